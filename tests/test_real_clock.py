"""The real clock: its sleep must not end before its deadline on any event loop the testbed runs."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import uvloop

from profilers.clock import RealClock


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_sleep_never_wakes_before_its_deadline(loop_factory) -> None:
    clock, rng = RealClock(), random.Random(7)

    async def earliest_wake() -> float:
        worst = float("inf")
        for _ in range(300):  # uvloop's whole-millisecond timers woke ~1 in 4 such sleeps early
            seconds = rng.uniform(0.0002, 0.004)
            start = time.monotonic()
            await clock.sleep(seconds)
            worst = min(worst, time.monotonic() - start - seconds)
        return worst

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        assert runner.run(earliest_wake()) >= 0.0


def test_sleep_of_zero_or_less_returns_without_waiting() -> None:
    clock = RealClock()
    start = time.monotonic()
    asyncio.run(clock.sleep(-1.0))
    assert time.monotonic() - start < 0.05
