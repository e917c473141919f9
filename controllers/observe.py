"""Building the controller's observation: latency and load from the requests recently served, power and
knobs from the replicas' telemetry. The same code observes a real deployment and a virtual-time one."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from controllers.policies import Observation, percentile
from serving.api import FrontDoor, RecentRequests
from serving.replica import Telemetry


class Observer:
    """Observations of one deployment; energy per token is taken between consecutive observations."""

    def __init__(
        self,
        recent: RecentRequests,
        telemetry: Callable[[], Awaitable[list[Telemetry]]],
        now: Callable[[], float],
        percentile: float = 95.0,  # of recent TTFT and TPOT, the one the SLO names
    ) -> None:
        self.recent = recent
        self.percentile = percentile
        self.telemetry = telemetry
        self.now = now
        self._last: tuple[float, float] | None = None  # (device energy J, generated tokens)

    async def __call__(self) -> Observation:
        """Observe now: recent latency percentiles and arrival rate, replica power, knobs, and energy per new token."""
        now = self.now()
        rate, ttfts, tpots = self.recent.view(now)
        telemetry = await self.telemetry()
        readings = [rd for tel in telemetry for rd in tel.readings]
        energy = sum(rd.energy_j for rd in readings)
        tokens = float(sum(tel.stats.generated_tokens_total for tel in telemetry))
        per_token = new_tokens = None
        if self._last is not None and tokens > self._last[1] and energy >= self._last[0]:
            new_tokens = tokens - self._last[1]
            per_token = (energy - self._last[0]) / new_tokens
        self._last = (energy, tokens)
        clocks = [rd.clock_mhz for rd in readings if rd.clock_mhz is not None]
        seqs = [tel.stats.max_num_seqs for tel in telemetry]
        proposed = sum(tel.stats.spec_proposed_tokens for tel in telemetry)
        accepted = sum(tel.stats.spec_accepted_tokens for tel in telemetry)
        return Observation(
            t_s=now,
            arrival_rate_rps=rate,
            ttft_s=percentile(ttfts, self.percentile),
            tpot_s=percentile(tpots, self.percentile),
            completed=len(ttfts),
            power_w=sum(rd.power_w for rd in readings),
            energy_per_token_j=per_token,
            running=sum(tel.stats.running for tel in telemetry),
            waiting=sum(tel.stats.waiting for tel in telemetry),
            clock_mhz=max(clocks) if clocks else None,
            max_num_seqs=max(seqs) if seqs else None,
            supported_clocks_mhz=tuple(sorted(set().union(*(tel.supported_clocks_mhz for tel in telemetry)))),
            spec_acceptance=accepted / proposed if proposed else None,
            tokens=new_tokens,
        )


def front_door_observer(door: FrontDoor, percentile: float = 95.0) -> Observer:
    """An observer of a front door's recent requests and its replicas' telemetry, on the door's perf-counter clock."""
    async def telemetry() -> list[Telemetry]:
        return [tel for _, tel in await door.router.telemetry()]

    return Observer(door.recent, telemetry, time.perf_counter, percentile)
