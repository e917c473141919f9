"""Probing power sources: NVML, then RAPL, then the caller's fallback, with a reason for each skip."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from profilers import nvml, nvml_fake
from profilers.errors import SourceUnavailableError
from profilers.nvml import NVMLSource
from profilers.nvml_fake import FakeGPU
from profilers.rapl import RaplSource
from profilers.sources import probe_sources
from profilers.types import DeviceInfo, PowerReading, Provenance


class ModelSource:
    def devices(self) -> list[DeviceInfo]:
        return [DeviceInfo("cpu-model", "CPU power model", "model", "modeled")]

    def read(self) -> list[PowerReading]:
        return [PowerReading(0.0, "cpu-model", 0.0, 10.0, None, Provenance.MODELED)]


@pytest.fixture(autouse=True)
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(nvml, "pynvml", nvml_fake)
    yield
    nvml_fake.reset()


@pytest.fixture
def rapl_tree(tmp_path: Path) -> Path:
    d = tmp_path / "intel-rapl:0"
    d.mkdir()
    (d / "name").write_text("package-0\n")
    (d / "energy_uj").write_text("123\n")
    (d / "max_energy_range_uj").write_text("262143328850\n")
    return tmp_path


def test_nvml_first_when_a_gpu_is_there(rapl_tree: Path) -> None:
    nvml_fake.configure([FakeGPU(), FakeGPU(has_energy_counter=False)])
    choice = probe_sources(options={"rapl": {"root": rapl_tree}})
    try:
        assert choice.name == "nvml" and isinstance(choice.source, NVMLSource)
        assert choice.provenance == "nvml: gpu0=counter, gpu1=integrated"
        assert choice.skipped == []
    finally:
        choice.source.close()  # type: ignore[attr-defined]


def test_no_nvml_library_falls_back_to_rapl(rapl_tree: Path) -> None:
    nvml_fake.configure([FakeGPU()], library_found=False)
    choice = probe_sources(options={"rapl": {"root": rapl_tree}})
    assert isinstance(choice.source, RaplSource)
    assert choice.provenance == "rapl: package-0=counter"
    (reason,) = choice.skipped
    assert reason.startswith("nvml: NVML: initialising: libnvidia-ml.so not found")


def test_nothing_measurable_uses_the_fallback_and_says_why(tmp_path: Path) -> None:
    nvml_fake.configure([])  # library present, no GPU
    choice = probe_sources(fallback=("cpu-model", ModelSource), options={"rapl": {"root": tmp_path}})
    assert choice.name == "cpu-model" and choice.provenance == "cpu-model: cpu-model=modeled"
    assert [r.split(":")[0] for r in choice.skipped] == ["nvml", "rapl"]
    assert "no GPU visible" in choice.skipped[0] and "intel-rapl" in choice.skipped[1]


def test_permission_error_on_nvml_is_a_reason_too(rapl_tree: Path) -> None:
    import pynvml

    denied = {"nvmlDeviceGetTotalEnergyConsumption": pynvml.NVML_ERROR_NO_PERMISSION}
    nvml_fake.configure([FakeGPU(errors=denied)])
    choice = probe_sources(options={"rapl": {"root": rapl_tree}})
    assert choice.name == "rapl" and "permission denied" in choice.skipped[0]


def test_no_source_and_no_fallback_lists_every_reason(tmp_path: Path) -> None:
    nvml_fake.configure([FakeGPU()], library_found=False)
    with pytest.raises(SourceUnavailableError, match=r"no power source available: nvml: .*; rapl: .*rapl"):
        probe_sources(options={"rapl": {"root": tmp_path}})


def test_unknown_source_name() -> None:
    with pytest.raises(ValueError, match="unknown power source"):
        probe_sources(order=["nvml", "tpu"])
