"""Replicas spread over the nodes of Ray's own multi-node test cluster; one node is removed while requests
stream. Run as a script (its own Ray, apart from the test session's): prints one JSON line of outcomes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


async def scenario(n_inflight: int, n_after: int, model: str | None = None) -> dict[str, object]:
    import ray
    from ray.cluster_utils import Cluster

    from deploy.raycluster import ray_env
    from deploy.serve import start_deployment
    from serving.config import EmulatedEngineConfig, ServingConfig, VLLMEngineConfig
    from serving.router import NoReplicaError, ReplicaFailedError
    from serving.types import GenerationRequest

    ray_env()  # the nodes below share one token: the cluster runs with Ray's token authentication, as ours do
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    config = ServingConfig(
        replicas=3,
        ray_address=cluster.address,
        placement="strict_spread",
        num_cpus_per_replica=1,
        engine=EmulatedEngineConfig(max_model_len=1024) if model is None else VLLMEngineConfig(
            model=model, max_model_len=512, max_num_seqs=16, kv_cache_memory_bytes=16 << 20
        ),
    )
    deployment = await start_deployment(config)
    try:
        placed = {i["replica"]: i["node_id"] for i in deployment.replica_info}
        router = deployment.router

        async def one(rid: str, max_tokens: int, started: asyncio.Event | None = None) -> dict[str, object]:
            last = None
            request = GenerationRequest(rid, prompt="a b c", max_tokens=max_tokens, ignore_eos=True, temperature=0)
            try:
                async for ev in router.stream(request):
                    last = ev
                    if started is not None:
                        started.set()
                assert last is not None and last.finished
                return {"id": rid, "status": "ok", "replica": last.replica, "tokens": last.output_tokens}
            except (ReplicaFailedError, NoReplicaError) as e:
                return {
                    "id": rid,
                    "status": "failed",
                    "error": f"{type(e).__name__}: {e}",
                    "cause": type(e.__cause__).__name__,
                }

        started = [asyncio.Event() for _ in range(n_inflight)]
        inflight = [asyncio.create_task(one(f"in-{i}", 400, started[i])) for i in range(n_inflight)]
        await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 180)  # every stream is under way
        victim = next(w for w in workers if w.node_id == placed["replica-0"])
        t0 = time.perf_counter()
        await asyncio.to_thread(cluster.remove_node, victim)
        removed_s = time.perf_counter() - t0
        results = await asyncio.gather(*inflight)
        alive_after_first = {r.name: r.alive for r in router.replicas}
        # Second removal while idle: the router has not noticed yet, so the first request routed to the dead
        # replica fails before any token and is retried on a live one (invisible to the client).
        victim = next(w for w in workers if w.node_id == placed["replica-1"])
        await asyncio.to_thread(cluster.remove_node, victim)
        t0 = time.perf_counter()
        after = await asyncio.gather(*(one(f"after-{i}", 20) for i in range(n_after)))
        return {
            "placed": placed,
            "distinct_nodes": len(set(placed.values())),
            "removed_s": removed_s,
            "inflight": results,
            "alive_after_first": alive_after_first,
            "after": after,
            "after_s": time.perf_counter() - t0,
            "alive": {r.name: r.alive for r in router.replicas},
        }
    finally:
        await deployment.stop()
        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    model = sys.argv[3] if len(sys.argv) > 3 else None  # a checkpoint directory: vLLM engines instead of emulated
    out = asyncio.run(scenario(int(sys.argv[1]), int(sys.argv[2]), model))
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
