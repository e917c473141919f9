"""Value types shared by every power source and by the accounting code."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Provenance(StrEnum):
    """Where a figure comes from: a hardware counter, or a model of the device."""

    MEASURED = "measured"
    MODELED = "modeled"


@dataclass(frozen=True)
class DeviceInfo:
    """What a power source reports about one device: id, model name, backend, energy method, limits."""

    device: str
    """Stable device id within its source, e.g. ``gpu0`` or ``emulated-h100_sxm-0``."""
    name: str
    """Human-readable model name, e.g. ``NVIDIA H100 SXM``."""
    backend: str
    """``nvml``, ``rapl``, ``emulated``, ..."""
    energy_method: str = "counter"
    """How cumulative energy is obtained: ``counter``, ``integrated`` (sampled power) or ``modeled``."""
    power_limit_w: float | None = None
    """Enforced power limit, where the device reports one."""
    preset: str | None = None
    """Emulated device preset that models it (None: a real device)."""
    calibration: str | None = None
    """How far its modeled figures can be trusted, e.g. ``modeled: a40, uncalibrated`` (None: a real device)."""


@dataclass(frozen=True)
class PowerReading:
    """One device reading: time (s), cumulative energy (J), power (W), clock (MHz), provenance, utilisation."""

    t_s: float
    device: str
    energy_j: float
    """Cumulative energy since the source started (monotonic unless the counter reset)."""
    power_w: float
    clock_mhz: float | None
    provenance: Provenance
    utilization: float | None = None
    """Busy fraction of the device over the driver's last sample period (0-1), where reported."""
