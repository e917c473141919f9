"""A replica: one engine hosted in a Ray actor, streaming token events back to the router."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import pickle
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import ray

from profilers import trace
from profilers.exporter import DeviceSample, ExportSnapshot
from profilers.types import DeviceInfo, PowerReading
from serving.config import parse_engine_config
from serving.engine import Engine, build_engine
from serving.types import AppliedKnobs, EngineStats, GenerationRequest, Knobs, TokenEvent, merge_events

log = logging.getLogger(__name__)


class HostedService(Protocol):
    """Something a caller runs on a replica actor's event loop (see :meth:`Replica.host`); sent pickled."""

    async def start(self, replica: Replica) -> dict[str, Any]:
        """Start on the replica's event loop; returns where it listens (e.g. the URL)."""

    async def wait(self) -> None:
        """Return when the service has ended."""

    async def stop(self) -> None:
        """Stop the service."""


@dataclass(frozen=True)
class Telemetry:
    """What the exporter needs from a replica, fetched in one round trip."""

    stats: EngineStats
    devices: list[DeviceInfo]
    readings: list[PowerReading]
    supported_clocks_mhz: tuple[float, ...] = ()


def channel_proof(secret: str, channel: str, nonce: str) -> bytes:
    """What a replica answers a router's nonce with: an HMAC only a holder of the channel's secret can compute."""
    return hmac.new(secret.encode(), f"{channel} {nonce}".encode(), "sha256").hexdigest().encode()


def export_snapshot(replicas: Iterable[tuple[str, str, Telemetry]], down: Set[str] = frozenset()) -> ExportSnapshot:
    """The exporter's view of replicas given as (name, backend, telemetry): one conversion for every caller.
    ``down``: replicas whose telemetry is their last answer (dead or not answering), exported with ``up`` 0."""
    snap = ExportSnapshot()
    for name, backend, tel in replicas:
        infos = {d.device: d for d in tel.devices}
        for rd in tel.readings:
            info = infos.get(rd.device)
            snap.devices.append(
                DeviceSample(name, rd.device, info.backend if info else backend, str(rd.provenance),
                             rd.energy_j, rd.power_w, rd.clock_mhz,
                             preset=info.preset if info else None, calibration=info.calibration if info else None)
            )
        sample = tel.stats.export_sample(name)
        snap.replicas.append(dataclasses.replace(sample, up=False) if name in down else sample)
    return snap


@dataclass(frozen=True)
class StreamError:
    """A request's stream ended with an engine error (travels in a channel batch in place of an event)."""

    request_id: str
    error: BaseException


class _Outbox:
    """Events of one channel's requests waiting to be shipped as the next batch."""

    def __init__(self) -> None:
        self.items: dict[str, list[TokenEvent | StreamError]] = {}
        self.on_ready: Callable[[], None] | None = None
        """Called when the outbox stops being empty (the socket channel schedules its flush)."""

    def put(self, item: TokenEvent | StreamError) -> None:
        was_empty = not self.items
        self.items.setdefault(item.request_id, []).append(item)
        if was_empty and self.on_ready is not None:
            self.on_ready()

    def drain(self) -> list[TokenEvent | StreamError]:
        batch: list[TokenEvent | StreamError] = []
        for items in self.items.values():
            events = [i for i in items if isinstance(i, TokenEvent)]
            if events:  # a reader that fell behind gets one event per request, not a backlog
                batch.append(merge_events(events))
            batch.extend(i for i in items if isinstance(i, StreamError))
        self.items = {}
        return batch


