"""Building the controller's observation from the front door (latency, load) and the replicas (power, knobs)."""

from __future__ import annotations

import time

from controllers.policies import Observation, percentile
from serving.api import FrontDoor


class FrontDoorObserver:
    """Observations of one deployment; energy per token is taken between consecutive observations."""

    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self._last: tuple[float, float] | None = None  # (device energy J, generated tokens)

    async def __call__(self) -> Observation:
        now = time.perf_counter()
        rate, ttfts, tpots = self.door.recent.view(now)
        telemetry = await self.door.router.telemetry()
        readings = [rd for _, tel in telemetry for rd in tel.readings]
        energy = sum(rd.energy_j for rd in readings)
        tokens = float(sum(tel.stats.generated_tokens_total for _, tel in telemetry))
        per_token = None
        if self._last is not None and tokens > self._last[1] and energy >= self._last[0]:
            per_token = (energy - self._last[0]) / (tokens - self._last[1])
        self._last = (energy, tokens)
        clocks = [rd.clock_mhz for rd in readings if rd.clock_mhz is not None]
        seqs = [tel.stats.max_num_seqs for _, tel in telemetry]
        return Observation(
            t_s=now,
            arrival_rate_rps=rate,
            ttft_p95_s=percentile(ttfts, 95),
            tpot_p95_s=percentile(tpots, 95),
            completed=len(ttfts),
            power_w=sum(rd.power_w for rd in readings),
            energy_per_token_j=per_token,
            running=sum(tel.stats.running for _, tel in telemetry),
            waiting=sum(tel.stats.waiting for _, tel in telemetry),
            clock_mhz=max(clocks) if clocks else None,
            max_num_seqs=max(seqs) if seqs else None,
            supported_clocks_mhz=tuple(sorted({c for _, tel in telemetry for c in tel.supported_clocks_mhz})),
        )
