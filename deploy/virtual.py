"""Virtual time: the same emulated engines and router, driven by a discrete-event clock, no HTTP, no Ray.

Every wait in the engines goes through :class:`VirtualClock`; when every task is blocked, the clock jumps
to the next timer instead of sleeping, so a campaign runs as fast as the model can be evaluated. The
results use the same schema as a real-time campaign (``points.csv``, ``requests.parquet``).

What HTTP and Ray add on a real path is not simulated step by step but as two measured delays drawn per
request (:class:`deploy.config.PathLatency`): the request reaches the router that long after the client
sends it, and the client reads each token that long after the engine emits it. Everything in between
(routing, admission at iteration boundaries, batching) is the same code as in real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import io
import itertools
import math
import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
from rich.console import Console

from controllers.actuators import EngineActuator
from controllers.config import ControllerConfig
from controllers.loop import ControlLoop
from controllers.observe import Observer
from controllers.policies import Policy, build_policy
from deploy.compare import device_floor, model_reference
from deploy.config import PathLatency
from profilers.errors import ConfigError
from profilers.scrape import CounterSnapshot, counters_from_export
from serving.api import RecentRequests
from serving.config import ServingConfig
from serving.emulated.engine import EmulatedEngine
from serving.knobs import Knobs
from serving.replica import Telemetry, export_snapshot
from serving.router import ReplicaHandle, Router
from serving.types import GenerationRequest, RequestRejectedError, TokenEvent
from workloads.arrivals import LengthStream, RequestSpec
from workloads.campaign import OpenPart, PointResult, campaign_loop, measure_one
from workloads.client import ClosedLoop, RequestRecord
from workloads.results import RecordWriter, RequestPart
from workloads.spec import CampaignSpec, PolicySetting

T = TypeVar("T")


class VirtualClock:
    """A discrete-event clock (the :class:`profilers.clock.Clock` protocol) driving its own event loop.

    :meth:`execute` runs a coroutine on a loop whose selector is the clock: the moment the loop has nothing
    ready to run (it would block waiting for I/O), the clock jumps to its next timer and wakes that sleeper.
    Time thus advances exactly when every task waits, at the cost of one loop pass per event.
    """

    def __init__(self, start_s: float = 0.0, deadlock_after_s: float = 5.0) -> None:
        self._now = start_s
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._driving = False
        self.deadlock_after_s = deadlock_after_s
        """Real seconds to wait for a wakeup from outside the loop (a thread) once no timer is left, before
        calling the run deadlocked."""

    def now(self) -> float:
        """Current virtual time in seconds."""
        return self._now

    async def sleep(self, seconds: float) -> None:
        """Wait until virtual time reaches ``now + seconds`` (the clock jumps there when every task waits)."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self._now + seconds, next(self._seq), fut))
        await fut

    async def sleep_until(self, t_s: float) -> None:
        """Wait until virtual time ``t_s``."""
        await self.sleep(t_s - self._now)

    def alarm(self, t_s: float, seq: int | None = None) -> asyncio.Future[None]:
        """A future that resolves when the clock reaches exactly ``t_s`` (no float round trip through a duration,
        as :meth:`sleep` makes): an engine's fast-forwarded run ends there. :meth:`rearm` moves it earlier.
        ``seq``: its place among timers due at the same instant, one that :meth:`reserve` gave (default: after
        every timer set so far)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (t_s, next(self._seq) if seq is None else seq, fut))
        return fut

    def reserve(self, n: int) -> int:
        """Reserve the places of ``n`` timers set now (the first of them returned): a timer set later with
        :meth:`alarm` at one of those places fires, among timers due at the same instant, as if set now."""
        first = next(self._seq)
        self._seq = itertools.count(first + n)
        return first

    def rearm(self, fut: asyncio.Future[None], t_s: float) -> None:
        """Resolve ``fut`` (from :meth:`alarm`) at ``t_s`` instead, which must not be later than its time: the
        old entry stays in the heap and is skipped once ``fut`` is done."""
        heapq.heappush(self._timers, (t_s, next(self._seq), fut))

    def execute(self, main: Coroutine[Any, Any, T]) -> T:
        """Run ``main`` to completion on a new event loop driven by this clock; return its result."""
        with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(_ClockSelector(self))) as runner:
            return runner.run(self._drive(main))

    async def _drive(self, main: Coroutine[Any, Any, T]) -> T:
        self._driving = True
        try:
            return await main
        finally:
            self._driving = False

    def _fire_next(self) -> bool:
        while self._timers:
            t, _, fut = heapq.heappop(self._timers)
            if fut.done():  # cancelled sleeper (an engine stopped)
                continue
            self._now = max(self._now, t)
            fut.set_result(None)
            return True
        return False


class _ClockSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The loop's selector: asked to wait (nothing is ready), it advances the virtual clock instead.

    The loop asks with timeout 0 while callbacks are ready; any other timeout means every task waits. With
    no virtual timer left, only a thread can still wake the loop (through its self-pipe): the selector waits
    ``deadlock_after_s`` for that before reporting a deadlock.
    """

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout != 0 and self._clock._driving:
            if self._clock._fire_next():
                return []  # the woken sleeper's callback is ready: the loop runs it in this pass
            if timeout is None:
                if events := super().select(self._clock.deadlock_after_s):
                    return events
                self._clock._driving = False
                raise RuntimeError(
                    "virtual time deadlock: every task waits, no timer is pending and nothing woke the loop "
                    f"for {self._clock.deadlock_after_s:g} s"
                )
        return super().select(timeout)


