"""The virtual target makes each open-loop request when its send time comes: a long window holds only the requests
in flight, and events (also those due at the same instant as an arrival) fire in the order they did when every
request's task was made at the start of the point."""

from __future__ import annotations

import asyncio
import gc
import random

import pytest

from deploy.config import PathLatency
from deploy.virtual import VirtualTarget
from serving.config import EmulatedEngineConfig, ServingConfig
from workloads.arrivals import RequestSpec
from workloads.client import RequestRecord


def _target(replicas: int = 2, latency: PathLatency | None = None) -> VirtualTarget:
    return VirtualTarget(ServingConfig(replicas=replicas, engine=EmulatedEngineConfig(max_model_len=4096)),
                         latency=latency or PathLatency())


def test_a_long_schedule_holds_only_the_requests_in_flight() -> None:
    """4,000 short requests over 400 s, a few in flight at a time: mid-point, neither their records nor their
    tasks exist for the requests not sent yet, nor (with ``keep_records=False``) for those already written."""
    target = _target(1)
    work = [RequestSpec(0.1 * i, 16, 4) for i in range(4000)]
    seen: list[tuple[int, int]] = []
    done: list[int] = []

    async def look() -> None:
        for t in (100.0, 200.0, 300.0):
            await target.clock.sleep_until(t)
            gc.collect()
            records = sum(isinstance(o, RequestRecord) for o in gc.get_objects())
            seen.append((records, len(asyncio.all_tasks())))

    async def go() -> list[RequestRecord]:
        await target.start()
        looking = asyncio.ensure_future(look())
        records = await target.send(0, work, 0, lambda r: done.append(r.request_index), lambda t: None,
                                    keep_records=False)
        await looking
        await target.stop()
        return records

    assert target.clock.execute(go()) == []
    assert sorted(done) == list(range(len(work)))
    assert len(seen) == 3
    for records, tasks in seen:
        assert records < 50, seen  # every request made up front: ~3,000 records still to send
        assert tasks < 50, seen


def _run(work: list[RequestSpec], eager: bool, latency: PathLatency) -> tuple[list[str], list[tuple]]:
    """``work`` on 2 replicas, with a looker reading the engines at whole seconds (when arrivals are due too); eager:
    every request's task made at the start, each sleeping until its send time (the target before it made them
    lazily)."""
    target = _target(2, latency)
    reads: list[tuple] = []

    async def look() -> None:
        for t in range(1, 40):
            await target.clock.sleep_until(float(t))
            for e in target.engines:
                st = e.stats()
                reads.append((t, st.running, st.waiting, st.generated_tokens_total, st.kv_used_tokens, st.iterations))

    async def send_eagerly() -> list[RequestRecord]:
        start = target.clock.now()
        records = [RequestRecord(0, i, s.t_s, s.prompt_tokens, s.max_output_tokens) for i, s in enumerate(work)]
        await asyncio.gather(*(target._exchange(r, start) for r in records))
        return records

    async def go() -> list[RequestRecord]:
        await target.start()
        looking = asyncio.ensure_future(look())
        if eager:
            records = await send_eagerly()
        else:
            records = await target.send(0, work, 0, lambda r: None, lambda t: None)
        await looking
        await target.stop()
        return records

    return [repr(r) for r in target.clock.execute(go())], reads


@pytest.mark.parametrize("path_s", [0.0, 0.0013])
@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lazy_requests_fire_in_the_eager_order(seed: int, ordered: bool, path_s: float) -> None:
    """Arrivals at 0 and on whole seconds (several at once, as a looker wakes), in send-time order or not, with no
    path latency (an arrival reaches an engine at its send time) or the default: the same records (token times,
    replicas, energy) and the same engine readings as making every task up front."""
    latency = PathLatency(request_latency_s=path_s, response_latency_s=path_s)
    rng = random.Random(seed)
    work = [RequestSpec(float(rng.choice([0, *range(1, 30)])) if rng.random() < 0.6 else rng.uniform(0, 30),
                        rng.randint(1, 1500), rng.randint(1, 300)) for _ in range(150)]
    if ordered:
        work.sort(key=lambda s: s.t_s)
    lazy = _run(work, False, latency)
    assert lazy == _run(work, True, latency)
    assert len(lazy[0]) == 150
