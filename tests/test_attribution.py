"""Per-request attribution closes on the metered total; steady-state energy per token."""

from __future__ import annotations

import math

import numpy as np
import pytest

from profilers.attribution import (
    Attributor,
    BatchSample,
    CostModel,
    Work,
    attribute_timeline,
    closure_error,
    steady_state,
)

COST = CostModel(prefill_j_per_token=0.02, decode_j_per_token=0.3)


def test_an_interval_is_split_by_modeled_cost() -> None:
    a = Attributor(COST)
    a.add_interval(10.0, [Work("a", prefill_tokens=100), Work("b", decode_tokens=10)])  # weights 2 : 3
    r = a.result
    assert r.prefill_j["a"] == pytest.approx(4.0) and r.decode_j["b"] == pytest.approx(6.0)
    assert r.closure_error() == pytest.approx(0.0)


def test_intervals_without_work_are_idle() -> None:
    a = Attributor(COST)
    a.add_interval(7.0, [])
    a.add_interval(3.0, [Work("a", decode_tokens=1)])
    assert a.result.idle_j == 7.0 and a.result.request_j("a") == 3.0 and a.result.metered_j == 10.0


def test_negative_interval_energy_is_refused() -> None:
    with pytest.raises(ValueError, match="drop counter resets"):
        Attributor(COST).add_interval(-1.0, [])


def test_costs_must_make_sense() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        CostModel(-1.0, 1.0)
    with pytest.raises(ValueError, match="positive"):
        CostModel(0.0, 0.0)


def test_closure_error_definition() -> None:
    assert closure_error(90.0, 9.0, 100.0) == pytest.approx(0.01)
    assert closure_error(0.0, 0.0, 0.0) == 0.0
    assert math.isinf(closure_error(1.0, 0.0, 0.0))


def test_timeline_closes_on_a_random_workload_and_drops_resets() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(0.0, 60.0, 0.1)
    energy = np.cumsum(rng.uniform(5.0, 70.0, t.size))
    energy[300:] -= energy[299] + 5.0  # a counter reset at t=30 s
    work = [Work(f"r{rng.integers(40)}", int(rng.integers(0, 3)) * 128, int(rng.integers(0, 2)),
                 float(rng.uniform(0, 60))) for _ in range(3000)]
    r = attribute_timeline(list(zip(t, energy, strict=True)), work, COST)
    assert r.dropped_intervals == 1
    assert r.metered_j == pytest.approx(float(np.diff(energy)[np.diff(energy) >= 0].sum()))
    assert r.closure_error() < 1e-9
    assert all(v >= 0 for v in r.per_request_j.values())


def test_steady_state_uses_only_full_batch_intervals() -> None:
    s = [
        BatchSample(0, 0, 0, 2, 8),      # ramp-up: not full
        BatchSample(1, 300, 20, 8, 8),
        BatchSample(2, 900, 220, 8, 8),  # full at both ends: 600 J, 200 tokens
        BatchSample(3, 1500, 420, 8, 8),  # full: 600 J, 200 tokens
        BatchSample(4, 1700, 450, 3, 8),  # draining: not counted
    ]
    ss = steady_state(s)
    assert ss is not None and ss.energy_j == 1200 and ss.output_tokens == 400 and ss.duration_s == 2
    assert ss.j_per_token == pytest.approx(3.0)
    assert steady_state(s[:2]) is None