class VirtualTarget:
    """Replicas of an emulated engine behind the real router, all on one virtual clock: a campaign's target in
    virtual time (:class:`workloads.campaign.Target`). Replicas run in-process (``ReplicaHandle.local``)."""

    streams_records = True
    """Records reach ``on_done`` numbered in the order ``send`` returns them: a point writes them as they finish."""

    def __init__(
        self, config: ServingConfig, clock: VirtualClock | None = None, latency: PathLatency | None = None
    ) -> None:
        self.clock = clock or VirtualClock()
        self.label = f"virtual://{config.engine.device}/{config.engine.model}"
        self.latency = latency or PathLatency()
        self.controller: ControllerConfig = getattr(config, "controller", None) or ControllerConfig(enabled=False)
        self.seed = config.engine.seed
        first = EmulatedEngine(config.engine, "replica-0", clock=self.clock)  # the preset and shape, read once
        self.engines = [first, *(EmulatedEngine(config.engine, f"replica-{i}", clock=self.clock, device=first.device,
                                                model=first.model) for i in range(1, config.replicas))]
        self._token_times: dict[str, list[float]] = {}
        for e in self.engines:
            e.on_token = self._on_token
            e.on_tokens = self._on_tokens
            e.stream_every_token = False  # token times come from the hook; events only open and close
        self.router = Router([ReplicaHandle(e.replica, None, backend=e.backend, local=e) for e in self.engines],
                             policy=config.router)
        # What an emulated engine reports that never changes (its devices, its clock table), read once: a controller
        # reads every replica's telemetry every period, hundreds of replicas in a fleet.
        self._fixed = [(e.devices(), tuple(e.supported_clocks_mhz())) for e in self.engines]
        self.recent = RecentRequests()  # what a controller observes, on the virtual time line
        self.request_timeout_s = math.inf
        self._control: asyncio.Future[None] | None = None

    def _on_token(self, request_id: str, t_s: float) -> None:
        times = self._token_times.get(request_id)  # not setdefault: it would build a list per token
        if times is None:
            self._token_times[request_id] = [t_s]
        else:
            times.append(t_s)

    def _on_tokens(self, request_id: str, times: list[float]) -> None:
        own = self._token_times.get(request_id)
        if own is None:
            self._token_times[request_id] = list(times)
        else:
            own.extend(times)

    async def start(self, spec: CampaignSpec | None = None) -> dict[str, object]:
        """Start the engines; requests slower than the campaign's ``request_timeout_s`` count as failed."""
        if spec is not None:
            self.request_timeout_s = spec.workload.request_timeout_s
        for e in self.engines:
            await e.start()
        return {}

    async def stop(self) -> None:
        """Release the deployment's resources and stop every engine."""
        await self._release()
        for e in self.engines:
            await e.stop()

    async def counters(self) -> CounterSnapshot:
        """The target's counters as a scrape of its ``/metrics`` would give them, built from the engines' telemetry."""
        return counters_from_export(export_snapshot(
            (e.replica, e.backend, t) for e, t in zip(self.engines, await self.telemetry(), strict=True)
        ))

    async def apply(self, setting: Knobs | PolicySetting | None) -> None:
        """Run the setting's policy (pinned knobs: the static policy; None: the deployment's own controller, if
        any) in the real control loop on the virtual clock until the next setting."""
        await self._release()
        policy = _policy_for(setting, self.controller)
        if policy is not None:
            loop = self.control_loop(policy, self.controller.period_s, self.controller.max_changes_per_min)
            self._control = asyncio.ensure_future(loop.run())

    async def _release(self) -> None:
        if self._control is not None:  # its ``finally`` restores the engines' default knobs
            self._control.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._control
            self._control = None

    async def send(
        self, point: int, work: list[RequestSpec] | ClosedLoop, seed: int,
        on_done: Callable[[RequestRecord], None], on_start: Callable[[float], None], *, keep_records: bool = True,
    ) -> list[RequestRecord]:
        """Send ``work`` (open-loop requests or closed-loop users) as the load client would; return its records in
        request order (none with ``keep_records=False``: they went to ``on_done``, and only requests in flight
        are held).

        An open-loop request's record and task are made at its send time, by one spawner walking the schedule on
        the virtual clock, so a long window holds only the requests in flight. Events fire in the order they
        would if every request's task had been made at the start and slept until its send time: the spawner
        reserves those sleeps' places among timers due at the same instant (:meth:`VirtualClock.reserve`)."""
        start = self.clock.now()
        on_start(start)
        if isinstance(work, ClosedLoop):
            return await self._closed_loop(point, work, seed, start, on_done, keep_records)
        if not work:
            return []
        kept: list[RequestRecord | None] | None = [None] * len(work) if keep_records else None
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        live: set[asyncio.Task[None]] = set()
        left = len(work)

        def finished(task: asyncio.Task[None]) -> None:  # as asyncio.gather's own callback: the same loop passes
            nonlocal left
            live.discard(task)
            if done.done():
                if not task.cancelled():
                    task.exception()  # retrieved: the point already failed
                return
            if task.cancelled() or task.exception() is not None:
                done.set_exception(asyncio.CancelledError() if task.cancelled() else task.exception())  # type: ignore[arg-type]
                return
            if task is not spawner:
                left -= 1
                if left == 0:
                    done.set_result(None)

        def launch(i: int) -> None:
            s = work[i]
            rec = RequestRecord(point, i, s.t_s, s.prompt_tokens, s.max_output_tokens)
            if kept is not None:
                kept[i] = rec
            task = asyncio.ensure_future(self._request(rec, start, on_done))
            live.add(task)
            task.add_done_callback(finished)

        async def spawn() -> None:
            # This first step runs where the first request's task would have taken its first step, the others right
            # after it: those due now would go on one loop pass later, the rest would set a timer each, in order.
            clock = self.clock
            now = clock.now()
            waits = [i for i, s in enumerate(work) if (start + s.t_s) - now > 0] if not _ordered(work) else None
            n_wait = len(waits) if waits is not None else sum((start + s.t_s) - now > 0 for s in work)
            first = clock.reserve(n_wait)
            if waits is None:  # by send time (the usual schedule): due now first, then the timers in their order
                rank = 0
                for i, s in enumerate(work):
                    if (start + s.t_s) - now <= 0:
                        launch(i)
                for i, s in enumerate(work):
                    if (start + s.t_s) - now > 0:
                        await clock.alarm(now + ((start + s.t_s) - now), first + rank)
                        rank += 1
                        launch(i)
                return
            for i, s in enumerate(work):  # out of order: the timers by (time, place)
                if (start + s.t_s) - now <= 0:
                    launch(i)
            order = sorted(range(n_wait), key=lambda r: (now + ((start + work[waits[r]].t_s) - now), r))
            for r in order:
                i = waits[r]
                await clock.alarm(now + ((start + work[i].t_s) - now), first + r)
                launch(i)

        spawner = asyncio.ensure_future(spawn())
        spawner.add_done_callback(finished)
        try:
            await done
        except BaseException:
            for t in (spawner, *live):
                t.cancel()
            raise
        return [r for r in kept if r is not None] if kept is not None else []

    async def _request(self, rec: RequestRecord, start_s: float, on_done: Callable[[RequestRecord], None]) -> None:
        await self._sent(rec, start_s)
        on_done(rec)

    async def _exchange(self, rec: RequestRecord, start_s: float) -> None:
        await self.clock.sleep_until(start_s + rec.intended_send_s)
        await self._sent(rec, start_s)

    async def _sent(self, rec: RequestRecord, start_s: float) -> None:
        """The request from its send time on: the path there, the router and engine, the path back."""
        t_send = self.clock.now()
        rec.actual_send_s = t_send - start_s
        self.recent.arrive(t_send)
        there, back = self.latency.draw(f"{self.seed}:{rec.point}:{rec.request_index}")
        await self.clock.sleep(there)  # HTTP, front door, Ray actor call
        req = GenerationRequest(
            request_id=f"p{rec.point}-{rec.request_index}",
            prompt_token_ids=[0] * rec.prompt_tokens,
            max_tokens=rec.max_output_tokens,
            ignore_eos=True,
        )
        last: TokenEvent | None = None
        try:
            async for ev in self.router.stream(req):
                last = ev
        except RequestRejectedError as e:
            rec.status, rec.http_status, rec.error = "failed", 400, str(e)
            return
        assert last is not None
        read = np.asarray(self._token_times.pop(req.request_id)) + back  # when the client reads them
        times = read.tolist()
        rec.replica, rec.output_tokens = last.replica, last.output_tokens
        rec.energy_j, rec.energy_provenance = last.energy_j, last.provenance
        rec.ttft_s = times[0] - t_send
        rec.e2e_s = times[-1] - t_send
        rec.itl_s = (read[1:] - read[:-1]).tolist()  # np.diff's arithmetic, without its Python-level overhead
        rec.tpot_s = (rec.e2e_s - rec.ttft_s) / (rec.output_tokens - 1) if rec.output_tokens > 1 else math.nan
        self.recent.complete(times[-1], rec.ttft_s, None if math.isnan(rec.tpot_s) else rec.tpot_s)
        rec.http_status, rec.status = 200, "ok" if rec.e2e_s <= self.request_timeout_s else "failed"
        if rec.status != "ok":
            rec.error = f"timed out after {self.request_timeout_s:g} s (virtual)"

    async def telemetry(self) -> list[Telemetry]:
        """Every engine's stats, devices, readings and supported clocks, read now."""
        return [Telemetry(e.stats(), devices, e.read(), clocks)
                for e, (devices, clocks) in zip(self.engines, self._fixed, strict=True)]

    def control_loop(self, policy: Policy, period_s: float, max_changes_per_min: int) -> ControlLoop:
        """The real control loop on the virtual clock, observing and actuating these engines in-process."""
        observer = Observer(self.recent, self.telemetry, self.clock.now, policy.slo.percentile)
        actuator = EngineActuator(self.engines, self.router)
        return ControlLoop(policy, observer, actuator, self.clock, period_s, max_changes_per_min)

    async def _closed_loop(self, point: int, spec: ClosedLoop, seed: int, start: float,
                           on_done: Callable[[RequestRecord], None], keep_records: bool) -> list[RequestRecord]:
        """``spec.concurrency`` users, each sending its next request when its last one ends (as the real client)."""
        lengths = LengthStream(spec.prompt_tokens, spec.output_tokens, seed)
        end = start + spec.duration_s
        records: list[RequestRecord] = []
        sent = 0

        async def user() -> None:
            nonlocal sent
            while self.clock.now() < end:
                p, o = lengths.next()
                rec = RequestRecord(point, sent, self.clock.now() - start, p, o)
                sent += 1
                if keep_records:
                    records.append(rec)
                await self._exchange(rec, start)
                if rec.ok:  # the user has its response once the last token crossed the path back
                    await self.clock.sleep_until(start + rec.intended_send_s + rec.e2e_s)
                on_done(rec)
                if spec.think_time_s > 0:
                    await self.clock.sleep(spec.think_time_s)

        await asyncio.gather(*(user() for _ in range(spec.concurrency)))
        return records