def run_at_normal_priority(replica: str) -> int:
    """Bring every thread of this process back to niceness 0; returns the niceness it then runs at.

    Ray starts worker processes at niceness 15 (its ``worker_niceness``, so that tasks do not starve the raylet).
    A replica is the workload being measured: at 15, its engine (the engine-core process inherits the niceness of
    the thread that starts it) loses the CPU to the front door, the load generator and every other process at 0 on
    a busy host, and the latency measured is the scheduler's. Linux keeps a niceness per thread, and threads and
    processes inherit their creator's, so each existing thread is reset before the engine starts anything. Lowering
    the niceness needs CAP_SYS_NICE: without it the replica keeps Ray's and says how to start Ray instead."""
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    if niceness <= 0:
        return niceness
    try:
        for task in Path("/proc/self/task").iterdir():
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                os.setpriority(os.PRIO_PROCESS, int(task.name), 0)
    except PermissionError:
        log.warning(
            "replica %s runs at niceness %d (Ray's worker_niceness) and may not lower it: on a busy host its engine "
            "gets less CPU than the front door. Start Ray with RAY_worker_niceness=0 in its environment (local "
            "clusters started by the testbed do), or give the workers CAP_SYS_NICE", replica, niceness,
        )
    return os.getpriority(os.PRIO_PROCESS, 0)


