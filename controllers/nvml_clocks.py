"""Locking GPU clocks through NVML: the only code that changes clocks on real hardware.

It runs in the privileged node agent (Kubernetes) or a local controller with the rights to do so; tests run it
against the NVML-compatible fake. NVML refusals (no permission, not supported) become
:class:`ClockKnobUnavailableError` with the reason, so a controller can carry on with its other knobs.
"""

from __future__ import annotations

import logging

from profilers import nvml as nvml_source
from profilers.errors import TestbedError
from profilers.nvml import convert_error

log = logging.getLogger(__name__)


class ClockKnobUnavailableError(TestbedError, RuntimeError):
    """The clock knob cannot be used on this machine; the message says why."""


class NVMLClocks:
    """GPU graphics clock locks through NVML, on the clocks every selected GPU supports at its top memory clock."""

    def __init__(self, indices: list[int] | None = None) -> None:
        nv = nvml_source.pynvml
        if nv is None:
            raise ClockKnobUnavailableError("NVML is not installed (pip install nvidia-ml-py)")
        try:
            nv.nvmlInit()
            count = nv.nvmlDeviceGetCount()
            self.handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in (indices or range(count))]
            per_gpu = []
            for h in self.handles:
                mem = max(nv.nvmlDeviceGetSupportedMemoryClocks(h))
                per_gpu.append(set(nv.nvmlDeviceGetSupportedGraphicsClocks(h, mem)))
        except nv.NVMLError as e:
            raise ClockKnobUnavailableError(str(convert_error(e, "reading the supported clocks"))) from e
        if not self.handles:
            raise ClockKnobUnavailableError("no NVIDIA GPU on this node")
        # One clock for all GPUs of the node: the ones every GPU supports.
        self.supported_mhz = sorted(set.intersection(*per_gpu))
        self.locked_mhz: float | None = None

    def nearest(self, clock_mhz: float) -> int:
        """The supported clock (MHz) closest to ``clock_mhz``, the lower one on a tie."""
        return min(self.supported_mhz, key=lambda c: (abs(c - clock_mhz), c))

    def lock(self, clock_mhz: float) -> int:
        """Lock every GPU at the supported clock nearest ``clock_mhz``; returns the clock applied."""
        nv = nvml_source.pynvml
        clock = self.nearest(clock_mhz)
        try:
            for h in self.handles:
                nv.nvmlDeviceSetGpuLockedClocks(h, clock, clock)
        except nv.NVMLError as e:
            raise ClockKnobUnavailableError(str(convert_error(e, "locking the GPU clock"))) from e
        self.locked_mhz = clock
        return clock

    def reset(self) -> None:
        """Back to the driver's default clock management (on every exit path of the agent)."""
        nv = nvml_source.pynvml
        try:
            for h in self.handles:
                nv.nvmlDeviceResetGpuLockedClocks(h)
        except nv.NVMLError as e:
            raise ClockKnobUnavailableError(str(convert_error(e, "resetting the GPU clock"))) from e
        self.locked_mhz = None
