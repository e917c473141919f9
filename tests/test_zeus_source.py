"""The Zeus power source through Zeus's own interfaces: on this machine (no GPU, no RAPL) it must say it found
nothing; with Zeus's RAPL pointed at a powercap tree it meters the packages, after our NVML and RAPL in the meter's
order."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from profilers.errors import SourceUnavailableError
from profilers.sources import METER_ORDER, probe_sources

zeus_device = pytest.importorskip("zeus.device", reason="zeus is not installed: pip install -e '.[zeus]'")


@pytest.fixture(autouse=True)
def fresh_zeus(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import zeus.device.cpu as cpu
    import zeus.device.cpu.rapl as rapl
    import zeus.device.gpu as gpu

    monkeypatch.setattr(cpu, "_cpus", None)  # Zeus keeps its managers in module globals
    monkeypatch.setattr(gpu, "_gpus", None)
    rapl.rapl_is_available.cache_clear()  # and whether RAPL exists, cached
    yield
    rapl.rapl_is_available.cache_clear()


def test_meter_order_puts_zeus_after_ours() -> None:
    assert METER_ORDER == ("nvml", "rapl", "zeus")


def test_no_device_here_is_said_with_zeus_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    import zeus.device.cpu.rapl as rapl

    if Path(rapl.RAPL_DIR).exists() or Path("/dev/nvidia0").exists():
        pytest.skip("this machine has RAPL or a GPU: Zeus finds a device")
    from profilers.zeus_source import ZeusSource

    with pytest.raises(SourceUnavailableError, match=r"zeus: no device found \(GPUs: .*; CPUs: .*RAPL"):
        ZeusSource()


def test_zeus_rapl_meters_packages_and_dram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zeus.device.cpu.rapl as rapl

    root = tmp_path / "intel-rapl"
    zones = {"intel-rapl:0": ("package-0", 5_000_000), "intel-rapl:0/intel-rapl:0:0": ("dram", 1_000_000)}
    for rel, (name, uj) in zones.items():
        d = root / rel
        d.mkdir(parents=True)
        (d / "name").write_text(name + "\n")
        (d / "energy_uj").write_text(f"{uj}\n")
        (d / "max_energy_range_uj").write_text("262143328850\n")
    monkeypatch.setattr(rapl, "RAPL_DIR", str(root))
    monkeypatch.setattr(rapl, "CONTAINER_RAPL_DIR", str(tmp_path / "none"))
    import profilers.zeus_source as zs

    t = [100.0]
    source = zs.ZeusSource(clock=lambda: t[0])
    assert [(d.device, d.backend) for d in source.devices()] == [("cpu0", "zeus"), ("dram0", "zeus")]
    (root / "intel-rapl:0" / "energy_uj").write_text("8000000\n")  # +3 J
    (root / "intel-rapl:0" / "intel-rapl:0:0" / "energy_uj").write_text("1500000\n")  # +0.5 J
    t[0] = 101.0
    got = {r.device: r for r in source.read()}
    assert got["cpu0"].energy_j == pytest.approx(3.0) and got["dram0"].energy_j == pytest.approx(0.5)
    assert got["cpu0"].power_w == pytest.approx(3.0) and got["cpu0"].provenance == "measured"
    # In the meter's order: our RAPL (at its default path, absent here) says why, then Zeus is used.
    choice = probe_sources(order=("rapl", "zeus"))
    assert choice.name == "zeus" and choice.skipped and choice.skipped[0].startswith("rapl:")
