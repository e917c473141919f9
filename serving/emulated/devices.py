"""Device specs: the constants every emulated device has, and the registry of device kinds.

A kind is a spec class (pydantic, loaded from a preset YAML) that knows how its hardware executes an
iteration's work: :meth:`DeviceSpec.execute` turns operation and byte counts into times and energies per
unit. The kinds themselves live in :mod:`serving.emulated.kinds`; :func:`device_from_dict` picks the class
from the preset's ``kind`` field through the registry, never through an if/elif chain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from profilers.errors import TestbedError
from serving.emulated.shapes import ModelShape, WorkCounts
from serving.emulated.technology import SRAM_PJ_PER_BYTE_45NM, node_scale


class DeviceFitError(TestbedError, ValueError):
    """The model cannot run on the device (not enough memory for its weights and a minimum KV cache)."""


class MemoryLevel(BaseModel):
    """Off-chip memory (HBM, GDDR, DDR, LPDDR) or, for DRAM-PIM, the DRAM the banks compute in."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    capacity_bytes: float = Field(gt=0)
    bandwidth_bps: float = Field(gt=0, description="Peak bandwidth, bytes/s.")
    energy_pj_per_byte: float = Field(gt=0, description="Access energy incl. interface; not node-scaled.")
    efficiency: float = Field(default=0.85, gt=0, le=1, description="Achievable share of peak bandwidth.")
    full_bandwidth_clock_mhz: float | None = Field(
        default=None, gt=0,
        description="Compute clock below which the cores can no longer issue loads fast enough to keep the memory "
        "busy: achievable bandwidth falls in proportion to the clock under it. None: bandwidth never depends on it.",
    )


class OnChipLevel(BaseModel):
    """On-chip buffers (SRAM, L2/shared memory, BRAM/URAM), node-scaled from the Horowitz 8 KB SRAM."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    capacity_bytes: float = Field(gt=0)
    energy_scale: float = Field(
        default=1.0,
        gt=0,
        description="Access energy relative to an 8 KB SRAM read (bigger arrays cost more).",
    )


class Interconnect(BaseModel):
    """The links between the devices of one node (NVLink, xGMI) that tensor-parallel all-reduces cross."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    bandwidth_bps: float = Field(gt=0, description="Per device and direction, bytes/s (datasheet).")
    energy_pj_per_byte: float = Field(gt=0, description="Energy per byte sent over a link (SerDes + switch).")
    allreduce_latency_s: float = Field(
        ge=0, description="Fixed cost of one all-reduce per additional device (launch, synchronisation, hop "
        "latency, waiting for the slowest device)."
    )
    devices_per_node: int = Field(gt=0, description="Devices one node's links connect (tensor_parallel's cap).")


class OperatingPoint(NamedTuple):
    """What a device offers a model at one clock: rates, unit energies and weight streaming."""

    peak_macs_per_s: float
    compute_efficiency: float
    bandwidth_bps: float
    """Bandwidth the streamed weights and the KV cache move at."""
    memory_efficiency: float
    weight_mac_j: float
    attn_mac_j: float
    kv_byte_j: float
    act_byte_j: float
    token_j: float
    resident_bytes: float
    """Weight bytes that stay on chip (or in arrays) between iterations; the rest is streamed every one."""
    stream_byte_j: float
    """Energy per weight byte streamed."""


@dataclass(slots=True)  # not frozen: building a frozen one costs 2 us more, per iteration in virtual time
class Execution:
    """How a device runs one iteration: times, and dynamic energy per unit of work (joules).

    With tensor parallelism the times are one device's (all run in lockstep) and the energies the sum
    over the devices.
    """

    time_s: float
    """Modeled iteration time before any power throttling."""
    kernel_s: float
    """The part of ``time_s`` the device computes or streams; the rest (host time, launch gaps, link
    latency) it waits at idle power."""
    compute_s: float
    memory_s: float
    ideal_compute_s: float
    """At peak rate: the roofline's compute bound."""
    ideal_memory_s: float
    weight_mac_j: float
    attn_mac_j: float
    kv_byte_j: float
    act_byte_j: float
    token_j: float
    """Fixed energy per token processed (e.g. writing K and V into CIM arrays)."""
    weight_stream_j: float
    """Shared by the iteration: weights streamed from memory (zero when they stay on chip)."""
    weight_stream_bytes: float
    comm_j: float = 0.0
    """Shared by the iteration: tensor-parallel all-reduce traffic over the interconnect."""

    def own_j(self, w: WorkCounts) -> float:
        """Dynamic energy of one request's share of the iteration."""
        return (
            w.weight_macs * self.weight_mac_j
            + w.attn_macs * self.attn_mac_j
            + w.kv_bytes * self.kv_byte_j
            + w.act_bytes * self.act_byte_j
            + w.tokens * self.token_j
        )


