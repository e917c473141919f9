"""The NVML source against the NVML fake, patched where the source imports it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pynvml
import pytest

from profilers import nvml, nvml_fake
from profilers.errors import (
    SamplerDiedError,
    SourcePermissionError,
    SourceReadError,
    SourceUnavailableError,
)
from profilers.nvml import NVMLSource
from profilers.nvml_fake import FakeGPU
from profilers.types import Provenance


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(autouse=True)
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(nvml, "pynvml", nvml_fake)
    yield
    nvml_fake.reset()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_counter_energy_is_the_integral_of_the_trace(clock: FakeClock) -> None:
    nvml_fake.configure([FakeGPU(power_trace=[(0, 100.0), (10, 300.0)], utilization_pct=87)], clock=clock)
    src = NVMLSource(clock=clock)
    try:
        assert [d.energy_method for d in src.devices()] == ["counter"]
        assert src.devices()[0].power_limit_w == 700.0
        clock.t += 10
        (r,) = src.read()
        assert r.energy_j == pytest.approx(2000.0, abs=1e-3)  # (100 + 300) / 2 x 10 s
        assert r.power_w == pytest.approx(300.0)
        assert r.clock_mhz == 1980.0
        assert r.utilization == pytest.approx(0.87)
        assert r.provenance is Provenance.MEASURED
    finally:
        src.close()


def test_counter_reset_is_neither_negative_nor_doubled(clock: FakeClock) -> None:
    nvml_fake.configure([FakeGPU(power_trace=[(0, 200.0)])], clock=clock)
    src = NVMLSource(clock=clock)
    clock.t += 10
    assert src.read()[0].energy_j == pytest.approx(2000.0, abs=1e-3)
    nvml_fake.reset_energy_counter(0)  # driver reload: the raw counter restarts at 0
    clock.t += 5
    (r,) = src.read()
    assert r.energy_j == pytest.approx(3000.0, abs=1e-3)
    assert src.resets == 1
    src.close()


def test_no_counter_falls_back_to_integrated_power() -> None:
    # Real time: the sampler thread integrates a ramp; the trapezoid rule is exact on a line.
    nvml_fake.configure([FakeGPU(has_energy_counter=False, power_trace=[(0, 100.0), (60, 700.0)])])
    src = NVMLSource(sample_hz=20)
    try:
        assert src.devices()[0].energy_method == "integrated"
        time.sleep(0.6)
        (r,) = src.read()
        history = src._sampler.history("gpu0")  # type: ignore[union-attr]
        assert len(history) >= 3
        t0 = nvml_fake._state.t0
        gpu = nvml_fake._state.gpus[0]
        exact = gpu.energy_j(history[-1].t_s - t0) - gpu.energy_j(history[0].t_s - t0)
        assert r.energy_j == pytest.approx(exact, rel=1e-3, abs=0.05)  # mW rounding of the fake
        status = src.sampler_status()
        assert status is not None and status.alive and status.errors_total == 0
    finally:
        src.close()


def test_dead_sampler_is_reported_not_zero() -> None:
    gpu = FakeGPU(has_energy_counter=False, power_trace=[(0, 150.0)])
    nvml_fake.configure([gpu])
    src = NVMLSource(sample_hz=50)
    try:
        gpu.errors["nvmlDeviceGetPowerUsage"] = pynvml.NVML_ERROR_GPU_IS_LOST
        deadline = time.monotonic() + 20
        while src.sampler_status().alive and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.05)
        status = src.sampler_status()
        assert status is not None and not status.alive and status.errors_total >= 5
        assert "fell off the bus" in (status.last_error or "")
        with pytest.raises(SamplerDiedError, match="energy after that moment is unknown"):
            src.read()
    finally:
        src.close()


@pytest.mark.parametrize(
    ("setup", "error", "message"),
    [
        (lambda: nvml_fake.configure([FakeGPU()], library_found=False), SourceUnavailableError, "libnvidia"),
        (lambda: nvml_fake.configure([]), SourceUnavailableError, "no GPU visible"),
        (
            lambda: nvml_fake.configure(
                [FakeGPU(errors={"nvmlDeviceGetTotalEnergyConsumption": pynvml.NVML_ERROR_NO_PERMISSION})]
            ),
            SourcePermissionError,
            "permission denied",
        ),
        (
            lambda: nvml_fake.configure(
                [FakeGPU(errors={"nvmlDeviceGetHandleByIndex": pynvml.NVML_ERROR_DRIVER_NOT_LOADED})]
            ),
            SourceUnavailableError,
            "driver is not loaded",
        ),
    ],
)
def test_nvml_failures_become_our_errors_with_a_reason(setup, error, message) -> None:  # type: ignore
    setup()
    with pytest.raises(error, match=message) as info:
        NVMLSource()
    if message != "no GPU visible":  # that one is our own finding, not an NVML error
        assert isinstance(info.value.__cause__, pynvml.NVMLError)
    assert "\n" not in str(info.value)
    assert nvml_fake._state.init_count == 0  # a failed open shuts NVML down again


def test_a_gpu_index_that_does_not_exist_is_named() -> None:
    nvml_fake.configure([FakeGPU()])
    with pytest.raises(SourceUnavailableError, match="GPU index 3 requested but only 1 visible"):
        NVMLSource(indices=[3])


@pytest.mark.parametrize(("visible", "read"), [
    ("2", ["gpu2"]), ("3,1", ["gpu3", "gpu1"]), ("GPU-00000000-0000-0000-0000-000000000001", ["gpu1"]),
    (" 0 , GPU-00000000-0000-0000-0000-000000000002", ["gpu0", "gpu2"]),
])
def test_a_replica_reads_only_the_gpus_its_cuda_visible_devices_names(visible: str, read: list[str]) -> None:
    """NVML numbers every GPU of the node; a Ray actor's CUDA_VISIBLE_DEVICES (indices or UUIDs) says which are
    its own, so replicas sharing a node never count each other's energy."""
    nvml_fake.configure([FakeGPU() for _ in range(4)])
    src = NVMLSource(visible_devices=visible)
    try:
        assert [d.device for d in src.devices()] == read
        assert [r.device for r in src.read()] == read
    finally:
        src.close()


