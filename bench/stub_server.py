"""A trivial OpenAI-compatible streaming server for measuring load generators (not part of the product path).

It answers ``/v1/completions`` and ``/v1/chat/completions`` at once with ``max_tokens`` tokens (default 16) in one
write, streamed (SSE, chunked) or not, and ``/v1/models`` with one model: the server costs as little CPU as possible
so a generator's own limits show. ``GET /arrivals`` returns (and clears) the perf_counter() time each completion
request arrived, to judge any generator's timing from the server side. Raw asyncio + httptools, uvloop if installed.

    python bench/stub_server.py [--port 0] [--model stub]     # prints "listening on http://127.0.0.1:PORT"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time

import httptools

MAX_TOKENS_DEFAULT = 16


ARRIVALS: list[float] = []
"""perf_counter() at which each completion request was fully received (read back and cleared by GET /arrivals)."""


class _Handler(asyncio.Protocol):
    def __init__(self, model: str) -> None:
        self.model = model
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._send(400, b"application/json", b'{"error":{"message":"bad request"}}', keep_alive=False)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        path = self.url.split(b"?", 1)[0]
        raw = b"".join(self.body)
        self.url, self.body = b"", []
        if path == b"/v1/models":
            body = json.dumps({"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                         "owned_by": "stub", "max_model_len": 1 << 20}]})
            self._send(200, b"application/json", body.encode())
        elif path == b"/arrivals":
            body = json.dumps(ARRIVALS).encode()
            ARRIVALS.clear()
            self._send(200, b"application/json", body)
        elif path in (b"/v1/completions", b"/v1/chat/completions"):
            ARRIVALS.append(time.perf_counter())
            self._complete(json.loads(raw or b"{}"), chat=path.endswith(b"chat/completions"))
        elif path in (b"/health", b"/"):
            self._send(200, b"application/json", b"{}")
        else:
            self._send(404, b"application/json", b'{"error":{"message":"not found"}}')

    def _complete(self, req: dict, chat: bool) -> None:
        n = int(req.get("max_tokens") or req.get("max_completion_tokens") or MAX_TOKENS_DEFAULT)
        prompt_tokens = len(str(req.get("prompt") or req.get("messages") or "").split())
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if not req.get("stream"):
            choice = ({"index": 0, "message": {"role": "assistant", "content": " tok" * n}, "finish_reason": "length"}
                      if chat else {"index": 0, "text": " tok" * n, "finish_reason": "length"})
            body = {"id": "stub", "object": kind, "created": created, "model": self.model, "choices": [choice],
                    "usage": usage}
            self._send(200, b"application/json", json.dumps(body).encode())
            return
        if chat:
            head = '{"id":"stub","object":"chat.completion.chunk","created":%d,"model":"%s","choices":[{"index":0,"delta":{"content":" tok"},"finish_reason":null}]}'  # noqa: E501
        else:
            head = '{"id":"stub","object":"text_completion","created":%d,"model":"%s","choices":[{"index":0,"text":" tok","finish_reason":null}]}'  # noqa: E501
        event = f"data: {head % (created, self.model)}\n\n"
        tail = json.dumps({"id": "stub", "object": kind, "created": created, "model": self.model, "choices": [],
                           "usage": usage})
        sse = (event * n + f"data: {tail}\n\ndata: [DONE]\n\n").encode()
        self._send(200, b"text/event-stream", sse, chunked=True)

    def _send(self, status: int, ctype: bytes, body: bytes, keep_alive: bool = True, chunked: bool = False) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}[status]
        head = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\n" % (status, reason, ctype)
        if chunked:
            chunk = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
            self.transport.write(head + b"transfer-encoding: chunked\r\n\r\n" + chunk)
        else:
            self.transport.write(head + b"content-length: %d\r\n\r\n%s" % (len(body), body))
        if not keep_alive:
            self.transport.close()


async def serve(port: int, model: str) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = await loop.create_server(lambda: _Handler(model), sock=sock, backlog=4096)
    print(f"listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--model", default="stub")
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.port, args.model))


if __name__ == "__main__":
    main()
