"""An NVML stand-in for machines without an NVIDIA GPU.

Same function names, signatures, units (mW, mJ, MHz) and error classes as ``pynvml`` (the error classes
and codes are pynvml's own). Tests patch the module where it is imported::

    monkeypatch.setattr(profilers.nvml, "pynvml", nvml_fake)
    nvml_fake.configure([FakeGPU(power_trace=[(0, 100), (10, 400)])], clock=fake_clock)

Devices follow a piecewise-linear power trace (seconds since :func:`configure`, watts); the energy
counter is its exact integral. Counter resets, missing counters, permission errors and a missing
library are configurable. The setters exist so that actuators can be tested against it.
"""

from __future__ import annotations

import bisect
import itertools
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pynvml
from pynvml import (  # reuse the real library's classes and codes, so `except pynvml.NVMLError` matches
    NVML_CLOCK_GRAPHICS,
    NVML_CLOCK_MEM,
    NVML_CLOCK_SM,
    NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_FOUND,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_ERROR_UNINITIALIZED,
    NVMLError,
    c_nvmlUtilization_t,
)

__all__ = [
    "NVML_CLOCK_GRAPHICS", "NVML_CLOCK_MEM", "NVML_CLOCK_SM", "FakeGPU", "NVMLError", "configure", "reset",
]
# Every NVML_ERROR_* code, by the same names as pynvml.
for _name in dir(pynvml):
    if _name.startswith("NVML_ERROR_"):
        setattr(sys.modules[__name__], _name, getattr(pynvml, _name))
H100_CLOCKS_MHZ = list(range(1980, 344, -15))


@dataclass
class FakeGPU:
    """One fake device. ``power_trace``: ``(t_s, watts)`` points, linear in between, flat outside."""

    name: str = "NVIDIA H100 80GB HBM3"
    power_trace: Sequence[tuple[float, float]] = ((0.0, 70.0),)
    has_energy_counter: bool = True
    counter_start_mj: int = 123_456_789
    """Counter value at t=0 (the real one counts from the last driver load)."""
    power_limit_mw: int = 700_000
    power_limit_range_mw: tuple[int, int] = (200_000, 700_000)
    graphics_clocks_mhz: list[int] = field(default_factory=lambda: list(H100_CLOCKS_MHZ))
    memory_clocks_mhz: list[int] = field(default_factory=lambda: [2619])
    utilization_pct: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    """NVML function name -> error code it raises (e.g. ``NVML_ERROR_NO_PERMISSION``)."""
    locked_clocks_mhz: tuple[int, int] | None = None
    uuid: str = ""
    """Default: ``GPU-00000000-0000-0000-0000-<index, 12 digits>``."""
    _counter_zero_mj: float = 0.0

    def power_w(self, t: float) -> float:
        """Power (W) at time ``t``, interpolated in the trace and capped at the power limit."""
        ts = [p[0] for p in self.power_trace]
        i = bisect.bisect_right(ts, t)
        if i == 0:
            w = self.power_trace[0][1]
        elif i == len(ts):
            w = self.power_trace[-1][1]
        else:
            (t0, p0), (t1, p1) = self.power_trace[i - 1], self.power_trace[i]
            w = p0 + (p1 - p0) * (t - t0) / (t1 - t0)
        return min(w, self.power_limit_mw / 1000.0)

    def energy_j(self, t: float) -> float:
        """Integral of the trace from 0 to ``t`` (exact unless a segment crosses the power limit)."""
        knots = [0.0, *[p[0] for p in self.power_trace if 0.0 < p[0] < t], t]
        pts = [(x, self.power_w(x)) for x in knots]
        return sum((b[0] - a[0]) * (a[1] + b[1]) / 2.0 for a, b in itertools.pairwise(pts))


@dataclass
class _State:
    gpus: list[FakeGPU] = field(default_factory=list)
    clock: Callable[[], float] = time.monotonic
    t0: float = 0.0
    library_found: bool = True
    init_count: int = 0
    privileged: bool = False

    def now(self) -> float:
        return self.clock() - self.t0


_state = _State()


@dataclass(frozen=True)
class _Handle:
    index: int


def configure(
    gpus: Sequence[FakeGPU], clock: Callable[[], float] = time.monotonic, library_found: bool = True,
    privileged: bool = False,
) -> None:
    """Replace the fake machine: its devices, clock, whether the library loads, and root rights."""
    global _state
    _state = _State(list(gpus), clock, clock(), library_found, 0, privileged)


def reset() -> None:
    """Replace the fake machine with one that has no GPU."""
    configure([])


def reset_energy_counter(index: int) -> None:
    """The counter restarts from zero now, as after a driver reload."""
    gpu = _state.gpus[index]
    gpu._counter_zero_mj = gpu.energy_j(_state.now()) * 1000.0
    gpu.counter_start_mj = 0


def _gpu(handle: _Handle, fn: str) -> FakeGPU:
    if _state.init_count == 0:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    gpu = _state.gpus[handle.index]
    if fn in gpu.errors:
        raise NVMLError(gpu.errors[fn])
    return gpu


# --- library ---------------------------------------------------------------------------------------
def nvmlInit() -> None:
    if not _state.library_found:
        raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
    _state.init_count += 1


