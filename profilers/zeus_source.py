"""A power source through Zeus (``pip install zeus``; its ``zeus.device`` layer): NVIDIA GPUs (pynvml), AMD GPUs
(amdsmi) and Intel/AMD CPUs (RAPL, with Zeus's own wrap-around tracking). Probed after our NVML and RAPL sources
(``testbed meter``'s default ``--sources nvml,rapl,zeus``), so it counts where they find nothing (an AMD GPU, a
RAPL tree Zeus reaches through its container path). Backend ``zeus``, provenance ``measured``; where Zeus finds no
device it says so with Zeus's own reasons (:class:`SourceUnavailableError`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from profilers.errors import SourceReadError, SourceUnavailableError
from profilers.sampler import PowerIntegrator
from profilers.types import DeviceInfo, PowerReading, Provenance


class ZeusSource:
    """PowerSource over Zeus's ``zeus.device`` GPUs and CPUs (energy since it opened, provenance measured)."""

    backend = "zeus"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        try:
            from zeus.device import get_cpus, get_gpus
        except ImportError as e:
            raise SourceUnavailableError(f"zeus: package not installed ({e}): pip install zeus") from e
        self.clock = clock
        self._gpus: Any = None
        self._cpus: Any = None
        self._infos: list[DeviceInfo] = []
        self._integrator = PowerIntegrator()
        reasons = []
        try:
            self._gpus = get_gpus()
        except Exception as e:  # Zeus raises its own ZeusGPUInitError (and vendor errors) here
            reasons.append(f"GPUs: {e}")
        try:
            self._cpus = get_cpus()
        except Exception as e:  # ZeusCPUInitError
            reasons.append(f"CPUs: {e}")
        n_gpus, n_cpus = len(self._gpus) if self._gpus else 0, len(self._cpus) if self._cpus else 0
        if n_gpus + n_cpus == 0:
            raise SourceUnavailableError("zeus: no device found (" + "; ".join(reasons or ["none listed"]) + ")")
        for i in range(n_gpus):
            method = "counter" if self._gpus.supports_get_total_energy_consumption(i) else "integrated"
            self._infos.append(DeviceInfo(f"gpu{i}", str(self._gpus.get_name(i)), self.backend, method))
        for i in range(n_cpus):
            self._infos.append(DeviceInfo(f"cpu{i}", f"CPU package {i} (Zeus RAPL)", self.backend, "counter"))
            if self._cpus.supports_get_dram_energy_consumption(i):
                self._infos.append(DeviceInfo(f"dram{i}", f"DRAM of package {i} (Zeus RAPL)", self.backend, "counter"))
        self._base: dict[str, float] = {}
        self._last: dict[str, tuple[float, float]] = {}
        self._base = {r.device: r.energy_j for r in self._read_raw()}

    def describe(self) -> str:
        """One line for the start-up log: Zeus, and how each device's energy is obtained."""
        return "Zeus (measured): " + ", ".join(f"{d.device}={d.energy_method}" for d in self._infos)

    def devices(self) -> list[DeviceInfo]:
        """The GPUs and CPU packages (and their DRAM) Zeus found."""
        return list(self._infos)

    def _read_raw(self) -> list[PowerReading]:
        t = self.clock()
        out = []
        try:
            for info in self._infos:
                kind, i = info.device.rstrip("0123456789"), int(info.device.lstrip("gpucdram"))
                if kind == "gpu":
                    watts = self._gpus.get_instant_power_usage(i) / 1000.0
                    if info.energy_method == "counter":
                        joules = self._gpus.get_total_energy_consumption(i) / 1000.0
                    else:
                        joules = self._integrator.add(info.device, t, watts)
                    out.append(PowerReading(t, info.device, joules, watts, None, Provenance.MEASURED))
                else:
                    m = self._cpus.get_total_energy_consumption(i)
                    mj = m.cpu_mj if kind == "cpu" else (m.dram_mj or 0.0)
                    joules = mj / 1000.0
                    t_prev, j_prev = self._last.get(info.device, (t, joules))
                    watts = (joules - j_prev) / (t - t_prev) if t > t_prev else 0.0  # RAPL has no power reading
                    self._last[info.device] = (t, joules)
                    out.append(PowerReading(t, info.device, joules, watts, None, Provenance.MEASURED))
        except Exception as e:  # Zeus's and the vendors' errors: one kind for our callers
            raise SourceReadError(f"zeus: reading {info.device} failed: {e}") from e
        return out

    def read(self) -> list[PowerReading]:
        """Energy since the source opened, per device."""
        readings = self._read_raw()
        return [PowerReading(r.t_s, r.device, r.energy_j - self._base.get(r.device, 0.0), r.power_w, r.clock_mhz,
                             r.provenance) for r in readings]
