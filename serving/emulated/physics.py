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

import yaml
from pydantic import ValidationError

from serving.emulated.devices import DeviceFitError, DeviceSpec, Execution, device_from_dict
from serving.emulated.shapes import ModelShape, SequenceWork, WorkCounts, count_rows

__all__ = [
    "DeviceFitError",
    "DeviceSpec",
    "EnergyFloor",
    "IterationCost",
    "ModelShape",
    "PresetError",
    "RunMetrics",
    "SequenceWork",
    "encoder_batch",
    "energy_floor_per_token",
    "iteration_cost",
    "load_device",
    "load_model_shape",
    "peak_tops_per_w",
    "run_metrics",
    "step_cost",
]


class PresetError(ValueError):
    """A device preset or model shape that cannot be used; names the file and the field."""


@dataclass(slots=True)  # not frozen: building a frozen one costs 2 us more, per iteration in virtual time
class IterationCost:
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


def _price(
    device: DeviceSpec,
    model: ModelShape,
    items: list[tuple[int, int]],
    clock_mhz: float,
    ideal: bool = False,
) -> tuple[IterationCost, Execution]:
    """Time and energy of an iteration doing ``items`` ((new tokens, context tokens) each), split so the
    item shares add up exactly. ``ideal``: the roofline bound (peak rates, no overhead)."""
    if not items:
        raise ValueError("an iteration needs at least one sequence")
    rows = count_rows(model.work_constants, items)
    weight_macs, attn_macs, kv_bytes, act_bytes = map(sum, zip(*rows, strict=True))
    tokens = sum(map(itemgetter(0), items))
    ex = device.execute(model, WorkCounts(tokens, weight_macs, attn_macs, kv_bytes, act_bytes), clock_mhz)
    time_s = (max(ex.ideal_compute_s, ex.ideal_memory_s) if ideal
              else max(ex.compute_s, ex.memory_s) + device.overhead_s)
    e_w, e_a, e_kv, e_act, e_tok = ex.weight_mac_j, ex.attn_mac_j, ex.kv_byte_j, ex.act_byte_j, ex.token_j
    own = [wm * e_w + am * e_a + kv * e_kv + act * e_act + n * e_tok
           for (n, _), (wm, am, kv, act) in zip(items, rows, strict=True)]
    dynamic_j = sum(own) + ex.weight_stream_j
    static_w = device.static_power_w(clock_mhz)
    throttled = dynamic_j / time_s + static_w > device.tdp_w
    if throttled:
        time_s = dynamic_j / (device.tdp_w - static_w)
    static_j = static_w * time_s
    shared_per_token = (ex.weight_stream_j + static_j) / tokens
    shares = [j + shared_per_token * n for j, (n, _) in zip(own, items, strict=True)]
    cost = IterationCost(
        time_s=time_s,
        energy_j=dynamic_j + static_j,
        static_j=static_j,
        shares_j=shares,
        compute_s=ex.compute_s,
        memory_s=ex.memory_s,
        throttled=throttled,
        ops=2 * (weight_macs + attn_macs),
        tokens=tokens,
    )
    return cost, ex


def step_cost(
    device: DeviceSpec, model: ModelShape, items: list[tuple[int, int]], clock_mhz: float
) -> IterationCost:
    """:func:`iteration_cost` of ``(new tokens, context tokens)`` items, shares in item order (the engine's
    hot path: no per-request objects)."""
    return _price(device, model, items, clock_mhz)[0]


def iteration_cost(
    device: DeviceSpec, model: ModelShape, work: list[SequenceWork], clock_mhz: float
) -> IterationCost:
    """Time and energy of one batched iteration, with its energy split among the requests in it.

    Each request is charged its own MACs, KV traffic and activations; the shared cost (streaming the
    weights once and static power for the iteration) is split by the tokens each request processed, so
    the shares add up to the iteration's energy exactly.
    """
    cost, _ = _price(device, model, [(w.new_tokens, w.context_tokens) for w in work], clock_mhz)
    return dataclasses.replace(cost, request_ids=tuple(w.request_id for w in work))


def _ideal_cost(
    device: DeviceSpec, model: ModelShape, work: list[SequenceWork], clock_mhz: float
) -> tuple[IterationCost, Execution]:
    """The roofline bound: peak rates, no overhead, same energies per unit of work."""
    return _price(device, model, [(w.new_tokens, w.context_tokens) for w in work], clock_mhz, ideal=True)


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
        return self.ops_per_s / 1e12

    @property
    def tops_per_w(self) -> float:
        return self.ops_per_s / self.power_w / 1e12 if self.power_w > 0 else 0.0


def run_metrics(
    device: DeviceSpec, model: ModelShape, work: list[SequenceWork], clock_mhz: float | None = None
) -> RunMetrics:
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
    """Roofline lower bound of energy per output token for a workload point."""

    joules_per_token: float
    clock_mhz: float
    """The clock at which the bound is lowest."""
    bound: str
    """What limits the decode step at that clock: ``compute`` or ``memory``."""


def energy_floor_per_token(
    device: DeviceSpec, model: ModelShape, prompt_tokens: int, output_tokens: int, batch: int = 1
) -> EnergyFloor:
    """Least energy per output token any schedule could reach on ``device``.

    Counts the operations that must run and the bytes that must move for ``batch`` requests of
    ``prompt_tokens`` in and ``output_tokens`` out (prefill once, then one decode step per output token at
    the mean context, the weights read once per step and shared by the batch), priced at peak rates with no
    overhead, static power included, at every supported clock; returns the cheapest. Measured energy per
    token divided by this is the headroom a scheduler or a knob could still win. For encoders the
    "output" tokens are the sequence's tokens (one pass, no decode).
    """
    if (
        prompt_tokens < 1
        or output_tokens < 0
        or batch < 1
        or (model.architecture == "decoder" and output_tokens < 1)
    ):
        raise ValueError("a floor needs prompt_tokens >= 1, output_tokens >= 1 (decoders) and batch >= 1")
    best: EnergyFloor | None = None
    for clock in sorted(device.clocks_mhz):
        prefill, _ = _ideal_cost(device, model, encoder_batch(batch, prompt_tokens), clock)
        if model.architecture == "encoder":
            per_token, bound = prefill.energy_j / (batch * prompt_tokens), "compute"
        else:
            ctx = prompt_tokens + output_tokens // 2
            step_work = [SequenceWork(f"seq{i}", 1, ctx, False) for i in range(batch)]
            step, ex = _ideal_cost(device, model, step_work, clock)
            bound = "compute" if ex.ideal_compute_s >= ex.ideal_memory_s else "memory"
            per_token = (prefill.energy_j + output_tokens * step.energy_j) / (batch * output_tokens)
        if best is None or per_token < best.joules_per_token:
            best = EnergyFloor(per_token, clock, bound)
    assert best is not None
    return best


# --- loading presets and shapes -------------------------------------------------------------------
def _load_data(folder: str, name_or_path: str, suffix: str) -> tuple[dict, str]:
    path = Path(name_or_path)
    if path.suffix == suffix and path.exists():
        text, where = path.read_text(), str(path)
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
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors()
        )
        raise PresetError(f"{where}: invalid device preset: {problems}") from e
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