def _ordered(work: list[RequestSpec]) -> bool:
    """Whether ``work`` is in send-time order."""
    return all(a.t_s <= b.t_s for a, b in itertools.pairwise(work))


def _policy_for(setting: Knobs | PolicySetting | None, ctl: ControllerConfig) -> Policy | None:
    """The policy a point runs under: pinned knobs are the static policy with those values; no setting means
    the deployment's own controller (if it has one)."""
    if isinstance(setting, Knobs):
        return build_policy("static", ctl.slo, **setting.model_dump(exclude_none=True))
    if isinstance(setting, PolicySetting):
        return build_policy(setting.policy, ctl.slo, **setting.options)
    return build_policy(ctl.policy, ctl.slo, **ctl.options) if ctl.enabled else None


def simulate_point(
    spec: CampaignSpec, config: ServingConfig, latency: PathLatency | None, point: int,
    write: Callable[[pa.Table], None], console: Console | None = None,
) -> PointResult:
    """Point ``point`` of the sweep on replicas and a clock of its own: what it gives does not depend on which
    points ran before it, where, or in which order (a serial run, ``--resume`` and Ray tasks agree row for row).
    Its requests go to ``write`` in row groups as they finish; its row carries the simulation speed (simulated
    over wall seconds)."""
    t0 = time.perf_counter()
    target = VirtualTarget(config, latency=latency)
    console = console or Console(file=io.StringIO())
    result = target.clock.execute(measure_one(spec, target, point, console, RecordWriter(write),
                                              floor=device_floor(config), reference=model_reference(config)))
    wall = time.perf_counter() - t0
    result.row = dataclasses.replace(result.row, sim_speed_x=target.clock.now() / wall if wall > 0 else math.nan)
    return result


