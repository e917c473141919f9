"""Device kinds: how GPUs, CPUs, FPGAs, SRAM compute-in-memory and DRAM-PIM devices run an iteration.

All kinds share one roofline: compute time = 2·MACs / peak, memory time = bytes streamed / bandwidth;
they differ in where weights live (streamed from DRAM, resident on chip, stationary in CIM arrays or in
DRAM banks), in what a MAC costs (Horowitz arithmetic x architecture overhead, or an array activation plus
ADC conversions) and in what sets the peak (tensor cores, CPU lanes, DSP slices, arrays, banks).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from serving.emulated.devices import DeviceSpec, OperatingPoint, register_kind
from serving.emulated.shapes import ModelShape
from serving.emulated.technology import INT32_ADD_PJ, mac_energy_pj, node_scale


class ProcessorSpec(DeviceSpec):
    """Load/store processors: weights and KV cache stream from off-chip memory through on-chip buffers.

    Weights that fit in the on-chip buffers stay there (loaded once), e.g. a small encoder in FPGA BRAM.
    """

    compute_efficiency: float = Field(gt=0, le=1, description="Achievable share of peak in GEMMs.")
    compute_energy_scale: float = Field(
        gt=0,
        description="Energy of a MAC relative to Horowitz arithmetic at this node (architecture overhead).",
    )
    onchip_bytes_per_mac: float = Field(
        default=0.05, ge=0, description="Operand bytes staged through on-chip buffers per MAC (tiling reuse)."
    )
    dtype_compute_efficiency: dict[str, float] = Field(
        default_factory=dict,
        description="Share of compute_efficiency a dtype's GEMMs reach, where it differs (FP8 GEMMs also "
        "quantize their activations per token and rarely reach the datasheet's doubled rate).",
    )

    @model_validator(mode="after")
    def _dtype_efficiency(self) -> ProcessorSpec:
        bad = {k: v for k, v in self.dtype_compute_efficiency.items() if not 0 < v <= 1}
        if bad:
            raise ValueError(f"dtype_compute_efficiency must lie in (0, 1], got {bad}")
        return self

    def mac_energy_j(self, dtype: str, clock_mhz: float) -> float:
        """Energy (J) of one MAC in ``dtype`` at this clock, operand staging through on-chip buffers included."""
        e_mac = mac_energy_pj(dtype, self.technology_nm, self.voltage(clock_mhz)) * self.compute_energy_scale
        return e_mac * 1e-12 + self.onchip_bytes_per_mac * self.onchip_byte_j(clock_mhz)

    def operating_point(self, model: ModelShape, clock_mhz: float) -> OperatingPoint:
        """The processor's rates and per-operation energies at this clock for this model."""
        e_mac_total = self.mac_energy_j(model.dtype, clock_mhz)
        e_on = self.onchip_byte_j(clock_mhz)
        e_off = self.memory.energy_pj_per_byte * 1e-12
        resident = model.matmul_weight_bytes if model.matmul_weight_bytes <= self.onchip.capacity_bytes else 0.0
        return OperatingPoint(
            peak_macs_per_s=self.peak_macs_per_s(model.dtype, clock_mhz),
            compute_efficiency=self.compute_efficiency * self.dtype_compute_efficiency.get(model.dtype, 1.0),
            bandwidth_bps=self.memory.bandwidth_bps,
            memory_efficiency=self.memory.efficiency,
            weight_mac_j=e_mac_total,
            attn_mac_j=e_mac_total,
            kv_byte_j=e_off + e_on,
            act_byte_j=e_on,
            token_j=0.0,
            resident_bytes=resident,
            stream_byte_j=e_off + e_on,
        )


@register_kind("gpu")
class GpuSpec(ProcessorSpec):
    """A GPU: datasheet peak tensor rates per dtype at the boost clock, HBM/GDDR memory."""

    peak_ops: dict[str, float] = Field(description="Dense ops/s (2 per MAC) at f_max, by dtype (datasheet).")

    @model_validator(mode="after")
    def _positive_rates(self) -> GpuSpec:
        bad = [k for k, v in self.peak_ops.items() if v <= 0]
        if bad or not self.peak_ops:
            raise ValueError(f"peak_ops must list positive rates by dtype (bad: {bad or 'empty'})")
        return self

    def peak_macs_per_s(self, dtype: str, clock_mhz: float) -> float:
        """Peak MACs per second in ``dtype``: half the datasheet ops, scaled by the clock."""
        self.check_dtype(dtype, self.peak_ops)
        return self.peak_ops[dtype] / 2 * clock_mhz / self.f_max_mhz

    @property
    def peak_flops(self) -> float:
        """Highest 16-bit rate (compatibility with single-rate callers)."""
        return max(self.peak_ops.get("bf16", 0.0), self.peak_ops.get("fp16", 0.0)) or max(
            self.peak_ops.values()
        )