def nvmlShutdown() -> None:
    if _state.init_count == 0:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    _state.init_count -= 1


def nvmlDeviceGetCount() -> int:
    if _state.init_count == 0:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    return len(_state.gpus)


def nvmlDeviceGetHandleByIndex(index: int) -> _Handle:
    if _state.init_count == 0:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    if not 0 <= index < len(_state.gpus):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    code = _state.gpus[index].errors.get("nvmlDeviceGetHandleByIndex")
    if code is not None:
        raise NVMLError(code)
    return _Handle(index)


def _uuid(index: int) -> str:
    return _state.gpus[index].uuid or f"GPU-00000000-0000-0000-0000-{index:012d}"


def nvmlDeviceGetHandleByUUID(uuid: str | bytes) -> _Handle:
    if _state.init_count == 0:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    wanted = uuid.decode() if isinstance(uuid, bytes) else uuid
    for index in range(len(_state.gpus)):
        if _uuid(index) == wanted:
            return _Handle(index)
    raise NVMLError(NVML_ERROR_NOT_FOUND)


def nvmlDeviceGetUUID(handle: _Handle) -> str:
    _gpu(handle, "nvmlDeviceGetUUID")
    return _uuid(handle.index)


def nvmlDeviceGetIndex(handle: _Handle) -> int:
    _gpu(handle, "nvmlDeviceGetIndex")
    return handle.index


# --- readings --------------------------------------------------------------------------------------
def nvmlDeviceGetName(handle: _Handle) -> str:
    return _gpu(handle, "nvmlDeviceGetName").name


def nvmlDeviceGetTotalEnergyConsumption(handle: _Handle) -> int:
    """Millijoules since the driver loaded."""
    gpu = _gpu(handle, "nvmlDeviceGetTotalEnergyConsumption")
    if not gpu.has_energy_counter:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return int(gpu.counter_start_mj + gpu.energy_j(_state.now()) * 1000.0 - gpu._counter_zero_mj)


def nvmlDeviceGetPowerUsage(handle: _Handle) -> int:
    """Milliwatts now."""
    gpu = _gpu(handle, "nvmlDeviceGetPowerUsage")
    return int(gpu.power_w(_state.now()) * 1000.0)


def nvmlDeviceGetClockInfo(handle: _Handle, type: int) -> int:
    gpu = _gpu(handle, "nvmlDeviceGetClockInfo")
    if type == NVML_CLOCK_MEM:
        return gpu.memory_clocks_mhz[0]
    if type not in (NVML_CLOCK_SM, NVML_CLOCK_GRAPHICS):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    top = gpu.graphics_clocks_mhz[0]
    return min(top, gpu.locked_clocks_mhz[1]) if gpu.locked_clocks_mhz else top


def nvmlDeviceGetUtilizationRates(handle: _Handle) -> c_nvmlUtilization_t:
    gpu = _gpu(handle, "nvmlDeviceGetUtilizationRates")
    return c_nvmlUtilization_t(gpu=gpu.utilization_pct, memory=gpu.utilization_pct // 2)


def nvmlDeviceGetPowerManagementLimit(handle: _Handle) -> int:
    return _gpu(handle, "nvmlDeviceGetPowerManagementLimit").power_limit_mw


def nvmlDeviceGetPowerManagementLimitConstraints(handle: _Handle) -> list[int]:
    return list(_gpu(handle, "nvmlDeviceGetPowerManagementLimitConstraints").power_limit_range_mw)


def nvmlDeviceGetSupportedMemoryClocks(handle: _Handle) -> list[int]:
    return list(_gpu(handle, "nvmlDeviceGetSupportedMemoryClocks").memory_clocks_mhz)


def nvmlDeviceGetSupportedGraphicsClocks(handle: _Handle, memoryClockMHz: int) -> list[int]:
    gpu = _gpu(handle, "nvmlDeviceGetSupportedGraphicsClocks")
    if memoryClockMHz not in gpu.memory_clocks_mhz:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return list(gpu.graphics_clocks_mhz)


# --- setters (need root, like the real ones) -------------------------------------------------------
def _privileged(handle: _Handle, fn: str) -> FakeGPU:
    gpu = _gpu(handle, fn)
    if not _state.privileged:
        raise NVMLError(NVML_ERROR_NO_PERMISSION)
    return gpu


def nvmlDeviceSetGpuLockedClocks(handle: _Handle, minGpuClockMHz: int, maxGpuClockMHz: int) -> None:
    gpu = _privileged(handle, "nvmlDeviceSetGpuLockedClocks")
    if minGpuClockMHz > maxGpuClockMHz:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    gpu.locked_clocks_mhz = (minGpuClockMHz, maxGpuClockMHz)


def nvmlDeviceResetGpuLockedClocks(handle: _Handle) -> None:
    _privileged(handle, "nvmlDeviceResetGpuLockedClocks").locked_clocks_mhz = None


def nvmlDeviceSetPowerManagementLimit(handle: _Handle, limit: int) -> None:
    gpu = _privileged(handle, "nvmlDeviceSetPowerManagementLimit")
    lo, hi = gpu.power_limit_range_mw
    if not lo <= limit <= hi:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    gpu.power_limit_mw = limit
