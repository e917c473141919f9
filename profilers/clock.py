"""Clocks passed wherever time is read or slept, so the same code runs in real and virtual time."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """A monotonic clock to read and sleep on: real time, or a virtual clock in simulated runs."""

    def now(self) -> float:
        """Seconds on a monotonic time line."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` on this clock's time line."""


class RealClock:
    """Monotonic wall time; `sleep` yields to the event loop and never returns before its deadline."""

    def now(self) -> float:
        """``time.monotonic()`` in seconds."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` of real time, never waking before the deadline (uvloop wakes timers early)."""
        deadline = time.monotonic() + seconds
        await asyncio.sleep(max(0.0, seconds))
        # uvloop rounds timers to whole milliseconds against a cached loop time and wakes up to ~1.3 ms
        # early; an emulated iteration that ended before its modeled end would emit tokens too soon.
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(left)
