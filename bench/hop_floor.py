"""What one process crossing costs on this host: the floor under every hop of the serving path.

A request's first token crosses processes on its way: client -> front door -> replica actor -> (engine) -> replica
actor -> front door -> client. ``bench/vllm_overhead.py``'s ``direct`` path crosses none of the four outer ones,
``router`` two, ``http`` four. This bench times a round trip of one small frame (the replica channel's framing: a
length-prefixed JSON request one way, a pickled event batch back) between two processes, so the added latency
measured there can be read against what the host charges for a crossing:
  uvloop     two plain processes on uvloop (asyncio streams, as the channel's two ends)
  protocol   the same with both ends as ``asyncio.Protocol`` parsing frames in ``data_received`` (no stream reader,
             no task wake-up per frame): what the streams' machinery costs on top of the wake-up
  ray actor  the server end inside a Ray async actor (uvloop on the actor's event-loop thread), as a replica
  blocking   two processes with blocking sockets: the kernel's and the hypervisor's part alone
each back to back and with an idle gap between frames (the processes sleep in epoll between requests, as they do
at the request rates the overhead bench runs). Half a round trip is one crossing.

    python bench/hop_floor.py [--frames 600] [--gaps-ms 0 1 5 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import pickle
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.types import TokenEvent

REQUEST = json.dumps({"submit": {"request_id": "cmpl-" + "0" * 32, "prompt": "the time of the man", "max_tokens": 32,
                                 "temperature": 0, "ignore_eos": True}}).encode()
EVENTS = [TokenEvent("cmpl-" + "0" * 32, "replica-0", " the", [279], 0, prompt_tokens=12, output_tokens=1,
                     energy_j=0.01, provenance="modeled")]


async def _serve_frames(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            size = int.from_bytes(await reader.readexactly(4), "big")
            json.loads(await reader.readexactly(size))
            data = pickle.dumps(EVENTS, protocol=pickle.HIGHEST_PROTOCOL)
            writer.write(len(data).to_bytes(4, "big") + data)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def _start_server() -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(_serve_frames, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _uvloop_server(ports: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    import uvloop

    async def main() -> None:
        server, port = await _start_server()
        ports.put(port)
        await server.serve_forever()

    uvloop.run(main())


class _FrameProtocol(asyncio.Protocol):
    """Length-prefixed frames handed to ``on_frame`` from ``data_received``."""

    def __init__(self, on_frame: Callable[[asyncio.Transport, bytes], None]) -> None:
        self.buffer = bytearray()
        self.on_frame = on_frame
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 4:
            size = int.from_bytes(self.buffer[:4], "big")
            if len(self.buffer) < 4 + size:
                return
            frame = bytes(self.buffer[4 : 4 + size])
            del self.buffer[: 4 + size]
            assert self.transport is not None
            self.on_frame(self.transport, frame)


def _answer_frame(transport: asyncio.Transport, frame: bytes) -> None:
    json.loads(frame)
    data = pickle.dumps(EVENTS, protocol=pickle.HIGHEST_PROTOCOL)
    transport.write(len(data).to_bytes(4, "big") + data)


def _protocol_server(ports: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    import uvloop

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(
            lambda: _FrameProtocol(_answer_frame), "127.0.0.1", 0
        )
        ports.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    uvloop.run(main())


async def _protocol_round_trips(port: int, frames: int, gap_s: float) -> list[float]:
    answers: asyncio.Queue[object] = asyncio.Queue()
    transport, _ = await asyncio.get_running_loop().create_connection(
        lambda: _FrameProtocol(lambda _, frame: answers.put_nowait(pickle.loads(frame))), "127.0.0.1", port
    )
    out = []
    for _ in range(frames):
        t0 = time.perf_counter()
        transport.write(len(REQUEST).to_bytes(4, "big") + REQUEST)
        await answers.get()
        out.append(time.perf_counter() - t0)
        if gap_s:
            await asyncio.sleep(gap_s)
    transport.close()
    return out


def _blocking_server(sock: socket.socket) -> None:
    conn, _ = sock.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(65536):
        conn.sendall(data)


class FrameServer:
    """The server end as a Ray async actor."""

    async def start(self) -> int:
        self.server, port = await _start_server()
        return port


async def _round_trips(port: int, frames: int, gap_s: float) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    for _ in range(frames):
        t0 = time.perf_counter()
        writer.write(len(REQUEST).to_bytes(4, "big") + REQUEST)
        size = int.from_bytes(await reader.readexactly(4), "big")
        pickle.loads(await reader.readexactly(size))
        out.append(time.perf_counter() - t0)
        if gap_s:
            await asyncio.sleep(gap_s)
    writer.close()
    return out


def _blocking_round_trips(port: int, frames: int, gap_s: float) -> list[float]:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        out = []
        for _ in range(frames):
            t0 = time.perf_counter()
            conn.sendall(REQUEST)
            got = 0
            while got < len(REQUEST):
                got += len(conn.recv(65536))
            out.append(time.perf_counter() - t0)
            if gap_s:
                time.sleep(gap_s)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=600)
    p.add_argument("--gaps-ms", type=float, nargs="+", default=[0.0, 1.0, 5.0, 20.0])
    args = p.parse_args()

    import ray
    import uvloop

    from deploy.raycluster import init_ray

    ports: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    plain = multiprocessing.Process(target=_uvloop_server, args=(ports,), daemon=True)
    plain.start()
    uvloop_port = ports.get(timeout=30)
    framed = multiprocessing.Process(target=_protocol_server, args=(ports,), daemon=True)
    framed.start()
    protocol_port = ports.get(timeout=30)
    init_ray(num_cpus=2)
    actor = ray.remote(FrameServer).options(max_concurrency=16).remote()
    ray_port = ray.get(actor.start.remote())

    rows = []
    for gap_ms in args.gaps_ms:
        gap = gap_ms / 1e3
        listener = socket.create_server(("127.0.0.1", 0))
        blocking = multiprocessing.Process(target=_blocking_server, args=(listener,), daemon=True)
        blocking.start()
        results = {
            "uvloop": uvloop.run(_round_trips(uvloop_port, args.frames, gap)),
            "protocol": uvloop.run(_protocol_round_trips(protocol_port, args.frames, gap)),
            "ray actor": uvloop.run(_round_trips(ray_port, args.frames, gap)),
            "blocking": _blocking_round_trips(listener.getsockname()[1], args.frames, gap),
        }
        blocking.join(5)
        listener.close()
        for name, rtts in results.items():
            body = sorted(rtts[len(rtts) // 10:])  # the first tenth warms up
            rows.append((name, gap_ms, statistics.median(body) * 1e6, body[int(0.9 * len(body))] * 1e6))
    ray.shutdown()
    plain.terminate()
    framed.terminate()

    print(f"\none process crossing on this host ({args.frames} round trips per row; crossing = round trip / 2)")
    head = f"{'server end':<10} {'gap ms':>7} {'RTT p50 us':>11} {'RTT p90 us':>11} {'crossing p50 us':>16}"
    print(head + "\n" + "-" * len(head))
    for name, gap_ms, p50, p90 in rows:
        print(f"{name:<10} {gap_ms:>7g} {p50:>11.0f} {p90:>11.0f} {p50 / 2:>16.0f}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
