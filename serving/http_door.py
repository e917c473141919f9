"""The front door's HTTP/1.1 connection: uvicorn's httptools protocol, with the generation endpoints answered on the
connection itself.

Through ASGI a streamed completion costs a task for the request cycle, the app's middleware stack, ``receive``
awaits for the body, and the response headers written apart from the first chunk, so the client wakes twice for
its first token. Here ``POST /v1/completions`` and ``POST /v1/chat/completions`` are validated when the body is
complete, run as one task, and answered with the status line, the headers and the first chunk in one write; the
following chunks go straight to the transport. Every other request (models, health, metrics, control API), and a
generation request pipelined behind another, goes through uvicorn's ASGI cycle as before, where
:class:`serving.api.GenerationFastPath` answers it with the same code.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from serving.api import SSE_DONE, FrontDoor, Route, SSEResponse, answer, generation_routes

log = logging.getLogger(__name__)


class _Exchange:
    """One generation request answered on the connection. It stands where uvicorn keeps its request cycle
    (``protocol.cycle``), with the attributes uvicorn reads there (connection loss, shutdown, pipelining)."""

    __slots__ = ("body", "disconnected", "keep_alive", "message_event", "protocol", "response_complete", "route",
                 "task")

    def __init__(self, protocol: DoorProtocol, route: Route, keep_alive: bool) -> None:
        self.protocol = protocol
        self.route = route
        self.keep_alive = keep_alive
        self.body = bytearray()
        self.response_complete = False
        self.disconnected = False
        self.message_event = asyncio.Event()  # set by uvicorn when the connection goes; nothing waits on it here
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        try:
            response = await answer(self.route, bytes(self.body))
            if isinstance(response, SSEResponse):
                await self._stream(response)
            else:
                self._write_whole(response.status_code, response.raw_headers, response.body)
        except asyncio.CancelledError:
            if not self.disconnected:  # the server is stopping: leave no half-written response behind
                self.protocol.transport.close()
                raise
        except Exception:  # while streaming (before, answer() turns failures into a 500)
            log.exception("front door: the stream of %s failed", self.protocol.scope.get("path"))
            self.protocol.transport.close()  # the client sees a truncated stream, not a corrupt one
        finally:
            self._complete()

    def _head(self, status: int, headers: list[tuple[bytes, bytes]], chunked: bool) -> list[bytes]:
        lines = [STATUS_LINE[status]]
        for name, value in (*self.protocol.server_state.default_headers, *headers):
            lines += [name, b": ", value, b"\r\n"]
        if chunked:
            lines.append(b"transfer-encoding: chunked\r\n")
        if not self.keep_alive:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        return lines

    def _write_whole(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.protocol.transport.write(b"".join([*self._head(status, headers, chunked=False), body]))

    async def _stream(self, response: SSEResponse) -> None:
        transport, flow = self.protocol.transport, self.protocol.flow
        chunks = response.chunks
        try:
            # The first chunk is formatted from an event the door already holds: no wait between it and the headers.
            first = await anext(chunks, None)
            parts = self._head(200, response.raw_headers, chunked=True)
            if first is not None:
                parts.append(_chunk(first.encode()))
            transport.write(b"".join(parts))
            ended = False
            async for text in chunks:
                if flow.write_paused:  # a slow reader: wait for its buffer to drain rather than grow it
                    await flow.drain()
                    if self.disconnected:
                        return
                ended = text.endswith(SSE_DONE)  # the end of the chunked body goes with it
                transport.write(_chunk(text.encode()) + (b"0\r\n\r\n" if ended else b""))
            if not ended:
                transport.write(b"0\r\n\r\n")
        finally:
            await chunks.aclose()  # an unfinished stream: cancels the request in the engine

    def _complete(self) -> None:
        self.response_complete = True
        protocol = self.protocol
        if not self.keep_alive or self.disconnected:
            protocol.transport.close()
        protocol.on_response_complete()  # keep-alive timer, or the next pipelined request


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class DoorProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; the routes in ``routes`` (exact path, POST) are answered by an
    :class:`_Exchange` instead of the ASGI app."""

    def __init__(self, *args: Any, routes: dict[bytes, Route], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.routes = routes

    def on_headers_complete(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete  # else pipelined: uvicorn queues it (ASGI path)
        route = None
        if idle and self.parser.get_method() == b"POST" and not self.parser.should_upgrade():
            route = self.routes.get(httptools.parse_url(self.url).path)
        if route is None:
            super().on_headers_complete()
            return
        self.scope["method"] = "POST"
        self.scope["path"] = self.url.decode("latin-1")  # for log messages
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        self.cycle = _Exchange(self, route, keep_alive)  # type: ignore[assignment]
        if self.expect_100_continue:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if isinstance(self.cycle, _Exchange):
            self.cycle.body += body
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        exchange = self.cycle
        if not isinstance(exchange, _Exchange):
            super().on_message_complete()
            return
        task = exchange.task = self.loop.create_task(exchange.run())
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)  # the server waits for it on a graceful shutdown

    def connection_lost(self, exc: Exception | None) -> None:
        exchange = self.cycle
        if isinstance(exchange, _Exchange) and not exchange.response_complete:
            exchange.disconnected = True
            if exchange.task is not None:
                exchange.task.cancel()  # the client went away: the stream's close cancels it in the engine
        super().connection_lost(exc)


def door_protocol(door: FrontDoor) -> Callable[..., asyncio.Protocol]:
    """The protocol factory uvicorn takes as ``Config(http=...)`` for a front door."""
    routes = {path.encode(): route for path, route in generation_routes(door).items()}
    return functools.partial(DoorProtocol, routes=routes)
