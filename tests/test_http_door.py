"""The front door's own HTTP/1.1 protocol (serving/http_door.py) under the real uvicorn server, over a stub router:
what HTTP clients rely on (keep-alive, pipelining, Connection: close, Expect: 100-continue, disconnects), and the
ASGI path it shares its handlers with."""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
import openai
import pytest

from deploy.serve import bind_socket, front_door_server
from profilers.exporter import DOOR_REFUSAL_REASONS, ExportSnapshot
from profilers.footprint import load_site_profile
from serving.api import FrontDoor, create_app
from serving.config import DoorConfig
from serving.http_door import LINGER_S, DoorProtocol
from serving.types import GenerationRequest, TokenEvent

MODEL = "stub"


@dataclass
class StubRouter:
    """The router's interface to the front door: ``tokens`` words per request, ``gap_s`` apart."""

    tokens: int = 4
    gap_s: float = 0.0
    fail: bool = False
    replicas: list[object] = field(default_factory=list)
    started: int = 0
    closed: list[str] = field(default_factory=list)
    """Request ids whose stream was closed before its last token (the engine would cancel them)."""

    async def snapshot(self) -> ExportSnapshot:
        return ExportSnapshot()

    def routable(self) -> list[object]:
        return self.replicas

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        self.started += 1
        if self.fail:
            raise RuntimeError("router bug")
        n = request.max_tokens or self.tokens
        finished = False
        try:
            for i in range(n):
                finished = i == n - 1
                yield TokenEvent(request.request_id, "stub-0", f" w{i}", [i], i, finished=finished,
                                 finish_reason="length" if finished else None, prompt_tokens=2, output_tokens=i + 1,
                                 energy_j=0.5, provenance="modeled")
                if self.gap_s:
                    await asyncio.sleep(self.gap_s)
        finally:
            if not finished:
                self.closed.append(request.request_id)


@dataclass
class Door:
    url: str
    port: int
    router: StubRouter
    front: FrontDoor


@contextlib.contextmanager
def serve_door(router: StubRouter, limits: DoorConfig | None = None) -> Iterator[Door]:
    front = FrontDoor(router, MODEL, 2048, load_site_profile("azure"), limits)  # type: ignore[arg-type]
    server = front_door_server(create_app(front))
    sock = bind_socket("127.0.0.1", 0)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=lambda: loop.run_until_complete(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = sock.getsockname()[1]
    yield Door(f"http://127.0.0.1:{port}", port, router, front)
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def door() -> Iterator[Door]:
    with serve_door(StubRouter()) as d:
        yield d


def raw_post(path: str, body: dict, extra: str = "") -> bytes:
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
    return f"{head}{extra}\r\n".encode() + data


def read_until(conn: socket.socket, marker: bytes, timeout_s: float = 5.0) -> bytes:
    conn.settimeout(timeout_s)
    data = b""
    while marker not in data:
        part = conn.recv(65536)
        if not part:
            break
        data += part
    return data


STREAM = {"model": MODEL, "prompt": "a b", "max_tokens": 3, "stream": True}


def test_the_generation_endpoints_are_answered_by_the_door_protocol(door: Door) -> None:
    server_protocols = []
    orig = DoorProtocol.on_message_complete

    def spy(self: DoorProtocol) -> None:
        server_protocols.append(type(self.cycle).__name__)
        orig(self)

    DoorProtocol.on_message_complete = spy  # type: ignore[method-assign]
    try:
        r = httpx.post(f"{door.url}/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2})
        httpx.get(f"{door.url}/health")
    finally:
        DoorProtocol.on_message_complete = orig  # type: ignore[method-assign]
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert r.headers["x-replica"] == "stub-0" and "date" in r.headers
    assert server_protocols == ["_Exchange", "RequestResponseCycle"]  # health went through ASGI


def test_status_line_headers_and_first_chunk_leave_in_one_write(door: Door, monkeypatch) -> None:
    """The client wakes once for its first token, not once for the headers and again for the chunk."""
    writes: list[bytes] = []

    class Recording:
        def __init__(self, transport: asyncio.Transport) -> None:
            self.transport = transport

        def write(self, data: bytes) -> None:
            writes.append(bytes(data))
            self.transport.write(data)

        def __getattr__(self, name: str) -> object:
            return getattr(self.transport, name)

    made = DoorProtocol.connection_made
    monkeypatch.setattr(DoorProtocol, "connection_made", lambda self, t: made(self, Recording(t)))
    door.router.gap_s = 0.05
    with socket.create_connection(("127.0.0.1", door.port)) as conn:
        conn.sendall(raw_post("/v1/completions", STREAM))
        read_until(conn, b"0\r\n\r\n")
    first = writes[0]
    assert first.startswith(b"HTTP/1.1 200 OK\r\n") and b"transfer-encoding: chunked" in first
    assert first.count(b"data: ") == 1 and b'"text":" w0"' in first
    # then the second token, and the last one with [DONE] and the end of the chunked body
    assert len(writes) == 3 and writes[-1].endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")


def test_keep_alive_and_pipelined_requests_answer_in_order(door: Door) -> None:
    with socket.create_connection(("127.0.0.1", door.port)) as conn:
        for n in (2, 3):  # one after the other on one connection
            conn.sendall(raw_post("/v1/completions", {**STREAM, "max_tokens": n}))
            reply = read_until(conn, b"data: [DONE]\n\n\r\n0\r\n\r\n")
            assert reply.count(b'"text":" w') == n
        # pipelined: a generation request, a health check and another generation request in one write
        conn.sendall(raw_post("/v1/completions", {**STREAM, "max_tokens": 1})
                     + b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n"
                     + raw_post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                         "max_tokens": 2}, "connection: close\r\n"))
        replies = read_until(conn, b"\x00never")  # the last one closes the connection
    first, health, chat = (replies.index(b"text_completion"), replies.index(b'"replicas":'),
                           replies.index(b'"chat.completion"'))
    assert first < health < chat and replies.count(b"HTTP/1.1 ") == 3


