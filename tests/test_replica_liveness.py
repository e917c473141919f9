"""A replica that stops answering (SIGSTOP) or dies (kill -9) mid-stream: its requests end with a reason within
the deadline, new ones go elsewhere, /health and /metrics say so, and the energy it used is kept."""

import asyncio
import os
import signal
import time

import httpx
import pytest

from deploy.serve import start_deployment
from serving.api import create_app
from serving.config import EmulatedEngineConfig, ServingConfig
from serving.router import NoReplicaError, ReplicaFailedError
from serving.types import GenerationRequest

DEADLINE_S = 2.0


def config() -> ServingConfig:
    return ServingConfig(replicas=2, heartbeat_s=0.25, replica_deadline_s=DEADLINE_S,
                         engine=EmulatedEngineConfig(model="llama-3.1-8b", max_model_len=4096))


async def consume(router, rid: str, tokens: int) -> tuple[str, str, float]:  # type: ignore[no-untyped-def]
    """(replica, outcome, seconds): ``ok`` or the error's message."""
    replica, t0 = "", time.monotonic()
    try:
        async for ev in router.stream(GenerationRequest(rid, prompt="a b c", max_tokens=tokens)):
            replica = ev.replica
        return replica, "ok", time.monotonic() - t0
    except (ReplicaFailedError, NoReplicaError) as e:
        return replica, str(e), time.monotonic() - t0


def devices(snapshot, replica: str) -> dict[str, float]:  # type: ignore[no-untyped-def]
    return {d.device: d.energy_j for d in snapshot.devices if d.replica == replica}


@pytest.mark.slow
async def test_a_stopped_replica_is_routed_around_its_requests_end_and_it_comes_back(ray_local) -> None:
    dep = await start_deployment(config())
    try:
        router, pid = dep.router, {i["replica"]: i["pid"] for i in dep.replica_info}
        streams = [asyncio.ensure_future(consume(router, f"long-{i}", 3000)) for i in range(4)]
        await asyncio.sleep(1.0)
        before = devices(await router.snapshot(), "replica-1")
        os.kill(pid["replica-1"], signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            await asyncio.sleep(DEADLINE_S + 1.5)
            assert [r.name for r in router.routable()] == ["replica-0"]
            snap = await router.snapshot()
            up = {r.replica: r.up for r in snap.replicas}
            assert up == {"replica-0": True, "replica-1": False}
            assert devices(snap, "replica-1").keys() == before.keys()  # its counters stay, frozen
            assert all(devices(snap, "replica-1")[d] >= e for d, e in before.items())
            transport = httpx.ASGITransport(app=create_app(dep.door))
            async with httpx.AsyncClient(transport=transport, base_url="http://door") as http:
                health = (await http.get("/health")).json()
                metrics = (await http.get("/metrics")).text
            assert health == {"status": "degraded", "replicas": {"replica-0": "up", "replica-1": "not answering"}}
            assert 'llm_energy_replica_up{backend="emulated",replica="replica-1"} 0.0' in metrics
            fresh = await asyncio.gather(*(consume(router, f"new-{i}", 5) for i in range(4)))
            assert all(rep == "replica-0" and out == "ok" for rep, out, _ in fresh), fresh
        finally:
            os.kill(pid["replica-1"], signal.SIGCONT)
        done = await asyncio.wait_for(asyncio.gather(*streams), 60)
        ended = [(rep, out) for rep, out, t in done if rep == "replica-1"]
        assert ended and all("stopped answering" in out for _, out in ended), done
        assert all(t < (stopped_at - time.monotonic()) + 60 for *_, t in done)
        for _ in range(40):  # answering again: routed to again
            if len(router.routable()) == 2:
                break
            await asyncio.sleep(0.25)
        assert len(router.routable()) == 2
    finally:
        await dep.stop()


@pytest.mark.slow
async def test_a_killed_replicas_energy_up_to_its_death_stays_in_the_snapshot(ray_local) -> None:
    dep = await start_deployment(config())
    try:
        router, pid = dep.router, {i["replica"]: i["pid"] for i in dep.replica_info}
        streams = [asyncio.ensure_future(consume(router, f"long-{i}", 3000)) for i in range(4)]
        await asyncio.sleep(1.5)
        before = devices(await router.snapshot(), "replica-1")
        assert before and all(e > 0 for e in before.values())
        os.kill(pid["replica-1"], signal.SIGKILL)
        done = await asyncio.wait_for(asyncio.gather(*streams), 60)
        assert all(out == "ok" or "died" in out for _, out, _ in done), done
        snap = await router.snapshot()
        assert {r.replica: r.up for r in snap.replicas} == {"replica-0": True, "replica-1": False}
        after = devices(snap, "replica-1")
        assert after.keys() == before.keys() and all(after[d] >= before[d] for d in before)
        assert (await consume(router, "after", 5))[:2] == ("replica-0", "ok")
    finally:
        await dep.stop()
