"""The CPU power model: exact integral of idle + per-core power x measured CPU time of a process tree."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from profilers.cpu_model import CpuPowerModel, descendants, process_cpu_seconds
from profilers.source import PowerSource
from profilers.types import Provenance

TCK = os.sysconf("SC_CLK_TCK")


def _write_stat(
    proc: Path, pid: int, ppid: int, utime_s: float, stime_s: float, comm: str = "py (x) y"
) -> None:
    d = proc / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    # After the command: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    rest = [
        "S",
        str(ppid),
        "1",
        "1",
        "0",
        "-1",
        "0",
        "0",
        "0",
        "0",
        "0",
        str(round(utime_s * TCK)),
        str(round(stime_s * TCK)),
        "0",
        "0",
    ]
    (d / "stat").write_text(f"{pid} ({comm}) {' '.join(rest)}\n")


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_energy_is_idle_plus_core_power_times_cpu_seconds_of_the_tree(tmp_path: Path) -> None:
    proc, clock = tmp_path, FakeClock()
    (proc / "cpuinfo").write_text("processor : 0\nmodel name\t: Test CPU 9000\n")
    _write_stat(proc, 10, 1, 1.0, 0.5)
    _write_stat(proc, 11, 10, 2.0, 0.0)  # child (the engine-core process)
    _write_stat(proc, 12, 11, 0.0, 0.0)  # grandchild
    _write_stat(proc, 99, 1, 50.0, 0.0)  # unrelated process: never counted
    m = CpuPowerModel(idle_w=10, core_w=20, pid=10, proc=proc, now=clock, rescan_s=0)
    assert isinstance(m, PowerSource)
    assert m.devices()[0].backend == "cpu_model" and "Test CPU 9000" in m.devices()[0].name
    assert m.read()[0].energy_j == pytest.approx(0.0)
    clock.t += 2.0
    _write_stat(proc, 10, 1, 1.5, 0.5)  # +0.5 s
    _write_stat(proc, 12, 11, 0.0, 1.0)  # +1.0 s
    r = m.read()[0]
    assert r.provenance == Provenance.MODELED
    assert r.energy_j == pytest.approx(10 * 2.0 + 20 * 1.5)
    assert r.power_w == pytest.approx((10 * 2.0 + 20 * 1.5) / 2.0)
    # A child that exits keeps the CPU time it used: energy never goes backwards.
    (proc / "12" / "stat").unlink()
    (proc / "12").rmdir()
    clock.t += 1.0
    assert m.read()[0].energy_j == pytest.approx(10 * 3.0 + 20 * 1.5)


def test_tree_is_walked_again_on_rescan_or_after_rescan_s_and_a_late_child_loses_nothing(tmp_path: Path) -> None:
    proc, clock = tmp_path, FakeClock()
    (proc / "cpuinfo").write_text("model name\t: Test CPU\n")
    _write_stat(proc, 10, 1, 1.0, 0.0)
    m = CpuPowerModel(idle_w=0, core_w=10, pid=10, proc=proc, now=clock, rescan_s=30)
    _write_stat(proc, 11, 10, 3.0, 0.0)  # an engine-core process started after the model: 3 s of CPU already
    clock.t += 1.0
    assert m.read()[0].energy_j == pytest.approx(0.0)  # not walked yet: a read on the token path stays cheap
    m.rescan()
    assert m.read()[0].energy_j == pytest.approx(10 * 3.0)  # found: its CPU since it started counts
    _write_stat(proc, 12, 10, 2.0, 0.0)
    clock.t += 29.0
    assert m.read()[0].energy_j == pytest.approx(10 * 3.0)
    clock.t += 1.0  # rescan_s after the last walk
    assert m.read()[0].energy_j == pytest.approx(10 * 5.0)


def test_descendants_and_stat_with_spaces_in_command(tmp_path: Path) -> None:
    _write_stat(tmp_path, 5, 1, 0.25, 0.25, comm="ray::Replica (a) b")
    _write_stat(tmp_path, 6, 5, 0, 0)
    _write_stat(tmp_path, 7, 6, 0, 0)
    _write_stat(tmp_path, 8, 1, 0, 0)
    assert sorted(descendants(5, tmp_path)) == [6, 7]
    assert process_cpu_seconds(5, tmp_path) == pytest.approx(0.5)


def test_real_proc_counts_busy_cpu_time() -> None:
    m = CpuPowerModel(idle_w=0, core_w=10)
    t_end = time.process_time() + 0.3
    while time.process_time() < t_end:
        pass
    e = m.read()[0].energy_j
    assert e >= 10 * 0.2  # at least 0.2 s of the 0.3 s of CPU burnt here (10 ms clock ticks)


def test_negative_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="must be >= 0 W"):
        CpuPowerModel(idle_w=-1)
