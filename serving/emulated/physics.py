"""Performance-and-energy model of one engine iteration on an emulated device.

Per iteration (DESIGN.md, "Emulated devices"):
    time   = max(compute time, memory time) + overhead
    energy = Σ MACs x energy per MAC + Σ bytes per memory level x energy per byte + static power x time
Prefill is compute-bound, decode memory-bound (weights and the KV cache are read once per step). How a
device executes the counts (peak rate, where weights live, what a MAC costs) is its kind's business
(:mod:`serving.emulated.kinds`); constants are node-scaled from Horowitz (:mod:`.technology`).
DVFS: compute rate scales with f, dynamic energy per operation with V², so dynamic power goes as C·V²·f;
V rises linearly from ``v_min`` at ``f_floor`` to ``v_max`` at ``f_max``. A device that would exceed its TDP
is throttled: the iteration is stretched until power equals TDP (what a power-capped GPU does).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from operator import itemgetter
from pathlib import Path

import numpy as np
import yaml
from pydantic import ValidationError

from profilers.attribution import split
from profilers.errors import ConfigError, validation_problems
from serving.emulated.devices import DeviceFitError, DeviceSpec, Execution, device_from_dict
from serving.emulated.shapes import ModelShape, SequenceWork, WorkCounts, count_rows
from serving.knobs import MAX_SPECULATIVE_TOKENS

__all__ = [
    "DecodeSteps",
    "DeviceFitError",
    "DeviceSpec",
    "EnergyFloor",
    "IterationCost",
    "ModelShape",
    "PresetError",
    "RunMetrics",
    "SequenceWork",
    "decode_steps",
    "encoder_batch",
    "energy_floor_per_token",
    "iteration_cost",
    "load_device",
    "load_model_shape",
    "peak_tops_per_w",
    "run_metrics",
    "step_cost",
    "work_cost",
]


class PresetError(ConfigError):
    """A device preset or model shape that cannot be used; names the file and the field."""


@dataclass(slots=True)  # not frozen: building a frozen one costs 2 us more, per iteration in virtual time
class IterationCost:
    """Time (s) and energy (J) of one engine iteration, static and per-item shares, and what bounded it."""

    time_s: float
    energy_j: float
    static_j: float
    shares_j: list[float]
    """Each work item's share of ``energy_j``, in the order the items were given."""
    compute_s: float
    memory_s: float
    throttled: bool
    ops: float = 0.0
    """Operations done (2 per MAC): the numerator of TOPS and TOPS/W."""
    tokens: int = 0
    request_ids: tuple[str, ...] = ()

    @property
    def power_w(self) -> float:
        """Mean power of the iteration in watts."""
        return self.energy_j / self.time_s if self.time_s > 0 else 0.0

    @property
    def per_request_j(self) -> dict[str, float]:
        """Shares by request id (items of one request summed); costs from :func:`iteration_cost` only."""
        if len(self.request_ids) != len(self.shares_j):
            raise ValueError("this cost carries no request ids (step_cost): use shares_j, in item order")
        out: dict[str, float] = {}
        for rid, j in zip(self.request_ids, self.shares_j, strict=True):
            out[rid] = out.get(rid, 0.0) + j
        return out


@dataclass(slots=True)
class _Totals:
    time_s: float
    own_j: float
    """Dynamic energy of the work itself (MACs, KV, activations), before shared costs."""
    shared_j: float
    """Shared dynamic energy: weights streamed, all-reduce traffic."""
    static_j: float
    throttled: bool
    execution: Execution


