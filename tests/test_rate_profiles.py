"""Time-varying arrivals (ramp, diurnal, piecewise): the empirical rate follows the profile (statistically)."""

import numpy as np
import pytest
from pydantic import ValidationError

from workloads.arrivals import DiurnalArrivals, PiecewiseArrivals, RampArrivals
from workloads.spec import WorkloadSpec

PROFILES = [
    RampArrivals(start=0.2, end=1.8),
    RampArrivals(start=1.0, end=0.0),
    DiurnalArrivals(period_s=40.0, amplitude=0.8, phase=0.25),
    DiurnalArrivals(period_s=70.0, amplitude=0.5),  # 100 s is not a whole number of cycles
    PiecewiseArrivals(points=[(0, 1), (30, 4), (50, 0), (80, 2)]),
]


def _counts(profile, rate: float, duration: float, seed: int, bins: int):  # type: ignore[no-untyped-def]
    times = np.array(list(profile.times(np.random.default_rng(seed), rate, duration)))
    edges = np.linspace(0, duration, bins + 1)
    counts, _ = np.histogram(times, edges)
    # Expected count per bin: the integral of the intensity over the bin (fine trapezoid).
    fine = np.linspace(0, duration, bins * 200 + 1)
    lam = profile.rate_at(fine, rate, duration)
    cum = np.concatenate([[0.0], np.cumsum((lam[1:] + lam[:-1]) / 2 * np.diff(fine))])
    expected = np.diff(cum[:: 200])
    return times, counts, expected


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: f"{p.kind}")
def test_empirical_rate_follows_the_profile(profile) -> None:  # type: ignore[no-untyped-def]
    rate, duration, bins = 200.0, 100.0, 50
    times, counts, expected = _counts(profile, rate, duration, seed=7, bins=bins)
    # The sweep's rate is the mean rate over the point.
    assert expected.sum() == pytest.approx(rate * duration, rel=1e-6)
    assert len(times) == pytest.approx(rate * duration, abs=5 * np.sqrt(rate * duration))
    assert np.all(np.diff(times) > 0) and times.min() >= 0 and times.max() < duration
    # Bin counts of a Poisson process: Pearson's statistic is chi-square with `bins` degrees of freedom
    # (mean 50, sd 10); a wrong shape (e.g. a flat rate) gives thousands, an over-regular process far less.
    live = expected > 0
    assert np.all(counts[~live] == 0)
    chi2 = float(np.sum((counts[live] - expected[live]) ** 2 / expected[live]))
    k = int(live.sum())
    assert k - 4.5 * np.sqrt(2 * k) < chi2 < k + 5 * np.sqrt(2 * k), chi2


def test_a_flat_rate_would_fail_the_profile_check() -> None:
    """The statistical check has teeth: homogeneous arrivals at the same mean do not pass as a ramp."""
    from workloads.arrivals import PoissonArrivals

    ramp = RampArrivals(start=0.2, end=1.8)
    _, _, expected = _counts(ramp, 200.0, 100.0, seed=7, bins=50)
    flat = np.array(list(PoissonArrivals().times(np.random.default_rng(7), 200.0, 100.0)))
    counts, _ = np.histogram(flat, np.linspace(0, 100, 51))
    assert float(np.sum((counts - expected) ** 2 / expected)) > 1000


def test_gaps_are_exponential_where_the_rate_is_flat() -> None:
    """A piecewise-constant stretch is a homogeneous Poisson process: gap CV 1, not a regular grid."""
    p = PiecewiseArrivals(points=[(0, 1), (100, 1)])
    times = np.array(list(p.times(np.random.default_rng(3), 100.0, 100.0)))
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(0.01, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)


def test_seeded_and_the_mean_is_the_sweep_rate_for_partial_cycles() -> None:
    d = DiurnalArrivals(period_s=30.0, amplitude=0.9, phase=0.1)
    a = list(d.times(np.random.default_rng(5), 20.0, 50.0))
    assert a == list(d.times(np.random.default_rng(5), 20.0, 50.0))
    assert a != list(d.times(np.random.default_rng(6), 20.0, 50.0))
    grid = np.linspace(0, 50.0, 500_001)
    assert np.trapezoid(d.rate_at(grid, 20.0, 50.0), grid) / 50.0 == pytest.approx(20.0, rel=1e-6)
    # Peak and trough of the sinusoid around the mean.
    assert d.rate_at(np.array([(0.25 - 0.1) * 30.0]), 20.0, 50.0)[0] > d.rate_at(np.array([0.0]), 20.0, 50.0)[0]


def test_piecewise_holds_the_last_level_and_interpolates() -> None:
    p = PiecewiseArrivals(points=[(0, 0), (10, 2)])
    # Over 20 s: mean level (1 * 10 + 2 * 10) / 20 = 1.5.
    assert p.shape_mean(20.0) == pytest.approx(1.5)
    assert p.rate_at(np.array([0.0, 5.0, 15.0]), 3.0, 20.0).tolist() == pytest.approx([0.0, 2.0, 4.0])
    # A point shorter than the profile only counts the part it covers.
    assert p.shape_mean(5.0) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("arrival", "message"),
    [
        ({"kind": "ramp", "start": 0, "end": 0}, "ramp start and end are both 0"),
        ({"kind": "ramp", "start": -1, "end": 1}, "arrival.ramp.start"),
        ({"kind": "diurnal", "period_s": 0}, "arrival.diurnal.period_s"),
        ({"kind": "diurnal", "period_s": 60, "amplitude": 1.5}, "arrival.diurnal.amplitude"),
        ({"kind": "piecewise", "points": []}, "arrival.piecewise.points"),
        ({"kind": "piecewise", "points": [[5, 1], [10, 2]]}, "must start at t = 0 (first point is at t = 5)"),
        ({"kind": "piecewise", "points": [[0, 1], [10, 2], [10, 3]]}, "point 2 (t = 10) is not after point 1"),
        ({"kind": "piecewise", "points": [[0, 1], [10, -2]]}, "point 1 (t = 10) has rate level -2"),
        ({"kind": "piecewise", "points": [[0, 0], [10, 0]]}, "every piecewise rate level is 0"),
        ({"kind": "piecewise", "points": [[0, 0], [100, 0], [110, 1]]}, "rate is 0 throughout the point's 20 s"),
        ({"kind": "sawtooth"}, "does not match any of the expected tags"),
    ],
)
def test_invalid_profiles_say_what_is_wrong(arrival, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValidationError) as err:
        WorkloadSpec.model_validate({"arrival": arrival, "duration_s": 20})
    assert message in str(err.value)
