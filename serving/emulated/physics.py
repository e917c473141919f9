"""Performance-and-energy model of one engine iteration on an emulated device.

Per iteration (DESIGN.md, "Emulated devices"):
    time   = max(FLOPs / (peak x efficiency x f/f_max), bytes / bandwidth) + overhead
    energy = FLOPs x e_flop(V) + DRAM bytes x e_dram + on-chip bytes x e_sram + static power x time
Prefill is compute-bound, decode memory-bound (weights and the KV cache are read once per step).
DVFS: compute rate scales with f; dynamic energy per operation with V^2, V rising linearly from
``v_min`` at ``f_floor`` to ``v_max`` at ``f_max``. A device that would exceed its TDP is throttled:
the iteration is stretched until power equals TDP (what a power-capped GPU does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class DeviceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: str = Field(description="gpu | cim | fpga | cpu")
    technology_nm: float = Field(gt=0)
    peak_flops: float = Field(gt=0, description="Dense FLOP/s at f_max for the model's dtype.")
    memory_bandwidth_bps: float = Field(gt=0, description="DRAM bandwidth, bytes/s.")
    memory_bytes: float = Field(gt=0, description="DRAM capacity, bytes.")
    idle_power_w: float = Field(ge=0)
    tdp_w: float = Field(gt=0)
    clocks_mhz: list[float] = Field(min_length=1, description="Supported compute clocks.")
    f_floor_mhz: float = Field(gt=0, description="Below this clock the voltage stays at v_min.")
    v_min: float = Field(gt=0)
    v_max: float = Field(gt=0)
    energy_per_flop_pj: float = Field(gt=0, description="Dynamic energy per FLOP at v_max.")
    energy_per_dram_byte_pj: float = Field(gt=0)
    energy_per_sram_byte_pj: float = Field(gt=0, description="On-chip buffer traffic, at v_max.")
    compute_efficiency: float = Field(gt=0, le=1, description="Achievable share of peak in GEMMs.")
    memory_efficiency: float = Field(gt=0, le=1, description="Achievable share of peak bandwidth.")
    overhead_s: float = Field(ge=0, description="Fixed per-iteration cost (launch, scheduling).")
    kv_memory_fraction: float = Field(default=0.9, gt=0, le=1)
    sources: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> DeviceSpec:
        if self.v_min > self.v_max:
            raise ValueError("v_min must not exceed v_max")
        if self.idle_power_w >= self.tdp_w:
            raise ValueError("idle_power_w must be below tdp_w")
        return self

    @property
    def f_max_mhz(self) -> float:
        return max(self.clocks_mhz)

    def voltage(self, clock_mhz: float) -> float:
        if clock_mhz <= self.f_floor_mhz:
            return self.v_min
        span = self.f_max_mhz - self.f_floor_mhz
        frac = 1.0 if span <= 0 else (clock_mhz - self.f_floor_mhz) / span
        return self.v_min + (self.v_max - self.v_min) * min(1.0, frac)

    def nearest_clock(self, clock_mhz: float) -> float:
        return min(self.clocks_mhz, key=lambda c: (abs(c - clock_mhz), c))


class ModelShape(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    n_params: float = Field(gt=0)
    n_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    n_heads: int = Field(gt=0)
    n_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    dtype_bytes: float = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)

    @property
    def weight_bytes(self) -> float:
        return self.n_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.dtype_bytes

    @classmethod
    def from_hf_config(cls, cfg: dict, name: str | None = None, dtype_bytes: float | None = None) -> ModelShape:
        """Shape of a Llama/Mistral/Qwen-style decoder from its Hugging Face ``config.json``."""
        h = int(cfg["hidden_size"])
        n_heads = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads", n_heads))
        hd = int(cfg.get("head_dim") or h // n_heads)
        inter = int(cfg.get("intermediate_size", 4 * h))
        layers = int(cfg["num_hidden_layers"])
        vocab = int(cfg["vocab_size"])
        per_layer = h * n_heads * hd + 2 * h * kv * hd + n_heads * hd * h + 3 * h * inter + 2 * h
        embed = vocab * h * (1 if cfg.get("tie_word_embeddings", False) else 2)
        if dtype_bytes is None:
            dtype_bytes = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}.get(
                str(cfg.get("torch_dtype", "bfloat16")), 2
            )
        return cls(
            name=name or str(cfg.get("_name_or_path") or cfg.get("model_type", "model")),
            n_params=float(layers * per_layer + embed + h),
            n_layers=layers, hidden_size=h, n_heads=n_heads, n_kv_heads=kv, head_dim=hd,
            vocab_size=vocab, dtype_bytes=dtype_bytes,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        )


@dataclass(frozen=True)
class SequenceWork:
    """What one request does in one iteration."""

    request_id: str
    new_tokens: int
    """Prompt tokens prefilled (a chunk) or 1 for a decode step."""
    context_tokens: int
    """Tokens already in the KV cache before this iteration."""
    is_prefill: bool


@dataclass(frozen=True)
class IterationCost:
    time_s: float
    energy_j: float
    static_j: float
    per_request_j: dict[str, float]
    compute_s: float
    memory_s: float
    throttled: bool

    @property
    def power_w(self) -> float:
        return self.energy_j / self.time_s if self.time_s > 0 else 0.0


def iteration_cost(
    device: DeviceSpec, model: ModelShape, work: list[SequenceWork], clock_mhz: float
) -> IterationCost:
    """Time and energy of one batched iteration, with its energy split among the requests in it.

    Each request is charged its own FLOPs and KV traffic; the shared cost (reading the weights once and
    static power for the iteration) is split by the tokens each request processed, so the shares add up
    to the iteration's energy exactly.
    """
    if not work:
        raise ValueError("an iteration needs at least one sequence")
    f_ratio = clock_mhz / device.f_max_mhz
    v_scale = (device.voltage(clock_mhz) / device.v_max) ** 2
    e_flop = device.energy_per_flop_pj * 1e-12 * v_scale
    e_dram = device.energy_per_dram_byte_pj * 1e-12
    e_sram = device.energy_per_sram_byte_pj * 1e-12 * v_scale
    d = model.hidden_size
    own_flops: dict[str, float] = {}
    own_bytes: dict[str, float] = {}
    for w in work:
        n, ctx = w.new_tokens, w.context_tokens
        dense = 2.0 * model.n_params * n
        attention = 4.0 * model.n_layers * d * n * (ctx + (n + 1) / 2)
        own_flops[w.request_id] = dense + attention
        # KV cache read for attention and the new entries written.
        own_bytes[w.request_id] = model.kv_bytes_per_token * (ctx + n)
    total_tokens = sum(w.new_tokens for w in work)
    flops = sum(own_flops.values())
    dram_bytes = model.weight_bytes + sum(own_bytes.values())
    compute_s = flops / (device.peak_flops * device.compute_efficiency * f_ratio)
    memory_s = dram_bytes / (device.memory_bandwidth_bps * device.memory_efficiency)
    time_s = max(compute_s, memory_s) + device.overhead_s
    # On-chip traffic: every DRAM byte passes the buffers once, every FLOP's operands are staged.
    sram_bytes = dram_bytes + flops * 0.05
    dynamic_j = flops * e_flop + dram_bytes * e_dram + sram_bytes * e_sram
    throttled = False
    static_w = device.idle_power_w
    if dynamic_j / time_s + static_w > device.tdp_w:
        time_s = dynamic_j / (device.tdp_w - static_w)
        throttled = True
    static_j = static_w * time_s
    shared_j = model.weight_bytes * (e_dram + e_sram) + static_j
    per_request = {}
    for w in work:
        rid = w.request_id
        own_j = own_flops[rid] * (e_flop + 0.05 * e_sram) + own_bytes[rid] * (e_dram + e_sram)
        per_request[rid] = own_j + shared_j * w.new_tokens / total_tokens
    return IterationCost(
        time_s=time_s,
        energy_j=dynamic_j + static_j,
        static_j=static_j,
        per_request_j=per_request,
        compute_s=compute_s,
        memory_s=memory_s,
        throttled=throttled,
    )


def _load_data(folder: str, name_or_path: str, suffix: str) -> tuple[dict, str]:
    path = Path(name_or_path)
    if path.suffix == suffix and path.exists():
        text = path.read_text()
    else:
        res = resources.files("serving.emulated") / folder / f"{name_or_path}{suffix}"
        if not res.is_file():
            known = sorted(
                p.name.removesuffix(suffix)
                for p in (resources.files("serving.emulated") / folder).iterdir()
                if p.name.endswith(suffix)
            )
            raise ValueError(f"unknown {folder[:-1]} {name_or_path!r}: use one of {known} or a {suffix} file path")
        text = res.read_text()
    data = yaml.safe_load(text) if suffix == ".yaml" else json.loads(text)
    return data, path.stem


def load_device(name_or_path: str) -> DeviceSpec:
    data, _ = _load_data("presets", name_or_path, ".yaml")
    return DeviceSpec.model_validate(data)


def load_model_shape(name_or_path: str) -> ModelShape:
    """A shipped shape by name (e.g. ``llama-3.1-8b``) or the path of a HF ``config.json``."""
    data, stem = _load_data("models", name_or_path, ".json")
    name = name_or_path if not name_or_path.endswith(".json") else Path(name_or_path).parent.name or stem
    return ModelShape.from_hf_config(data, name=name)
