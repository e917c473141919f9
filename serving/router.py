"""Chooses a replica for each request and routes around dead ones."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import logging
import operator
import pickle
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import ray.exceptions

from profilers import trace
from profilers.errors import TestbedError
from profilers.exporter import ExportSnapshot
from serving.replica import StreamError, Telemetry, channel_proof, export_snapshot
from serving.types import GenerationRequest, RequestRejectedError, TokenEvent

log = logging.getLogger(__name__)

# Errors that mean the replica (its actor, process or node) is gone, not that the request was bad.
REPLICA_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class NoReplicaError(TestbedError, RuntimeError):
    """No live replica can take the request."""


class ReplicaUnresponsiveError(TestbedError, RuntimeError):
    """The replica answered no heartbeat within the deadline (hung, stopped, or its node partitioned): its requests
    are ended and it gets none until it answers again."""


class ReplicaFailedError(TestbedError, RuntimeError):
    """The replica died after it had streamed tokens; the request cannot be resumed transparently."""


class _ChannelClosed:
    """Put in a request's queue when the channel's stream ends: carries why."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Channel:
    """This router's requests to one replica and their events, split into one queue per request: a TCP connection
    to the replica (``Replica.stream_address``) carries requests one way and one frame of events per engine
    iteration the other. One reader task per replica, started on first use, restarted after a failure."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self.id = uuid.uuid4().hex
        self.queues: dict[str, asyncio.Queue[TokenEvent | StreamError | _ChannelClosed]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Future[asyncio.StreamWriter] | None = None

    def open(self, request_id: str) -> asyncio.Queue[TokenEvent | StreamError | _ChannelClosed]:
        """Register a request's event queue, (re)starting the reader and connection if needed."""
        if self._reader is None or self._reader.done():
            self._writer = asyncio.get_running_loop().create_future()
            self._reader = asyncio.create_task(self._read())
        queue: asyncio.Queue[TokenEvent | StreamError | _ChannelClosed] = asyncio.Queue()
        self.queues[request_id] = queue
        return queue

    async def submit(self, request: GenerationRequest) -> None:
        """Start a request (after :meth:`open`); a rejection arrives in its queue."""
        assert self._writer is not None
        # Connected: no await (a task step per request); else wait, raising the channel's error if it failed.
        writer = self._writer.result() if self._writer.done() else await asyncio.shield(self._writer)
        self._send(writer, {"submit": request.__dict__})  # a flat dataclass: no deep copy (asdict) needed

    def cancel(self, request_id: str) -> None:
        """Ask the replica to cancel a request (only if the connection is up)."""
        if self._writer is not None and self._writer.done() and not self._writer.exception():
            self._send(self._writer.result(), {"cancel": request_id})

    @staticmethod
    def _send(writer: asyncio.StreamWriter, command: dict[str, Any]) -> None:
        if writer.is_closing():
            raise ConnectionResetError("the replica's channel is closed")
        data = json.dumps(command, separators=(",", ":")).encode()
        writer.write(len(data).to_bytes(4, "big") + data)

    def close(self, request_id: str) -> None:
        """Drop a finished request's queue."""
        self.queues.pop(request_id, None)

    def fail(self, error: BaseException) -> None:
        """End every open request of this channel with ``error`` (the replica stopped answering)."""
        for queue in self.queues.values():
            queue.put_nowait(_ChannelClosed(error))

    def _dispatch(self, batch: list[TokenEvent | StreamError]) -> None:
        for item in batch:
            if (queue := self.queues.get(item.request_id)) is not None:
                queue.put_nowait(item)

    async def _read(self) -> None:
        error: BaseException = RuntimeError("the replica closed the event stream")
        try:
            await self._read_socket()
        except asyncio.CancelledError:
            raise
        except (OSError, asyncio.IncompleteReadError) as e:
            error = await self._why_closed(e)
        except BaseException as e:  # the actor died, or its node: every open request learns it
            error = e
        if self._writer is not None and not self._writer.done():
            self._writer.set_exception(error)
            self._writer.exception()  # retrieved: no "never retrieved" warning when no request waits on it
        for queue in self.queues.values():
            queue.put_nowait(_ChannelClosed(error))

    async def _read_socket(self) -> None:
        host, port, secret = await self.actor.stream_address.remote()
        reader, writer = await asyncio.open_connection(host, port)
        try:
            nonce = secrets.token_hex(16)
            writer.write(f"{secret} {self.id} {nonce}\n".encode())
            proof = (await asyncio.wait_for(reader.readline(), 30)).strip()
            if not hmac.compare_digest(proof, channel_proof(secret, self.id, nonce)):
                # Whoever answered does not hold the replica's secret: nothing it sends is unpickled.
                raise ConnectionRefusedError(f"the peer at {host}:{port} did not prove the replica's channel secret")
            assert self._writer is not None
            self._writer.set_result(writer)
            while True:
                size = int.from_bytes(await reader.readexactly(4), "big")
                batch = pickle.loads(await reader.readexactly(size))
                trace.mark_first_tokens(batch, "router.frame")
                self._dispatch(batch)
        finally:
            writer.close()

    async def _why_closed(self, error: BaseException) -> BaseException:
        """The socket closed under the router: if the actor is gone, say so in Ray's terms (the router then routes
        around it and retries what had not started)."""
        try:
            await asyncio.wait_for(self.actor.describe.remote(), 30)
        except REPLICA_GONE as gone:
            return gone
        except TimeoutError:
            return ray.exceptions.ActorUnavailableError(
                f"the replica's event stream broke ({error!r}) and the actor did not answer within 30 s", None
            )
        except Exception as e:
            return e
        return ConnectionError(f"the replica's event stream closed while the actor is alive: {error!r}")

    async def stop(self) -> None:
        """Stop the reader task (its connection closes with it)."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader


@dataclass
class ReplicaHandle:
    """The router's view of one replica: its actor, requests outstanding and routed, liveness, stream channel."""

    name: str
    actor: Any
    outstanding: int = 0
    routed: int = 0
    alive: bool = True
    backend: str = "emulated"
    channel: Channel | None = None
    """Set for Ray replica actors (they offer ``stream_address``); in-process stand-ins stream per request."""
    local: Any = None
    """The replica itself when this router runs in its actor (a front door hosted by the replica): requests call
    its ``generate`` in process, no crossing; ``actor`` stays its Ray handle for telemetry and knobs."""
    responsive: bool = True
    """False while the replica misses its heartbeat deadline: routed around, reported on /health and /metrics."""
    last_telemetry: Telemetry | None = None
    """Its last answer: a dead or hung replica's counters stay in the exporter's snapshot (energy is never lost)."""
    last_answer_s: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.channel is None and self.local is None and _has_channel(self.actor):
            self.channel = Channel(self.actor)