def _totals(
    device: DeviceSpec,
    model: ModelShape,
    work: WorkCounts,
    sequences: int,
    clock_mhz: float,
    ideal: bool = False,
    tensor_parallel: int = 1,
) -> _Totals:
    """Time and energy of an iteration doing ``work`` over ``sequences`` sequences. ``ideal``: the roofline
    bound (peak rates, no overhead). Energies cover all ``tensor_parallel`` devices; each is held under its
    own TDP by running at the fastest clock that stays under it (what a power-capped GPU's governor does)."""
    n = tensor_parallel
    t = _at_clock(device, model, work, sequences, clock_mhz, ideal, n)
    if ideal or not t.throttled:
        return t
    # Over the TDP the governor lowers the clock: the fastest supported clock that stays under it, else the
    # lowest clock stretched to the TDP. The request's clock stays a cap, never a floor.
    lower_clocks = device.cache.get(("lower_clocks", clock_mhz))
    if lower_clocks is None:  # every throttled iteration searches the same table: sorted once per clock
        lower_clocks = device.cache[("lower_clocks", clock_mhz)] = sorted(
            (c for c in device.clocks_mhz if c < clock_mhz), reverse=True)
    for lower in lower_clocks:
        t = _at_clock(device, model, work, sequences, lower, ideal, n)
        if not t.throttled:
            break
    t.throttled = True
    return t


def _at_clock(
    device: DeviceSpec, model: ModelShape, work: WorkCounts, sequences: int, clock_mhz: float, ideal: bool, n: int
) -> _Totals:
    ex = device.execute(model, work, clock_mhz, sequences, n)
    time_s = max(ex.ideal_compute_s, ex.ideal_memory_s) if ideal else ex.time_s
    own_j = ex.own_j(work)
    shared_j = ex.weight_stream_j + ex.comm_j
    dynamic_j = own_j + shared_j
    # Busy power (clock tree, active SMs) while kernels run; idle power while the device waits on the host,
    # launch gaps and link latency. The ideal bound is all kernel time.
    static_w = device.static_power_w(clock_mhz) * n
    idle_w = device.idle_power_w * n
    kernel_s = time_s if ideal else min(time_s, ex.kernel_s)
    static_j = idle_w * time_s + (static_w - idle_w) * kernel_s
    throttled = (dynamic_j + static_j) / time_s > device.tdp_w * n * (1 + 1e-12)
    if throttled and clock_mhz <= min(device.clocks_mhz):  # nothing lower: stretch the kernels to the TDP
        # dynamic + idle·wait + static·kernel = TDP·(wait + kernel), solved for the kernel time
        wait_s = time_s - kernel_s
        tdp_w = device.tdp_w * n
        kernel_s = (dynamic_j - (tdp_w - idle_w) * wait_s) / (tdp_w - static_w)
        time_s = wait_s + kernel_s
        static_j = idle_w * time_s + (static_w - idle_w) * kernel_s
    return _Totals(time_s, own_j, shared_j, static_j, throttled, ex)


def _price(
    device: DeviceSpec,
    model: ModelShape,
    items: list[tuple[int, int]],
    clock_mhz: float,
    ideal: bool = False,
    tensor_parallel: int = 1,
) -> tuple[IterationCost, Execution]:
    """:func:`_totals` of ``items`` ((new tokens, context tokens) each), with the energy split so the item
    shares add up exactly: each item its own work, the shared costs by tokens processed."""
    if not items:
        raise ValueError("an iteration needs at least one sequence")
    rows = count_rows(model.work_constants, items)
    weight_macs, attn_macs, kv_bytes, act_bytes = map(sum, zip(*rows, strict=True))
    tokens = sum(map(itemgetter(0), items))
    work = WorkCounts(tokens, weight_macs, attn_macs, kv_bytes, act_bytes)
    t = _totals(device, model, work, len(items), clock_mhz, ideal, tensor_parallel)
    ex = t.execution
    e_w, e_a, e_kv, e_act, e_tok = ex.weight_mac_j, ex.attn_mac_j, ex.kv_byte_j, ex.act_byte_j, ex.token_j
    own = [wm * e_w + am * e_a + kv * e_kv + act * e_act + m * e_tok
           for (m, _), (wm, am, kv, act) in zip(items, rows, strict=True)]
    shared = split(t.shared_j + t.static_j, [m for m, _ in items])
    shares = [j + s for j, s in zip(own, shared, strict=True)]
    cost = IterationCost(
        time_s=t.time_s,
        energy_j=sum(own) + t.shared_j + t.static_j,
        static_j=t.static_j,
        shares_j=shares,
        compute_s=ex.compute_s,
        memory_s=ex.memory_s,
        throttled=t.throttled,
        ops=2 * (weight_macs + attn_macs),
        tokens=tokens,
    )
    return cost, ex


