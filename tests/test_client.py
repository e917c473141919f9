"""The load client against real sockets: well-behaved and misbehaving HTTP servers on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable

import pytest

from workloads.arrivals import FixedLength, RequestSpec
from workloads.client import ClosedLoop, LoadClient, LoadGeneratorError, RequestRecord, _events
from workloads.http1 import Endpoint

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def sse_response(n_tokens: int, extra: dict | None = None) -> bytes:
    events = [
        "data: " + json.dumps({"choices": [{"index": 0, "text": f" t{i}"}]}) + "\n\n" for i in range(n_tokens)
    ]
    events.append("data: " + json.dumps({"choices": [], "usage": {"completion_tokens": n_tokens}, **(extra or {})})
                  + "\n\n")
    events.append("data: [DONE]\n\n")
    body = "".join(events).encode()
    return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-replica: r7\r\ntransfer-encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))


async def read_request(reader: asyncio.StreamReader) -> dict | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length"))
    return json.loads(await reader.readexactly(length))


class Server:
    """A loopback HTTP server whose behaviour per request the test chooses."""

    def __init__(self, respond: Callable[[dict, int], Awaitable[bytes | None]]) -> None:
        self.respond = respond
        self.count = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while (req := await read_request(reader)) is not None:
                self.count += 1
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    out = await self.respond(req, self.count)
                finally:
                    self.in_flight -= 1
                if out is None:  # hang up
                    break
                writer.write(out)
                await writer.drain()
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


def specs(n: int, rate: float, prompt: int = 4, out: int = 3) -> list[RequestSpec]:
    return [RequestSpec(i / rate, prompt, out) for i in range(n)]


async def ok(req: dict, _: int) -> bytes:
    return sse_response(req["max_tokens"], {"energy": {"joules": 1.5, "provenance": "modeled", "replica": "r7"}})


@pytest.mark.parametrize("processes", [0, 1, 2])
async def test_streams_are_timed_and_parsed(processes: int) -> None:
    async with Server(ok) as url:
        client = LoadClient(url, "m", processes=processes)
        try:
            recs = await client.run(0, specs(20, 100.0, out=5), seed=1)
        finally:
            client.close()
    assert [r.request_index for r in recs] == list(range(20))
    for r in recs:
        assert r.status == "ok", r.error
        assert r.output_tokens == 5 and len(r.itl_s) == 4 and r.http_status == 200
        assert r.replica == "r7" and r.energy_j == 1.5 and r.energy_provenance == "modeled"
        assert 0 < r.ttft_s <= r.e2e_s
        assert r.actual_send_s >= r.intended_send_s


async def test_sse_events_split_across_reads_keep_their_arrival_time() -> None:
    raw = b'data: {"a":1}\n\ndata: {"b"' + b':2}\r\n\r\ndata: [DONE]\n\n'
    pieces = [(1.0, raw[:10]), (2.0, raw[10:25]), (3.0, raw[25:])]
    assert [t for t, _ in _events(pieces)] == [2.0, 3.0, 3.0]
    assert [e for _, e in _events(pieces)] == [b'data: {"a":1}', b'data: {"b":2}', b"data: [DONE]"]


async def test_a_slow_server_does_not_delay_later_sends() -> None:
    async def slow(req: dict, _: int) -> bytes:
        await asyncio.sleep(0.6)
        return sse_response(req["max_tokens"])

    async with Server(slow) as url:
        client = LoadClient(url, "m", processes=1)
        try:
            recs = await client.run(0, specs(40, 50.0), seed=1)
        finally:
            client.close()
    assert all(r.ok for r in recs)
    # Every send is on schedule although every response takes 0.6 s (30 requests in flight at once).
    assert max(r.send_lag_s for r in recs) < 0.3  # coordinated omission would make it grow to ~20 s
    assert min(r.e2e_s for r in recs) >= 0.55


async def test_max_concurrency_caps_requests_in_flight() -> None:
    async def slow(req: dict, _: int) -> bytes:
        await asyncio.sleep(0.2)
        return sse_response(1)

    server = Server(slow)
    async with server as url:
        client = LoadClient(url, "m", max_concurrency=3, processes=0)
        recs = await client.run(0, specs(12, 100.0), seed=1)
    assert all(r.ok for r in recs) and server.max_in_flight == 3
    assert max(r.send_lag_s for r in recs) > 0.3  # the cap, not the schedule, decided when they went


async def test_closed_loop_keeps_exactly_the_users_in_flight() -> None:
    async def slow(req: dict, _: int) -> bytes:
        await asyncio.sleep(0.05)
        return sse_response(req["max_tokens"])

    server = Server(slow)
    async with server as url:
        client = LoadClient(url, "m", processes=1)
        try:
            loop = ClosedLoop(4, 1.0, FixedLength(value=8), FixedLength(value=2))
            recs = await client.run_closed(0, loop, seed=3)
        finally:
            client.close()
    assert server.max_in_flight == 4
    assert 40 <= len(recs) <= 90 and all(r.ok for r in recs)  # ~4 users x 1 s / 0.05 s
    assert len({r.request_index for r in recs}) == len(recs)
    assert [r.intended_send_s for r in recs] == sorted(r.intended_send_s for r in recs)


async def test_http_errors_and_broken_streams_are_recorded_with_the_reason() -> None:
    async def mixed(req: dict, n: int) -> bytes | None:
        if n == 1:
            body = b'{"error": {"message": "prompt is too long", "type": "BadRequestError"}}'
            return b"HTTP/1.1 400 Bad Request\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        if n in (2, 3):
            return None  # hangs up after the request (a reused connection's request is resent once: n == 3)
        if n == 4:
            return b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\ndata: {oops}"
        return b"NOT HTTP AT ALL\r\n\r\n"

    async with Server(mixed) as url:
        client = LoadClient(url, "m", processes=0)
        recs = await client.run(0, specs(4, 20.0), seed=1)
    errors = [r.error for r in recs]
    assert all(r.status == "failed" for r in recs)
    assert errors[0] == "HTTP 400: prompt is too long" and recs[0].http_status == 400
    assert "closed the connection before the response ended" in errors[1]
    assert errors[2].startswith("client error JSONDecodeError")
    assert errors[3].startswith("malformed HTTP response")


async def test_a_stalled_response_times_out() -> None:
    async def stall(req: dict, _: int) -> bytes:
        await asyncio.sleep(30)
        return b""

    async with Server(stall) as url:
        client = LoadClient(url, "m", request_timeout_s=0.5, processes=0)
        t = time.perf_counter()
        recs = await client.run(0, specs(2, 10.0), seed=1)
    assert time.perf_counter() - t < 5
    assert [r.status for r in recs] == ["failed", "failed"]
    assert all(r.error.startswith("ReadTimeout") for r in recs)


async def test_a_keep_alive_connection_closed_by_the_server_is_retried_once() -> None:
    async def close_after_each(req: dict, _: int) -> bytes:
        return sse_response(2)

    server = Server(close_after_each)
    # The server answers one request per connection then closes (see ``handle``: it keeps reading, so make it
    # close by answering with ``connection: close`` missing but shutting the socket right after).
    orig = server.handle

    async def one_shot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = await read_request(reader)
        if req is not None:
            writer.write(sse_response(2))
            await writer.drain()
        writer.close()

    server.handle = one_shot  # type: ignore[method-assign]
    async with server as url:
        client = LoadClient(url, "m", processes=0)
        recs = await client.run(0, specs(6, 5.0), seed=1)
    assert orig is not None
    assert all(r.ok for r in recs), [r.error for r in recs]


async def test_server_down_fails_each_request_with_the_reason() -> None:
    client = LoadClient("http://127.0.0.1:9", "m", processes=1)
    try:
        recs = await client.run(0, specs(3, 50.0), seed=1)
    finally:
        client.close()
    assert all(r.status == "failed" and r.error.startswith("ConnectError: cannot connect to 127.0.0.1:9")
               for r in recs)


async def test_a_killed_generator_process_is_reported() -> None:
    async def slow(req: dict, _: int) -> bytes:
        await asyncio.sleep(0.2)
        return sse_response(1)

    async with Server(slow) as url:
        client = LoadClient(url, "m", processes=1)
        done: list[RequestRecord] = []

        def kill_on_start(_: float) -> None:
            proc = client._workers[0][0]
            asyncio.get_running_loop().call_later(0.3, os.kill, proc.pid, signal.SIGKILL)

        with pytest.raises(LoadGeneratorError, match=r"died \(exit code -9\) during point 0.*--resume"):
            await client.run(0, specs(200, 50.0), seed=1, on_done=done.append, on_start=kill_on_start)
        client.close()


def test_bad_target_urls_are_refused_up_front() -> None:
    with pytest.raises(ValueError, match="must be http://HOST"):
        LoadClient("localhost:8000", "m")
    assert Endpoint.parse("https://h.example/api/").path_prefix == "/api"
    assert Endpoint.parse("http://[::1]:81").host_header == "[::1]:81"


async def test_tokens_without_printable_text_still_count() -> None:
    async def partial_utf8(req: dict, _: int) -> bytes:
        events = [{"choices": [{"index": 0, "text": "", "finish_reason": None}]},  # first byte of a character
                  {"choices": [{"index": 0, "text": "é", "finish_reason": "length"}]},
                  {"choices": [], "usage": {"completion_tokens": 2}}]
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode() + b"data: [DONE]\n\n"
        return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)

    async with Server(partial_utf8) as url:
        recs = await LoadClient(url, "m", processes=0).run(0, specs(1, 1.0, out=2), seed=1)
    assert recs[0].ok and recs[0].output_tokens == 2 and len(recs[0].itl_s) == 1


async def test_a_prompt_the_synthesiser_cannot_make_is_recorded_failed() -> None:
    def picky(n_tokens: int, seed: int) -> str:
        if n_tokens < 2:
            raise ValueError("1 token cannot hold the BOS token and text")
        return "x " * n_tokens

    async with Server(ok) as url:
        client = LoadClient(url, "m", processes=0, prompt_fn=picky)
        recs = await client.run(0, [RequestSpec(0.0, 1, 2), RequestSpec(0.01, 4, 2)], seed=1)
    assert recs[0].status == "failed" and recs[0].error.startswith("prompt synthesis failed: ValueError: 1 token")
    assert recs[1].ok
