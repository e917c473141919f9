"""An emulated device in real (or virtual) time: continuous batching driven by the physics model.

The engine is also the power source of its device: the cumulative energy counter is exact (modeled),
interpolated inside an iteration and charged at idle power between iterations.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import random
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np

from profilers import trace
from profilers.clock import Clock, RealClock
from profilers.types import DeviceInfo, PowerReading, Provenance
from serving.config import EmulatedEngineConfig
from serving.emulated.calibration import device_calibration, modeled_label, preset_name
from serving.emulated.physics import (
    DecodeSteps,
    DeviceSpec,
    IterationCost,
    ModelShape,
    decode_steps,
    load_device,
    load_model_shape,
    step_cost,
)
from serving.engine import register_engine
from serving.tokenizer import WordTokenizer
from serving.types import (
    AppliedKnobs,
    EngineStats,
    GenerationRequest,
    Knobs,
    RequestRejectedError,
    TokenEvent,
    merge_events,
)

log = logging.getLogger(__name__)
MAX_LAG_S = 0.05


@dataclass
class _Sequence:
    request: GenerationRequest
    prompt_len: int
    max_tokens: int
    events: asyncio.Queue[TokenEvent]
    prefilled: int = 0
    generated: int = 0
    prefill_j: float = 0.0
    decode_j: float = 0.0
    done: bool = False
    admitted_s: float = 0.0
    last_token: asyncio.Event = field(default_factory=asyncio.Event)
    kv_tokens: int = 0
    """KV-cache slots held now: allocated as tokens are processed, as vLLM's paged cache does."""
    prefill_target: int = field(init=False)
    """Tokens to prefill before decoding: the prompt, or after a preemption the prompt and the output so far."""

    def __post_init__(self) -> None:
        self.prefill_target = self.prompt_len

    @property
    def energy_j(self) -> float:
        return self.prefill_j + self.decode_j


MAX_RUN_STEPS = 512
"""Most decode steps priced at once for a fast-forwarded run (the rest of a cut run is priced in vain)."""


@dataclass
class _Run:
    """A fast-forwarded run of decode steps (see ``EmulatedEngine._start_run``)."""

    seqs: list[_Sequence]
    starts: list[float]
    ends: list[float]
    """Each step's modeled end (the next step's start)."""
    wakes: list[float]
    """The clock's time at each step's end, when its tokens are emitted."""
    cost_of: DecodeSteps
    steps: int
    """Steps in the run (fewer once cut)."""
    seq_j: np.ndarray
    """(sequences, steps + 1): each sequence's decode energy after each step, its shares added in step order."""
    total_j: np.ndarray
    """The engine's attributed decode energy after each share, step after step, in batch order: after step ``i``
    it is ``total_j[(i + 1) * batch]``. Both sums are taken once, when the run is priced, so that committing
    steps is indexing."""
    committed: int = 0
    allocated: int = 1
    """Steps whose KV slots are allocated (the first by the schedule)."""
    alarm: asyncio.Future[None] | None = None
    tail: int = 0
    """1 when the run's last step ends a request: that step is committed by the engine when it wakes, with the
    ordinary emission (the request finished, its slots freed), never by a look from outside."""

    def cost(self, i: int) -> IterationCost:
        """Step ``i`` as the power reading interpolates it (time and energy)."""
        return IterationCost(float(self.cost_of.time_s[i]), float(self.cost_of.energy_j[i]), 0.0, [], 0.0, 0.0,
                             False)