def work_cost(
    device: DeviceSpec,
    model: ModelShape,
    work: WorkCounts,
    sequences: int,
    clock_mhz: float,
    tensor_parallel: int = 1,
) -> tuple[float, float, bool]:
    """(time s, energy J, throttled) of an iteration given its summed work: the aggregate form of
    :func:`step_cost` for models of whole batches (calibration fits, floors) without per-request items."""
    t = _totals(device, model, work, sequences, clock_mhz, tensor_parallel=tensor_parallel)
    return t.time_s, t.own_j + t.shared_j + t.static_j, t.throttled


def step_cost(
    device: DeviceSpec,
    model: ModelShape,
    items: list[tuple[int, int]],
    clock_mhz: float,
    tensor_parallel: int = 1,
) -> IterationCost:
    """:func:`iteration_cost` of ``(new tokens, context tokens)`` items, shares in item order (the engine's
    hot path: no per-request objects)."""
    return _price(device, model, items, clock_mhz, tensor_parallel=tensor_parallel)[0]


@dataclass(slots=True)
class DecodeSteps:
    """:func:`step_cost` of consecutive decode steps of one batch, as arrays over the steps and the batch's
    sequences (in item order)."""

    time_s: np.ndarray
    energy_j: np.ndarray
    shares_j: np.ndarray
    """(sequences, steps): each sequence's share of each step's energy (a row per sequence)."""
    throttled: np.ndarray


def _seq_sum(m: np.ndarray) -> np.ndarray:
    """Column sums of ``m`` (terms, columns) added row after row, as Python's ``sum`` of each column's terms does
    (numpy's own reduction may sum pairwise: a different float result). One in-place add per term: the batches of a
    fleet are a few sequences, where this beats ``np.add.accumulate`` (its cost grows per element)."""
    total = m[0].copy()
    for row in m[1:]:
        total += row
    return total


