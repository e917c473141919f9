"""A lean HTTP/1.1 keep-alive client for streamed responses, built on asyncio protocols and ``httptools``.

Why not httpx: at 1,000 requests/s on two cores its per-request overhead (a task, an async context manager and a
line iterator per response) costs more CPU than the server it measures and bends the arrival process. Here a
request is one ``transport.write`` of pre-built bytes and a response is a list of ``(arrival time, bytes)`` pieces
appended from ``data_received``; everything else (SSE parsing, statistics) happens after the response ends.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools


@dataclass(frozen=True)
class Endpoint:
    """Where requests go: host, port, path prefix and whether TLS is used, parsed from a base URL."""

    host: str
    port: int
    path_prefix: str
    tls: bool

    @classmethod
    def parse(cls, base_url: str) -> Endpoint:
        """Parse ``http(s)://HOST[:PORT][/PREFIX]``; ValueError for anything else."""
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"target URL {base_url!r} must be http://HOST[:PORT][/PREFIX] or https://...")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.hostname, port, parts.path.rstrip("/"), parts.scheme == "https")

    @property
    def host_header(self) -> str:
        """The ``Host`` header value: the host, bracketed if IPv6, with the port unless it is the default."""
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def post_request(endpoint: Endpoint, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """The bytes of one keep-alive POST with a JSON body."""
    lines = [
        f"POST {endpoint.path_prefix}{path} HTTP/1.1",
        f"host: {endpoint.host_header}",
        "content-type: application/json",
        "accept: text/event-stream",
        f"content-length: {len(body)}",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass(eq=False)
class Exchange:
    """One request and its response as it arrived; ``on_end`` runs once, after the last byte or the error."""

    payload: bytes
    on_end: Callable[[Exchange], None]
    sent_at: float = 0.0
    """perf_counter() right before the request was handed to the socket."""
    status: int = 0
    headers_at: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    pieces: list[tuple[float, bytes]] = field(default_factory=list)
    """Body pieces (chunked encoding already removed), each with the perf_counter() of the read that brought it."""
    error: str = ""
    deadline: float = float("inf")
    ended: bool = False
    retried: bool = False

    def end(self, error: str = "") -> None:
        """Finish the exchange once (``error`` empty on success) and hand it to ``on_end``."""
        if self.ended:
            return
        self.ended = True
        self.error = error
        self.on_end(self)


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one exchange at a time."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.read_at = 0.0
        self.used = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.read_at = time.perf_counter()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(f"malformed HTTP response: {e}")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)
        ex, self.exchange = self.exchange, None
        if ex is None:
            return
        if not ex.pieces and ex.status == 0 and self.used and self.pool.retry_stale(ex):
            return  # the server closed an idle keep-alive connection just as we reused it: resent on a fresh one
        reason = f": {exc}" if exc else ""
        ex.end(f"RemoteProtocolError: the server closed the connection before the response ended{reason}")

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.exchange is not None:
            self.exchange.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self.exchange is not None:
            self.exchange.status = self.parser.get_status_code()
            self.exchange.headers_at = self.read_at

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.pieces.append((self.read_at, body))

    def on_message_complete(self) -> None:
        ex, self.exchange = self.exchange, None
        if self.parser.should_keep_alive() and self.transport is not None and not self.transport.is_closing():
            self.pool.release(self)
        else:
            self.close()
        if ex is not None:
            ex.end()

    def send(self, ex: Exchange) -> None:
        assert self.transport is not None
        self.exchange = ex
        self.used = True
        # Stamped before the write: the server may read the request before write() returns to us.
        ex.sent_at = time.perf_counter()
        self.transport.write(ex.payload)

    def _fail(self, error: str) -> None:
        ex, self.exchange = self.exchange, None
        if ex is not None:
            ex.end(error)

    def close(self) -> None:
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.close()


class ConnectionPool:
    """Idle keep-alive connections to one endpoint; a send never waits for another request's response."""

    def __init__(self, endpoint: Endpoint, connect_timeout_s: float = 10.0) -> None:
        self.endpoint = endpoint
        self.connect_timeout_s = connect_timeout_s
        self.idle: list[_Connection] = []
        self.busy: set[_Connection] = set()
        self._ssl = ssl.create_default_context() if endpoint.tls else None
        self._tasks: set[asyncio.Task[None]] = set()

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: _Connection(self), self.endpoint.host, self.endpoint.port, ssl=self._ssl),
            self.connect_timeout_s,
        )
        return conn

    async def warm(self, n: int) -> None:
        """Open connections ahead of the schedule so the first sends do not pay for the handshake."""
        need = max(0, n - len(self.idle))
        conns = await asyncio.gather(*(self._open() for _ in range(need)))
        self.idle.extend(conns)

    def send(self, ex: Exchange) -> None:
        """Write now on an idle connection, or open one in the background and write when it is up."""
        while self.idle:
            conn = self.idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                self.busy.add(conn)
                conn.send(ex)
                return
        task = asyncio.get_running_loop().create_task(self._send_fresh(ex))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_fresh(self, ex: Exchange) -> None:
        try:
            conn = await self._open()
        except (OSError, TimeoutError) as e:
            what = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
            ex.sent_at = time.perf_counter()
            ex.end(f"ConnectError: cannot connect to {self.endpoint.host}:{self.endpoint.port}: {what}")
            return
        if ex.ended:  # timed out while connecting
            conn.close()
            return
        self.busy.add(conn)
        conn.send(ex)

    def retry_stale(self, ex: Exchange) -> bool:
        """Resend an exchange that met a stale keep-alive connection, once; False if it was already retried."""
        if ex.retried:
            return False
        ex.retried = True
        self.send(ex)
        return True

    def release(self, conn: _Connection) -> None:
        """Return a connection whose exchange finished to the idle pool for reuse."""
        self.busy.discard(conn)
        self.idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        """Drop a closed connection from the pool."""
        self.busy.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)

    def expire(self, now: float) -> None:
        """End exchanges past their deadline (their connection is closed: HTTP/1.1 cannot cancel a response)."""
        for conn in list(self.busy):
            ex = conn.exchange
            if ex is not None and now > ex.deadline:
                conn.exchange = None
                conn.close()
                ex.end("ReadTimeout: no complete response before the request timeout")

    async def aclose(self) -> None:
        """Cancel pending connects and close every connection of the pool."""
        for task in list(self._tasks):
            task.cancel()
        for conn in [*self.idle, *self.busy]:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()
        self.busy.clear()