class EmulatedEngine:
    """Continuous batching (decode first, then chunked prefill within a token budget) on a modeled device."""

    backend = "emulated"

    def __init__(
        self,
        config: EmulatedEngineConfig,
        replica: str,
        clock: Clock | None = None,
        device: DeviceSpec | None = None,
        model: ModelShape | None = None,
    ) -> None:
        self.config = config
        self.replica = replica
        self.clock = clock or RealClock()
        self.device = device or load_device(config.device)
        self.preset = preset_name(config.device)
        self.calibration = modeled_label(self.preset, device_calibration(self.device))  # on every modeled figure
        self.model = model or load_model_shape(config.model, config.dtype)
        if self.model.architecture != "decoder":
            raise ValueError(
                f"model {self.model.name} is an encoder: the serving engine generates tokens and needs a "
                "decoder; evaluate encoders with serving.emulated.physics.run_metrics"
            )
        self.device.peak_macs_per_s(self.model.dtype, self.device.f_max_mhz)  # raises if no such datapath
        self.tensor_parallel = config.tensor_parallel
        self.device.check_tensor_parallel(self.model, self.tensor_parallel)
        self.kv_capacity_tokens = self.device.kv_capacity_tokens(self.model, self.tensor_parallel)  # DeviceFitError
        if config.max_model_len > self.kv_capacity_tokens:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the KV-cache capacity of {self.device.name} "
                f"for {self.model.name} ({self.kv_capacity_tokens} tokens); lower max_model_len"
            )
        self.clock_mhz = self.device.nearest_clock(config.clock_mhz or self.device.f_max_mhz)
        if config.clock_mhz is not None and self.clock_mhz != config.clock_mhz:
            log.warning(
                "%s: clock %g MHz is not in the device's table; clamped to supported %g MHz",
                self.device.name,
                config.clock_mhz,
                self.clock_mhz,
            )
        self.max_num_seqs = config.max_num_seqs
        self.speculative_tokens = config.speculative_tokens
        self._spec_rng = random.Random(config.seed)  # acceptance draws: reproducible per engine
        self._spec_proposed = 0
        self._spec_accepted = 0
        self.tokenizer = WordTokenizer()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._kv_used = 0
        self._preemptions = 0
        # Energy accounting (joules); invariant: energy = idle + attributed prefill + attributed decode.
        self._energy_j = 0.0
        self._idle_j = 0.0
        self._prefill_j = 0.0
        self._decode_j = 0.0
        self._accounted_until = self.clock.now()
        self._inflight: tuple[float, IterationCost] | None = None
        self._run_state: _Run | None = None
        self._run_hint = 64
        self.fast_forwarded_steps = 0
        """Iterations committed by fast-forwarded runs rather than one by one (a diagnostic)."""
        self._prompt_tokens = 0
        self._generated_tokens = 0
        self._iterations = 0
        # Virtual-time runs observe token times through this hook and stream only the first and last
        # token of each request, which saves the per-token event plumbing (the model is unchanged).
        self.on_token: Callable[[str, float], None] | None = None
        self.on_tokens: Callable[[str, list[float]], None] | None = None
        """Bulk form of ``on_token`` for a fast-forwarded run: one call per request with its tokens' times."""
        self.stream_every_token = True
        self.fast_forward = True
        """In virtual time, run stretches of identical decode steps without an event loop pass per step (exactly
        the same results: see :meth:`_start_run`); False steps one by one."""
        self._trace = trace.enabled()  # read once: the token loop is hot in virtual time

    # --- Engine protocol -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the engine's iteration loop (once), idle energy counted from now."""
        if self._task is None:
            self._accounted_until = self.clock.now()
            self._task = asyncio.create_task(self._run(), name=f"emulated-engine-{self.replica}")

    async def stop(self) -> None:
        """Cancel the iteration loop and wait for it to end."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Admit the request (rejecting it before any event), then stream its tokens as modeled iterations make them."""
        seq = self._admit(request)  # rejects before any event is produced
        return self._stream(seq)

    def stats(self) -> EngineStats:
        """Load, token and attributed energy counters now (idle energy up to the current time included)."""
        self._sync()
        return EngineStats(
            replica=self.replica,
            backend=self.backend,
            running=len(self._running),
            waiting=len(self._waiting),
            prompt_tokens_total=self._prompt_tokens,
            generated_tokens_total=self._generated_tokens,
            attributed_prefill_j=self._prefill_j,
            attributed_decode_j=self._decode_j,
            idle_j=self._idle_j + self._pending_idle_j(self.clock.now()),
            iterations=self._iterations,
            kv_used_tokens=self._kv_used,
            kv_capacity_tokens=self.kv_capacity_tokens,
            max_num_seqs=self.max_num_seqs,
            spec_proposed_tokens=self._spec_proposed,
            spec_accepted_tokens=self._spec_accepted,
        )

    async def apply(self, knobs: Knobs) -> AppliedKnobs:
        """Set the clock (nearest supported), max_num_seqs and speculation depth; report what took effect."""
        self._cut()
        t0 = self.clock.now()
        notes: list[str] = []
        if knobs.clock_mhz is not None:
            self.clock_mhz = self.device.nearest_clock(knobs.clock_mhz)
            if self.clock_mhz != knobs.clock_mhz:
                notes.append(f"clock {knobs.clock_mhz:g} MHz clamped to supported {self.clock_mhz:g} MHz")
        if knobs.max_num_seqs is not None:
            self.max_num_seqs = knobs.max_num_seqs
            self._wake.set()
        if knobs.max_num_batched_tokens is not None:
            self.config = self.config.model_copy(update={"max_num_batched_tokens": knobs.max_num_batched_tokens})
        if knobs.speculative_tokens is not None:  # Knobs holds each within its bounds
            self.speculative_tokens = knobs.speculative_tokens
        if knobs.prefix_caching is not None:
            notes.append("prefix_caching ignored: the emulated engine has no prefix cache")
        return AppliedKnobs(self.clock_mhz, self.max_num_seqs, took_s=self.clock.now() - t0, notes=notes,
                            speculative_tokens=self.speculative_tokens,
                            max_num_batched_tokens=self.config.max_num_batched_tokens)

    @property
    def preemptions(self) -> int:
        """Sequences preempted (KV cache freed, recomputed later) since the engine started."""
        self._sync()
        return self._preemptions

    def supported_clocks_mhz(self) -> list[float]:
        """The emulated device's supported clocks in MHz, ascending."""
        return sorted(self.device.clocks_mhz)

    # --- Power source ----------------------------------------------------------------------------
    def devices(self) -> list[DeviceInfo]:
        """One modeled device per tensor-parallel rank, with its preset and calibration."""
        return [
            DeviceInfo(device=f"emu{i}", name=self.device.name, backend=self.backend, energy_method="modeled",
                       preset=self.preset, calibration=self.calibration)
            for i in range(self.tensor_parallel)
        ]

    def read(self) -> list[PowerReading]:
        """One reading per device; tensor-parallel devices run in lockstep and share the work evenly."""
        total = self._read_total()
        n = self.tensor_parallel
        if n == 1:
            return [total]
        return [
            PowerReading(total.t_s, f"emu{i}", total.energy_j / n, total.power_w / n, total.clock_mhz,
                         total.provenance)
            for i in range(n)
        ]

    def _read_total(self) -> PowerReading:
        self._sync()
        now = self.clock.now()
        energy = self._energy_j
        if self._inflight is not None:
            t0, cost = self._inflight
            frac = min(1.0, max(0.0, (now - t0) / cost.time_s)) if cost.time_s > 0 else 1.0
            energy += cost.energy_j * frac
            power = cost.power_w
        else:
            energy += self._pending_idle_j(now)
            power = self.device.idle_power_w * self.tensor_parallel
        return PowerReading(now, "emu0", energy, power, self.clock_mhz, Provenance.MODELED)

    # --- internals -------------------------------------------------------------------------------
    def _pending_idle_j(self, now: float) -> float:
        if self._inflight is not None:
            return 0.0
        return self.device.idle_power_w * self.tensor_parallel * max(0.0, now - self._accounted_until)

    def _admit(self, request: GenerationRequest) -> _Sequence:
        if request.prompt_token_ids is not None:
            prompt_len = len(request.prompt_token_ids)
        else:
            prompt_len = len(self.tokenizer.encode(request.prompt or ""))
        limit = self.config.max_model_len
        if prompt_len == 0:
            raise RequestRejectedError("the prompt is empty: send at least one token", param="prompt")
        if prompt_len >= limit:
            raise RequestRejectedError(
                f"This model's maximum context length is {limit} tokens. However, your prompt has "
                f"{prompt_len} tokens. Please reduce the length of the prompt.",
                param="prompt",
                code="context_length_exceeded",
            )
        max_tokens = request.max_tokens if request.max_tokens is not None else min(
            limit - prompt_len, request.default_max_tokens or limit)  # the door's default cap, within the context
        if max_tokens < 1:
            raise RequestRejectedError("max_tokens must be at least 1", param="max_tokens")
        if prompt_len + max_tokens > limit:
            raise RequestRejectedError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                "completion). Please reduce the length of the prompt or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        self._cut()
        seq = _Sequence(request, prompt_len, max_tokens, asyncio.Queue(), admitted_s=self.clock.now())
        if self._trace:
            trace.mark(request.request_id, "engine.admit", seq.admitted_s)
        self._waiting.append(seq)
        self._wake.set()
        return seq

    async def _stream(self, seq: _Sequence) -> AsyncIterator[TokenEvent]:
        interval = self.config.stream_interval_s
        try:
            first = True
            while True:
                # One message per token costs ~1 ms of CPU on the Ray and HTTP path: after the first token,
                # hold tokens for up to the stream interval (the last one ends the wait) and ship them as one.
                pending = [await seq.events.get()]
                if not first and interval > 0 and not pending[-1].finished:
                    await self._hold(seq, interval)
                first = False
                while not seq.events.empty():
                    pending.append(seq.events.get_nowait())
                event = merge_events(pending)
                yield event
                if event.finished:
                    return
        finally:
            if not seq.done:  # the client went away: free its batch slot and KV cache
                self._release(seq)

    async def _hold(self, seq: _Sequence, interval: float) -> None:
        waits = [asyncio.ensure_future(seq.last_token.wait()), asyncio.ensure_future(self.clock.sleep(interval))]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def _release(self, seq: _Sequence) -> None:
        self._cut()
        seq.done = True
        if seq in self._running:
            self._running.remove(seq)
            self._kv_used -= seq.kv_tokens
            seq.kv_tokens = 0
        elif seq in self._waiting:
            self._waiting.remove(seq)

    def _preempt(self, seq: _Sequence) -> None:
        """Free a running sequence's KV cache and queue it first, to be prefilled again with its output so far
        (vLLM's recompute preemption when the cache is full)."""
        self._running.remove(seq)
        self._kv_used -= seq.kv_tokens
        seq.kv_tokens = 0
        seq.prefilled = 0
        seq.prefill_target = seq.prompt_len + seq.generated
        self._waiting.appendleft(seq)
        self._preemptions += 1

    def _allocate(self, seq: _Sequence, tokens: int) -> bool:
        """KV slots for ``tokens`` more tokens of ``seq``, preempting the newest running sequences while the
        cache is full; False if ``seq`` itself had to go."""
        while self._kv_used + tokens > self.kv_capacity_tokens:
            victim = self._running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self._kv_used += tokens
        seq.kv_tokens += tokens
        return True

    def _schedule(self, t0: float) -> list[tuple[_Sequence, int, int, bool]]:
        """The iteration starting at ``t0`` as (sequence, new tokens, context tokens, is prefill) items:
        requests admitted after ``t0`` wait for the next one."""
        budget = self.config.max_num_batched_tokens
        spec = self.speculative_tokens
        plan: list[tuple[_Sequence, int, int, bool]] = []
        preempted = self._preemptions
        for seq in list(self._running):  # decodes first: one token each, plus k proposals to verify if speculating
            if seq.prefilled == seq.prefill_target and budget > 0:  # (a preempted one has prefilled 0)
                k = max(0, min(spec, seq.max_tokens - seq.generated - 1, budget - 1)) if spec else 0
                if self._kv_used + 1 + k <= self.kv_capacity_tokens:  # the common case, inline (hot path)
                    self._kv_used += 1 + k
                    seq.kv_tokens += 1 + k
                    plan.append((seq, 1 + k, seq.prompt_len + seq.generated, False))
                    budget -= 1 + k
                elif self._allocate(seq, 1 + k):
                    plan.append((seq, 1 + k, seq.prompt_len + seq.generated, False))
                    budget -= 1 + k
        for seq in self._running:  # then unfinished (chunked) prefills, as far as the cache has room
            if seq.prefilled < seq.prefill_target and budget > 0:
                chunk = min(budget, seq.prefill_target - seq.prefilled, self.kv_capacity_tokens - self._kv_used)
                if chunk > 0:
                    self._allocate(seq, chunk)
                    plan.append((seq, chunk, seq.prefilled, True))
                    budget -= chunk
        while (  # new requests only while nothing had to be preempted, and only what the cache holds
            self._preemptions == preempted
            and self._waiting
            and self._waiting[0].admitted_s <= t0
            and budget > 0
            and len(self._running) < self.max_num_seqs
            and self._kv_used + min(budget, self._waiting[0].prefill_target) <= self.kv_capacity_tokens
        ):
            seq = self._waiting.popleft()
            self._running.append(seq)
            chunk = min(budget, seq.prefill_target)
            self._allocate(seq, chunk)
            plan.append((seq, chunk, 0, True))
            budget -= chunk
        return plan

    async def _run(self) -> None:
        busy_until: float | None = None  # modeled end of the previous iteration while the engine stays busy
        while True:
            now = self.clock.now()
            # Back-to-back iterations start at the previous one's modeled end, so a real clock's sleep
            # overshoot (~1 ms per iteration on a loaded host) does not accumulate into the timeline;
            # a lag beyond MAX_LAG_S (a starved host) is given up rather than caught up in a burst.
            t0 = busy_until if busy_until is not None and now - busy_until <= MAX_LAG_S else now
            plan = self._schedule(t0)  # a request that arrived during the overshoot waits, as in virtual time
            if not plan and t0 < now:  # only such requests: the engine was idle since busy_until
                t0 = now
                plan = self._schedule(t0)
            if not plan:
                busy_until = None
                self._wake.clear()
                await self._wake.wait()
                continue
            self._idle_j += self._pending_idle_j(t0)
            self._energy_j = self._idle_j + self._prefill_j + self._decode_j
            if self._can_fast_forward:
                run = self._start_run(plan, t0)
                if run is not None:
                    busy_until = await self._finish_run(run)
                    continue
            cost = step_cost(
                self.device, self.model, [(n, ctx) for _, n, ctx, _ in plan], self.clock_mhz, self.tensor_parallel
            )
            self._inflight = (t0, cost)
            if self._trace:
                woke = self.clock.now()
                for seq, _, ctx, is_prefill in plan:
                    if is_prefill and ctx == 0:
                        trace.mark(seq.request.request_id, "engine.iteration_woke", woke)
                        trace.mark(seq.request.request_id, "engine.iteration_start", t0)
            try:
                await self.clock.sleep(t0 + cost.time_s - self.clock.now())
            finally:
                self._inflight = None
                self._accounted_until = t0 + cost.time_s
            self._iterations += 1
            busy_until = t0 + cost.time_s
            now = self.clock.now()  # every token of the iteration is emitted at its end
            for (seq, n, _, is_prefill), share in zip(plan, cost.shares_j, strict=True):
                if is_prefill:
                    seq.prefill_j += share
                    self._prefill_j += share
                    seq.prefilled += n
                    self._prompt_tokens += n
                else:
                    seq.decode_j += share
                    self._decode_j += share
                if seq.done:  # cancelled while the iteration ran: its energy stays attributed
                    continue
                if seq.prefilled == seq.prefill_target:
                    if is_prefill or n == 1:
                        self._emit_token(seq, now)
                    else:
                        accepted = self._accepted(n - 1)
                        if not seq.done:  # rejected proposals free their slots
                            self._kv_used -= n - accepted
                            seq.kv_tokens -= n - accepted
                        for _ in range(accepted):
                            if not seq.done:
                                self._emit_token(seq, now)
            self._energy_j = self._idle_j + self._prefill_j + self._decode_j

    @property
    def _can_fast_forward(self) -> bool:
        return (self.fast_forward and not self.stream_every_token and not self._trace
                and hasattr(self.clock, "alarm"))

    def _start_run(self, plan: list[tuple[_Sequence, int, int, bool]], t0: float) -> _Run | None:
        """Start a fast-forwarded run of decode steps with ``plan`` (already scheduled at ``t0``) as its first step,
        or None where the next steps could differ from this one with every context a token longer (prefill,
        speculation with its random acceptance, a request that may be admitted, one finishing, a full cache, TDP
        throttling): those are stepped one by one.

        The run's steps are priced at once (:func:`decode_steps`, bit for bit :func:`step_cost`) and the engine
        sleeps once, to the end of the last. Its state is brought up to the clock (:meth:`_sync`) whenever anything
        looks at the engine (stats, power reading), and the run is cut after the step in flight (:meth:`_cut`)
        when something changes what the next step would be (an arrival, a knob, a client leaving): what anyone
        sees, and every figure, is what stepping one by one gives, float for float.
        """
        if self.speculative_tokens or len(plan) != len(self._running):
            return None
        for _, n, _, is_prefill in plan:
            if is_prefill or n != 1:
                return None
        if self._waiting and len(self._running) < self.max_num_seqs:
            return None  # a waiting request could be admitted as soon as the cache or budget allows
        seqs = [item[0] for item in plan]
        batch = len(seqs)
        # Up to the step that gives the first request its last token (emitted as the ordinary path does).
        last = min(s.max_tokens - s.generated for s in seqs)
        limit = last
        # Steps 1.. allocate one KV slot per sequence; the ordinary path preempts once the cache is full.
        # Priced ahead: as many steps as recent runs lasted before something cut them, doubling while none is.
        limit = min(limit, 1 + (self.kv_capacity_tokens - self._kv_used) // batch, self._run_hint)
        if limit < 2:
            return None
        steps = decode_steps(self.device, self.model, [item[2] for item in plan], limit, self.clock_mhz,
                             self.tensor_parallel)
        k = limit if not steps.throttled.any() else int(steps.throttled.argmax())  # throttled: step_cost's business
        if k < 2:
            return None
        # Each step ends where the last ended plus its time (the ordinary loop's busy_until) ...
        ends_a = np.add.accumulate(np.concatenate(([t0], steps.time_s[:k])))[1:]
        # ... and the clock lands on now + (end - now), VirtualClock.sleep's arithmetic. Where that is the end
        # itself (always, unless a step is longer than the time since the clock's zero), the next step starts at
        # the clock and both series are one; the run stops before the first step where they part.
        now = self.clock.now()
        seconds = float(ends_a[0]) - now
        if not seconds > 0 or now + seconds != ends_a[0]:
            return None
        if k > 1:
            landed = ends_a[:-1] + (ends_a[1:] - ends_a[:-1]) == ends_a[1:]
            if not landed.all():
                k = 1 + int(landed.argmin())
                if k < 2:
                    return None
        ends = ends_a[:k].tolist()
        starts = [t0, *ends[:-1]]
        shares = steps.shares_j[:, :k]
        seq_j = np.add.accumulate(np.concatenate(([[s.decode_j] for s in seqs], shares), axis=1), axis=1)
        total_j = np.add.accumulate(np.concatenate(([self._decode_j], shares.T.ravel())))
        run = _Run(seqs, starts, ends, ends, steps, k, seq_j, total_j, tail=int(k == last))
        run.alarm = self.clock.alarm(ends[-1])  # type: ignore[attr-defined]
        self._run_state = run
        self._inflight = (starts[0], run.cost(0))
        return run

    async def _finish_run(self, run: _Run) -> float:
        """Sleep to the run's end (moved earlier if the run is cut), commit it; the busy-until of its last step."""
        assert run.alarm is not None
        try:
            await run.alarm
            if run.steps == len(run.wakes):  # not cut: price longer runs ahead next time
                self._run_hint = min(MAX_RUN_STEPS, 2 * self._run_hint)
            else:
                self._run_hint = max(64, 2 * run.steps)
        except asyncio.CancelledError:  # the engine stops: keep what has happened by now
            self._sync()
            self._run_state = self._inflight = None
            raise
        last = run.steps - 1
        self._sync(run.wakes[last])
        self._run_state = None
        self._inflight = None
        self._accounted_until = run.ends[last]
        if run.tail:  # the step that finishes a request: as the ordinary loop ends an iteration
            now = run.wakes[last]
            self._iterations += 1
            self.fast_forwarded_steps += 1
            self._commit_energy(run, run.steps)
            for seq in run.seqs:
                if not seq.done:
                    self._emit_token(seq, now)
            self._energy_j = self._idle_j + self._prefill_j + self._decode_j
        return run.ends[last]

    def _sync(self, now: float | None = None) -> None:
        """Bring a fast-forwarded run's state up to ``now``: the steps that have ended by then are committed
        (energy shares, tokens and their times, KV slots of the step that started), the next one is in flight."""
        run = self._run_state
        if run is None:
            return
        now = self.clock.now() if now is None else now
        done = bisect.bisect_right(run.wakes, now, 0, run.steps - run.tail)
        if done <= run.committed:
            return
        lo, seqs, batch = run.committed, run.seqs, len(run.seqs)
        self._commit_energy(run, done)
        k = done - lo
        started = min(done + 1, run.steps) - run.allocated  # steps begun since: their KV slots
        run.allocated += started
        self._kv_used += batch * started
        self._iterations += k
        self.fast_forwarded_steps += k
        self._generated_tokens += batch * k
        times = run.wakes[lo:done]
        bulk, single = self.on_tokens, self.on_token
        for s in seqs:
            s.kv_tokens += started
            s.generated += k
            if bulk is not None:
                bulk(s.request.request_id, times)
            elif single is not None:
                for t in times:
                    single(s.request.request_id, t)
        run.committed = done
        self._energy_j = self._idle_j + self._prefill_j + self._decode_j
        self._accounted_until = run.ends[done - 1]
        self._inflight = (run.starts[done], run.cost(done)) if done < run.steps else None

    def _commit_energy(self, run: _Run, steps: int) -> None:
        """Each sequence's and the engine's decode energy once the run's first ``steps`` steps are done."""
        for s, j in zip(run.seqs, run.seq_j[:, steps].tolist(), strict=True):
            s.decode_j = j
        self._decode_j = float(run.total_j[steps * len(run.seqs)])

    def _cut(self) -> None:
        """Something changes what the next step would be: end the run after the step now in flight."""
        run = self._run_state
        if run is None:
            return
        self._sync()
        in_flight = bisect.bisect_right(run.wakes, self.clock.now(), 0, run.steps)
        if in_flight + 1 < run.steps:
            run.steps = in_flight + 1
            run.tail = 0
            self.clock.rearm(run.alarm, run.wakes[in_flight])  # type: ignore[attr-defined]

    def _accepted(self, proposed: int) -> int:
        """Tokens a verification step yields: the accepted prefix of the proposals plus the model's own token."""
        accepted = 0
        while accepted < proposed and self._spec_rng.random() < self.config.spec_acceptance:
            accepted += 1
        self._spec_proposed += proposed
        self._spec_accepted += accepted
        return 1 + accepted

    def _emit_token(self, seq: _Sequence, now: float) -> None:
        index = seq.generated
        rid = seq.request.request_id
        if self.on_token is not None:
            self.on_token(rid, now)
        seq.generated += 1
        self._generated_tokens += 1
        finished = seq.generated >= seq.max_tokens
        if self._trace and (index == 0 or finished):  # modeled emission time, then the clock's
            which = "first" if index == 0 else "last"
            trace.mark(rid, f"engine.{which}_token_modeled", self._accounted_until)
            trace.mark(rid, f"engine.{which}_token", now)
        if finished:
            seq.done = True
            seq.last_token.set()
            self._running.remove(seq)
            self._kv_used -= seq.kv_tokens
            seq.kv_tokens = 0
        elif index > 0 and not self.stream_every_token:
            return
        token_id = zlib.crc32(f"{self.config.seed}:{rid}:{index}".encode()) % self.tokenizer.vocab_size
        seq.events.put_nowait(
            TokenEvent(
                request_id=rid,
                replica=self.replica,
                text=self.tokenizer.decode_one(token_id),
                token_ids=[token_id],
                index=index,
                finished=finished,
                finish_reason="length" if finished else None,
                prompt_tokens=seq.prompt_len,
                output_tokens=seq.generated,
                energy_j=seq.energy_j,
                provenance=Provenance.MODELED.value,
            )
        )


@register_engine("emulated")
def _build(config: EmulatedEngineConfig, replica: str) -> EmulatedEngine:
    return EmulatedEngine(config, replica)