def decode_steps(
    device: DeviceSpec,
    model: ModelShape,
    contexts: list[int],
    steps: int,
    clock_mhz: float,
    tensor_parallel: int = 1,
) -> DecodeSteps:
    """Step ``i`` (of ``steps``) of a decode batch whose sequences hold ``contexts`` tokens at step 0, each one
    more per step: what :func:`step_cost` gives for items ``[(1, c + i) for c in contexts]``, bit for bit (the
    same float operations in the same order, elementwise over the steps), without the TDP governor: a step
    flagged ``throttled`` is priced wrong here and must be priced by :func:`step_cost` (the caller stops there).
    Per-sequence arrays are (sequences, steps), so that every sum over the batch adds whole rows.
    """
    c = model.work_constants
    if c.encoder or not contexts:
        raise ValueError("decode steps need a decoder and at least one sequence")
    n = tensor_parallel
    batch = len(contexts)
    ctx = np.add.outer(np.asarray(contexts, dtype=np.int64), np.arange(steps, dtype=np.int64))
    # count_rows for (1, ctx): (mp * 1 + lm, ac * 1 * (ctx + 1.0), kvt * (ctx + 1), acc * 1)
    wm_item, act_item = c.matmul_params * 1 + c.lm_head_params, c.act_coef * 1
    am = (c.attn_coef * 1) * (ctx + 1.0)
    kv = c.kv_bytes_per_token * (ctx + 1)
    weight_macs, act_bytes = sum([wm_item] * batch), sum([act_item] * batch)
    attn_macs, kv_bytes = _seq_sum(am), _seq_sum(kv)
    # DeviceSpec.execute, for tokens = sequences = batch
    key = (c, model.dtype, model.dtype_bytes, clock_mhz)
    op = device.cache.get(key)
    if op is None:
        op = device.cache[key] = device.operating_point(model, clock_mhz)
    stream = max(0.0, model.weight_bytes_read(batch) - op.resident_bytes)
    kv_share = 1.0 / n if model.n_kv_heads >= n else 1.0 / model.n_kv_heads
    gemm_c = weight_macs / n / op.peak_macs_per_s
    attn_c = attn_macs / n / op.peak_macs_per_s
    weight_m = stream / n / op.bandwidth_bps
    kv_m = kv_bytes * kv_share / op.bandwidth_bps
    ce, me = op.compute_efficiency, op.memory_efficiency
    knee = device.memory.full_bandwidth_clock_mhz
    if knee is not None and clock_mhz < knee:
        me *= clock_mhz / knee
    o = device.gemm_overlap
    if device.attention_efficiency is None:
        compute_s, memory_s = (gemm_c + attn_c) / ce, (weight_m + kv_m) / me
        busy = np.maximum(compute_s, memory_s) + (1.0 - o) * np.minimum(compute_s, memory_s)
    else:
        ae = device.attention_efficiency
        gemm_s = max(gemm_c / ce, weight_m / me) + (1.0 - o) * min(gemm_c / ce, weight_m / me)
        busy = gemm_s + np.maximum(attn_c / (ce * ae), kv_m / (me * ae))
    moe_layers = model.n_moe_layers if model.is_moe else 0
    layer_s = device.layer_overhead_s * model.n_layers + device.moe_layer_overhead_s * moe_layers
    device_s = busy + device.overhead_s + layer_s
    kernel_s = busy + device.overhead_s
    comm_j = 0.0
    if n > 1:
        assert device.interconnect is not None
        link = device.interconnect
        message = batch * model.hidden_size * model.head_bytes
        sent = 2 * (n - 1) / n * message
        reduces = 2 * model.n_layers
        transfer_s = reduces * sent / link.bandwidth_bps
        device_s += reduces * link.allreduce_latency_s * (n - 1) + transfer_s
        kernel_s += transfer_s
        comm_j = reduces * sent * n * link.energy_pj_per_byte * 1e-12
    host_s = device.overlapped_overhead_s + device.overlapped_sequence_s * batch
    time_s = np.maximum(device_s, host_s) + device.sequence_overhead_s * batch
    e_w, e_a, e_kv, e_act, e_tok = op.weight_mac_j, op.attn_mac_j, op.kv_byte_j, op.act_byte_j, op.token_j
    # _at_clock
    own_j = weight_macs * e_w + attn_macs * e_a + kv_bytes * e_kv + act_bytes * e_act + batch * e_tok
    shared_j = stream * op.stream_byte_j + comm_j
    static_w = device.static_power_w(clock_mhz) * n
    idle_w = device.idle_power_w * n
    np.minimum(time_s, kernel_s, out=kernel_s)
    static_j = idle_w * time_s + (static_w - idle_w) * kernel_s
    throttled = (own_j + shared_j + static_j) / time_s > device.tdp_w * n * (1 + 1e-12)  # (dynamic + static) / t
    # _price
    own = wm_item * e_w + am * e_a + kv * e_kv + act_item * e_act + 1 * e_tok
    pooled = shared_j + static_j
    shares = own + pooled / batch  # a row per sequence: its own energy plus its even part of the pooled
    energy_j = _seq_sum(own) + shared_j + static_j
    return DecodeSteps(time_s, energy_j, shares, throttled)


def iteration_cost(
    device: DeviceSpec,
    model: ModelShape,
    work: list[SequenceWork],
    clock_mhz: float,
    tensor_parallel: int = 1,
) -> IterationCost:
    """Time and energy of one batched iteration, with its energy split among the requests in it.

    Each request is charged its own MACs, KV traffic and activations; the shared cost (streaming the
    weights once and static power for the iteration) is split by the tokens each request processed, so
    the shares add up to the iteration's energy exactly.
    """
    items = [(w.new_tokens, w.context_tokens) for w in work]
    cost, _ = _price(device, model, items, clock_mhz, tensor_parallel=tensor_parallel)
    return dataclasses.replace(cost, request_ids=tuple(w.request_id for w in work))


# --- whole-workload figures ----------------------------------------------------------------------
def encoder_batch(batch: int, seq_len: int) -> list[SequenceWork]:
    """One encoder inference pass (e.g. BERT): ``batch`` sequences of ``seq_len`` tokens, no decode."""
    if batch < 1 or seq_len < 1:
        raise ValueError("an encoder batch needs at least one sequence of at least one token")
    return [SequenceWork(f"seq{i}", seq_len, 0, True) for i in range(batch)]