@pytest.mark.parametrize(("visible", "message"), [
    ("", "CUDA_VISIBLE_DEVICES is empty: this process was given no GPU"),
    ("7", "GPU index 7 requested but only 4 visible"),
    ("GPU-ffffffff-0000-0000-0000-000000000000", "no GPU by that name on this node"),
    ("MIG-4f3c2c1e-0000-0000-0000-000000000000", "NVML reports energy per physical GPU"),
])
def test_a_cuda_visible_devices_naming_no_gpu_of_this_node_says_so(visible: str, message: str) -> None:
    nvml_fake.configure([FakeGPU() for _ in range(4)])
    with pytest.raises(SourceUnavailableError, match=message):
        NVMLSource(visible_devices=visible)
    assert nvml_fake._state.init_count == 0  # closed again: nothing leaks


def test_vllm_replica_power_source_follows_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.config import VLLMEngineConfig
    from serving.vllm_engine import select_power_source

    nvml_fake.configure([FakeGPU(), FakeGPU(name="NVIDIA H200")])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    source, text = select_power_source(VLLMEngineConfig(model="/m"), "replica-1")
    assert [(d.device, d.name) for d in source.devices()] == [("gpu1", "NVIDIA H200")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # an actor Ray gave no GPU: not a neighbour's energy
    source, text = select_power_source(VLLMEngineConfig(model="/m", power_sources=["nvml"]), "replica-1")
    assert text.startswith("CPU power model") and "CUDA_VISIBLE_DEVICES is empty" in text


def test_a_ray_actor_given_no_gpu_reads_none_of_the_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving import vllm_engine
    from serving.config import VLLMEngineConfig

    assert vllm_engine.visible_devices("1", ["1"]) == "1"
    assert vllm_engine.visible_devices(None, []) == ""  # an actor without GPUs: Ray left the node's view
    assert vllm_engine.visible_devices(None, None) is None  # not in an actor (a bench, a notebook): every GPU
    nvml_fake.configure([FakeGPU(), FakeGPU()])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(vllm_engine, "_ray_actor_gpu_ids", lambda: [])
    _, text = vllm_engine.select_power_source(VLLMEngineConfig(model="/m", power_sources=["nvml"]), "replica-0")
    assert text.startswith("CPU power model") and "given no GPU" in text and "num_gpus_per_replica" in text


def test_a_lost_gpu_during_reads_is_a_read_error(clock: FakeClock) -> None:
    gpu = FakeGPU()
    nvml_fake.configure([gpu], clock=clock)
    src = NVMLSource(clock=clock)
    gpu.errors["nvmlDeviceGetTotalEnergyConsumption"] = pynvml.NVML_ERROR_GPU_IS_LOST
    with pytest.raises(SourceReadError, match="fell off the bus"):
        src.read()
    src.close()


def test_the_source_never_actuates(monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> None:
    calls: list[str] = []
    for name in ("nvmlDeviceSetGpuLockedClocks", "nvmlDeviceResetGpuLockedClocks",
                 "nvmlDeviceSetPowerManagementLimit"):
        monkeypatch.setattr(nvml_fake, name, lambda *a, _n=name: calls.append(_n))
    nvml_fake.configure([FakeGPU(), FakeGPU(has_energy_counter=False)], clock=clock, privileged=True)
    src = NVMLSource(clock=clock)
    src.read()
    src.close()
    assert calls == []


# --- the fake behaves like pynvml --------------------------------------------------------------------
def test_fake_uses_pynvml_error_classes_and_units(clock: FakeClock) -> None:
    nvml_fake.configure([FakeGPU(power_trace=[(0, 250.5)])], clock=clock)
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        nvml_fake.nvmlDeviceGetCount()
    nvml_fake.nvmlInit()
    h = nvml_fake.nvmlDeviceGetHandleByIndex(0)
    assert nvml_fake.nvmlDeviceGetPowerUsage(h) == 250_500  # mW, an int like the real call
    assert isinstance(nvml_fake.nvmlDeviceGetTotalEnergyConsumption(h), int)  # mJ
    mem = nvml_fake.nvmlDeviceGetSupportedMemoryClocks(h)
    assert max(nvml_fake.nvmlDeviceGetSupportedGraphicsClocks(h, mem[0])) == 1980
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nvml_fake.nvmlDeviceGetHandleByIndex(1)
    with pytest.raises(pynvml.NVMLError_NoPermission):  # not root
        nvml_fake.nvmlDeviceSetGpuLockedClocks(h, 1000, 1400)
    nvml_fake.nvmlShutdown()


def test_fake_setters_act_when_privileged(clock: FakeClock) -> None:
    nvml_fake.configure([FakeGPU(power_trace=[(0, 650.0)])], clock=clock, privileged=True)
    nvml_fake.nvmlInit()
    h = nvml_fake.nvmlDeviceGetHandleByIndex(0)
    nvml_fake.nvmlDeviceSetGpuLockedClocks(h, 810, 1410)
    assert nvml_fake.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM) == 1410
    nvml_fake.nvmlDeviceResetGpuLockedClocks(h)
    assert nvml_fake.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM) == 1980
    nvml_fake.nvmlDeviceSetPowerManagementLimit(h, 400_000)
    assert nvml_fake.nvmlDeviceGetPowerUsage(h) == 400_000  # capped by the new limit
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nvml_fake.nvmlDeviceSetPowerManagementLimit(h, 50_000)
    nvml_fake.nvmlShutdown()


def _validate_script():  # type: ignore[no-untyped-def]
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "nvml_validate.py"
    spec = importlib.util.spec_from_file_location("nvml_validate", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.parametrize(
    ("gpus", "found", "message"),
    [([FakeGPU()], False, "not applicable here: NVML: initialising: libnvidia-ml.so not found"),
     ([FakeGPU(has_energy_counter=False)], True, "has no energy counter; nothing to compare")],
)
def test_gpu_validation_script_says_why_it_cannot_run(gpus, found, message, capsys) -> None:  # type: ignore
    nvml_fake.configure(gpus, library_found=found)
    assert _validate_script().main(["--seconds", "1"]) == 2
    assert message in capsys.readouterr().out
    assert nvml_fake._state.init_count == 0
