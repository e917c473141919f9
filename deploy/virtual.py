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
import heapq
import itertools
import math
import selectors
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
from rich.console import Console

from controllers.actuators import EngineActuator
from controllers.config import ControllerConfig
from controllers.loop import ControlLoop
from controllers.observe import Observer
from controllers.policies import Policy, build_policy
from deploy.config import PathLatency
from profilers.footprint import load_site_profile
from profilers.meter import Measurement, snapshot, window_energy
from serving.api import RecentRequests
from serving.config import ServingConfig
from serving.emulated.engine import EmulatedEngine
from serving.knobs import Knobs
from serving.replica import Telemetry
from serving.router import ReplicaHandle, Router
from serving.types import GenerationRequest, RequestRejectedError, TokenEvent
from workloads.arrivals import ClosedLoopArrivals, LengthStream, RequestSpec
from workloads.campaign import Target, mark_phases, offered_rate, point_requests, point_seed, write_manifest
from workloads.client import ClosedLoop, RequestRecord
from workloads.results import DeviceLabel, ResultStore, engine_token_shares, summarize_point
from workloads.spec import CampaignSpec, PolicySetting, WorkloadSpec, setting_label

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
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self._now + seconds, next(self._seq), fut))
        await fut

    async def sleep_until(self, t_s: float) -> None:
        await self.sleep(t_s - self._now)

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


class _Done:
    """An already-resolved stand-in for a Ray object ref (``await ref`` gives the value)."""

    __slots__ = ("value",)

    def __init__(self, value: TokenEvent) -> None:
        self.value = value

    def __await__(self):  # type: ignore[no-untyped-def]
        return self.value
        yield  # pragma: no cover  (makes this a generator)


class _LocalStream:
    def __init__(self, events: AsyncIterator[TokenEvent]) -> None:
        self._events = events

    def __aiter__(self) -> _LocalStream:
        return self

    async def __anext__(self) -> _Done:
        return _Done(await self._events.__anext__())


class _LocalGenerate:
    def __init__(self, engine: EmulatedEngine) -> None:
        self._engine = engine

    def options(self, **_: Any) -> _LocalGenerate:
        return self

    def remote(self, request: GenerationRequest) -> _LocalStream:
        return _LocalStream(self._engine.generate(request))


class LocalActor:
    """The slice of a Ray replica actor's interface the router uses, calling the engine in-process."""

    def __init__(self, engine: EmulatedEngine) -> None:
        self.engine = engine
        self.generate = _LocalGenerate(engine)