class DeviceSpec(BaseModel):
    """Constants shared by all kinds: technology, DVFS table, power envelope, memory levels, sources."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: str
    technology_nm: float = Field(gt=0, description="Process node; scales energy per operation.")
    clocks_mhz: list[float] = Field(min_length=1, description="Supported compute clocks.")
    f_floor_mhz: float = Field(gt=0, description="Below this clock the voltage stays at v_min.")
    v_min: float = Field(gt=0)
    v_max: float = Field(gt=0, description="Supply voltage at the highest clock.")
    idle_power_w: float = Field(ge=0, description="Power between iterations: leakage and always-on parts.")
    busy_power_w: float | None = Field(
        default=None,
        ge=0,
        description="Power while an iteration runs before any work is counted (clock tree, fabric) at f_max; "
        "scales with V²f down to idle_power_w. Default: idle_power_w.",
    )
    uncore_power_w: float = Field(
        default=0.0, ge=0,
        description="Share of busy power on clocks DVFS does not move (memory controllers and PHYs, L2, fabric): "
        "drawn while an iteration runs at any SM clock.",
    )
    tdp_w: float = Field(
        gt=0, description="Power cap: an iteration over it runs at the fastest clock that stays under it."
    )
    overhead_s: float = Field(ge=0, description="Fixed per-iteration cost (launch, scheduling, host sync).")
    layer_overhead_s: float = Field(
        default=0.0, ge=0,
        description="Per layer and iteration: kernel launch gaps, synchronisation and the small non-GEMM kernels "
        "(norms, rotary, activation) whose time does not scale with the batch.",
    )
    moe_layer_overhead_s: float = Field(
        default=0.0, ge=0,
        description="Extra per mixture-of-experts layer and iteration: routing, top-k, token permutation and the "
        "grouped expert GEMMs' launch, which a dense MLP does not have.",
    )
    sequence_overhead_s: float = Field(
        default=0.0, ge=0,
        description="Per sequence and iteration: the serving engine's host time (scheduling, input preparation, "
        "detokenisation, sampling bookkeeping), during which the device waits.",
    )
    gemm_overlap: float = Field(
        default=1.0, ge=0, le=1,
        description="Share of the shorter of a GEMM's compute and weight streaming hidden behind the longer: 1 is "
        "the roofline (time = max of the two), 0 runs them one after the other (sum), as skinny decode GEMMs "
        "(a few tokens against a whole weight matrix) do when tiles wait for their weights.",
    )
    overlapped_overhead_s: float = Field(
        default=0.0, ge=0,
        description="Per iteration: the serving engine's fixed host time overlapped with the device's work (see "
        "overlapped_sequence_s); an iteration lasts at least this plus overlapped_sequence_s x sequences.",
    )
    overlapped_sequence_s: float = Field(
        default=0.0, ge=0,
        description="Per sequence and iteration: host time the serving engine overlaps with the device's work "
        "(with asynchronous scheduling the host prepares the next step while the device runs this one). An "
        "iteration lasts at least this x sequences; a device done sooner waits for the host at idle power.",
    )
    attention_efficiency: float | None = Field(
        default=None, gt=0, le=1,
        description="Share of peak bandwidth (and of compute efficiency) attention kernels reach. Set: GEMMs and "
        "attention run as separate kernels, each bound by its own roofline (time = sum of maxima); unset: one "
        "roofline over the whole iteration (time = max of sums).",
    )
    interconnect: Interconnect | None = Field(default=None, description="Links for tensor parallelism.")
    memory: MemoryLevel
    onchip: OnChipLevel
    kv_memory_fraction: float = Field(default=0.9, gt=0, le=1, description="Memory share for weights + KV.")
    sources: list[str] = Field(default_factory=list, description="Where each constant comes from.")
    calibrated: list[str] = Field(default_factory=list, description="Constants fitted to published figures.")
    calibration: str | None = Field(
        default=None,
        description="Calibration report (serving/emulated/calibration.py): a shipped report's name or a YAML path; "
        "the error band of this preset against measured rows, carried by every figure it models.",
    )

    @model_validator(mode="after")
    def _check(self) -> DeviceSpec:
        if any(c <= 0 for c in self.clocks_mhz):
            raise ValueError("clocks_mhz: every clock must be positive")
        if self.v_min > self.v_max:
            raise ValueError("v_min must not exceed v_max")
        if self.idle_power_w >= self.tdp_w:
            raise ValueError("idle_power_w must be below tdp_w")
        busy = self.busy_power_w if self.busy_power_w is not None else self.idle_power_w
        if not self.idle_power_w <= busy < self.tdp_w:
            raise ValueError("busy_power_w must lie between idle_power_w and tdp_w")
        return self

    # --- DVFS ------------------------------------------------------------------------------------
    @cached_property
    def f_max_mhz(self) -> float:
        """The highest supported clock in MHz (where voltage is v_max)."""
        return max(self.clocks_mhz)

    def voltage(self, clock_mhz: float) -> float:
        """Supply voltage: flat at v_min up to the floor clock, then rising linearly to v_max."""
        if clock_mhz <= self.f_floor_mhz:
            return self.v_min
        span = self.f_max_mhz - self.f_floor_mhz
        frac = 1.0 if span <= 0 else (clock_mhz - self.f_floor_mhz) / span
        return self.v_min + (self.v_max - self.v_min) * min(1.0, frac)

    def nearest_clock(self, clock_mhz: float) -> float:
        """The supported clock (MHz) closest to ``clock_mhz``, the lower one on a tie."""
        return min(self.clocks_mhz, key=lambda c: (abs(c - clock_mhz), c))

    def static_power_w(self, clock_mhz: float) -> float:
        """Power drawn during an iteration besides the work's own energy: idle + clock tree (C·V²·f)."""
        watts = self.cache.get(("static_w", clock_mhz))
        if watts is None:
            busy = self.busy_power_w if self.busy_power_w is not None else self.idle_power_w
            dvfs = (self.voltage(clock_mhz) / self.v_max) ** 2 * clock_mhz / self.f_max_mhz
            uncore = min(self.uncore_power_w, busy - self.idle_power_w)
            watts = self.cache[("static_w", clock_mhz)] = (
                self.idle_power_w + uncore + (busy - self.idle_power_w - uncore) * dvfs
            )
        return watts

    @cached_property
    def cache(self) -> dict[Any, Any]:
        """Per-instance memo of derived quantities (operating points, static power) for the hot path."""
        return {}

    # --- memory ----------------------------------------------------------------------------------
    @property
    def memory_bytes(self) -> float:
        """Off-chip memory capacity in bytes."""
        return self.memory.capacity_bytes

    @property
    def memory_bandwidth_bps(self) -> float:
        """Off-chip memory bandwidth in bytes per second."""
        return self.memory.bandwidth_bps

    def onchip_byte_j(self, clock_mhz: float) -> float:
        """Energy (J) to move one byte through on-chip SRAM at this clock's voltage and the device's node."""
        scale = node_scale(self.technology_nm, self.voltage(clock_mhz))
        return SRAM_PJ_PER_BYTE_45NM * self.onchip.energy_scale * scale * 1e-12

    def kv_capacity_tokens(self, model: ModelShape, tensor_parallel: int = 1) -> int:
        """KV-cache tokens left in memory once the weights are placed (split over ``tensor_parallel``
        devices); raises if the model does not fit."""
        n = tensor_parallel
        usable = self.memory.capacity_bytes * self.kv_memory_fraction * n
        kv_bytes = usable - model.weight_bytes
        if kv_bytes < model.kv_bytes_per_token * 16:  # at least one 16-token KV block
            devices = f"{n} x " if n > 1 else ""
            need = (model.weight_bytes + model.kv_bytes_per_token * 16) / 1e9
            raise DeviceFitError(
                f"model {model.name} does not fit {devices}{self.name}: {model.weight_bytes / 1e9:.2f} GB of "
                f"{model.dtype} weights + a minimum KV cache of {model.kv_bytes_per_token * 16 / 1e6:.2f} MB "
                f"need {need:.2f} GB of {self.memory.name}, and {usable / 1e9:.2f} GB are usable "
                f"({self.kv_memory_fraction:.0%} of {devices}{self.memory.capacity_bytes / 1e9:.2f} GB); "
                "use a smaller model, more devices (tensor_parallel) or a device with more memory"
            )
        return int(kv_bytes // model.kv_bytes_per_token)

    def check_tensor_parallel(self, model: ModelShape, tensor_parallel: int) -> None:
        """Raise DeviceFitError naming both numbers when ``model`` cannot be split over ``tensor_parallel``."""
        n = tensor_parallel
        if n < 1:
            raise DeviceFitError(f"tensor_parallel must be at least 1, got {n}")
        if n == 1:
            return
        if self.interconnect is None:
            raise DeviceFitError(f"tensor_parallel {n}: device {self.name} has no interconnect in its preset")
        if n > self.interconnect.devices_per_node:
            raise DeviceFitError(
                f"tensor_parallel {n} exceeds the {self.interconnect.devices_per_node} devices of a "
                f"{self.name} node ({self.interconnect.name}); use at most {self.interconnect.devices_per_node}"
            )
        if model.n_heads % n:
            raise DeviceFitError(
                f"tensor_parallel {n} does not divide the {model.n_heads} attention heads of {model.name}; "
                "use a divisor of the head count"
            )
        if model.n_kv_heads % n and n % model.n_kv_heads:
            raise DeviceFitError(
                f"tensor_parallel {n} and the {model.n_kv_heads} KV heads of {model.name}: one must divide the "
                "other (KV heads are split, or replicated when there are fewer than devices)"
            )

    def check_dtype(self, dtype: str, supported: dict[str, Any]) -> None:
        """ValueError unless the device has a datapath for ``dtype`` (a key of ``supported``)."""
        if dtype not in supported:
            raise ValueError(
                f"device {self.name} has no {dtype} datapath (supports {sorted(supported)}): "
                f"set the engine's dtype to one of them"
            )

    # --- kind-specific ---------------------------------------------------------------------------
    supported_dtypes: ClassVar[tuple[str, ...]] = ()

    def peak_macs_per_s(self, dtype: str, clock_mhz: float) -> float:
        """Peak multiply-accumulates per second at ``clock_mhz`` for operands of ``dtype``."""
        raise NotImplementedError

    def mac_energy_j(self, dtype: str, clock_mhz: float) -> float:
        """Dynamic energy of one MAC with its operands in place (what macro papers report)."""
        raise NotImplementedError

    def operating_point(self, model: ModelShape, clock_mhz: float) -> OperatingPoint:
        """Rates and energies per unit of work for ``model`` at ``clock_mhz`` (kind-specific)."""
        raise NotImplementedError

    def execute(
        self, model: ModelShape, work: WorkCounts, clock_mhz: float, sequences: int = 1, tensor_parallel: int = 1
    ) -> Execution:
        """Times and unit energies of one iteration doing ``work`` (summed over its ``sequences``), its matrices
        split over ``tensor_parallel`` devices."""
        key = (model.work_constants, model.dtype, model.dtype_bytes, clock_mhz)
        op = self.cache.get(key)
        if op is None:  # the hot path of every iteration: computed once per model and clock
            op = self.cache[key] = self.operating_point(model, clock_mhz)
        n = tensor_parallel
        stream = max(0.0, model.weight_bytes_read(work.tokens) - op.resident_bytes)
        # Per device: weights, heads and the KV cache are split n ways (KV heads replicated below n).
        kv_share = 1.0 / n if model.n_kv_heads >= n else 1.0 / model.n_kv_heads
        gemm_c = work.weight_macs / n / op.peak_macs_per_s
        attn_c = work.attn_macs / n / op.peak_macs_per_s
        weight_m = stream / n / op.bandwidth_bps
        kv_m = work.kv_bytes * kv_share / op.bandwidth_bps
        ce, me = op.compute_efficiency, op.memory_efficiency
        knee = self.memory.full_bandwidth_clock_mhz
        if knee is not None and clock_mhz < knee:
            me *= clock_mhz / knee
        compute_s, memory_s = (gemm_c + attn_c) / ce, (weight_m + kv_m) / me
        if self.attention_efficiency is None:
            busy = _overlapped(compute_s, memory_s, self.gemm_overlap)
        else:  # GEMMs, then attention: separate kernels, each on its own roofline
            ae = self.attention_efficiency
            busy = _overlapped(gemm_c / ce, weight_m / me, self.gemm_overlap) + max(
                attn_c / (ce * ae), kv_m / (me * ae)
            )
        # Launch gaps and small per-layer kernels: bound by launch latency and the host, not the SM clock.
        moe_layers = model.n_moe_layers if model.is_moe else 0
        layer_s = self.layer_overhead_s * model.n_layers + self.moe_layer_overhead_s * moe_layers
        device_s = busy + self.overhead_s + layer_s
        kernel_s = busy + self.overhead_s
        comm_j = 0.0
        if n > 1:
            assert self.interconnect is not None  # check_tensor_parallel refuses it earlier
            link = self.interconnect
            # Two all-reduces per layer (attention and MLP outputs), ring: each device sends 2(n-1)/n of it.
            message = work.tokens * model.hidden_size * model.head_bytes
            sent = 2 * (n - 1) / n * message
            reduces = 2 * model.n_layers
            # The fixed cost grows with the devices that must synchronise (ring steps, the slowest one's skew).
            transfer_s = reduces * sent / link.bandwidth_bps
            device_s += reduces * link.allreduce_latency_s * (n - 1) + transfer_s
            kernel_s += transfer_s
            comm_j = reduces * sent * n * link.energy_pj_per_byte * 1e-12
        # Host work overlapped with the device's (asynchronous scheduling): the slower of the two sets the
        # pace; then the host time that cannot overlap (sampling, output processing), device waiting.
        host_s = self.overlapped_overhead_s + self.overlapped_sequence_s * sequences
        time_s = max(device_s, host_s) + self.sequence_overhead_s * sequences
        return Execution(
            time_s=time_s,
            kernel_s=kernel_s,
            compute_s=compute_s,
            memory_s=memory_s,
            ideal_compute_s=gemm_c + attn_c,
            ideal_memory_s=weight_m + kv_m,
            weight_mac_j=op.weight_mac_j,
            attn_mac_j=op.attn_mac_j,
            kv_byte_j=op.kv_byte_j,
            act_byte_j=op.act_byte_j,
            token_j=op.token_j,
            weight_stream_j=stream * op.stream_byte_j,
            weight_stream_bytes=stream,
            comm_j=comm_j,
        )


def _overlapped(compute_s: float, memory_s: float, overlap: float) -> float:
    """Time of a kernel that computes ``compute_s`` and streams ``memory_s``, ``overlap`` of the shorter one
    hidden behind the longer (1: the roofline's max)."""
    return max(compute_s, memory_s) + (1.0 - overlap) * min(compute_s, memory_s)


_KINDS: dict[str, type[DeviceSpec]] = {}


def register_kind(kind: str) -> Callable[[type[DeviceSpec]], type[DeviceSpec]]:
    """Class decorator registering a DeviceSpec subclass under the preset ``kind`` it models."""
    def deco(cls: type[DeviceSpec]) -> type[DeviceSpec]:
        _KINDS[kind] = cls
        return cls

    return deco


def device_kinds() -> list[str]:
    """The registered device kinds, sorted (what a preset's ``kind`` may be)."""
    import serving.emulated.kinds  # noqa: F401  (registers the kinds)

    return sorted(_KINDS)


def device_class(kind: str) -> type[DeviceSpec]:
    """The DeviceSpec subclass of ``kind``; ValueError if it is unknown."""
    import serving.emulated.kinds  # noqa: F401

    try:
        return _KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown device kind {kind!r}; known kinds: {sorted(_KINDS)}") from None


def device_from_dict(data: dict[str, Any]) -> DeviceSpec:
    """A device spec from a preset mapping, validated by the class of its ``kind``."""
    if not isinstance(data, dict) or "kind" not in data:
        raise ValueError(f"a device preset needs a 'kind' field (one of {device_kinds()})")
    return device_class(str(data["kind"])).model_validate(data)