@dataclass(frozen=True)
class RunMetrics:
    """Throughput and efficiency of one iteration, as papers report them."""

    time_s: float
    energy_j: float
    tokens_per_s: float
    ops_per_s: float
    power_w: float
    joules_per_token: float
    throttled: bool

    @property
    def tops(self) -> float:
        """Effective throughput in tera-operations per second (2 ops per MAC)."""
        return self.ops_per_s / 1e12

    @property
    def tops_per_w(self) -> float:
        """Energy efficiency in tera-operations per second per watt."""
        return self.ops_per_s / self.power_w / 1e12 if self.power_w > 0 else 0.0


def run_metrics(
    device: DeviceSpec, model: ModelShape, work: list[SequenceWork], clock_mhz: float | None = None
) -> RunMetrics:
    """Throughput and efficiency of one iteration of ``work`` on the device (default: its top clock)."""
    cost = iteration_cost(device, model, work, clock_mhz or device.f_max_mhz)
    return RunMetrics(
        time_s=cost.time_s,
        energy_j=cost.energy_j,
        tokens_per_s=cost.tokens / cost.time_s,
        ops_per_s=cost.ops / cost.time_s,
        power_w=cost.power_w,
        joules_per_token=cost.energy_j / cost.tokens,
        throttled=cost.throttled,
    )


def peak_tops_per_w(device: DeviceSpec, dtype: str, clock_mhz: float | None = None) -> float:
    """Efficiency as chip and macro papers quote it: every MAC unit busy at peak, operands in place.

    No weight or activation movement and no framework overhead, static power included. This is the
    figure to compare with a macro's published TOPS/W; workload figures come from :func:`run_metrics`.
    """
    clock = clock_mhz or device.f_max_mhz
    macs = device.peak_macs_per_s(dtype, clock)
    watts = macs * device.mac_energy_j(dtype, clock) + device.static_power_w(clock)
    return 2 * macs / watts / 1e12


@dataclass(frozen=True)
class EnergyFloor:
    """Lower bound of energy per output token for a workload on a device, over every setting."""

    joules_per_token: float
    clock_mhz: float
    """The clock at which the bound is lowest."""
    bound: str
    """What limits the work at that clock: ``compute`` or ``memory``."""