class VirtualDeployment:
    """Replicas of an emulated engine behind the real router, all on one virtual clock."""

    def __init__(self, config: ServingConfig, clock: VirtualClock, latency: PathLatency | None = None) -> None:
        self.clock = clock
        self.latency = latency or PathLatency()
        self.seed = config.engine.seed
        self.engines = [EmulatedEngine(config.engine, f"replica-{i}", clock=clock) for i in range(config.replicas)]
        self._token_times: dict[str, list[float]] = {}
        for e in self.engines:
            e.on_token = self._on_token
            e.stream_every_token = False  # token times come from the hook; events only open and close
        handles = [ReplicaHandle(e.replica, LocalActor(e), backend=e.backend) for e in self.engines]
        self.router = Router(handles, policy=config.router)
        self.recent = RecentRequests()  # what a controller observes, on the virtual time line

    def _on_token(self, request_id: str, t_s: float) -> None:
        times = self._token_times.get(request_id)  # not setdefault: it would build a list per token
        if times is None:
            self._token_times[request_id] = [t_s]
        else:
            times.append(t_s)

    async def start(self) -> None:
        for e in self.engines:
            await e.start()

    async def stop(self) -> None:
        for e in self.engines:
            await e.stop()

    def counters(self) -> dict[str, Any]:
        return {f"{e.replica}/{dev}": sample for e in self.engines for dev, sample in snapshot(e.read()).items()}

    async def request(self, rec: RequestRecord, start_s: float, timeout_s: float) -> None:
        await self.clock.sleep_until(start_s + rec.intended_send_s)
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
        times = [t + back for t in self._token_times.pop(req.request_id)]  # when the client reads them
        rec.replica, rec.output_tokens = last.replica, last.output_tokens
        rec.energy_j, rec.energy_provenance = last.energy_j, last.provenance
        rec.ttft_s = times[0] - t_send
        rec.e2e_s = times[-1] - t_send
        rec.itl_s = [b - a for a, b in itertools.pairwise(times)]
        rec.tpot_s = (rec.e2e_s - rec.ttft_s) / (rec.output_tokens - 1) if rec.output_tokens > 1 else math.nan
        self.recent.complete(times[-1], rec.ttft_s, None if math.isnan(rec.tpot_s) else rec.tpot_s)
        rec.http_status, rec.status = 200, "ok" if rec.e2e_s <= timeout_s else "failed"
        if rec.status != "ok":
            rec.error = f"timed out after {timeout_s:g} s (virtual)"

    async def telemetry(self) -> list[Telemetry]:
        return [Telemetry(e.stats(), e.devices(), e.read(), tuple(e.supported_clocks_mhz())) for e in self.engines]

    def control_loop(self, policy: Policy, period_s: float, max_changes_per_min: int) -> ControlLoop:
        """The real control loop on the virtual clock, observing and actuating these engines in-process."""
        observer = Observer(self.recent, self.telemetry, self.clock.now, policy.slo.percentile)
        actuator = EngineActuator(self.engines, self.router)
        return ControlLoop(policy, observer, actuator, self.clock, period_s, max_changes_per_min)

    def device_labels(self) -> list[DeviceLabel]:
        """(preset, calibration, provenance) of every engine's devices, as a scrape of their /metrics gives them."""
        return [(d.preset, d.calibration, str(r.provenance))
                for e in self.engines for d, r in zip(e.devices(), e.read(), strict=True)]

    def generated_tokens(self) -> int:
        return sum(e.stats().generated_tokens_total for e in self.engines)

    def engine_tokens(self) -> dict[str, float]:
        """The engines' speculation and prefix-cache counters, keyed as a scrape keys them (``replica/name``)."""
        out: dict[str, float] = {}
        for e in self.engines:
            s = e.stats()
            out[f"{e.replica}/spec_proposed"] = s.spec_proposed_tokens
            out[f"{e.replica}/spec_accepted"] = s.spec_accepted_tokens
            if s.prefix_cache_queried_tokens is not None:
                out[f"{e.replica}/prefix_cache_queried"] = s.prefix_cache_queried_tokens
                out[f"{e.replica}/prefix_cache_hit"] = s.prefix_cache_hit_tokens or 0
        return out

    def _rows(self, point: int, t_s: float) -> list[dict[str, object]]:
        return [
            {
                "point": point,
                "t_s": t_s,
                "replica": e.replica,
                "device": r.device,
                "energy_j": r.energy_j,
                "power_w": r.power_w,
                "clock_mhz": r.clock_mhz,
            }
            for e in self.engines
            for r in e.read()
        ]

    async def _at(self, t_s: float) -> tuple[dict[str, Any], int, dict[str, float]]:
        await self.clock.sleep_until(t_s)
        return self.counters(), self.generated_tokens(), self.engine_tokens()

    async def _sample(self, point: int, start: float, period_s: float, rows: list[dict[str, object]]) -> None:
        while True:
            rows.extend(self._rows(point, self.clock.now() - start))
            await self.clock.sleep(period_s)

    async def _closed_loop(self, point: int, spec: ClosedLoop, seed: int, start: float, timeout_s: float,
                           records: list[RequestRecord]) -> None:
        """``spec.concurrency`` users, each sending its next request when its last one ends (as the real client)."""
        lengths = LengthStream(spec.prompt_tokens, spec.output_tokens, seed)
        end = start + spec.duration_s

        async def user() -> None:
            while self.clock.now() < end:
                p, o = lengths.next()
                rec = RequestRecord(point, len(records), self.clock.now() - start, p, o)
                records.append(rec)
                await self.request(rec, start, timeout_s)
                if rec.ok:  # the user has its response once the last token crossed the path back
                    await self.clock.sleep_until(start + rec.intended_send_s + rec.e2e_s)
                if spec.think_time_s > 0:
                    await self.clock.sleep(spec.think_time_s)

        await asyncio.gather(*(user() for _ in range(spec.concurrency)))

    async def run_point(
        self, point: int, work: list[RequestSpec] | ClosedLoop, w: WorkloadSpec, seed: int = 0
    ) -> tuple[list[RequestRecord], Measurement, int, list[dict[str, object]], dict[str, float]]:
        """Send ``work`` (open-loop requests or closed-loop users) and meter the point as a real-time campaign
        does (warm-up and cool-down excluded from the energy window, a power time series every
        ``sample_interval_s``)."""
        start = self.clock.now()
        if isinstance(work, ClosedLoop):
            records: list[RequestRecord] = []
            sending = self._closed_loop(point, work, seed, start, w.request_timeout_s, records)
        else:
            records = [RequestRecord(point, i, s.t_s, s.prompt_tokens, s.max_output_tokens)
                       for i, s in enumerate(work)]
            sending = asyncio.gather(*(self.request(r, start, w.request_timeout_s) for r in records))
        rows: list[dict[str, object]] = []
        begin = asyncio.ensure_future(self._at(start + w.warmup_s))
        end = asyncio.ensure_future(self._at(start + w.duration_s - w.cooldown_s)) if w.cooldown_s > 0 else None
        sampler = asyncio.ensure_future(self._sample(point, start, w.sample_interval_s, rows))
        try:
            await sending
            (first, tok0, engine0) = await begin
            (last, tok1, engine1) = (
                await end if end is not None else (self.counters(), self.generated_tokens(), self.engine_tokens())
            )
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        if end is not None:
            window_s = w.duration_s - w.cooldown_s - w.warmup_s
        else:
            window_s = self.clock.now() - start - w.warmup_s
        mark_phases(records, w.warmup_s, w.duration_s - w.cooldown_s if w.cooldown_s > 0 else math.inf)
        return records, window_energy(first, last, window_s), tok1 - tok0, rows, engine_token_shares(engine0, engine1)