@register_kind("cpu")
class CpuSpec(ProcessorSpec):
    """CPU cores: peak = cores x ops per cycle (SIMD width x FMA) x clock."""

    cores: int = Field(gt=0)
    ops_per_cycle: dict[str, float] = Field(description="Ops (2 per MAC) per cycle per core, by dtype.")

    def peak_macs_per_s(self, dtype: str, clock_mhz: float) -> float:
        """Peak MACs per second in ``dtype``: cores x ops per cycle / 2 x clock."""
        self.check_dtype(dtype, self.ops_per_cycle)
        return self.cores * self.ops_per_cycle[dtype] / 2 * clock_mhz * 1e6


@register_kind("fpga")
class FpgaSpec(ProcessorSpec):
    """FPGA: DSP-bound compute (MAC lanes built from DSP slices), BRAM/URAM buffers, external DDR."""

    dsp_total: int = Field(gt=0, description="DSP slices on the device (datasheet).")
    dsps_used: int = Field(gt=0, description="DSP slices the accelerator design instantiates as MAC lanes.")
    dsps_per_mac: dict[str, float] = Field(description="DSP slices per pipelined MAC lane, by dtype.")

    @model_validator(mode="after")
    def _dsps(self) -> FpgaSpec:
        if self.dsps_used > self.dsp_total:
            raise ValueError(f"dsps_used ({self.dsps_used}) exceeds dsp_total ({self.dsp_total})")
        return self

    def peak_macs_per_s(self, dtype: str, clock_mhz: float) -> float:
        """Peak MACs per second in ``dtype``: DSPs used / DSPs per MAC x clock."""
        self.check_dtype(dtype, self.dsps_per_mac)
        return self.dsps_used / self.dsps_per_mac[dtype] * clock_mhz * 1e6


class _ArrayCimSpec(DeviceSpec):
    """SRAM compute-in-memory: weights stationary in arrays, inputs bit-serial, outputs read per column.

    Weights that do not fit the arrays are tiled: the non-resident part is re-read from DRAM and written
    into the arrays every iteration. Attention (activation x activation) runs in the same arrays after K
    and V are written into them, one write per token and layer.
    """

    supported_dtypes: ClassVar[tuple[str, ...]] = ("int8",)

    n_arrays: int = Field(gt=0)
    array_rows: int = Field(gt=0)
    array_cols: int = Field(gt=0)
    bits_per_cell: int = Field(default=1, gt=0)
    weight_bits: int = Field(default=8, gt=0)
    input_bits: int = Field(default=8, gt=0, description="Inputs are applied one bit per cycle.")
    rows_active: int = Field(
        gt=0, description="Rows summed at once on a bitline (one ADC read / adder tree)."
    )
    cols_per_adc: int = Field(default=1, gt=0, description="Columns sharing one ADC / adder tree (muxed).")
    compute_efficiency: float = Field(gt=0, le=1, description="Array utilization of the mapping.")
    write_energy_scale: float = Field(default=2.0, gt=0, description="Array write per byte vs an SRAM read.")

    @model_validator(mode="after")
    def _geometry(self) -> _ArrayCimSpec:
        if self.rows_active > self.array_rows:
            raise ValueError(f"rows_active ({self.rows_active}) exceeds array_rows ({self.array_rows})")
        return self

    @property
    def cols_per_weight(self) -> float:
        return self.weight_bits / self.bits_per_cell

    @property
    def array_capacity_bytes(self) -> float:
        return self.n_arrays * self.array_rows * self.array_cols * self.bits_per_cell / 8

    def peak_macs_per_s(self, dtype: str, clock_mhz: float) -> float:
        self.check_dtype(dtype, dict.fromkeys(self.supported_dtypes))
        per_cycle = (
            self.rows_active * self.array_cols / self.cols_per_weight / (self.input_bits * self.cols_per_adc)
        )
        return self.n_arrays * per_cycle * clock_mhz * 1e6

    def mac_pj(self, clock_mhz: float) -> float:
        """Energy of one in-array 8-bit MAC, peripherals included."""
        raise NotImplementedError

    def mac_energy_j(self, dtype: str, clock_mhz: float) -> float:
        self.check_dtype(dtype, dict.fromkeys(self.supported_dtypes))
        return self.mac_pj(clock_mhz) * 1e-12

    def operating_point(self, model: ModelShape, clock_mhz: float) -> OperatingPoint:
        e_mac = self.mac_energy_j(model.dtype, clock_mhz)
        e_on = self.onchip_byte_j(clock_mhz)
        e_write = e_on * self.write_energy_scale
        e_off = self.memory.energy_pj_per_byte * 1e-12
        return OperatingPoint(
            peak_macs_per_s=self.peak_macs_per_s(model.dtype, clock_mhz),
            compute_efficiency=self.compute_efficiency,
            bandwidth_bps=self.memory.bandwidth_bps,
            memory_efficiency=self.memory.efficiency,
            weight_mac_j=e_mac,
            attn_mac_j=e_mac,
            kv_byte_j=e_off + e_on,
            act_byte_j=e_on,
            token_j=model.kv_bytes_per_token * e_write,
            resident_bytes=self.array_capacity_bytes,
            stream_byte_j=e_off + e_write,
        )


