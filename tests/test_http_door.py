"""The front door's own HTTP/1.1 protocol (serving/http_door.py) under the real uvicorn server, over a stub router:
what HTTP clients rely on (keep-alive, pipelining, Connection: close, Expect: 100-continue, disconnects), and the
ASGI path it shares its handlers with."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
import openai
import pytest

from deploy.serve import bind_socket, front_door_server
from profilers.footprint import load_site_profile
from serving.api import FrontDoor, create_app
from serving.http_door import DoorProtocol
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


@pytest.fixture
def door() -> Iterator[Door]:
    router = StubRouter()
    app = create_app(FrontDoor(router, MODEL, 2048, load_site_profile("azure")))  # type: ignore[arg-type]
    server = front_door_server(app)
    sock = bind_socket("127.0.0.1", 0)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=lambda: loop.run_until_complete(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = sock.getsockname()[1]
    yield Door(f"http://127.0.0.1:{port}", port, router)
    server.should_exit = True
    thread.join(10)


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