def test_connection_close_and_http10_close_after_the_response(door: Door) -> None:
    for extra, version in (("connection: close\r\n", b"HTTP/1.1"), ("", b"HTTP/1.0")):
        request = raw_post("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 2}, extra)
        with socket.create_connection(("127.0.0.1", door.port)) as conn:
            conn.sendall(request.replace(b"HTTP/1.1", version, 1))
            reply = read_until(conn, b"\x00never")  # read until the server closes
        assert reply.startswith(b"HTTP/1.1 200") and b"connection: close" in reply
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["usage"]["completion_tokens"] == 2


def test_expect_100_continue_is_answered_before_the_body(door: Door) -> None:
    head, body = raw_post("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 1},
                          "expect: 100-continue\r\n").split(b"\r\n\r\n", 1)
    with socket.create_connection(("127.0.0.1", door.port)) as conn:
        conn.sendall(head + b"\r\n\r\n")
        assert read_until(conn, b"\r\n\r\n").startswith(b"HTTP/1.1 100 Continue")
        conn.sendall(body)
        assert read_until(conn, b'"usage"').split(b"\r\n", 1)[0] == b"HTTP/1.1 200 OK"


def test_a_client_that_disconnects_mid_stream_closes_the_router_stream(door: Door) -> None:
    door.router.gap_s = 0.05
    with socket.create_connection(("127.0.0.1", door.port)) as conn:
        conn.sendall(raw_post("/v1/completions", {**STREAM, "max_tokens": 200}))
        assert b"data: " in read_until(conn, b"data: ")
    deadline = time.monotonic() + 5
    while not door.router.closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(door.router.closed) == 1  # the engine would cancel it; nothing streams 200 tokens into the void
    r = httpx.post(f"{door.url}/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 1})
    assert r.status_code == 200


def test_bad_requests_and_a_failing_router_get_openai_errors(door: Door) -> None:
    r = httpx.post(f"{door.url}/v1/completions", content=b"{nope")
    assert r.status_code == 400 and "Invalid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{door.url}/v1/completions", json={"model": "other", "prompt": "a"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(f"{door.url}/v1/completions").status_code == 405  # not POST: the ASGI path answers
    door.router.fail = True
    r = httpx.post(f"{door.url}/v1/completions", json={"model": MODEL, "prompt": "a"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    door.router.fail = False
    assert httpx.post(f"{door.url}/v1/completions", json={"model": MODEL, "prompt": "a"}).status_code == 200


def test_openai_client_streams_through_the_door_protocol(door: Door) -> None:
    client = openai.OpenAI(base_url=f"{door.url}/v1", api_key="unused")
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == " w0 w1 w2 w3"
    assert chunks[-1].usage.completion_tokens == 4


async def test_other_asgi_servers_get_the_same_answers_from_the_middleware() -> None:
    router = StubRouter()
    app = create_app(FrontDoor(router, MODEL, 2048, load_site_profile("azure")))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == " w0 w1"
        r = await client.post("/v1/completions", json={**STREAM, "stream_options": {"include_usage": True}})
        lines = [ln for ln in r.text.split("\n") if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 3
        r = await client.post("/v1/completions", content=b"{nope")
        assert r.status_code == 400


# The door's limits (serving.config.DoorConfig): timeouts, connection and in-flight caps, sizes, OpenAI fields.

END = b"data: [DONE]\n\n\r\n0\r\n\r\n"  # a stream's last event and the end of its chunked body
FAST = {"header_timeout_s": 0.3, "body_timeout_s": 0.3, "keep_alive_timeout_s": 0.3}


def connect(door: Door) -> socket.socket:
    return socket.create_connection(("127.0.0.1", door.port), timeout=5)


def read_all(conn: socket.socket, timeout_s: float = 3.0) -> bytes:
    """Everything until the server closes the connection (a hang fails at the timeout)."""
    conn.settimeout(timeout_s)
    data = b""
    while part := conn.recv(65536):
        data += part
    return data


def test_idle_slow_and_incomplete_requests_are_timed_out() -> None:
    with serve_door(StubRouter(), DoorConfig(**FAST)) as door:
        idle = connect(door)  # never sends a byte: closed without an answer
        slow = connect(door)
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: t\r\n")  # headers that never end
        short = connect(door)
        short.sendall(raw_post("/v1/completions", STREAM)[:-5])  # a body shorter than its Content-Length
        chunked = connect(door)
        chunked.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n")
        control = connect(door)  # the ASGI path: a body that never ends
        control.sendall(b"POST /control/policy HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\n{")
        t0 = time.perf_counter()
        for _ in range(2):  # a chunked body that never ends, trickled faster than the timeout: the timeout is the
            chunked.sendall(b"1\r\nx\r\n")  # body's, not the gap's
            time.sleep(0.1)
        assert read_all(idle) == b""
        for conn in (slow, short, chunked):
            answer = read_all(conn)
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert b"connection: close" in answer
        answer = read_all(control)  # answered without its body (no such route here), then closed
        assert answer.startswith(b"HTTP/1.1 404 ") and answer.count(b"HTTP/1.1") == 1
        assert time.perf_counter() - t0 < 2.0
        # slow, short, chunked, and control's body (its 404 went before): the idle one got nothing, no refusal
        assert door.front.refusals.counts["timeout"] == 4
        # The door still serves.
        assert httpx.post(door.url + "/v1/completions", json={"model": MODEL, "prompt": "a"}).status_code == 200


def test_an_idle_keep_alive_connection_is_closed() -> None:
    with serve_door(StubRouter(), DoorConfig(**FAST)) as door:
        conn = connect(door)
        conn.sendall(raw_post("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 2}))
        t0 = time.perf_counter()
        assert read_all(conn).startswith(b"HTTP/1.1 200 ")  # then closed after keep_alive_timeout_s
        assert 0.2 < time.perf_counter() - t0 < 2.0


def test_at_the_connection_cap_the_oldest_idle_connection_makes_room_for_health() -> None:
    with serve_door(StubRouter(), DoorConfig(max_connections=8)) as door:
        flood = [connect(door) for _ in range(11)]  # 3 beyond the cap: each closes the oldest idle one
        time.sleep(0.1)  # accepted
        t0 = time.perf_counter()
        r = httpx.get(door.url + "/health")  # at the cap too: closes the next oldest
        assert r.status_code in (200, 503) and time.perf_counter() - t0 < 1.0
        assert [read_all(c, 1.0) for c in flood[:4]] == [b""] * 4
        flood[4].setblocking(False)
        with pytest.raises(BlockingIOError):
            flood[4].recv(1)  # the newer ones are still open


def test_when_every_connection_is_answered_a_new_one_gets_a_503() -> None:
    with serve_door(StubRouter(tokens=50, gap_s=0.02), DoorConfig(max_connections=2)) as door:
        streams = [connect(door) for _ in range(2)]
        for conn in streams:
            conn.sendall(raw_post("/v1/completions", {**STREAM, "max_tokens": 50}))
            read_until(conn, b"data: ")
        extra = connect(door)
        answer = read_all(extra)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in answer
        assert door.front.refusals.counts["connections"] == 1
        for conn in streams:  # the streams go on
            assert read_until(conn, END).endswith(END)


def test_beyond_the_in_flight_cap_a_generation_request_gets_a_503_at_once() -> None:
    with serve_door(StubRouter(tokens=40, gap_s=0.02), DoorConfig(max_inflight_requests=2)) as door:
        streams = [connect(door) for _ in range(2)]
        for conn in streams:
            conn.sendall(raw_post("/v1/completions", {**STREAM, "max_tokens": 40}))
            read_until(conn, b"data: ")
        assert door.front.admission.inflight == 2
        extra = connect(door)
        t0 = time.perf_counter()
        extra.sendall(raw_post("/v1/completions", {**STREAM, "stream": False}))
        answer = read_until(extra, b'"code":"overloaded"}}')
        assert time.perf_counter() - t0 < 0.1
        assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1\r\n" in answer
        assert b"connection: close\r\n" in answer and read_all(extra) == b""  # a new connection's: shed, closed
        # On a kept-alive connection: answered when the headers came, before the body, which is then read and
        # dropped; the connection is kept.
        data = json.dumps({**STREAM, "prompt": "a " * 5000}).encode()
        early = connect(door)
        early.sendall(b"GET /v1/models HTTP/1.1\r\nhost: t\r\n\r\n")
        assert b"HTTP/1.1 200 " in read_until(early, b'"max_model_len"')
        early.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n" % len(data))
        assert read_until(early, b'"code":"overloaded"}}').startswith(b"HTTP/1.1 503 ")
        early.sendall(data + b"GET /v1/models HTTP/1.1\r\nhost: t\r\n\r\n")
        assert b"HTTP/1.1 200 " in read_until(early, b'"max_model_len"')
        r = httpx.post(door.url + "/v1/completions", json=STREAM)
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        assert httpx.get(door.url + "/health").status_code in (200, 503)  # not counted
        metrics = httpx.get(door.url + "/metrics")
        assert metrics.status_code == 200
        assert 'llm_energy_door_refused_total{reason="in_flight"} 3.0' in metrics.text
        assert door.front.refusals.counts == {**dict.fromkeys(DOOR_REFUSAL_REASONS, 0), "in_flight": 3}
        streams[0].close()  # a client that goes away frees its place
        assert read_until(streams[1], END).endswith(END)
        deadline = time.monotonic() + 2
        while door.front.admission.inflight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert door.front.admission.inflight == 0
        assert httpx.post(door.url + "/v1/completions", json={**STREAM, "stream": False}).status_code == 200


def test_oversized_bodies_and_headers_are_refused() -> None:
    with serve_door(StubRouter(), DoorConfig(max_body_bytes=4096, max_header_bytes=2048)) as door:
        conn = connect(door)  # refused from Content-Length, before the body is sent
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ncontent-length: 10000000\r\n\r\n")
        answer = read_all(conn)
        assert answer.startswith(b"HTTP/1.1 413 ") and b'"param":null' in answer
        conn = connect(door)  # a chunked body: refused as it passes the limit, the rest is not read
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
                     + (b"400\r\n" + b"x" * 1024 + b"\r\n") * 5)  # no last chunk: refused at 5 KiB, not at its end
        assert read_all(conn).startswith(b"HTTP/1.1 413 ")
        conn = connect(door)  # the ASGI path too
        conn.sendall(b"POST /control/policy HTTP/1.1\r\nhost: t\r\ncontent-length: 5000\r\n\r\n")
        assert read_all(conn).startswith(b"HTTP/1.1 413 ")
        conn = connect(door)
        conn.sendall(b"GET /health HTTP/1.1\r\nhost: t\r\nx-big: " + b"y" * 4000 + b"\r\n\r\n")
        assert read_all(conn).startswith(b"HTTP/1.1 431 ")
        body = {"model": MODEL, "prompt": "a " * 1000, "max_tokens": 2}  # under the limit
        assert httpx.post(door.url + "/v1/completions", json=body).status_code == 200
        counts = door.front.refusals.counts
        assert (counts["body_too_large"], counts["headers_too_large"], counts["in_flight"]) == (3, 1, 0)


def send_until_answered(conn: socket.socket, block: bytes, timeout_s: float = 5.0) -> bytes:
    """A client that keeps sending its body until the server answers (as most do): the answer, to the server's
    close; a reset raises."""
    conn.setblocking(False)
    answer, deadline = b"", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        readable, writable, _ = select.select([conn], [] if answer else [conn], [], 0.5)
        if readable:
            part = conn.recv(65536)
            if not part:
                return answer
            answer += part
        elif writable:
            with contextlib.suppress(BlockingIOError):
                conn.send(block)
    raise AssertionError(f"no close within {timeout_s} s: {answer[:80]!r}")


def test_a_refused_client_still_sending_its_body_reads_the_answer_not_a_reset(monkeypatch) -> None:
    """A lingering close: the door ends its side after the 413, drops what still comes, and closes when the client
    does (or after LINGER_S); the body read so far is let go at once."""
    refused: list[DoorProtocol] = []
    refuse = DoorProtocol._refuse

    def spy(self: DoorProtocol, *args: object, **kwargs: object) -> None:
        refused.append(self)
        refuse(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(DoorProtocol, "_refuse", spy)
    with serve_door(StubRouter(), DoorConfig(max_body_bytes=64 << 10)) as door:
        for head, block in ((b"content-length: 100000000", b"x" * 65536),
                            (b"transfer-encoding: chunked", b"10000\r\n" + b"x" * 65536 + b"\r\n")):
            conn = connect(door)
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: t\r\n" + head + b"\r\n\r\n")
            t0 = time.perf_counter()
            answer = send_until_answered(conn, block)
            assert answer.startswith(b"HTTP/1.1 413 ") and b"connection: close" in answer, answer[:80]
            assert time.perf_counter() - t0 < LINGER_S + 1.0
            conn.close()
        deadline = time.monotonic() + LINGER_S + 1.0
        while any(not p.transport.is_closing() for p in refused) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(refused) == 2 and all(p.transport.is_closing() for p in refused)
        assert refused[0].cycle is None  # refused from Content-Length: nothing was read
        assert len(refused[1].cycle.body) == 0  # the chunked one's 64 KiB: not kept until the cycle collector runs
        assert httpx.post(door.url + "/v1/completions", json={"model": MODEL, "prompt": "a"}).status_code == 200


@pytest.mark.parametrize(("field", "value"), [
    ("stop", ["\n"]), ("stop", "x"), ("logprobs", 1), ("logprobs", 0), ("top_logprobs", 2), ("echo", True),
    ("best_of", 2), ("top_p", 0.9), ("presence_penalty", 0.5), ("logit_bias", {"1": 5}), ("suffix", "x"),
    ("response_format", {"type": "json_object"}), ("tools", [{"type": "function"}]),
])
def test_fields_the_door_does_not_implement_get_a_400_naming_them(door: Door, field: str, value: object) -> None:
    for path, body in (("/v1/completions", {"model": MODEL, "prompt": "a"}),
                       ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a"}]})):
        r = httpx.post(door.url + path, json={**body, field: value})
        assert r.status_code == 400, (path, r.text)
        error = r.json()["error"]
        assert error["param"] == field and field in error["message"] and error["type"] == "invalid_request_error"
    assert door.router.started == 0


def test_neutral_values_of_those_fields_are_served(door: Door) -> None:
    neutral = {"stop": None, "logprobs": None, "best_of": 1, "top_p": 1.0, "temperature": 0.0, "echo": False,
               "presence_penalty": 0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "user": "u", "top_k": -1}
    r = httpx.post(door.url + "/v1/completions", json={"model": MODEL, "prompt": "a", **neutral})
    assert r.status_code == 200, r.text
    r = httpx.post(door.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "a"}], "logprobs": False, "stop": []})
    assert r.status_code == 200, r.text


def test_a_request_without_max_tokens_carries_the_default_cap(door: Door) -> None:
    seen: list[GenerationRequest] = []
    stream = door.router.stream

    def spy(request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        seen.append(request)
        return stream(request)

    door.router.stream = spy  # type: ignore[method-assign]
    httpx.post(door.url + "/v1/completions", json={"model": MODEL, "prompt": "a"})
    httpx.post(door.url + "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 3})
    assert [(r.max_tokens, r.default_max_tokens) for r in seen] == [(None, 1024), (3, 1024)]


async def test_the_asgi_path_counts_requests_in_flight_too() -> None:
    """Other ASGI servers (and requests pipelined behind another) go through GenerationFastPath: same cap."""
    router = StubRouter(tokens=20, gap_s=0.01)
    front = FrontDoor(router, MODEL, 2048, load_site_profile("azure"), DoorConfig(max_inflight_requests=1))  # type: ignore[arg-type]
    app = create_app(front)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        body = {"model": MODEL, "prompt": "a", "max_tokens": 20}
        first = asyncio.create_task(client.post("/v1/completions", json=body))
        while front.admission.inflight == 0:
            await asyncio.sleep(0.001)
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert front.refusals.counts["in_flight"] == 1
        assert (await first).status_code == 200 and front.admission.inflight == 0
        assert (await client.post("/v1/completions", json=body)).status_code == 200
