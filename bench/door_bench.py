"""The front door under overload, with its default limits (``serving.config.DoorConfig``).

A door (``create_app`` under uvicorn with uvloop and the door's own protocol, in a child process) serves one emulated
engine in real time (``EmulatedEngineConfig`` defaults: an H100 running Llama-3.1-8B, batch cap 256) on 127.0.0.1.
This process then

1. opens N connections at once and sends a streamed completion on each (for every N given): how many the door
   admitted and how many got a 503 at its in-flight cap, the 99th percentile of the time to that 503 (send -> status
   line), and of the admitted requests' time to first token;
2. opens idle connections (never a byte sent) up to twice the connection cap while polling ``/health`` on a fresh
   connection every few milliseconds: the slowest /health answer, and how many idle connections the door closed
   to make room;
3. sends oversized bodies (``--attack-rounds`` rounds of 4 at once, half declaring ``--attack-mb`` MB in
   Content-Length, half chunked without end): the door's resident memory before and after.

Each stream run also reports the door process's CPU time per request (user + system, from /proc): on a host where
the client and the door share cores, the time to a 503 measured by the client includes waiting for a core (the
client's and the door's), which this figure does not. At the end, the door's refusals by reason, from /metrics.

    python bench/door_bench.py [--streams 500 3000] [--max-tokens 16] [--max-connections N] [--max-inflight N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import resource
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.config import DoorConfig  # noqa: E402
from serving.types import GenerationRequest, TokenEvent  # noqa: E402

MODEL = "llama-3.1-8b"


class EngineRouter:
    """The router's interface to the front door over one emulated engine in this process (no Ray)."""

    def __init__(self) -> None:
        from serving.config import EmulatedEngineConfig
        from serving.emulated.engine import EmulatedEngine

        self.engine = EmulatedEngine(EmulatedEngineConfig(model=MODEL), "r0")
        self.replicas = [SimpleNamespace(name="r0", alive=True, responsive=True)]  # what /health reports

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        async for event in self.engine.generate(request):
            yield event

    async def snapshot(self) -> object:
        from profilers.exporter import ExportSnapshot

        return ExportSnapshot()

    def routable(self) -> list[object]:
        return self.replicas


def serve(sock: socket.socket, limits: DoorConfig) -> None:
    import uvloop

    from deploy.serve import front_door_server
    from profilers.footprint import builtin_site_names, load_site_profile
    from serving.api import FrontDoor, create_app

    async def main() -> None:
        router = EngineRouter()
        await router.engine.start()
        door = FrontDoor(router, MODEL, 4096, load_site_profile(builtin_site_names()[0]), limits)  # type: ignore[arg-type]
        await front_door_server(create_app(door)).serve(sockets=[sock])

    uvloop.run(main())


def p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