@register_kind("sram_cim")
class SramCimSpec(_ArrayCimSpec):
    """Analog SRAM CIM: bitline charge sums ``rows_active`` products, a column ADC digitizes them.

    Per 8b x 8b MAC: input_bits x cols_per_weight bit-cell activations, and input_bits x cols_per_weight /
    rows_active ADC conversions, each followed by a digital shift-and-add.
    """

    adc_bits: int = Field(gt=0, le=12)
    adc_fom_fj_per_step: float = Field(
        gt=0, description="Walden figure of merit: energy per conversion step."
    )
    cell_energy_fj: float = Field(gt=0, description="Bit-cell activation energy (bitline swing) at v_max.")

    def conversions_per_mac(self) -> float:
        """ADC conversions per MAC: input bit-serial steps x columns per weight, shared over the rows read at once."""
        return self.input_bits * self.cols_per_weight / self.rows_active

    def mac_pj(self, clock_mhz: float) -> float:
        """Energy (pJ) of one in-array MAC at this clock: ADC conversions, shift-and-add and bit-cell swings."""
        v = self.voltage(clock_mhz)
        conv = self.conversions_per_mac()
        adc = conv * self.adc_fom_fj_per_step * 2**self.adc_bits * 1e-3
        shift_add = conv * INT32_ADD_PJ * node_scale(self.technology_nm, v)
        cells = self.input_bits * self.cols_per_weight * self.cell_energy_fj * 1e-3 * (v / self.v_max) ** 2
        return adc + shift_add + cells


@register_kind("digital_cim")
class DigitalCimSpec(_ArrayCimSpec):
    """Digital SRAM CIM macro: bit-wise products summed by an adder tree beside the array, no ADC."""

    mac_energy_scale: float = Field(
        gt=0, description="In-array MAC energy relative to a Horowitz INT8 MAC at this node and voltage."
    )

    def mac_pj(self, clock_mhz: float) -> float:
        """Energy (pJ) of one digital in-memory INT8 MAC at this clock's voltage."""
        return mac_energy_pj("int8", self.technology_nm, self.voltage(clock_mhz)) * self.mac_energy_scale


@register_kind("dram_pim")
class DramPimSpec(DeviceSpec):
    """DRAM processing-in-memory (TransPIM-style): near-bank units compute where weights and KV live.

    Nothing crosses the external interface: every byte is a bank access at internal bandwidth and energy.
    """

    banks: int = Field(gt=0, description="Banks with a processing unit, all stacks together.")
    macs_per_bank_per_cycle: dict[str, float] = Field(description="MAC lanes per bank unit, by dtype.")
    internal_bandwidth_bps: float = Field(gt=0, description="Aggregate bank-to-unit bandwidth, bytes/s.")
    bank_energy_pj_per_byte: float = Field(gt=0, description="Row activation + column access, no I/O.")
    compute_efficiency: float = Field(gt=0, le=1)
    compute_energy_scale: float = Field(
        gt=0, description="MAC energy vs Horowitz at this node (DRAM-process logic)."
    )

    def peak_macs_per_s(self, dtype: str, clock_mhz: float) -> float:
        """Peak MACs per second in ``dtype`` across every bank's MAC units."""
        self.check_dtype(dtype, self.macs_per_bank_per_cycle)
        return self.banks * self.macs_per_bank_per_cycle[dtype] * clock_mhz * 1e6

    def mac_energy_j(self, dtype: str, clock_mhz: float) -> float:
        """Energy (J) of one MAC in ``dtype`` at this clock, in the DRAM process."""
        self.check_dtype(dtype, self.macs_per_bank_per_cycle)
        v = self.voltage(clock_mhz)
        return mac_energy_pj(dtype, self.technology_nm, v) * self.compute_energy_scale * 1e-12

    def operating_point(self, model: ModelShape, clock_mhz: float) -> OperatingPoint:
        """The PIM device's rates and energies: weights streamed at the banks' internal bandwidth."""
        e_mac = self.mac_energy_j(model.dtype, clock_mhz)
        e_bank = self.bank_energy_pj_per_byte * 1e-12
        return OperatingPoint(
            peak_macs_per_s=self.peak_macs_per_s(model.dtype, clock_mhz),
            compute_efficiency=self.compute_efficiency,
            bandwidth_bps=self.internal_bandwidth_bps,
            memory_efficiency=self.memory.efficiency,
            weight_mac_j=e_mac,
            attn_mac_j=e_mac,
            kv_byte_j=e_bank,
            act_byte_j=self.onchip_byte_j(clock_mhz),
            token_j=0.0,
            resident_bytes=0.0,  # weights are read from the banks every iteration, in place
            stream_byte_j=e_bank,
        )
