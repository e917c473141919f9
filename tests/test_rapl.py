"""The RAPL source on fixture powercap trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from profilers.errors import SourcePermissionError, SourceReadError, SourceUnavailableError
from profilers.rapl import RaplSource

MAX_UJ = 262_143_328_850


def zone(root: Path, name: str, label: str, energy_uj: int, max_uj: int = MAX_UJ) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "name").write_text(f"{label}\n")
    (d / "energy_uj").write_text(f"{energy_uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    # The flat layout of /sys/class/powercap: zones and sub-zones side by side.
    zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    zone(tmp_path, "intel-rapl:0:0", "core", 500_000)
    zone(tmp_path, "intel-rapl:0:1", "dram", 2_000_000)
    zone(tmp_path, "intel-rapl:1", "package-1", 7_000_000)
    return tmp_path


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def test_package_and_dram_domains_are_read(tree: Path) -> None:
    clock = Clock()
    src = RaplSource(tree, clock=clock)
    assert [d.device for d in src.devices()] == ["package-0", "dram-0", "package-1"]  # core is inside package
    (tree / "intel-rapl:0" / "energy_uj").write_text("51000000\n")  # +50 J
    (tree / "intel-rapl:0:1" / "energy_uj").write_text("7000000\n")  # +5 J
    clock.t = 2.0
    readings = {r.device: r for r in src.read()}
    assert readings["package-0"].energy_j == pytest.approx(50.0)
    assert readings["package-0"].power_w == pytest.approx(25.0)
    assert readings["dram-0"].energy_j == pytest.approx(5.0)
    assert readings["package-1"].energy_j == 0.0


def test_counter_wrap_is_undone(tmp_path: Path) -> None:
    zone(tmp_path, "intel-rapl:0", "package-0", 999_000_000, max_uj=1_000_000_000)
    clock = Clock()
    src = RaplSource(tmp_path, clock=clock)
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("4000000\n")  # wrapped: 1 J to the top, then 4 J
    clock.t = 1.0
    (r,) = src.read()
    assert r.energy_j == pytest.approx(5.0)
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("6000000\n")
    clock.t = 2.0
    (r,) = src.read()
    assert r.energy_j == pytest.approx(7.0)  # never negative, never a whole range added twice


def test_no_powercap_tree_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailableError, match=r"no .*intel-rapl:\* zones"):
        RaplSource(tmp_path / "missing")


def test_unreadable_energy_file_says_how_to_fix(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The tests may run as root, for whom chmod 000 does not stop reads: raise what the kernel would.
    real = Path.read_text

    def read_text(self: Path, *a: object, **k: object) -> str:
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(SourcePermissionError, match="run as root or `chmod a\\+r`"):
        RaplSource(tree)


def test_a_file_that_vanishes_mid_run_is_a_read_error(tree: Path) -> None:
    src = RaplSource(tree)
    (tree / "intel-rapl:1" / "energy_uj").unlink()
    with pytest.raises(SourceReadError, match="vanished"):
        src.read()


def test_garbage_in_a_counter_is_named(tree: Path) -> None:
    (tree / "intel-rapl:0" / "max_energy_range_uj").write_text("n/a\n")
    with pytest.raises(SourceReadError, match="does not hold an integer"):
        RaplSource(tree)