def energy_floor_per_token(
    device: DeviceSpec,
    model: ModelShape,
    prompt_tokens: int,
    output_tokens: int,
    tensor_parallel: int = 1,
) -> EnergyFloor:
    """Least energy per output token any setting could reach on ``device`` for requests of ``prompt_tokens``
    in and ``output_tokens`` out: every batch up to the KV capacity, every clock, speculation at perfect
    acceptance, any packing or policy.

    Counted per request, each part a lower bound of what any schedule spends: its own work (MACs, KV and
    activation traffic, at the device's unit energies) with decode tokens verified ``1 + 16`` at a time (the
    KV cache read once per step for all of them); the weights streamed, amortised over the largest step the
    KV cache can hold; busy power over the roofline time of all that work (peak rates, no overhead, the
    compute and memory bounds summed over the request before taking the larger, which no split into
    iterations can beat); no TDP throttling (which only adds time at static power) and no interconnect
    traffic. Measured energy per token divided by this is the headroom a scheduler or a knob could still win.
    For encoders the "output" tokens are the sequence's tokens (one pass, no decode).
    """
    decoder = model.architecture == "decoder"
    if prompt_tokens < 1 or output_tokens < 0 or (decoder and output_tokens < 1):
        raise ValueError("a floor needs prompt_tokens >= 1 and output_tokens >= 1 (decoders)")
    n = tensor_parallel
    steps, per_step = 0.0, 1 + MAX_SPECULATIVE_TOKENS
    items = [(prompt_tokens, 0)]
    if decoder and output_tokens > 1:
        decode_tokens = output_tokens - 1  # the first token comes out of the prefill
        steps = decode_tokens / per_step
        items.append((per_step, prompt_tokens + decode_tokens // 2))
    rows = count_rows(model.work_constants, items)
    prefill, decode = rows[0], (rows[1] if len(rows) > 1 else (0.0, 0.0, 0.0, 0.0))
    weight_macs, attn_macs, kv_bytes, act_bytes = (p + steps * d for p, d in zip(prefill, decode, strict=True))
    tokens = prompt_tokens + (output_tokens - 1 if decoder else 0)
    largest_step = device.kv_capacity_tokens(model, n) if decoder else prompt_tokens
    stream_share = model.weight_bytes_read(largest_step) / largest_step * tokens
    per_token = output_tokens if decoder else prompt_tokens
    best: EnergyFloor | None = None
    for clock in sorted(device.clocks_mhz):
        ex = device.execute(model, WorkCounts(tokens, weight_macs, attn_macs, kv_bytes, act_bytes), clock, 1, n)
        # execute() streams the weights once: scale that to the amortised share (none if they stay on chip).
        scale = stream_share / ex.weight_stream_bytes if ex.weight_stream_bytes > 0 else 0.0
        weight_s = ex.weight_stream_bytes / n / device.memory_bandwidth_bps
        memory_s = ex.ideal_memory_s - weight_s + weight_s * scale
        own_j = ex.own_j(WorkCounts(tokens, weight_macs, attn_macs, kv_bytes, act_bytes))
        stream_j = ex.weight_stream_j * scale
        static_j = device.static_power_w(clock) * n * max(ex.ideal_compute_s, memory_s)
        j = (own_j + stream_j + static_j) / per_token
        if best is None or j < best.joules_per_token:
            bound = "compute" if ex.ideal_compute_s >= memory_s else "memory"
            best = EnergyFloor(j, clock, bound)
    assert best is not None
    return best


# --- loading presets and shapes -------------------------------------------------------------------
def _load_data(folder: str, name_or_path: str, suffix: str) -> tuple[dict, str]:
    path = Path(name_or_path)
    if path.suffix == suffix and path.exists():
        try:
            text, where = path.read_text(), str(path)
        except (OSError, UnicodeDecodeError) as e:
            raise PresetError(f"{path}: not a readable {suffix[1:].upper()} file: {e}") from e
    else:
        res = resources.files("serving.emulated") / folder / f"{name_or_path}{suffix}"
        if not res.is_file():
            known = sorted(
                p.name.removesuffix(suffix)
                for p in (resources.files("serving.emulated") / folder).iterdir()
                if p.name.endswith(suffix)
            )
            what = "preset" if folder == "presets" else "model shape"
            raise PresetError(f"unknown {what} {name_or_path!r}: use one of {known} or a {suffix} file path")
        text, where = res.read_text(), f"{folder}/{name_or_path}{suffix}"
    try:
        data = yaml.safe_load(text) if suffix == ".yaml" else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise PresetError(f"{where}: not valid {suffix[1:].upper()}: {e}") from e
    if not isinstance(data, dict):
        raise PresetError(f"{where}: expected a mapping of fields, got {type(data).__name__}")
    return data, where


def load_device(name_or_path: str) -> DeviceSpec:
    """A shipped preset by name (e.g. ``h100_sxm``) or the path of a preset YAML."""
    data, where = _load_data("presets", name_or_path, ".yaml")
    try:
        spec = device_from_dict(data)
    except ValidationError as e:
        raise PresetError(f"{where}: invalid device preset: {validation_problems(e)}") from e
    except ValueError as e:
        raise PresetError(f"{where}: {e}") from e
    from serving.emulated.calibration import attach_calibration  # imports this module: not at the top

    return attach_calibration(spec, name_or_path, where)  # eager: a broken report fails here, not in a figure


def load_model_shape(name_or_path: str, dtype: str | None = None) -> ModelShape:
    """A shipped shape by name (e.g. ``llama-3.1-8b``) or the path of a HF ``config.json``."""
    data, where = _load_data("models", name_or_path, ".json")
    name = (
        name_or_path
        if not name_or_path.endswith(".json")
        else Path(name_or_path).parent.name or Path(where).stem
    )
    try:
        shape = ModelShape.from_hf_config(data, name=name)
    except (KeyError, ValueError, TypeError) as e:
        raise PresetError(f"{where}: cannot read the model shape: {e}") from e
    return shape.with_dtype(dtype) if dtype else shape