@dataclasses.dataclass
class _Ran:
    """A point task's last item: the point's result and the Ray node that simulated it."""

    result: PointResult
    node_id: str


def _point_task(spec: CampaignSpec, config: ServingConfig, latency: PathLatency | None, point: int,
                die_once: str | None) -> Iterator[pa.Table | _Ran]:
    """A Ray streaming-generator task: one point. Yields its requests a row group at a time as the simulation
    writes them (the driver writes them to the point's part, so neither process holds a long window's requests),
    then a :class:`_Ran`. ``die_once`` (fault injection for tests): a marker file; the worker process exits hard
    the first time, when the file does not exist yet."""
    import ray

    if die_once is not None and not os.path.exists(die_once):
        Path(die_once).write_text(str(os.getpid()))
        os._exit(1)
    # The simulation runs in a thread of its own, as a generator cannot yield from inside its callback; the bounded
    # queue holds it back when the driver falls behind.
    chunks: queue.Queue[pa.Table | None] = queue.Queue(maxsize=4)
    outcome: list[PointResult | BaseException] = []

    def simulate() -> None:
        try:
            outcome.append(simulate_point(spec, config, latency, point, chunks.put))
        except BaseException as e:  # re-raised in the task, where Ray reports it
            outcome.append(e)
        finally:
            chunks.put(None)

    thread = threading.Thread(target=simulate, name=f"point-{point}", daemon=True)
    thread.start()
    while (chunk := chunks.get()) is not None:
        yield chunk
    thread.join()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    yield _Ran(outcome[0], ray.get_runtime_context().get_node_id())