async def one_stream(port: int, body: bytes, out: dict[str, list[float]]) -> None:
    """A streamed completion on a connection of its own: 'admitted' (TTFT), 'rejected' (time to the 503), 'failed'."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        out["failed"].append(0.0)
        return
    try:
        t0 = time.perf_counter()
        writer.write(body)
        status = await reader.readline()
        if status.startswith(b"HTTP/1.1 503"):
            out["rejected"].append(time.perf_counter() - t0)
            return
        if not status.startswith(b"HTTP/1.1 200"):
            out["failed"].append(time.perf_counter() - t0)
            return
        await reader.readuntil(b"data: ")  # the first event: the headers and the first chunk leave in one write
        out["admitted"].append(time.perf_counter() - t0)
        await reader.readuntil(b"data: [DONE]")
    except (OSError, asyncio.IncompleteReadError):
        out["failed"].append(0.0)
    finally:
        writer.close()


async def streams(port: int, n: int, max_tokens: int) -> dict[str, list[float]]:
    data = json.dumps({"model": MODEL, "prompt": "hello " * 32, "max_tokens": max_tokens, "stream": True}).encode()
    body = (b"POST /v1/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(data), data))
    out: dict[str, list[float]] = {"admitted": [], "rejected": [], "failed": []}
    await asyncio.gather(*(one_stream(port, body, out) for _ in range(n)))
    return out


async def health(port: int) -> tuple[float, bool]:
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        writer.write(b"GET /health HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
        status = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        return time.perf_counter() - t0, status.startswith(b"HTTP/1.1 200")
    except (OSError, TimeoutError):
        return time.perf_counter() - t0, False


async def flood(port: int, n: int, poll_s: float) -> dict[str, float]:
    """``n`` idle connections opened (in waves) while /health is polled; then how many the door closed."""
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    polls: list[tuple[float, bool]] = []
    stop = asyncio.Event()

    async def poll() -> None:
        while not stop.is_set():
            polls.append(await health(port))
            await asyncio.sleep(poll_s)

    poller = asyncio.create_task(poll())
    refused = 0
    for start in range(0, n, 256):
        results = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port)
                                         for _ in range(min(256, n - start))), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                refused += 1
            else:
                idle.append(r)
    await asyncio.sleep(0.5)  # polls at the cap
    stop.set()
    await poller
    closed = 0
    for reader, _ in idle:
        try:
            if await asyncio.wait_for(reader.read(1), 0.001) == b"":
                closed += 1
        except (TimeoutError, OSError):
            pass
    for _, writer in idle:
        writer.close()
    latencies = [t for t, _ in polls]
    return {"opened": len(idle), "refused": refused, "closed": closed, "polls": len(polls),
            "failed": sum(1 for _, ok in polls if not ok), "max_ms": max(latencies) * 1e3,
            "p99_ms": (p99(latencies) or 0.0) * 1e3}


def cpu_s(pid: int) -> float:
    """CPU time (user + system) of a process so far, seconds (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def refusals(port: int) -> dict[str, float]:
    """The door's ``llm_energy_door_refused_total`` by reason, from /metrics."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
    text = (await reader.read()).decode(errors="replace")
    writer.close()
    prefix = 'llm_energy_door_refused_total{reason="'
    return {line[len(prefix):].split('"')[0]: float(line.split()[-1])
            for line in text.splitlines() if line.startswith(prefix)}


def rss_mb(pid: int) -> float:
    """Resident memory of a process, MB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def oversized_body(port: int, size_mb: int, chunked: bool) -> str:
    """Send a body far over the limit until the door answers or closes; returns its status line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "transfer-encoding: chunked" if chunked else f"content-length: {size_mb * 2**20}"
    writer.write(f"POST /v1/completions HTTP/1.1\r\nhost: b\r\ncontent-type: application/json\r\n{head}\r\n\r\n"
                 .encode())
    block = b"x" * 2**20
    chunk = f"{len(block):x}\r\n".encode() + block + b"\r\n" if chunked else block
    answered = asyncio.ensure_future(reader.readline())
    with contextlib.suppress(ConnectionError):
        for _ in range(size_mb):
            if answered.done():  # the door has answered (and closes): stop sending
                break
            writer.write(chunk)
            await writer.drain()
    try:
        line = await asyncio.wait_for(answered, 30)
    except (ConnectionError, TimeoutError):
        line = b"(closed)"
    writer.close()
    return line.decode(errors="replace").strip()


async def attack(port: int, rounds: int, size_mb: int) -> list[str]:
    out = []
    for _ in range(rounds):
        out += await asyncio.gather(*(oversized_body(port, size_mb, chunked=i % 2 == 1) for i in range(4)))
    return out


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, nargs="+", default=[500, 3000], help="concurrent streams, one run each")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-connections", type=int, help="the door's max_connections (default: DoorConfig's)")
    p.add_argument("--max-inflight", type=int, help="the door's max_inflight_requests (default: twice the batch cap)")
    p.add_argument("--flood-factor", type=float, default=2.0, help="idle connections, as a multiple of the cap")
    p.add_argument("--poll-ms", type=float, default=10.0, help="pause between /health polls during the flood")
    p.add_argument("--attack-rounds", type=int, default=10, help="rounds of 4 oversized bodies")
    p.add_argument("--attack-mb", type=int, default=200, help="size of each oversized body, MB")
    args = p.parse_args()
    import uvloop

    from deploy.serve import bind_socket

    overrides = {"max_connections": args.max_connections, "max_inflight_requests": args.max_inflight}
    limits = DoorConfig(**{k: v for k, v in overrides.items() if v is not None}).resolved(256)  # one engine's batch
    n_flood = int(args.flood_factor * limits.max_connections)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max([*args.streams, n_flood]) + 256
    if soft < need:  # the client's own sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, need), hard))
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = multiprocessing.get_context("fork").Process(target=serve, args=(sock, limits), daemon=True)
    server.start()
    time.sleep(1.5)
    try:
        rows = []
        for n in args.streams:
            cpu0 = cpu_s(server.pid)  # type: ignore[arg-type]
            out = uvloop.run(streams(port, n, args.max_tokens))
            time.sleep(0.2)  # the door closes what the client closed
            rows.append((n, out, (cpu_s(server.pid) - cpu0) / n))  # type: ignore[arg-type]
        flooded = uvloop.run(flood(port, n_flood, args.poll_ms / 1e3))
        time.sleep(1.0)
        rss_before = rss_mb(server.pid)  # type: ignore[arg-type]
        statuses = uvloop.run(attack(port, args.attack_rounds, args.attack_mb))
        time.sleep(1.0)
        rss_after = rss_mb(server.pid)  # type: ignore[arg-type]
        refused = uvloop.run(refusals(port))
    finally:
        server.terminate()
        server.join(10)
    print(f"\nfront door with max_connections={limits.max_connections}, max_inflight_requests="
          f"{limits.max_inflight_requests}; one emulated engine ({MODEL} on h100_sxm, batch cap 256), "
          f"{args.max_tokens} tokens a request")
    print(f"{'streams':>8} {'admitted':>9} {'503':>6} {'failed':>7} {'time to 503 p99 ms':>19} "
          f"{'TTFT p99 (admitted) ms':>23} {'door CPU us/request':>20}")
    for n, out, cpu in rows:
        print(f"{n:>8} {len(out['admitted']):>9} {len(out['rejected']):>6} {len(out['failed']):>7} "
              f"{ms(p99(out['rejected'])):>19} {ms(p99(out['admitted'])):>23} {cpu * 1e6:>20.0f}")
    f = flooded
    print(f"\nidle flood: {f['opened']:.0f} idle connections opened ({f['refused']:.0f} refused), "
          f"{args.flood_factor:g}x the cap; {f['closed']:.0f} closed by the door to make room")
    print(f"/health during the flood: {f['polls']:.0f} polls, {f['failed']:.0f} failed, "
          f"p99 {f['p99_ms']:.1f} ms, max {f['max_ms']:.1f} ms")
    answers = {x: statuses.count(x) for x in sorted(set(statuses))}
    print(f"\noversized bodies: {len(statuses)} x {args.attack_mb} MB ({args.attack_rounds} rounds of 4, half "
          f"chunked); answers {answers}; door RSS {rss_before:.0f} MB before, {rss_after:.0f} MB after "
          f"({rss_after - rss_before:+.0f} MB)")
    print("door refusals (llm_energy_door_refused_total): "
          + (", ".join(f"{k} {v:.0f}" for k, v in refused.items()) or "none exported"))
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
