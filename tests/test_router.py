"""Routing around dead replicas with real Ray actors."""

import asyncio

import pytest
import ray

from deploy.serve import start_deployment
from serving.config import EmulatedEngineConfig, ServingConfig
from serving.router import NoReplicaError, ReplicaFailedError
from serving.types import GenerationRequest

pytestmark = pytest.mark.slow


def cfg(replicas: int = 2) -> ServingConfig:
    return ServingConfig(replicas=replicas, engine=EmulatedEngineConfig(model="qwen2.5-0.5b", max_model_len=1024))


async def run(router, rid: str, tokens: int = 5) -> int:
    n = 0
    async for ev in router.stream(GenerationRequest(rid, prompt="a b c", max_tokens=tokens)):
        n += len(ev.token_ids)
    return n


async def test_requests_spread_and_survive_a_killed_replica(ray_local) -> None:
    dep = await start_deployment(cfg())
    try:
        router = dep.router
        assert await asyncio.gather(*(run(router, f"a{i}") for i in range(4))) == [5] * 4
        assert {r.routed for r in router.replicas} == {2}  # light load still spreads over both
        victim = router.replicas[0]
        ray.kill(victim.actor, no_restart=True)
        # The router learns of the death on the next request it sends there and retries on the other replica.
        results = await asyncio.gather(*(run(router, f"b{i}") for i in range(6)))
        assert results == [5] * 6
        assert not victim.alive and router.replicas[1].alive
        snap = await router.snapshot()
        assert {d.replica for d in snap.devices} == {"replica-1"}
    finally:
        await dep.stop()


async def test_death_mid_stream_is_reported_not_hidden(ray_local) -> None:
    dep = await start_deployment(cfg(replicas=1))
    try:
        router = dep.router
        stream = router.stream(GenerationRequest("long", prompt="a b", max_tokens=1000))
        first = await anext(stream)
        assert first.token_ids
        ray.kill(router.replicas[0].actor, no_restart=True)
        with pytest.raises(ReplicaFailedError, match="died after streaming part of the response"):
            async for _ in stream:
                pass
        with pytest.raises(NoReplicaError, match="no live replica"):
            await run(router, "after")
    finally:
        await dep.stop()