class Replica:
    """Actor body (wrapped with ``ray.remote`` as :data:`ReplicaActor`).

    Two ways to stream: ``generate`` (one Ray message per event, for callers that want one request) and the
    channel, for routers: a TCP connection to the replica (``stream_address``) carrying requests and cancellations
    one way and, the other way, the events of all of the router's requests produced by one engine iteration as one
    frame. A Ray message costs ~0.5 ms of CPU in this process (which also runs the engine's output handling) and
    ~0.7 ms in the caller, a Ray call more; a frame on a socket costs tens of microseconds."""

    def __init__(self, replica: str, engine_config: dict[str, Any], channel_host: str | None = None) -> None:
        self.replica = replica
        self._channel_host = channel_host
        self.niceness = run_at_normal_priority(replica)
        self.engine: Engine = build_engine(parse_engine_config(engine_config), replica)
        self.defaults = Knobs()
        self._lease_until: float | None = None
        self._lease_s = 0.0
        self._applying = 0  # knob changes in progress (an engine restart): the watchdog waits for them
        self._watchdog: asyncio.Task[None] | None = None
        self._outboxes: dict[str, _Outbox] = {}
        self._pumps: dict[str, tuple[str, asyncio.Task[None]]] = {}
        self._server: asyncio.Server | None = None
        self._secret = secrets.token_hex(16)
        self._hosted: HostedService | None = None

    async def start(self) -> dict[str, Any]:
        """Start the engine, keep its start-up knobs as defaults; returns pid, node, GPUs and engine description."""
        await self.engine.start()
        current = await self.engine.apply(Knobs())  # a no-op that reports the engine's start-up knobs
        self.defaults = current.as_knobs()
        node = ray.get_runtime_context().get_node_id()
        info = {"replica": self.replica, "pid": os.getpid(), "node_id": node, "niceness": self.niceness,
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
        describe = getattr(self.engine, "describe", None)
        return {**info, **describe()} if describe else info

    async def describe(self) -> dict[str, Any]:
        """The replica's name and backend with what its engine says of itself (model, version, KV cache...)."""
        describe = getattr(self.engine, "describe", None)
        return {"replica": self.replica, "backend": self.engine.backend, **(describe() if describe else {})}

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream a request's token events from the engine (Ray streaming-generator path)."""
        trace.mark(request.request_id, "actor.receive")
        async for event in self.engine.generate(request):
            if event.index == 0:
                trace.mark(request.request_id, "actor.first_event")
            yield event

    # --- channel: many requests, one stream of event batches ------------------------------------------
    def _outbox(self, channel: str) -> _Outbox:
        return self._outboxes.setdefault(channel, _Outbox())

    async def submit(self, request: GenerationRequest, channel: str) -> None:
        """Start a request whose events go to ``channel``; a request the engine rejects raises here."""
        trace.mark(request.request_id, "actor.receive")
        stream = self.engine.generate(request)  # validates before any event exists
        outbox = self._outbox(channel)
        rid = request.request_id
        self._pumps[rid] = (channel, asyncio.create_task(self._pump(rid, stream, outbox)))

    async def _pump(self, rid: str, stream: AsyncIterator[TokenEvent], outbox: _Outbox) -> None:
        try:
            async for event in stream:
                if event.index == 0:
                    trace.mark(rid, "actor.first_event")
                outbox.put(event)
        except asyncio.CancelledError:
            pass  # cancelled by the router: the client went away
        except Exception as e:  # the engine failed this request: the router raises it to the client
            log.exception("replica %s: request %s failed", self.replica, rid)
            outbox.put(StreamError(rid, e))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()  # aborts the request in the engine if it had not finished
            self._pumps.pop(rid, None)

    async def cancel(self, request_id: str) -> None:
        """Cancel a request streamed over the channel (the client went away)."""
        if (pump := self._pumps.get(request_id)) is not None:
            pump[1].cancel()

    def _close_channel(self, channel: str) -> None:
        """The router went away: nobody will read these requests' events."""
        self._outboxes.pop(channel, None)
        for ch, task in list(self._pumps.values()):
            if ch == channel:
                task.cancel()

    async def stream_address(self) -> tuple[str, int, str]:
        """Where a router connects for its channel on a socket, and the secret it must present (handed out
        through Ray only, so only members of the Ray cluster can open a channel). See :meth:`_serve_channel`."""
        if self._server is None:
            host = self._channel_host or ray.util.get_node_ip_address()
            self._server = await asyncio.start_server(self._serve_channel, host, 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port, self._secret

    async def _serve_channel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One router's channel on a socket. The router sends ``SECRET CHANNEL NONCE\\n`` and this side proves it
        holds the secret too (:func:`channel_proof`), so the router unpickles frames only from the replica; then the
        router sends JSON frames (4-byte length, ``{"submit": request}`` or ``{"cancel": request_id}``) and this side
        frames of pickled batches, as :meth:`events` yields them. Rejected requests come back as
        :class:`StreamError`."""
        channel = None
        try:
            line = (await asyncio.wait_for(reader.readline(), 30)).decode(errors="replace").split()
            if len(line) != 3 or not hmac.compare_digest(line[0], self._secret):
                log.warning("replica %s: refused a channel connection without the secret", self.replica)
                return
            channel = line[1]
            writer.write(channel_proof(self._secret, channel, line[2]) + b"\n")
            outbox = self._outbox(channel)
            flush = _ChannelFlush(outbox, writer)
            outbox.on_ready = flush.schedule
            if outbox.items:
                flush.schedule()
            try:
                await self._channel_commands(reader, channel, outbox)
            finally:
                outbox.on_ready = None
                flush.stop()
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            if channel:
                self._close_channel(channel)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _channel_commands(self, reader: asyncio.StreamReader, channel: str, outbox: _Outbox) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                size = int.from_bytes(await reader.readexactly(4), "big")
                command = json.loads(await reader.readexactly(size))
                if "submit" in command:
                    request = GenerationRequest(**command["submit"])
                    trace.mark(request.request_id, "actor.frame")  # read off the socket: the wire ends here
                    try:
                        await self.submit(request, channel)
                    except Exception as e:  # rejected: the router raises it to its client
                        outbox.put(StreamError(request.request_id, e))
                elif "cancel" in command:
                    await self.cancel(command["cancel"])

    async def telemetry(self) -> Telemetry:
        """The engine's stats, devices, power readings and supported clocks, for the router and controller."""
        source = self.engine
        devices = source.devices() if hasattr(source, "devices") else []
        readings = source.read() if hasattr(source, "read") else []
        clocks = tuple(source.supported_clocks_mhz()) if hasattr(source, "supported_clocks_mhz") else ()
        return Telemetry(self.engine.stats(), devices, readings, clocks)

    async def apply(self, knobs: Knobs) -> AppliedKnobs:
        """Apply knobs to the engine (may restart it); the lease watchdog waits while this runs."""
        # A knob can restart the engine (seconds to minutes), and the controller that asked waits for the answer
        # before its next heartbeat: the change's own duration is not the controller's silence.
        self._applying += 1
        try:
            return await self.engine.apply(knobs)
        finally:
            self._applying -= 1
            if self._lease_until is not None:
                self._lease_until = max(self._lease_until, time.monotonic() + self._lease_s)

    async def restore_defaults(self) -> AppliedKnobs:
        """Re-apply the knobs the engine started with."""
        return await self.apply(self.defaults)

    async def heartbeat(self, lease_s: float) -> None:
        """A controller's promise to call again within ``lease_s``; if it does not (killed, hung, partitioned),
        the replica's watchdog restores the default knobs itself."""
        self._lease_until = time.monotonic() + lease_s
        self._lease_s = lease_s
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            if self._lease_until is not None and not self._applying and time.monotonic() > self._lease_until:
                self._lease_until = None
                log.warning("replica %s: controller heartbeat lost; restoring default knobs", self.replica)
                await self.restore_defaults()

    async def stop(self) -> None:
        """Stop the hosted service, the stream server and the engine."""
        await self.stop_hosted()
        if self._server is not None:
            self._server.close()
        await self.engine.stop()

    # --- a service hosted on this actor's event loop (the front door, ``front_door: in_replica``) --------------
    async def host(self, service: HostedService) -> dict[str, Any]:
        """Start ``service`` on this actor's event loop, beside the engine: it reaches this replica in process.
        Returns what its ``start`` returns (where it listens)."""
        if self._hosted is not None:
            raise RuntimeError(f"replica {self.replica} already hosts a service")
        info = await service.start(self)
        self._hosted = service
        return info

    async def hosted_done(self) -> None:
        """Returns when the hosted service has ended (the caller's watch: an error here means the actor died)."""
        if self._hosted is not None:
            await self._hosted.wait()

    async def stop_hosted(self) -> None:
        """Stop the service hosted on this actor, if any."""
        if self._hosted is not None:
            service, self._hosted = self._hosted, None
            await service.stop()


class _ChannelFlush:
    """Ships a socket channel's outbox as one frame at the end of the event-loop turn in which it filled: the
    request pumps woken by one engine iteration are already queued to run in that turn, so the frame holds the
    whole iteration. A callback, not a task waiting on an event: a task costs three loop turns (its wait, the
    wait's completion, the task) between the engine's output and the socket. While the socket's buffer is over
    :attr:`HIGH_WATER` (a slow reader), events stay in the outbox, which merges them per request."""

    HIGH_WATER = 1 << 20

    def __init__(self, outbox: _Outbox, writer: asyncio.StreamWriter) -> None:
        self.outbox = outbox
        self.writer = writer
        self.scheduled = False
        self.draining: asyncio.Task[None] | None = None

    def schedule(self) -> None:
        if not self.scheduled and self.draining is None:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        if self.draining is not None or not self.outbox.items or self.writer.is_closing():
            return
        batch = self.outbox.drain()
        trace.mark_first_tokens(batch, "actor.flush")
        data = _dumps(batch)
        self.writer.write(len(data).to_bytes(4, "big") + data)
        if self.writer.transport.get_write_buffer_size() > self.HIGH_WATER:
            self.draining = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()
            self.draining = None
            self.flush()

    def stop(self) -> None:
        if self.draining is not None:
            self.draining.cancel()


def _dumps(batch: list[TokenEvent | StreamError]) -> bytes:
    try:
        return pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # an engine error that does not pickle still reaches the router, as text
        return pickle.dumps(
            [i if isinstance(i, TokenEvent) else StreamError(i.request_id, RuntimeError(repr(i.error))) for i in batch],
            protocol=pickle.HIGHEST_PROTOCOL,
        )


ReplicaActor = ray.remote(Replica)
