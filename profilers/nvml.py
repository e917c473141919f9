"""NVIDIA GPUs through NVML (``nvidia-ml-py``). Read-only: this module never sets clocks or limits.

Energy comes from the cumulative counter ``nvmlDeviceGetTotalEnergyConsumption`` (mJ; Volta and newer)
where the device has one; otherwise power (``nvmlDeviceGetPowerUsage``, mW) is sampled at >= 10 Hz by a
:class:`~profilers.sampler.Sampler` and integrated. NVML errors become the project's own exceptions
with a one-line reason (see :func:`convert_error`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from profilers.errors import (
    CounterUnsupportedError,
    PowerSourceError,
    SourcePermissionError,
    SourceReadError,
    SourceUnavailableError,
)
from profilers.sampler import Sampler, SamplerStatus
from profilers.types import DeviceInfo, PowerReading, Provenance

try:
    import pynvml
except ImportError:  # the dependency is declared; this keeps the import of profilers working without it
    pynvml = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
MIN_SAMPLE_HZ = 10.0

# NVML error name -> (our exception, what to do). Names are looked up on the module in use, so the
# fake (which shares the codes) and the real library map the same way.
_ERRORS: dict[str, tuple[type[PowerSourceError], str]] = {
    "NVML_ERROR_LIBRARY_NOT_FOUND": (
        SourceUnavailableError, "libnvidia-ml.so not found: install the NVIDIA driver or run on a GPU node"),
    "NVML_ERROR_DRIVER_NOT_LOADED": (
        SourceUnavailableError, "the NVIDIA driver is not loaded: check `nvidia-smi` and the kernel module"),
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH": (
        SourceUnavailableError, "NVML and driver versions differ: reboot or reload the nvidia kernel module"),
    "NVML_ERROR_GPU_NOT_FOUND": (SourceUnavailableError, "no such GPU: check CUDA_VISIBLE_DEVICES"),
    "NVML_ERROR_NOT_FOUND": (SourceUnavailableError, "no GPU by that name on this node: check CUDA_VISIBLE_DEVICES"),
    "NVML_ERROR_NO_PERMISSION": (
        SourcePermissionError, "permission denied: give this user access to /dev/nvidia* (video group)"),
    "NVML_ERROR_NOT_SUPPORTED": (CounterUnsupportedError, "not supported on this GPU or driver"),
    "NVML_ERROR_GPU_IS_LOST": (SourceReadError, "the GPU fell off the bus: check `dmesg` and reset the node"),
    "NVML_ERROR_UNINITIALIZED": (SourceReadError, "NVML is not initialised: the source was closed"),
}


def convert_error(e: Exception, what: str) -> PowerSourceError:
    """Our exception for the NVML error ``e`` raised while doing ``what``."""
    code = getattr(e, "value", None)
    for name, (kind, advice) in _ERRORS.items():
        if code is not None and getattr(pynvml, name, object()) == code:
            return kind(f"NVML: {what}: {advice} (NVML error {code})")
    return SourceReadError(f"NVML: {what} failed: {e} (NVML error {code})")


@contextlib.contextmanager
def _nvml(what: str) -> Iterator[None]:
    try:
        yield
    except pynvml.NVMLError as e:
        raise convert_error(e, what) from e


class _PowerOnly:
    """Power of the devices without an energy counter, for the integrating sampler."""

    def __init__(self, source: NVMLSource, devices: list[str]) -> None:
        self._source, self._names = source, devices

    def devices(self) -> list[DeviceInfo]:
        return [d for d in self._source.devices() if d.device in self._names]

    def read(self) -> list[PowerReading]:
        t = self._source.clock()
        power = self._source.power_w
        return [PowerReading(t, name, 0.0, power(name), None, Provenance.MEASURED) for name in self._names]


def _visible_indices(visible_devices: str) -> list[int]:
    """NVML indices of the GPUs a ``CUDA_VISIBLE_DEVICES`` value names (indices or ``GPU-`` UUIDs; NVML numbers
    the node's GPUs regardless of the variable). NVML must be initialised."""
    entries = [e.strip() for e in visible_devices.split(",") if e.strip()]
    if not entries:
        raise SourceUnavailableError(
            "NVML: CUDA_VISIBLE_DEVICES is empty: this process was given no GPU (for a replica: set "
            "num_gpus_per_replica)"
        )
    indices = []
    for entry in entries:
        if entry.lstrip("-").isdigit():
            indices.append(int(entry))
        elif entry.startswith("MIG-"):
            raise SourceUnavailableError(
                f"NVML: CUDA_VISIBLE_DEVICES names the MIG instance {entry}: NVML reports energy per physical GPU, "
                "not per MIG instance"
            )
        else:
            with _nvml(f"finding the GPU {entry} of CUDA_VISIBLE_DEVICES"):
                indices.append(int(pynvml.nvmlDeviceGetIndex(pynvml.nvmlDeviceGetHandleByUUID(entry))))
    return indices


class NVMLSource:
    """Power source of the NVIDIA GPUs NVML sees, of ``indices``, or of those a ``CUDA_VISIBLE_DEVICES`` value
    (``visible_devices``) names: a replica reads the GPUs Ray gave it, not its neighbours'."""

    backend = "nvml"

    def __init__(
        self,
        indices: Sequence[int] | None = None,
        sample_hz: float = 20.0,
        clock: Callable[[], float] = time.monotonic,
        visible_devices: str | None = None,
    ) -> None:
        if pynvml is None:
            raise SourceUnavailableError("NVML: package nvidia-ml-py is missing: pip install nvidia-ml-py")
        if sample_hz < MIN_SAMPLE_HZ:
            raise ValueError(f"NVML power sampling needs at least {MIN_SAMPLE_HZ:g} Hz, got {sample_hz:g}")
        self.clock = clock
        self._handles: dict[str, Any] = {}
        self._infos: list[DeviceInfo] = []
        self._base_mj: dict[str, float] = {}
        self._last_mj: dict[str, float] = {}
        self.resets = 0
        self._sampler: Sampler | None = None
        with _nvml("initialising"):
            pynvml.nvmlInit()
        try:
            if visible_devices is not None and indices is None:
                indices = _visible_indices(visible_devices)
            self._open(indices, sample_hz)
        except BaseException:
            self.close()
            raise

    def _open(self, indices: Sequence[int] | None, sample_hz: float) -> None:
        with _nvml("counting GPUs"):
            count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            raise SourceUnavailableError("NVML: no GPU visible: check `nvidia-smi` and CUDA_VISIBLE_DEVICES")
        for i in range(count) if indices is None else indices:
            if not 0 <= i < count:
                raise SourceUnavailableError(f"NVML: GPU index {i} requested but only {count} visible")
            self._open_device(i)
        integrated = [d.device for d in self._infos if d.energy_method == "integrated"]
        if integrated:
            self._sampler = Sampler(_PowerOnly(self, integrated), hz=sample_hz, integrate=integrated,
                                    clock=self.clock, name="nvml-power-sampler").start()

    def _open_device(self, i: int) -> None:
        dev = f"gpu{i}"
        with _nvml(f"opening GPU {i}"):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
        self._handles[dev] = handle
        limit_w = None
        with contextlib.suppress(CounterUnsupportedError), _nvml(f"reading the power limit of {dev}"):
            limit_w = pynvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000.0
        try:
            with _nvml(f"reading the energy counter of {dev}"):
                mj = float(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
            self._base_mj[dev] = self._last_mj[dev] = mj
            method = "counter"
        except CounterUnsupportedError as e:
            log.info("%s; integrating sampled power instead", e)
            method = "integrated"
        self._infos.append(DeviceInfo(dev, str(name), self.backend, method, limit_w))

    # --- PowerSource ----------------------------------------------------------------------------
    def devices(self) -> list[DeviceInfo]:
        """The GPUs read, each with how its energy is obtained (counter or integrated power)."""
        return list(self._infos)

    def read(self) -> list[PowerReading]:
        """One reading per GPU: cumulative energy (J), power, SM clock and utilisation."""
        integrated = {r.device: r.energy_j for r in self._sampler.latest()} if self._sampler else {}
        t = self.clock()
        out = []
        for info in self._infos:
            dev, handle = info.device, self._handles[info.device]
            energy = integrated[dev] if info.energy_method == "integrated" else self._counter_j(dev)
            with _nvml(f"reading clocks and utilization of {dev}"):
                clock = float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
                util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
            out.append(PowerReading(t, dev, energy, self.power_w(dev), clock, Provenance.MEASURED, util))
        return out

    # --- details --------------------------------------------------------------------------------
    def power_w(self, dev: str) -> float:
        """The GPU's current power draw in watts, as NVML reports it."""
        with _nvml(f"reading the power of {dev}"):
            return pynvml.nvmlDeviceGetPowerUsage(self._handles[dev]) / 1000.0

    def _counter_j(self, dev: str) -> float:
        """Energy since the source opened; a counter that goes backwards (driver reload) is rebased."""
        with _nvml(f"reading the energy counter of {dev}"):
            mj = float(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handles[dev]))
        if mj < self._last_mj[dev]:
            self.resets += 1
            log.warning("NVML energy counter of %s went backwards (%.0f -> %.0f mJ): counter reset, rebased",
                        dev, self._last_mj[dev], mj)
            # Count on from the last energy reported plus what the counter shows since it restarted;
            # energy between the last read and the reset itself is lost (never doubled, never negative).
            self._base_mj[dev] = -(self._last_mj[dev] - self._base_mj[dev])
        self._last_mj[dev] = mj
        return (mj - self._base_mj[dev]) / 1000.0

    def sampler_status(self) -> SamplerStatus | None:
        """State of the power-integrating thread, or None if every device has a counter."""
        return self._sampler.status() if self._sampler else None

    def close(self) -> None:
        """Stop the power-integrating thread and shut NVML down."""
        if self._sampler is not None:
            self._sampler.stop()
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
