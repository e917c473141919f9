"""The front door's own share of a request's time to first token, with a router that answers at once.

The real front door (``create_app`` under uvicorn with uvloop and the door's own protocol, in a child process) over a
stub router whose stream yields its events immediately; this process sends streamed completions one at a time with the
testbed's raw HTTP/1.1 client and reads the latency trace (``profilers/trace.py``) back. What is left is the door:
HTTP parsing, request validation, building the request, answering the first event, and the socket hops between
client and door. Prints the median of each stage over the requests after a warm-up.

With ``--compare``, a second door serves every request through ASGI with uvicorn's stock protocol (as before
``serving/http_door.py``), the two taking turns request by request.

    python bench/front_door_latency.py [--requests 1000] [--gap-ms 5] [--compare]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from profilers import trace  # noqa: E402
from serving.types import GenerationRequest, TokenEvent  # noqa: E402

MODEL = "stub"
STAGES = [
    ("client.send", "door.receive", "client send -> door handler (HTTP parse, validation)"),
    ("door.receive", "router.first_event", "handler -> first event (stub router: instant)"),
    ("router.first_event", "door.first_chunk", "first event -> SSE response started"),
    ("door.first_chunk", "client.first_chunk", "first chunk -> client has it"),
    ("client.send", "client.first_chunk", "TTFT the door adds (send -> first chunk)"),
    ("client.first_chunk", "client.last_chunk", "first -> last chunk (8 tokens, usage, [DONE])"),
]


class InstantRouter:
    """The router's interface to the front door, answering every request at once with 8 tokens."""

    def __init__(self) -> None:
        self.replicas: list[object] = []

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        trace.mark(request.request_id, "router.first_event")
        for i in range(8):
            done = i == 7
            yield TokenEvent(request.request_id, "stub-0", " x", [1], i, finished=done,
                             finish_reason="length" if done else None, prompt_tokens=2, output_tokens=i + 1)


def serve(sock: socket.socket, door_http: bool) -> None:
    import uvloop

    from deploy.serve import front_door_server
    from profilers.footprint import builtin_site_names, load_site_profile
    from serving.api import FrontDoor, create_app

    door = FrontDoor(InstantRouter(), MODEL, 2048, load_site_profile(builtin_site_names()[0]))  # type: ignore[arg-type]
    uvloop.run(front_door_server(create_app(door), door_http).serve(sockets=[sock]))


async def drive(urls: list[str], n: int, gap_s: float) -> list[list[str]]:
    """``n`` requests to each front door, one at a time and taking turns (every door meets the same host state);
    the request ids sent to each."""
    from workloads.client import RawResponse, RequestRecord, finish_record
    from workloads.http1 import ConnectionPool, Endpoint, Exchange, post_request

    body = {"model": MODEL, "prompt": "a b", "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}
    doors = []
    for url in urls:
        endpoint = Endpoint.parse(url)
        doors.append((ConnectionPool(endpoint), post_request(endpoint, "/v1/completions", json.dumps(body).encode())))
    request_ids: list[list[str]] = [[] for _ in urls]
    for _ in range(n):
        for (pool, payload), ids in zip(doors, request_ids, strict=True):
            done = asyncio.get_running_loop().create_future()
            ex = Exchange(payload, lambda _, done=done: done.set_result(None))
            pool.send(ex)
            await done
            raw = RawResponse.of(ex)
            rec = finish_record(RequestRecord(0, 0, 0.0, 0, 8), raw)  # marks the client's stages
            if not rec.ok:
                raise RuntimeError(f"request failed: {rec.error}")
            ids.append(raw.request_id)
            await asyncio.sleep(gap_s)  # one request at a time: the door's latency, not its queueing
    for pool, _ in doors:
        await pool.aclose()
    return request_ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--gap-ms", type=float, default=5.0, help="pause between requests")
    p.add_argument("--compare", action="store_true",
                   help="beside the front door, the same app with every request through ASGI and uvicorn's own "
                        "protocol (requests take turns between the two)")
    args = p.parse_args()
    import uvloop

    from deploy.serve import bind_socket

    directory = Path(tempfile.mkdtemp(prefix="door-trace-"))
    os.environ[trace.TRACE_ENV] = str(directory)
    kinds = [("door protocol", True), ("ASGI only", False)] if args.compare else [("door protocol", True)]
    servers, urls = [], []
    for _, door_http in kinds:
        sock = bind_socket("127.0.0.1", 0)
        servers.append(multiprocessing.get_context("fork").Process(target=serve, args=(sock, door_http), daemon=True))
        servers[-1].start()
        urls.append(f"http://127.0.0.1:{sock.getsockname()[1]}")
    time.sleep(1.0)
    try:
        ids = [i[args.warmup:] for i in uvloop.run(drive(urls, args.warmup + args.requests, args.gap_ms / 1e3))]
    finally:
        for server in servers:
            server.terminate()
            server.join(10)
    marks = trace.read_trace(directory)
    print(f"\nfront door alone ({args.requests} streamed completions per door, one at a time, instant router): "
          "median ms")
    print("".join(f"{name:>15}" for name, _ in kinds) + "  stage")
    for start, end, what in STAGES:
        cells = [statistics.median(marks[r][end] - marks[r][start] for r in door_ids) * 1e3 for door_ids in ids]
        print("".join(f"{c:>15.3f}" for c in cells) + f"  {what}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
