"""Building the controller's observation from the front door (latency, load) and the replicas (power, knobs)."""

from __future__ import annotations

import time

from controllers.policies import Observation, percentile
from serving.api import FrontDoor


async def observe_front_door(door: FrontDoor) -> Observation:
    now = time.perf_counter()
    rate, ttfts, tpots = door.recent.view(now)
    telemetry = await door.router.telemetry()
    power = sum(rd.power_w for _, tel in telemetry for rd in tel.readings)
    clocks = [rd.clock_mhz for _, tel in telemetry for rd in tel.readings if rd.clock_mhz is not None]
    supported = sorted({c for _, tel in telemetry for c in tel.supported_clocks_mhz})
    seqs = [tel.stats.max_num_seqs for _, tel in telemetry]
    return Observation(
        t_s=now,
        arrival_rate_rps=rate,
        ttft_p95_s=percentile(ttfts, 95),
        tpot_p95_s=percentile(tpots, 95),
        completed=len(ttfts),
        power_w=power,
        energy_per_token_j=None,
        running=sum(tel.stats.running for _, tel in telemetry),
        waiting=sum(tel.stats.waiting for _, tel in telemetry),
        clock_mhz=max(clocks) if clocks else None,
        max_num_seqs=max(seqs) if seqs else None,
        supported_clocks_mhz=tuple(supported),
    )
