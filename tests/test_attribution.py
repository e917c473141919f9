"""The one energy split both engines use: in proportion to modeled cost, closing on the energy split."""

from __future__ import annotations

import numpy as np
import pytest

from profilers.attribution import split


def test_energy_is_split_in_proportion_to_the_weights() -> None:
    assert split(10.0, [2.0, 3.0]) == pytest.approx([4.0, 6.0])
    assert split(7.0, [1]) == [7.0]


def test_the_shares_close_on_the_energy() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        weights = list(rng.integers(1, 4096, size=int(rng.integers(1, 64))))
        energy = float(rng.uniform(0.0, 1e4))
        assert sum(split(energy, weights)) == pytest.approx(energy, rel=1e-12)


def test_the_emulated_iteration_shares_use_it() -> None:
    """An iteration's shares: each sequence its own work, the shared energy by tokens processed."""
    from serving.emulated.physics import load_device, load_model_shape, step_cost

    cost = step_cost(load_device("h100_sxm"), load_model_shape("llama-3.1-8b"), [(256, 0), (1, 300), (1, 900)], 1980)
    assert sum(cost.shares_j) == pytest.approx(cost.energy_j, rel=1e-12)
    assert cost.shares_j[0] > cost.shares_j[2] > cost.shares_j[1]  # prefill; the longer context reads more KV