_LOAD = operator.attrgetter("outstanding", "routed")
"""Least-outstanding routing's order: ties go to the replica given the fewest requests, so light load still spreads."""


def _has_channel(actor: Any) -> bool:
    return hasattr(actor, "stream_address")


def _unwrap(error: BaseException) -> BaseException:
    """Ray wraps exceptions raised in actors; recover the engine's own error when there is one."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


class Router:
    """Least-outstanding-requests (default) or round-robin; one retry on another replica if the chosen
    replica dies before the first token (nothing was streamed, so the retry is invisible to the client)."""

    def __init__(self, replicas: list[ReplicaHandle], policy: str = "least_outstanding", retries: int = 1) -> None:
        if not replicas:
            raise ValueError("a router needs at least one replica")
        self.replicas = replicas
        self.policy = policy
        self.retries = retries
        self._rr = itertools.cycle(range(len(replicas)))
        self.pack_per_replica = 0
        self._watch: asyncio.Task[None] | None = None
        """Set by a controller (knob ``pack_per_replica``): fill replicas in order up to this many requests."""

    def routable(self) -> list[ReplicaHandle]:
        """Replicas that may take a request: alive and answering their heartbeat."""
        return [r for r in self.replicas if r.alive and r.responsive]

    def live(self) -> list[ReplicaHandle]:
        """Replicas still alive."""
        return [r for r in self.replicas if r.alive]

    def pick(self, exclude: set[str] = frozenset()) -> ReplicaHandle:  # type: ignore[assignment]
        """The replica for the next request: round robin, packing, or least outstanding; NoReplicaError if none."""
        if self.policy != "round_robin" and self.pack_per_replica <= 0:
            # The common case in one C-level pass (a fleet of hundreds routes every request): the least loaded of
            # all replicas is the least loaded candidate whenever it is a candidate (ties: the first listed).
            best = min(self.replicas, key=_LOAD)
            if best.alive and best.responsive and best.name not in exclude:
                return best
        candidates = [r for r in self.live() if r.name not in exclude and r.responsive]
        if not candidates:
            dead = [r.name for r in self.replicas if not r.alive]
            hung = [r.name for r in self.replicas if r.alive and not r.responsive]
            raise NoReplicaError(f"no live replica to serve the request (dead: {', '.join(dead) or 'none'}; "
                                 f"not answering: {', '.join(hung) or 'none'})")
        if self.policy == "round_robin":
            for _ in range(len(self.replicas)):
                r = self.replicas[next(self._rr)]
                if r in candidates:
                    return r
        if self.pack_per_replica > 0:
            # The busiest replica with room (ties: the first listed): the load packs onto as few replicas as the
            # limit allows and the others drain; every replica full: the least loaded.
            room = [r for r in candidates if r.outstanding < self.pack_per_replica]
            if room:
                return max(room, key=lambda r: (r.outstanding, -self.replicas.index(r)))
        return min(candidates, key=_LOAD)

    def mark_dead(self, replica: ReplicaHandle, error: BaseException) -> None:
        """Stop routing to a replica that died (logged once)."""
        if replica.alive:
            log.error("replica %s is gone (%s); routing around it", replica.name, type(error).__name__)
        replica.alive = False

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream a request's events from a replica, retrying on another if one dies before the first event."""
        tried: set[str] = set()
        while True:
            replica = self.pick(tried)
            tried.add(replica.name)
            started = False
            replica.outstanding += 1
            replica.routed += 1
            try:
                trace.mark(request.request_id, "router.dispatch")
                if replica.local is not None:
                    events = replica.local.generate(request)
                elif replica.channel is not None:
                    events = self._channel_events(replica, request)
                else:
                    events = self._events(replica, request)
                # Closed here when the client goes away, not when the collector gets to it: closing ends the
                # request in the engine (in process, the engine's own generator; over a channel, a cancel).
                async with contextlib.aclosing(events):
                    async for event in events:
                        if not started:
                            trace.mark(request.request_id, "router.first_event")
                        started = True
                        yield event
                return
            except (*REPLICA_GONE, ReplicaUnresponsiveError) as e:
                # Dead for good, or silent past its deadline (routed to again once it answers): either way nothing
                # more comes from it, so a request not yet streamed is retried elsewhere.
                what = "stopped answering" if isinstance(e, ReplicaUnresponsiveError) else "died"
                if what == "died":
                    self.mark_dead(replica, e)
                if started:
                    raise ReplicaFailedError(
                        f"replica {replica.name} {what} after streaming part of the response"
                    ) from e
                if len(tried) > self.retries:
                    raise NoReplicaError(f"replica {replica.name} {what} and the retry budget is spent") from e
            except ray.exceptions.RayTaskError as e:
                cause = _unwrap(e)
                if isinstance(cause, RequestRejectedError):
                    raise cause from None
                raise
            finally:
                replica.outstanding -= 1

    @staticmethod
    async def _events(replica: ReplicaHandle, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        async for ref in replica.actor.generate.options(num_returns="streaming").remote(request):
            yield await ref

    @staticmethod
    async def _channel_events(replica: ReplicaHandle, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        channel = replica.channel
        assert channel is not None
        rid = request.request_id
        queue = channel.open(rid)  # before submitting: the first events may arrive before submit returns
        finished = False
        try:
            with contextlib.suppress(OSError):  # a broken socket: the reader puts the diagnosed reason in the queue
                await channel.submit(request)
            while not finished:
                item = await queue.get()
                if isinstance(item, _ChannelClosed | StreamError):
                    raise item.error
                finished = item.finished
                yield item
        finally:
            channel.close(rid)
            if not finished:  # the client went away or the stream failed: free the engine's slot
                with contextlib.suppress(Exception):
                    channel.cancel(rid)

    async def stop(self) -> None:
        """Stop the heartbeat and every replica's stream channel."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        for r in self.replicas:
            if r.channel is not None:
                await r.channel.stop()

    async def telemetry(self, timeout_s: float = 2.0) -> list[tuple[ReplicaHandle, Telemetry]]:
        """Telemetry of every live replica that answers in time; a replica whose actor is gone is marked dead."""
        live = self.live()

        async def fetch(r: ReplicaHandle) -> Telemetry | None:
            try:
                r.last_telemetry = await asyncio.wait_for(r.actor.telemetry.remote(), timeout_s)
                r.last_answer_s = time.monotonic()
                return r.last_telemetry
            except REPLICA_GONE as e:
                self.mark_dead(r, e)
            except TimeoutError:
                log.warning("replica %s did not report telemetry within %.1f s", r.name, timeout_s)
            return None

        results = await asyncio.gather(*(fetch(r) for r in live))
        return [(r, tel) for r, tel in zip(live, results, strict=True) if tel is not None]

    async def snapshot(self, timeout_s: float = 2.0) -> ExportSnapshot:
        """What the exporter publishes: every replica's devices and counters. A replica that is dead or did not
        answer keeps its last counters (frozen, ``up`` 0): the energy it used up to then stays in every window."""
        fresh = {r.name for r, _ in await self.telemetry(timeout_s)}
        seen = [r for r in self.replicas if r.last_telemetry is not None]
        return export_snapshot(
            ((r.name, r.backend, r.last_telemetry) for r in seen),  # type: ignore[misc]
            down={r.name for r in seen if r.name not in fresh or not r.responsive},
        )

    def start_watch(self, period_s: float, deadline_s: float) -> None:
        """Run :meth:`watch` in the background until :meth:`stop`."""
        self._watch = asyncio.ensure_future(self.watch(period_s, deadline_s))

    async def watch(self, period_s: float = 1.0, deadline_s: float = 10.0) -> None:
        """Heartbeat every live replica each period (a telemetry call): one silent for ``deadline_s`` is marked not
        answering, its open requests end with :class:`ReplicaUnresponsiveError`, and it is routed around until it
        answers again. Runs until cancelled."""
        while True:
            await asyncio.gather(*(self._beat(r, period_s, deadline_s) for r in self.live() if r.local is None))
            await asyncio.sleep(period_s)

    async def _beat(self, r: ReplicaHandle, period_s: float, deadline_s: float) -> None:
        try:
            r.last_telemetry = await asyncio.wait_for(r.actor.telemetry.remote(), max(period_s, 0.5))
            r.last_answer_s = time.monotonic()
        except REPLICA_GONE as e:
            self.mark_dead(r, e)
            return
        except TimeoutError:
            silent = time.monotonic() - r.last_answer_s
            if r.responsive and silent > deadline_s:
                r.responsive = False
                log.error("replica %s answered no heartbeat for %.1f s: routing around it and ending its requests",
                          r.name, silent)
                if r.channel is not None:
                    r.channel.fail(ReplicaUnresponsiveError(
                        f"replica {r.name} answered no heartbeat for {deadline_s:g} s: its requests were ended"))
            return
        if not r.responsive:
            log.warning("replica %s answers again: routing to it", r.name)
            r.responsive = True
