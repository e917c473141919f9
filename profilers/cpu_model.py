"""A CPU power model for machines whose power counters cannot be read (virtual machines, no permission).

Power = idle + per-core dynamic power x busy cores, where "busy cores" is the measured CPU time of the
watched processes (a replica and every process it started) per second of wall time, read from
``/proc/<pid>/stat``. Energy is the exact integral of that model between two reads:
``idle_w * dt + core_w * d(cpu seconds)``, so no sampling thread is needed. Figures are ``modeled``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from profilers.types import DeviceInfo, PowerReading, Provenance

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(text: str) -> list[str]:
    # The command name (field 2) may hold spaces and parentheses: split after its closing parenthesis.
    return text[text.rindex(")") + 2 :].split()


def process_cpu_seconds(pid: int, proc: Path = Path("/proc")) -> float:
    """User + system CPU time of every thread of ``pid`` (raises OSError if it is gone)."""
    fields = _stat_fields((proc / str(pid) / "stat").read_text())
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14 and 15 of stat)


def descendants(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields((entry / "stat").read_text())[1])
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cpu_model_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``"CPU"`` when unreadable)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


class CpuPowerModel:
    """PowerSource for the CPU share of one process tree (provenance ``modeled``).

    Finding the tree walks all of ``/proc`` (milliseconds on an idle host, more on a busy node), and a read can
    sit on a serving engine's token path: the walk runs at most every ``rescan_s`` and when :meth:`rescan` asks
    (an engine calls it once its processes have started). A process found late is not lost: its CPU time since it
    started counts from the read that finds it."""

    backend = "cpu_model"

    def __init__(
        self,
        idle_w: float = 10.0,
        core_w: float = 12.0,
        pid: int | None = None,
        device: str = "cpu0",
        proc: Path = Path("/proc"),
        now: Callable[[], float] = time.monotonic,
        rescan_s: float = 30.0,
    ) -> None:
        if idle_w < 0 or core_w < 0:
            raise ValueError(f"power model parameters must be >= 0 W (idle_w={idle_w}, core_w={core_w})")
        self.idle_w = idle_w
        self.core_w = core_w
        self.pid = os.getpid() if pid is None else pid
        self.device = device
        self.proc = proc
        self._now = now
        self._rescan_s = rescan_s
        self._name = f"{cpu_model_name(proc / 'cpuinfo')} (power model)"
        # CPU time of processes that exited is kept, so the integral never goes backwards.
        self._last_cpu: dict[int, float] = {}
        self._cpu_of_gone = 0.0
        self._pids: list[int] = [self.pid]
        self._scanned_at = -1e18
        self._t0 = now()
        self._cpu0 = self._cpu_seconds()
        self._last: tuple[float, float, float] = (self._t0, 0.0, 0.0)  # (t, energy, cpu s) of the last read
        self._power_w = idle_w
        self._util = 0.0
        self._ncpu = os.cpu_count() or 1

    def describe(self) -> str:
        """One line saying how power is modeled: idle and per-core watts, and whose utilisation is counted."""
        return (
            f"CPU power model (modeled): {self.idle_w:g} W idle + {self.core_w:g} W per busy core, "
            f"utilisation of pid {self.pid} and its children from {self.proc}"
        )

    def _cpu_seconds(self) -> float:
        t = self._now()
        if t - self._scanned_at >= self._rescan_s:
            self._pids = [self.pid, *descendants(self.pid, self.proc)]
            self._scanned_at = t
        seen: dict[int, float] = {}
        for pid in self._pids:
            try:
                seen[pid] = process_cpu_seconds(pid, self.proc)
            except (OSError, ValueError, IndexError):
                continue
        for pid, cpu in self._last_cpu.items():
            if pid not in seen and pid != self.pid:
                self._cpu_of_gone += cpu
        self._last_cpu = seen
        return self._cpu_of_gone + sum(seen.values())

    def rescan(self) -> None:
        """Walk the process tree again at the next read (the tree changed: an engine started its processes)."""
        self._scanned_at = -1e18

    def busy_cores_since_start(self) -> float:
        """Average busy cores of the process tree since the model started (CPU seconds per second)."""
        dt = self._now() - self._t0
        return (self._cpu_seconds() - self._cpu0) / dt if dt > 0 else 0.0

    def devices(self) -> list[DeviceInfo]:
        """The one modeled CPU device."""
        return [DeviceInfo(device=self.device, name=self._name, backend=self.backend, energy_method="modeled")]

    def read(self) -> list[PowerReading]:
        """Modeled energy (J) since start: idle W times time plus core W times CPU seconds of the process tree."""
        t = self._now()
        cpu = self._cpu_seconds() - self._cpu0
        energy = self.idle_w * (t - self._t0) + self.core_w * cpu
        t_prev, e_prev, cpu_prev = self._last
        if t - t_prev >= 0.05:  # power over the last interval; too short an interval is only tick noise
            self._power_w = (energy - e_prev) / (t - t_prev)
            self._util = min(1.0, (cpu - cpu_prev) / (t - t_prev) / self._ncpu)
            self._last = (t, energy, cpu)
        return [PowerReading(t, self.device, energy, self._power_w, None, Provenance.MODELED, self._util)]
