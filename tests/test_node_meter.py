"""``testbed meter``: the node exporter over the NVML fake and over the CPU model of a real process tree."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from profilers import nvml, nvml_fake
from profilers.cpu_model import CpuPowerModel
from profilers.node_meter import NodeMeter, choose_source, meter_registry, serve_metrics
from profilers.nvml_fake import FakeGPU
from profilers.scrape import parse_counters
from workloads.campaign import sampler_notes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(nvml, "pynvml", nvml_fake)
    yield
    nvml_fake.reset()


def scrape(meter: NodeMeter) -> str:
    return meter_registry(meter).render().decode()


def test_nvml_devices_with_the_replicas_names_and_labels(fake_nvml: None) -> None:
    nvml_fake.configure([FakeGPU(power_trace=[(0, 100.0 + 10 * i)]) for i in range(8)])
    source, text = choose_source(gpus=None)
    meter = NodeMeter(source, node="node-a", description=text)
    try:
        body = scrape(meter)
        snap = parse_counters(body)
        assert sorted(snap.energy) == [f"node-a/gpu{i}" for i in range(8)]
        assert snap.backends == {"nvml"}
        assert {s.provenance for s in snap.energy.values()} == {"measured"}
        assert snap.power_w["node-a/gpu3"] == pytest.approx(130.0)
        assert 'llm_energy_energy_joules_total{backend="nvml",device="gpu0",provenance="measured",replica="node-a"}' \
            in body
        assert "llm_energy_clock_mhz{" in body
        assert snap.meter_up == {"node-a": 1.0} and snap.meter_errors == {}
    finally:
        meter.stop()


@pytest.mark.parametrize("gpus, env, expected", [("1,3", None, ["gpu1", "gpu3"]), (None, "2", ["gpu2"])])
def test_only_the_visible_gpus(fake_nvml: None, monkeypatch: pytest.MonkeyPatch, gpus: str | None,
                               env: str | None, expected: list[str]) -> None:
    nvml_fake.configure([FakeGPU() for _ in range(4)])
    if env is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    else:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    source, _ = choose_source(gpus=gpus)
    meter = NodeMeter(source, node="n")
    try:
        assert sorted(k.split("/")[1] for k in parse_counters(scrape(meter)).energy) == expected
    finally:
        meter.stop()


def test_nvml_error_mid_run_keeps_the_meter_up_and_degrades_the_point(fake_nvml: None) -> None:
    gpu = FakeGPU(power_trace=[(0, 200.0)])
    nvml_fake.configure([gpu])
    source, _ = choose_source()
    meter = NodeMeter(source, node="n")
    registry = meter_registry(meter)
    server = serve_metrics(registry, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    try:
        time.sleep(0.06)
        begin = parse_counters(httpx.get(url).text)
        gpu.errors["nvmlDeviceGetTotalEnergyConsumption"] = pynvml_unknown()
        time.sleep(0.06)
        during = parse_counters(httpx.get(url).text)  # the server still answers
        assert during.meter_up == {"n": 0.0}
        assert "NVML" in during.meter_errors["n"] or "energy counter" in during.meter_errors["n"]
        assert during.energy["n/gpu0"].energy_j == pytest.approx(begin.energy["n/gpu0"].energy_j, abs=15)
        assert during.sampler_errors["n/gpu0"] >= 1
        notes = sampler_notes(begin, during)
        assert any("sampler errors" in n for n in notes) and any(n.startswith("meter n was down: ") for n in notes)
        del gpu.errors["nvmlDeviceGetTotalEnergyConsumption"]  # the source comes back: up again
        time.sleep(0.06)
        assert parse_counters(httpx.get(url).text).meter_up == {"n": 1.0}
    finally:
        server.shutdown()
        server.server_close()
        meter.stop()


def pynvml_unknown() -> int:
    return int(nvml_fake.NVML_ERROR_UNKNOWN)  # type: ignore[attr-defined]


BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < 30: pass\n"


def test_cpu_model_meters_a_real_process_tree_and_says_when_it_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        model = CpuPowerModel(idle_w=10.0, core_w=12.0, pid=[child.pid])
        meter = NodeMeter(model, node="n")
        t0 = time.monotonic()
        time.sleep(1.0)
        snap = parse_counters(scrape(meter))
        dt = time.monotonic() - t0
        e = snap.energy["n/cpu0"]
        assert e.provenance == "modeled" and snap.backends == {"cpu_model"}
        # idle for the interval plus a good share of one busy core (the child spins; two shared cores here)
        assert 10.0 * dt + 12.0 * 0.2 < e.energy_j < 10.0 * dt + 12.0 * 1.1 + 1
        assert snap.meter_up == {"n": 1.0}
        child.kill()
        child.wait()
        time.sleep(0.06)  # a scrape within 50 ms of a read serves that read
        after = parse_counters(scrape(meter))
        assert after.meter_up == {"n": 0.0}
        assert f"{child.pid} exited" in after.meter_errors["n"]
        assert after.energy["n/cpu0"].energy_j >= e.energy_j  # never backwards
        assert any("was down" in n for n in sampler_notes(snap, after))
    finally:
        child.kill()
        child.wait()


def test_cli_meter_binds_loopback_and_stops_on_sigterm(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", BUSY])
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "meter", "--port", "0", "--pid", str(child.pid), "--sources", "rapl",
         "--node", "cli-node", "--ready-file", str(ready)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        url = ready.read_text().strip()
        assert url.startswith("http://127.0.0.1:")
        snap = parse_counters(httpx.get(url).text)
        assert list(snap.energy) == ["cli-node/cpu0"] and snap.backends == {"cpu_model"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "CPU power model" in (proc.stdout.read() if proc.stdout else "")
    finally:
        proc.kill()
        child.kill()
        proc.wait()
        child.wait()


def test_cli_refuses_a_pid_that_does_not_exist(capsys: pytest.CaptureFixture[str]) -> None:
    from deploy.cli import main

    assert main(["meter", "--pid", "999999999", "--port", "0"]) == 2
    assert "--pid 999999999: no such process" in capsys.readouterr().err


def test_a_campaign_point_over_a_failing_meter_is_degraded_with_the_reason(fake_nvml: None, tmp_path: Path) -> None:
    from test_energy_sources import run, spec

    gpu = FakeGPU(power_trace=[(0, 200.0)])
    nvml_fake.configure([gpu])
    source, _ = choose_source()
    meter = NodeMeter(source, node="n")
    server = serve_metrics(meter_registry(meter), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stub = subprocess.Popen([sys.executable, str(REPO / "bench" / "stub_server.py"), "--model", "stub"],
                            stdout=subprocess.PIPE, text=True)
    fail = threading.Timer(1.0, lambda: gpu.errors.update(nvmlDeviceGetTotalEnergyConsumption=pynvml_unknown()))
    try:
        assert stub.stdout is not None
        url = stub.stdout.readline().split()[-1]
        fail.start()
        row = run(spec({"energy_metrics": [f"http://127.0.0.1:{server.server_address[1]}/metrics"]}, duration_s=3.0),
                  url, tmp_path)
    finally:
        fail.cancel()
        stub.terminate()
        stub.wait(10)
        server.shutdown()
        server.server_close()
        meter.stop()
    assert row["status"] == "degraded", row["notes"]
    assert "meter n was down: " in row["notes"] and "energy counter" in row["notes"]
