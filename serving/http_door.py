"""The front door's HTTP/1.1 connection: uvicorn's httptools protocol, with the generation endpoints answered on the
connection itself.

Through ASGI a streamed completion costs a task for the request cycle, the app's middleware stack, ``receive``
awaits for the body, and the response headers written apart from the first chunk, so the client wakes twice for
its first token. Here ``POST /v1/completions`` and ``POST /v1/chat/completions`` are validated when the body is
complete, run as one task, and answered with the status line, the headers and the first chunk in one write; the
following chunks go straight to the transport. Every other request (models, health, metrics, control API), and a
generation request pipelined behind another, goes through uvicorn's ASGI cycle as before, where
:class:`serving.api.GenerationFastPath` answers it with the same code.

The protocol also enforces the door's limits (``serving.config.DoorConfig``), which uvicorn's httptools protocol
lacks: it has a keep-alive timeout (``timeout_keep_alive``, set from the config) but no timeout while a request
arrives, no bound on headers or body, and its ``limit_concurrency`` answers every request 503 at the cap, /health
included. Here a request's headers must arrive within ``header_timeout_s`` and its body within ``body_timeout_s``
(408 and close); headers beyond ``max_header_bytes`` get a 431 and bodies beyond ``max_body_bytes`` a 413, from
Content-Length before reading or as a chunked body passes it; a connection beyond ``max_connections`` closes the
one idle (or still sending its request) for the longest, so health checks get through a flood of idle
connections; generation requests beyond ``max_inflight_requests`` get a 503 with Retry-After at once (a new
connection's from its request line, before parsing, then closed; a kept-alive one's when its headers are in). Every
refusal closes lingering (the client reads its answer, not a reset) and is counted by reason (``DoorRefusals``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.logging import TRACE_LOG_LEVEL
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.utils import get_local_addr, get_remote_addr, is_ssl

from profilers.exporter import DoorRefusals
from serving.api import SSE_DONE, Admission, FrontDoor, Route, SSEResponse, answer, error_response, generation_routes
from serving.config import DoorConfig

log = logging.getLogger(__name__)

LINGER_S = 2.0
"""After a refusal, how long the door keeps reading (and dropping) what the client still sends before it closes, so
that the client reads the answer instead of a reset (a lingering close, as Apache's and nginx's)."""
REFUSAL_REASONS = {503: "connections", 413: "body_too_large", 431: "headers_too_large", 408: "timeout"}
"""What each of the protocol's own refusals is counted as (``DoorRefusals``; the in-flight 503 is Admission's)."""
MAX_LINGERING = 256
"""Connections lingering at once; beyond it a refused connection is closed at once (they hold file descriptors)."""


class _Exchange:
    """One generation request answered on the connection. It stands where uvicorn keeps its request cycle
    (``protocol.cycle``), with the attributes uvicorn reads there (connection loss, shutdown, pipelining)."""

    __slots__ = ("body", "disconnected", "keep_alive", "message_event", "protocol", "rejected", "response_complete",
                 "response_started", "route", "task")

    def __init__(self, protocol: DoorProtocol, route: Route, keep_alive: bool) -> None:
        self.protocol = protocol
        self.route = route
        self.keep_alive = keep_alive
        self.body = bytearray()
        self.rejected = False  # answered 503 (in-flight cap) when its headers came: its body is read and dropped
        self.response_started = False
        self.response_complete = False
        self.disconnected = False
        self.message_event = asyncio.Event()  # set by uvicorn when the connection goes; nothing waits on it here
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        try:
            response = await answer(self.route, bytes(self.body))
            self.body = bytearray()
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
        self.response_started = True
        self.protocol.transport.write(b"".join([*self._head(status, headers, chunked=False), body]))

    def reject(self) -> None:
        """The door is at its in-flight cap as the headers arrive: the 503 now, before the body (which is then
        read and dropped, so the connection stays usable); the exchange completes with the request."""
        self.rejected = True
        overloaded = self.protocol.admission.overloaded()
        self._write_whole(overloaded.status_code, overloaded.raw_headers, overloaded.body)

    async def _stream(self, response: SSEResponse) -> None:
        transport, flow = self.protocol.transport, self.protocol.flow
        chunks = response.chunks
        try:
            # The first chunk is formatted from an event the door already holds: no wait between it and the headers.
            first = await anext(chunks, None)
            parts = self._head(200, response.raw_headers, chunked=True)
            self.response_started = True
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


class _Connections:
    """What the connections of one server share: the limits, and the connections that may be closed to make room
    for a new one (idle, or still sending a request), the longest in that state first."""

    def __init__(self, limits: DoorConfig, refusals: DoorRefusals) -> None:
        self.limits = limits
        self.refusals = refusals  # the door's counter, by reason (llm_energy_door_refused_total)
        self.max_connections = limits.max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and limits.max_connections > soft * 3 // 4:
            self.max_connections = max(2, soft * 3 // 4)
            log.warning("front door: max_connections %d is more than the open-file limit (%d) allows; using %d",
                        limits.max_connections, soft, self.max_connections)
        self.closable: dict[DoorProtocol, None] = {}  # insertion-ordered: the oldest first
        self.shed_lines: tuple[bytes, ...] = ()  # request lines a new connection's 503 is decided from (shed)
        self._shed: tuple[object, bytes] | None = None  # (uvicorn's default headers, the 503 built with them)
        self.evicted = 0
        self.refused = 0
        self.lingering = 0  # connections refused and draining (see DoorProtocol._linger)

    def shed_answer(self, default_headers: list[tuple[bytes, bytes]], admission: Admission) -> bytes:
        """The 503 (in-flight cap, ``Connection: close``) a shed connection gets, rebuilt when uvicorn's default
        headers change (their date, every second)."""
        if self._shed is None or self._shed[0] is not default_headers:
            response = admission.overloaded()
            head = [STATUS_LINE[503]]
            for name, value in (*default_headers, *response.raw_headers):
                head += [name, b": ", value, b"\r\n"]
            head.append(b"connection: close\r\n\r\n")
            self._shed = (default_headers, b"".join([*head, response.body]))
        return self._shed[1]


class DoorProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; the routes in ``routes`` (exact path, POST) are answered by an
    :class:`_Exchange` instead of the ASGI app, and the door's limits are enforced (see the module's docstring)."""

    def __init__(
        self, *args: Any, routes: dict[bytes, Route], admission: Admission, shared: _Connections, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.routes = routes
        self.admission = admission
        self.shared = shared
        self.limits = shared.limits
        self.phase = "idle"  # idle | headers | body | answering
        self.read_timer: asyncio.TimerHandle | None = None
        self.header_bytes = 0
        self.body_bytes = 0
        self.refused = False  # a limit answered this connection: it is closing, the rest of its input is dropped
        self.lingering = False  # refused, answered, and waiting for the client to close (see _linger)
        self.linger_bytes = 0  # while lingering: bytes still read and dropped before reading stops

    # Connections and timeouts

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Accept a connection; over the connection limit, close the oldest idle one or refuse this one with a 503."""
        if self.logger.level <= TRACE_LOG_LEVEL:
            super().connection_made(transport)
        else:  # uvicorn's, less the two addresses (a socket object and a system call each): see on_message_begin
            self.connections.add(self)
            self.transport = transport
            self.flow = FlowControl(transport)
            self.scheme = "https" if is_ssl(transport) else "http"
        shared = self.shared
        if len(self.connections) > shared.max_connections:
            victim = next(iter(shared.closable), None)
            if victim is None:  # every connection is being answered: this one waits for none of them
                shared.refused += 1
                self._refuse(503, "the server is at its connection limit; retry later", retry=True)
                return
            shared.evicted += 1
            victim.evict()
        shared.closable[self] = None
        self._arm(self.limits.header_timeout_s)  # a new connection must send its request in time

    def evict(self) -> None:
        """Make room for a new connection: close this idle (or slow) one."""
        self.shared.closable.pop(self, None)
        self._disarm()
        if self.phase == "idle":
            self.transport.close()  # an idle keep-alive connection: clients retry on a fresh one
        else:
            self._refuse(503, "the server is at its connection limit; retry later", retry=True)

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection; cancel its exchange in flight (the client went away)."""
        self.shared.closable.pop(self, None)
        self._disarm()
        if self.lingering:
            self.lingering = False
            self.shared.lingering -= 1
        exchange = self.cycle
        if isinstance(exchange, _Exchange) and not exchange.response_complete:
            exchange.disconnected = True
            exchange.body = bytearray()
            if exchange.task is not None:
                exchange.task.cancel()  # the client went away: the stream's close cancels it in the engine
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """The server is stopping: a refused connection closes now (it has its answer), the rest as uvicorn's."""
        if self.refused:
            self.transport.close()
        else:
            super().shutdown()

    def _arm(self, delay_s: float) -> None:
        self._disarm()
        self.read_timer = self.loop.call_later(delay_s, self._timed_out)

    def _disarm(self) -> None:
        if self.read_timer is not None:
            self.read_timer.cancel()
            self.read_timer = None

    def _timed_out(self) -> None:
        self.read_timer = None
        if self.phase == "answering" or self.transport.is_closing():
            return
        if self.phase == "idle" and self.header_bytes == 0:
            self.transport.close()  # a connection that never sent a byte of a request: nothing to answer
            return
        what = "headers" if self.phase in ("idle", "headers") else "body"
        self._refuse(408, f"the request's {what} did not arrive in time")

    def _refuse(self, status: int, message: str, retry: bool = False) -> None:
        """Answer ``status`` and close: the request (if any) is not served and nothing more is read."""
        self.refused = True
        self.shared.refusals.count(REFUSAL_REASONS[status])
        self.shared.closable.pop(self, None)
        self._disarm()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # an ASGI app reading the body sees a disconnect; its answer goes nowhere
            cycle.message_event.set()
            # What was read of the body goes now, not when the cycle collector finds the exchange (it and the
            # protocol refer to each other): four refused chunked bodies held 4 MiB each for minutes.
            cycle.body = bytearray() if isinstance(cycle, _Exchange) else b""
        if cycle is not None and (cycle.response_complete or getattr(cycle, "response_started", False)):
            self.transport.close()  # answered already (without reading the body): nothing more to say
            return
        response = error_response(status, message, code="overloaded" if status == 503 else "request_limit",
                                  headers={"retry-after": str(self.admission.retry_after_s)} if retry else None)
        head = [STATUS_LINE[status]]
        for name, value in (*self.server_state.default_headers, *response.raw_headers):
            head += [name, b": ", value, b"\r\n"]
        head.append(b"connection: close\r\n\r\n")
        if not self.transport.is_closing():
            self.transport.write(b"".join([*head, response.body]))
            self._linger()

    def _shed(self) -> None:
        """The door is at its in-flight cap and a new connection's first bytes are a generation request's line:
        its 503 from that line, before any parsing, and the connection closes (lingering). Overload comes as a
        flood of such requests, and each one the door parses delays the 503s of all behind it (3,000 streams at
        once: the last 503 waited for the parsing of every request before it). A kept-alive connection's request
        is parsed, refused when its headers are in, and the connection kept (:meth:`_Exchange.reject`)."""
        self.refused = True
        self.shared.closable.pop(self, None)
        self._disarm()
        self.transport.write(self.shared.shed_answer(self.server_state.default_headers, self.admission))
        self._linger()

    def _linger(self) -> None:
        """Close after a refusal so that the client reads the answer. Closing a socket with unread input sends a
        reset, and a client still sending its body (the one refused with a 413) then fails its write and often
        never reads the answer waiting in its buffer. So the door ends its side (FIN after the answer), reads
        and drops up to ``max_body_bytes`` more, then stops reading, and closes when the client does or after
        ``LINGER_S``, whichever is first."""
        transport, shared = self.transport, self.shared
        if shared.lingering >= MAX_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        shared.lingering += 1
        self.lingering = True
        self.linger_bytes = self.limits.max_body_bytes
        transport.write_eof()  # the client's next read after the answer is its end
        self.read_timer = self.loop.call_later(LINGER_S, transport.close)

    def _drop(self, n: int) -> None:
        """Input of a refused connection: dropped; once ``linger_bytes`` are, reading stops (see :meth:`_linger`)."""
        if self.linger_bytes:
            self.linger_bytes = max(0, self.linger_bytes - n)
            if not self.linger_bytes:
                self.transport.pause_reading()  # the rest waits in the socket until the timer closes it

    def data_received(self, data: bytes) -> None:
        """Feed bytes to the parser; a kept-alive connection's next request arms the header timeout."""
        if self.refused:
            self._drop(len(data))
            return
        admission = self.admission
        if (self.cycle is None and admission.inflight >= admission.limit and data.startswith(self.shared.shed_lines)
                and admission.full()):
            self._shed()
            return
        if self.phase == "idle" and self.read_timer is None:  # the first bytes of a request on a kept-alive one
            self._arm(self.limits.header_timeout_s)
        super().data_received(data)

    def on_response_complete(self) -> None:
        """After a response: the connection goes idle (the newest to close) unless a pipelined request waits."""
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        if self.phase == "answering" and not pipelined and not self.transport.is_closing():
            self.phase = "idle"
            self.header_bytes = 0
            self.shared.closable[self] = None  # the newest idle one: the last to be closed

    # Parser callbacks

    def on_message_begin(self) -> None:
        """A request begins: count its header bytes from here (a timeout now answers with a 408)."""
        if self.server is None:  # looked up for the first request's ASGI scope, not for every connection (shed)
            self.server, self.client = get_local_addr(self.transport), get_remote_addr(self.transport)
        super().on_message_begin()
        self.phase = "headers"
        self.header_bytes = 1  # a request has begun (a timeout answers it with a 408)
        self.body_bytes = 0

    def on_url(self, url: bytes) -> None:
        """Count the URL against the header size limit, then parse it."""
        if self.refused:
            return
        self._count_header(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """Count a header against the header size limit, then parse it."""
        if self.refused:
            return
        self._count_header(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_header(self, n: int) -> None:
        self.header_bytes += n
        if self.header_bytes > self.limits.max_header_bytes:
            self._refuse(431, f"the request's headers are larger than {self.limits.max_header_bytes} bytes")

    def on_headers_complete(self) -> None:
        """Headers done: arm the body timeout; refuse a declared body over the limit with a 413."""
        if self.refused:
            return
        self.phase = "body"
        self._arm(self.limits.body_timeout_s)
        for name, value in self.headers:
            if name == b"content-length" and value.isdigit() and int(value) > self.limits.max_body_bytes:
                self._refuse(413, f"the request's body ({int(value)} bytes) is larger than the limit of "
                                  f"{self.limits.max_body_bytes} bytes")
                return
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
        exchange = self.cycle = _Exchange(self, route, keep_alive)  # type: ignore[assignment]
        if self.expect_100_continue:  # the client waits for this before its body: the cap is checked after it
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        elif self.admission.full():  # the 503 before the body, with nothing allocated for the request
            exchange.reject()

    def on_body(self, body: bytes) -> None:
        """Count body bytes against the limit (413 over it) and collect them for the request."""
        if self.refused:
            return
        self.body_bytes += len(body)
        if self.body_bytes > self.limits.max_body_bytes:
            self._refuse(413, f"the request's body is larger than the limit of {self.limits.max_body_bytes} bytes")
            return
        if isinstance(self.cycle, _Exchange):
            if not self.cycle.rejected:
                self.cycle.body += body
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        """Request complete: a generation request is admitted (or 503) and answered by a task, others through ASGI."""
        if self.refused:
            return
        self._disarm()
        self.phase = "answering"
        self.shared.closable.pop(self, None)
        exchange = self.cycle
        if not isinstance(exchange, _Exchange):
            super().on_message_complete()
            return
        admission = self.admission
        if exchange.rejected:  # answered 503 when its headers came
            exchange._complete()
            return
        if not admission.enter():  # at the in-flight cap: answered now, without a task; the connection is kept
            exchange.reject()
            exchange._complete()
            return
        task = exchange.task = self.loop.create_task(exchange.run())
        # Its place is given back when the task ends, even cancelled before it ran (the client went at once).
        task.add_done_callback(lambda _: admission.leave())
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)  # the server waits for it on a graceful shutdown


def door_protocol(door: FrontDoor) -> Callable[..., asyncio.Protocol]:
    """The protocol factory uvicorn takes as ``Config(http=...)`` for a front door (one per server: the
    connection limit is the server's)."""
    routes = {path.encode(): route for path, route in generation_routes(door).items()}
    shared = _Connections(door.limits, door.refusals)
    shared.shed_lines = tuple(b"POST %s HTTP/1." % path for path in routes)
    return functools.partial(DoorProtocol, routes=routes, admission=door.admission, shared=shared)
