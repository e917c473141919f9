"""Energy per operation and per access, anchored at 45 nm (Horowitz, ISSCC 2014) and scaled by node.

Scaling law: switched energy is E = C·V². Gate and wire capacitance shrink roughly in proportion to the
feature size, so an operation that costs E₄₅ at 45 nm and 0.9 V costs

    E(node, V) = E₄₅ × (node / 45 nm) × (V / 0.9 V)²

at another node and supply voltage (classic constant-field scaling of C, with V taken from the device's
DVFS table rather than from a scaling rule, because below ~28 nm supply voltage stopped scaling while
capacitance kept shrinking). Below ~10 nm "node" names are marketing numbers and the law overstates the
gain; every preset carries a calibrated ``*_energy_scale`` factor that absorbs this together with the
architecture's overheads (instruction fetch, register files, operand delivery), documented in the preset.

Off-chip DRAM energy is set by the interface, not the logic node, so it is never node-scaled: each preset
gives its memory's energy per byte with a source (Horowitz's 640 pJ per 32-bit DDR3 read is the anchor).
"""

from __future__ import annotations

NODE_REF_NM = 45.0
V_REF = 0.9
"""Horowitz's figures are for a 45 nm process at 0.9 V."""

# Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014, Fig. 1.1.9 (45 nm, 0.9 V).
INT8_MULT_PJ = 0.2
INT8_ADD_PJ = 0.03
INT32_ADD_PJ = 0.1
FP16_MULT_PJ = 1.1
FP16_ADD_PJ = 0.4
FP32_MULT_PJ = 3.7
FP32_ADD_PJ = 0.9
SRAM_8KB_READ_32BIT_PJ = 5.0
DRAM_READ_32BIT_PJ = 640.0

MAC_45NM_PJ: dict[str, float] = {
    "int8": INT8_MULT_PJ + INT32_ADD_PJ,  # 8-bit products accumulate in 32 bits
    "fp16": FP16_MULT_PJ + FP16_ADD_PJ,
    "bf16": FP16_MULT_PJ + FP16_ADD_PJ,  # no bf16 figure in Horowitz: a 16-bit float MAC
    "fp32": FP32_MULT_PJ + FP32_ADD_PJ,
    # No 8-bit float figure in Horowitz: an 8-bit multiplier (its 3-4 bit mantissa product is smaller than
    # an int8 one) accumulating in 16-bit float or wider, as FP8 tensor cores do.
    "fp8": INT8_MULT_PJ + FP16_ADD_PJ,
}
"""Energy of one multiply-accumulate by operand type (one MAC = 2 operations)."""

DTYPE_BYTES: dict[str, float] = {"int8": 1, "fp8": 1, "fp16": 2, "bf16": 2, "fp32": 4}

SRAM_PJ_PER_BYTE_45NM = SRAM_8KB_READ_32BIT_PJ / 4
DRAM_DDR3_PJ_PER_BYTE = DRAM_READ_32BIT_PJ / 4


def node_scale(technology_nm: float, voltage: float) -> float:
    """Factor by which a 45 nm / 0.9 V energy changes at ``technology_nm`` and ``voltage``."""
    return (technology_nm / NODE_REF_NM) * (voltage / V_REF) ** 2


def mac_energy_pj(dtype: str, technology_nm: float, voltage: float) -> float:
    """Arithmetic energy of one MAC of ``dtype`` at a node and voltage (no data movement, no overhead)."""
    try:
        base = MAC_45NM_PJ[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(MAC_45NM_PJ)}") from None
    return base * node_scale(technology_nm, voltage)
