"""Clocks passed wherever time is read or slept, so the same code runs in real and virtual time."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic time line."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class RealClock:
    """Monotonic wall time; `sleep` yields to the event loop."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
