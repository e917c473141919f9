"""The sampling thread: pacing, bounded history, power integration, and death that is reported."""

from __future__ import annotations

import time

import pytest

from profilers.errors import SamplerDiedError
from profilers.sampler import PowerIntegrator, Sampler
from profilers.types import DeviceInfo, PowerReading, Provenance


class ScriptedSource:
    """Power 100 W on one device; fails on the reads listed in ``fail_on`` (1-based)."""

    def __init__(self, fail_on: set[int] | None = None) -> None:
        self.calls = 0
        self.fail_on = fail_on or set()

    def devices(self) -> list[DeviceInfo]:
        return [DeviceInfo("d0", "scripted", "test", "integrated")]

    def read(self) -> list[PowerReading]:
        self.calls += 1
        if self.calls in self.fail_on:
            raise OSError(f"read {self.calls} failed")
        return [PowerReading(time.monotonic(), "d0", -1.0, 100.0, None, Provenance.MEASURED)]


def wait_for(predicate, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_integrator_is_trapezoidal_and_ignores_out_of_order_samples() -> None:
    integ = PowerIntegrator()
    assert integ.add("a", 0.0, 100.0) == 0.0
    assert integ.add("a", 2.0, 300.0) == pytest.approx(400.0)
    assert integ.add("a", 1.0, 999.0) == pytest.approx(400.0)  # late sample: no energy, no negative
    assert integ.add("a", 3.0, 300.0) == pytest.approx(700.0)


def test_sampler_integrates_and_bounds_its_history() -> None:
    src = ScriptedSource()
    with Sampler(src, hz=50, history=8, integrate={"d0"}) as s:
        wait_for(lambda: s.status().samples >= 12)
        hist = s.history("d0")
        latest = s.latest()[0]
    assert len(hist) == 8
    assert latest == hist[-1]
    # Exact: constant power integrates to power x the span between two samples.
    assert [r.energy_j for r in hist] == sorted(r.energy_j for r in hist)
    assert hist[-1].energy_j - hist[0].energy_j == pytest.approx(100.0 * (hist[-1].t_s - hist[0].t_s))


def test_a_few_errors_are_counted_and_survived() -> None:
    src = ScriptedSource(fail_on={3, 4})
    with Sampler(src, hz=50, max_consecutive_errors=3) as s:
        wait_for(lambda: s.status().samples >= 6)
        st = s.status()
    assert st.errors_total == 2 and st.last_error == "OSError: read 4 failed"
    assert st.samples >= 6


def test_a_sampler_that_dies_says_so() -> None:
    src = ScriptedSource(fail_on=set(range(2, 10_000)))
    s = Sampler(src, hz=50, max_consecutive_errors=3).start()
    wait_for(lambda: not s.status().alive)
    st = s.status()
    assert st.errors_total == 3
    with pytest.raises(SamplerDiedError, match=r"stopped after 3 errors .*read 4 failed"):
        s.latest()
    s.stop()


def test_a_broken_source_fails_at_start_in_the_caller() -> None:
    with pytest.raises(OSError, match="read 1 failed"):
        Sampler(ScriptedSource(fail_on={1})).start()


def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Sampler(ScriptedSource(), hz=0)
