import numpy as np
import pytest
from pydantic import ValidationError

from workloads.arrivals import (
    ConstantArrivals,
    FixedLength,
    LogNormalLength,
    PoissonArrivals,
    UniformLength,
    build_requests,
)


def test_poisson_rate_and_exponential_gaps() -> None:
    times = np.array(list(PoissonArrivals().times(np.random.default_rng(1), 50.0, 200.0)))
    assert len(times) == pytest.approx(50 * 200, rel=0.03)
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # CV of an exponential is 1
    assert times.max() < 200.0


def test_constant_arrivals() -> None:
    times = list(ConstantArrivals().times(np.random.default_rng(0), 4.0, 2.0))
    assert times == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]


def test_lengths_respect_bounds() -> None:
    rng = np.random.default_rng(0)
    x = LogNormalLength(median=100, sigma=1.0, min=10, max=300).sample(rng, 10_000)
    assert x.min() >= 10 and x.max() <= 300
    assert np.median(x) == pytest.approx(100, rel=0.1)
    u = UniformLength(low=3, high=5).sample(rng, 1000)
    assert set(u.tolist()) == {3, 4, 5}
    assert FixedLength(value=7).sample(rng, 3).tolist() == [7, 7, 7]


def test_requests_are_seeded_and_independent_streams() -> None:
    a = build_requests(PoissonArrivals(), FixedLength(value=5).sample, UniformLength(low=1, high=9).sample, 10, 5, 42)
    b = build_requests(PoissonArrivals(), FixedLength(value=5).sample, UniformLength(low=1, high=9).sample, 10, 5, 42)
    c = build_requests(PoissonArrivals(), FixedLength(value=6).sample, UniformLength(low=1, high=9).sample, 10, 5, 42)
    assert a == b
    assert [r.t_s for r in a] == [r.t_s for r in c]  # a new prompt length leaves arrivals unchanged


def test_invalid_lengths_rejected() -> None:
    with pytest.raises(ValidationError):
        FixedLength(value=0)
    with pytest.raises(ValidationError, match="high"):
        UniformLength(low=5, high=2)
    with pytest.raises(ValidationError, match="max"):
        LogNormalLength(median=5, sigma=1, min=10, max=2)