def _policy_for(
    setting: Knobs | PolicySetting | None, controller: ControllerConfig | None
) -> tuple[Policy | None, ControllerConfig]:
    """The policy a point runs under: pinned knobs are the static policy with those values; no setting means
    the deployment's own controller (if it has one)."""
    ctl = controller or ControllerConfig(enabled=False)
    if isinstance(setting, Knobs):
        return build_policy("static", ctl.slo, **setting.model_dump(exclude_none=True)), ctl
    if isinstance(setting, PolicySetting):
        return build_policy(setting.policy, ctl.slo, **setting.options), ctl
    return (build_policy(ctl.policy, ctl.slo, **ctl.options) if ctl.enabled else None), ctl


async def _campaign(
    spec: CampaignSpec, config: ServingConfig, clock: VirtualClock, store: ResultStore, latency: PathLatency | None
) -> None:
    site = load_site_profile(spec.site)
    deployment = VirtualDeployment(config, clock, latency)
    await deployment.start()
    try:
        w = spec.workload
        done = store.finished_points()
        for point, (setting, rate) in enumerate(spec.sweep.points()):
            if point in done:
                continue
            policy, ctl = _policy_for(setting, getattr(config, "controller", None))
            loop = deployment.control_loop(policy, ctl.period_s, ctl.max_changes_per_min) if policy else None
            control = asyncio.ensure_future(loop.run()) if loop else None
            work: list[RequestSpec] | ClosedLoop
            if spec.closed_loop:
                assert isinstance(w.arrival, ClosedLoopArrivals)
                seed = point_seed(spec, rate)
                work = ClosedLoop(int(rate), w.duration_s, w.prompt_tokens, w.output_tokens, w.arrival.think_time_s)
            else:
                seed, work = point_requests(spec, rate)  # the same requests as a real-time run of the point
            try:
                records, measurement, tokens, rows, shares = await deployment.run_point(point, work, w, seed)
            finally:
                if control is not None:  # its ``finally`` restores the engines' default knobs
                    control.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await control
            summary = summarize_point(
                point, offered_rate(spec, rate, records), records, measurement, "emulated", site, spec.slo, tokens,
                devices=deployment.device_labels(),
            )
            summary["concurrency"] = int(rate) if spec.closed_loop else math.nan
            summary.update(shares)
            summary["setting"] = setting_label(setting) if setting is not None else (
                f"policy={policy.name}" if policy is not None else "as deployed")
            clocks = [float(r["clock_mhz"]) for r in rows if not math.isnan(float(r["clock_mhz"]))]  # type: ignore[arg-type]
            summary["clock_mhz_mean"] = sum(clocks) / len(clocks) if clocks else math.nan
            store.add_point(summary, records, rows)
    finally:
        await deployment.stop()


def run_virtual_campaign(
    spec: CampaignSpec, config: ServingConfig, out: Path, console: Console | None = None,
    latency: PathLatency | None = None,
) -> pd.DataFrame:
    """Run every point not yet in ``out`` in virtual time; return ``points.csv`` as a frame. ``latency``: what
    the real serving path adds to each request (default: the testbed's own path as measured)."""
    console = console or Console()
    out.mkdir(parents=True, exist_ok=True)
    store = ResultStore(out)
    target = Target(f"virtual://{config.engine.device}/{config.engine.model}")
    write_manifest(out, spec, target, "running")
    clock = VirtualClock()
    console.print(
        f"virtual time: {config.replicas} x {config.engine.device} replicas of {config.engine.model}, "
        f"{len(spec.sweep.points())} point(s)"
    )
    clock.execute(_campaign(spec, config, clock, store, latency))
    write_manifest(out, spec, target, "finished")
    return store.points()