FAULT_ENV = "TESTBED_FAULT_KILL_POINT"
"""Fault injection for tests: ``POINT:MARKER`` kills the Ray worker running that point once (MARKER is created)."""
MAX_ATTEMPTS = 4


def connect_ray(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (None: a local Ray); a clear :class:`ConfigError` if it cannot be
    reached, before anything runs or is written."""
    import ray

    from deploy.raycluster import init_ray

    if address:
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
                pass
        except (OSError, ValueError) as e:
            raise ConfigError(f"ray_address {address!r}: cannot reach a Ray cluster there ({e}); start one "
                              "(ray start --head) or fix the address") from None
    if ray.is_initialized():
        return
    try:
        init_ray(address)
    except Exception as e:  # Ray's own: the port answered but no cluster joined
        raise ConfigError(f"ray_address {address!r}: cannot join the Ray cluster: {e}") from None


def _cluster_cpus() -> int:
    """The Ray cluster's CPUs now. Read each time a point ends, not once: a driver that has just connected may not
    see every node yet, and an autoscaler adds nodes while a sweep runs."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _run_on_ray(
    spec: CampaignSpec, config: ServingConfig, latency: PathLatency | None, pending: list[int], workers: int,
    open_part: OpenPart, record: Callable[[PointResult], None], console: Console,
) -> None:
    """Simulate ``pending`` points as Ray tasks, ``workers`` at a time: each task's requests are written to its
    point's part as they stream in, and its result handed to ``record`` (the driver's one writer) when it ends; a
    point whose worker dies is run again from the start (at most MAX_ATTEMPTS times)."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=0, num_returns="streaming")(_point_task)
    per_cpu = workers == 0  # as many at once as the cluster has CPUs, read again as each point ends
    fault = os.environ.get(FAULT_ENV, "")
    kill_point, _, marker = fault.partition(":")
    loads = spec.sweep.points()
    # Heaviest loads first (longest processing time first): a heavy point started last would leave the other
    # workers idle while it runs. Points at one load cost about the same; their order is kept.
    queue_ = sorted(pending, key=lambda p: -loads[p][1])
    attempts = dict.fromkeys(pending, 0)
    inflight: dict[Any, tuple[int, RequestPart]] = {}
    nodes: dict[int, str] = {}
    try:
        while queue_ or inflight:
            limit = _cluster_cpus() if per_cpu else workers
            while queue_ and len(inflight) < limit:
                p = queue_.pop(0)
                attempts[p] += 1
                die = marker if marker and kill_point == str(p) else None
                inflight[task.remote(spec, config, latency, p, die)] = (p, open_part(p))
            (gen,), _ = ray.wait(list(inflight), num_returns=1)
            p, part = inflight[gen]
            try:
                item = ray.get(next(gen))
            except ray.exceptions.RayTaskError:
                raise  # the simulation itself failed: the same on a rerun
            except (ray.exceptions.RayError, StopIteration) as e:  # the worker or its node died: run it again
                del inflight[gen]
                if attempts[p] >= MAX_ATTEMPTS:
                    raise RuntimeError(f"point {p}: its Ray worker died {attempts[p]} times ({e!r})") from e
                console.print(f"point {p}: its Ray worker died ({type(e).__name__}); running it again")
                queue_.insert(0, p)
                continue
            if isinstance(item, _Ran):
                del inflight[gen]
                nodes[p] = item.node_id
                record(item.result)
            else:
                part.write(item)
    finally:  # stopped (an error, Ctrl-C): points still running are abandoned, finished ones are written
        for gen in inflight:
            # force: the simulation runs in a thread of the task, which a KeyboardInterrupt in its main thread
            # would leave running (blocked on the full queue) in a worker Ray reuses.
            ray.cancel(gen, force=True)
    if nodes:
        where = sorted(set(nodes.values()))
        console.print(f"points simulated on {len(where)} Ray node(s): " + "; ".join(
            f"{n[:12]}: {', '.join(str(p) for p in sorted(nodes) if nodes[p] == n)}" for n in where))


def run_virtual_campaign(
    spec: CampaignSpec, config: ServingConfig, out: Path, console: Console | None = None,
    latency: PathLatency | None = None,
) -> pd.DataFrame:
    """Run every point not yet in ``out`` in virtual time; return ``points.csv`` as a frame. ``latency``: what
    the real serving path adds to each request (default: the testbed's own path as measured).

    Each point runs on replicas of its own (:func:`simulate_point`): one after the other here, or as Ray tasks
    (``workers``, ``ray_address`` in the campaign file), the results written by this process alone, in point
    order in ``points.csv`` whatever order they finish in.
    """
    console = console or Console()
    workers = int(getattr(spec, "workers", 1))
    address = getattr(spec, "ray_address", None)
    on_ray = workers != 1 or address is not None
    if on_ray:
        connect_ray(address)  # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    where = f", {workers or 'all'} at a time on Ray{f' at {address}' if address else ''}" if on_ray else ""
    console.print(
        f"virtual time: {config.replicas} x {config.engine.device} replicas of {config.engine.model}, "
        f"{len(spec.sweep.points())} point(s){where}"
    )

    def measure(pending: list[int], open_part: OpenPart, record: Callable[[PointResult], None]) -> None:
        if on_ray:
            _run_on_ray(spec, config, latency, pending, workers, open_part, record, console)
        else:
            for p in pending:
                record(simulate_point(spec, config, latency, p, open_part(p).write, console))

    return campaign_loop(spec, f"virtual://{config.engine.device}/{config.engine.model}", out, measure, console)
