"""Energy and tokens from other exporters (issue #19 part 2): parsing of DCGM, Kepler and servers' token
counters (labelled fixtures in tests/fixtures/exporters), the ``metering:`` section, and a ``--url`` campaign's
refusals and degraded points against a stub server and stub exporters on loopback."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydantic import ValidationError
from rich.console import Console

from deploy.config import CampaignFile
from profilers.scrape import found_energy_families, parse_counters, select_sources
from workloads.campaign import run_campaign
from workloads.http_target import HttpTarget, MeteringError, ModelNotServedError
from workloads.spec import CampaignSpec, MeteringSpec

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "exporters"
QUIET = Console(quiet=True)


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# --- parsing -------------------------------------------------------------------------------------------------------
def test_dcgm_counter_in_millijoules_and_power_in_watts() -> None:
    snap = parse_counters(fixture("dcgm_exporter.prom"), origin="h:9400")
    assert found_energy_families(snap) == ["dcgm"]
    energy = snap.energy_families["dcgm"]
    assert energy["gpu-node-1/gpu0"].energy_j == pytest.approx(4_412_345.678)
    assert energy["gpu-node-1/gpu1"].energy_j == pytest.approx(1234.0)
    assert snap.power_families["dcgm"] == {"gpu-node-1/gpu0": 312.5, "gpu-node-1/gpu1": 71.25}
    assert snap.energy == {}  # ours stays ours


def test_kepler_07_node_parts_without_nested_or_platform_and_containers_by_pod() -> None:
    snap = parse_counters(fixture("kepler_0.7.prom"))
    assert found_energy_families(snap) == ["kepler_node", "kepler_container"]
    node = {k: v.energy_j for k, v in snap.energy_families["kepler_node"].items()}
    assert node == {"node-a/kepler-package": pytest.approx(2000.75), "node-a/kepler-dram": 150.0}  # core, platform out
    containers = {k: v.energy_j for k, v in snap.energy_families["kepler_container"].items()}
    assert containers == {"vllm-0/vllm": 730.0, "vllm-0/sidecar": 5.0}  # dynamic + idle


def test_kepler_010_zones_per_socket() -> None:
    snap = parse_counters(fixture("kepler_0.10.prom"))
    node = {k: v.energy_j for k, v in snap.energy_families["kepler_node"].items()}
    assert node == {"node-b/kepler-package-intel-rapl:0": 2000.0, "node-b/kepler-package-intel-rapl:1": 1500.0,
                    "node-b/kepler-dram-intel-rapl:0:2": 300.0}
    assert {k: v.energy_j for k, v in snap.energy_families["kepler_container"].items()} == {"/vllm": 440.0}


def test_servers_token_counters() -> None:
    snap = parse_counters(fixture("servers_tokens.prom"), origin="h:8000")
    assert snap.token_families == {"vllm": {"engine=0,model_name=tiny": 1234.0}, "sglang": {"model_name=qwen": 99.0},
                                   "tgi": {"h:8000": 42.0}}
    assert snap.prompt_token_families["vllm"] == {"engine=0,model_name=tiny": 5678.0}
    assert found_energy_families(snap) == []


def test_select_sources_takes_a_shared_device_once() -> None:
    a = parse_counters(fixture("dcgm_exporter.prom"))
    merged = select_sources([("u1", a), ("u2", a)], [], "dcgm", None)
    assert sorted(merged.energy) == ["gpu-node-1/gpu0", "gpu-node-1/gpu1"]
    assert merged.backends == {"dcgm"} and merged.energy_source == "dcgm: u1, u2" and merged.token_source == ""


# --- the metering: section -----------------------------------------------------------------------------------------
def test_config_hash_of_files_without_metering_is_unchanged() -> None:
    # Hashes computed with the code before metering: existed (commit 389fceb).
    assert CampaignSpec.model_validate({"sweep": {"rate_rps": [1, 2]}}).config_hash() == "b321121c63f09f4e"
    assert CampaignFile.model_validate(
        {"sweep": {"rate_rps": [1, 2]}, "workload": {"duration_s": 5}}).config_hash() == "b5c25ce4e1eb7bb9"
    with_metering = CampaignSpec.model_validate(
        {"sweep": {"rate_rps": [1, 2]}, "metering": {"energy_metrics": ["http://n:9400/metrics"]}})
    assert with_metering.config_hash() != "b321121c63f09f4e"


@pytest.mark.parametrize("metering, problem", [
    ({"energy_metrics": ["n:9400/metrics"]}, "not an http\\(s\\) URL"),
    ({"energy_family": "nvml"}, "energy_family"),
    ({"energy_family": "dcgm"}, "energy_family chooses among energy_metrics"),
    ({"prometheus": "http://p:9090", "energy_metrics": ["http://n:9400/metrics"]}, "prometheus reads energy"),
    ({"energy_query": "x"}, "need prometheus"),
    ({"token_metrics": "http://x/metrics"}, "token_metrics"),
    ({"energy_url": ["http://x/metrics"]}, "energy_url"),
])
def test_metering_is_validated(metering: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        CampaignSpec.model_validate({"sweep": {"rate_rps": [1]}, "metering": metering})


# --- stub servers ----------------------------------------------------------------------------------------------------
class Exporter:
    """A /metrics endpoint whose text is ``page(t)``, t in seconds since its first request (the campaign's check
    before load, moments before the point starts); None answers HTTP 500."""

    def __init__(self, page: Callable[[float], str | None]) -> None:
        self.page = page
        self.t0: float | None = None
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.t0 = outer.t0 if outer.t0 is not None else time.monotonic()
                body = outer.page(time.monotonic() - outer.t0)
                if body is None:
                    self.send_error(500)
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def exporters() -> Iterator[Callable[[Callable[[float], str | None]], Exporter]]:
    made: list[Exporter] = []

    def make(page: Callable[[float], str | None]) -> Exporter:
        made.append(Exporter(page))
        return made[-1]

    yield make
    for e in made:
        e.close()


@pytest.fixture(scope="module")
def stub_url() -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "stub_server.py"), "--model", "stub"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    yield line.split()[-1]
    proc.terminate()
    proc.wait(10)


def ours(energy: float, device: str = "gpu0", node: str = "node-a") -> str:
    return (f'llm_energy_energy_joules_total{{replica="{node}",device="{device}",backend="nvml",'
            f'provenance="measured"}} {energy}\n')


def dcgm(energy_mj: float | None, watts: float = 200.0) -> str:
    labels = 'gpu="0",Hostname="node-a"'
    text = f"DCGM_FI_DEV_POWER_USAGE{{{labels}}} {watts}\n"
    return text + (f"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{labels}}} {energy_mj}\n" if energy_mj is not None else "")


def vllm_tokens(n: float) -> str:
    return f'vllm:generation_tokens_total{{engine="0",model_name="stub"}} {n}\n'


def spec(metering: dict[str, object] | None = None, model: str | None = None, duration_s: float = 2.0) -> CampaignSpec:
    return CampaignSpec.model_validate({
        "model": model, "seed": 1, "metering": metering,
        "workload": {"duration_s": duration_s, "tokenizer": "word", "sample_interval_s": 0.2,
                     "prompt_tokens": {"kind": "fixed", "value": 8}, "output_tokens": {"kind": "fixed", "value": 4}},
        "sweep": {"rate_rps": [5]},
    })


def start(target: HttpTarget, s: CampaignSpec) -> None:
    async def go() -> None:
        try:
            await target.start(s)
        finally:
            await target.stop()

    asyncio.run(go())


def run(s: CampaignSpec, url: str, out: Path) -> dict[str, object]:
    points = run_campaign(s, HttpTarget(url, metering=s.metering), out, QUIET)
    assert len(points) == 1
    return dict(points.iloc[0])


# --- refusals before load --------------------------------------------------------------------------------------------
def test_energy_endpoint_without_known_families_is_refused_with_what_it_has(stub_url: str, exporters) -> None:
    e = exporters(lambda t: "node_cpu_seconds_total{cpu=\"0\"} 5\nprocess_resident_memory_bytes 1e6\n")
    s = spec({"energy_metrics": [e.url]})
    with pytest.raises(MeteringError) as err:
        start(HttpTarget(stub_url, metering=s.metering), s)
    msg = str(err.value)
    assert "none of the energy families" in msg and "node_cpu_seconds" in msg and "process_resident_memory" in msg
    assert "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION" in msg and "kepler_node" in msg and "llm_energy_energy_joules" in msg


def test_two_sources_for_the_same_devices_are_refused_unless_one_is_chosen(stub_url: str, exporters) -> None:
    meter = exporters(lambda t: ours(100 * t))
    gpu = exporters(lambda t: dcgm(1e5 * t))
    s = spec({"energy_metrics": [meter.url, gpu.url]})
    with pytest.raises(MeteringError, match="count them twice: choose one with --energy-family"):
        start(HttpTarget(stub_url, metering=s.metering), s)
    chosen = spec({"energy_metrics": [gpu.url], "energy_family": "dcgm"})
    start(HttpTarget(stub_url, metering=chosen.metering), chosen)
    both_chosen = spec({"energy_metrics": [meter.url, gpu.url], "energy_family": "dcgm"})
    with pytest.raises(MeteringError, match="no dcgm counters"):  # an endpoint left unused is refused, not ignored
        start(HttpTarget(stub_url, metering=both_chosen.metering), both_chosen)


def test_kepler_containers_only_when_asked(stub_url: str, exporters) -> None:
    k = exporters(lambda t: fixture("kepler_0.7.prom"))
    start(HttpTarget(stub_url, metering=MeteringSpec(energy_metrics=[k.url])), spec())  # kepler_node, automatically
    target = HttpTarget(stub_url, metering=MeteringSpec(energy_metrics=[k.url], energy_family="kepler_container"))
    start(target, spec())
    assert target._energy_family == "kepler_container"


def test_model_not_served_lists_the_served_names(stub_url: str) -> None:
    with pytest.raises(ModelNotServedError, match="does not serve the campaign's model 'llama'; it serves: stub"):
        start(HttpTarget(stub_url), spec(model="llama"))


def test_token_endpoint_without_token_counters_is_refused(stub_url: str, exporters) -> None:
    e = exporters(lambda t: ours(t))
    s = spec({"token_metrics": [e.url]})
    with pytest.raises(MeteringError, match=r"no generated-token counter.*llm_energy_energy_joules.*Accepted"):
        start(HttpTarget(stub_url, metering=s.metering), s)


# --- campaigns: where energy and tokens came from, and degraded windows ----------------------------------------------
def test_campaign_with_meter_energy_and_vllm_tokens(stub_url: str, exporters, tmp_path: Path) -> None:
    meter = exporters(lambda t: ours(100 * t) + 'llm_energy_meter_up{replica="node-a"} 1\n')
    tokens = exporters(lambda t: vllm_tokens(round(50 * t)))
    row = run(spec({"energy_metrics": [meter.url], "token_metrics": [tokens.url]}), stub_url, tmp_path)
    assert row["status"] == "ok", row["notes"]
    assert row["energy_j"] == pytest.approx(100 * row["duration_s"], rel=0.1)
    assert row["output_tokens"] == pytest.approx(50 * row["duration_s"], rel=0.15)
    assert row["energy_source"] == f"ours: {meter.url}" and row["token_source"] == f"vllm: {tokens.url}"


def test_without_a_token_endpoint_the_clients_usage_counts_and_says_so(stub_url: str, exporters,
                                                                       tmp_path: Path) -> None:
    meter = exporters(lambda t: ours(100 * t))
    row = run(spec({"energy_metrics": [meter.url]}), stub_url, tmp_path)
    assert row["status"] == "ok", row["notes"]
    assert row["token_source"] == "client usage" and row["output_tokens"] == row["client_output_tokens"] > 0


def test_dcgm_power_without_counter_is_integrated_and_labelled(stub_url: str, exporters, tmp_path: Path) -> None:
    gpu = exporters(lambda t: dcgm(None, watts=200.0))
    row = run(spec({"energy_metrics": [gpu.url]}), stub_url, tmp_path)
    assert row["status"] == "ok", row["notes"]
    assert row["energy_j"] == pytest.approx(200.0 * row["duration_s"], rel=0.15)
    assert "power integrated between scrapes for node-a/gpu0" in row["energy_source"] and row["backend"] == "dcgm"


class Calls:
    """A page by how many times it was fetched (1: the check before load; the point's first scrapes are 2-3, its
    sampler then fetches every 0.2 s, its end scrape last), so a change lands inside the window however slow the
    host: ``page(n)``."""

    def __init__(self, page: Callable[[int], str | None]) -> None:
        self.page, self.n = page, 0

    def __call__(self, t: float) -> str | None:
        self.n += 1
        return self.page(self.n)


@pytest.mark.parametrize("page, reason", [
    (lambda n: ours(100 * n if n < 6 else 1), "dropped (counter reset or device gone)"),
    (lambda n: ours(100 * n if n < 6 else 100 * n - 550), "node-a/gpu0 went backwards inside the point"),
    (lambda n: ours(100 * n) + (ours(50 * n, "gpu1") if n < 6 else ""), "energy of node-a/gpu1 dropped"),
    (lambda n: ours(100 * n) if n < 6 else None, "failed at the window's end"),
    (lambda n: ours(100 * n) + (ours(50 * n, "gpu1") if n >= 6 else ""), "node-a/gpu1 appeared inside the window"),
], ids=["counter-reset", "reset-end-above-start", "series-vanished", "scrape-failed", "series-appeared"])
def test_a_broken_energy_window_is_degraded_with_the_reason(stub_url: str, exporters, tmp_path: Path,
                                                            page: Callable[[int], str | None], reason: str) -> None:
    meter = exporters(Calls(page))
    row = run(spec({"energy_metrics": [meter.url]}), stub_url, tmp_path)
    assert row["status"] == "degraded" and reason in row["notes"], row["notes"]


def test_a_token_counter_reset_is_degraded_and_falls_back_to_the_clients(stub_url: str, exporters,
                                                                         tmp_path: Path) -> None:
    meter = exporters(lambda t: ours(100 * t))
    tokens = exporters(Calls(lambda n: vllm_tokens(1000 + 10 * n if n < 6 else 10 * n)))
    row = run(spec({"energy_metrics": [meter.url], "token_metrics": [tokens.url]}), stub_url, tmp_path)
    assert row["status"] == "degraded" and "went backwards" in row["notes"]
    assert row["token_source"] == "client usage" and row["output_tokens"] == row["client_output_tokens"]


def test_cli_flags_fill_metering_and_refusals_exit_2(stub_url: str, exporters, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from deploy.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(spec().model_dump(mode="json", exclude={"metering"})))
    assert main(["campaign", "run", str(path), "--out", str(tmp_path / "a"), "--url", stub_url,
                 "--energy-metrics", "n:9400/metrics"]) == 2
    assert "metering flags: energy_metrics: Value error, 'n:9400/metrics' is not an http(s) URL" in \
        capsys.readouterr().err
    e = exporters(lambda t: "up 1\n")
    assert main(["campaign", "run", str(path), "--out", str(tmp_path / "b"), "--url", stub_url,
                 "--energy-metrics", e.url]) == 2
    err = capsys.readouterr().err
    assert f"--energy-metrics {e.url} exposes none of the energy families" in err and "it has 1 metric family: up" \
        in err
    meter = exporters(lambda t: ours(100 * t))
    assert main(["campaign", "run", str(path), "--out", str(tmp_path / "c"), "--url", stub_url,
                 "--energy-metrics", meter.url]) == 0
    import pandas as pd

    row = pd.read_csv(tmp_path / "c" / "points.csv").iloc[0]
    assert row["energy_source"] == f"ours: {meter.url}" and row["status"] == "ok"
    import json

    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["metering"]["energy_metrics"] == [meter.url]


def test_energy_series_keeps_the_served_models_devices(stub_url: str, exporters, tmp_path: Path) -> None:
    two = exporters(lambda t: ours(100 * t, "gpu0") + ours(1000 * t, "gpu1"))
    row = run(spec({"energy_metrics": [two.url], "energy_series": "node-a/gpu0"}), stub_url, tmp_path)
    assert row["status"] == "ok" and row["energy_j"] == pytest.approx(100 * row["duration_s"], rel=0.1)
    assert row["energy_source"].endswith("(series node-a/gpu0)")
    s = spec({"energy_metrics": [two.url], "energy_series": "gpu0"})  # must match the whole key
    with pytest.raises(MeteringError, match="matches none of the ours series: node-a/gpu0, node-a/gpu1"):
        start(HttpTarget(stub_url, metering=s.metering), s)
