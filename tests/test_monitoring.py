"""The local monitoring stack: a real Prometheus (Debian package) scraping a real testbed deployment.

Every dashboard query is run against it; queries on metrics the controller does not export yet are listed
in EXPECTED_EMPTY and must stay empty (when they start returning data, move them out of the list).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from deploy.cli import main
from deploy.dashboards import iter_queries, substitute
from deploy.monitoring import (
    LocalPrometheus,
    MonitorError,
    grafana_provisioning,
    monitor_down,
    monitor_up,
    prometheus_config,
    read_state,
    scrape_target,
)
from profilers.footprint import load_site_profile

# (dashboard uid, panel title, query refId) with no data in the live run: the emulated engine has no prefix cache,
# and the run does not speculate (the shares have no series while their denominators stand still).
EXPECTED_EMPTY: set[tuple[str, str, str]] = {
    ("llm-energy-replica", "Prefix-cache hits and accepted draft tokens", "A"),
    ("llm-energy-replica", "Prefix-cache hits and accepted draft tokens", "B"),
}


def _need_prometheus() -> None:
    if not shutil.which("prometheus"):
        pytest.skip("prometheus is not installed: apt-get install --no-install-recommends prometheus")


def test_scrape_target_accepts_urls_and_metrics_urls() -> None:
    assert scrape_target("http://127.0.0.1:8000") == ("http", "127.0.0.1:8000", "/metrics")
    assert scrape_target("127.0.0.1:8000/metrics") == ("http", "127.0.0.1:8000", "/metrics")
    assert scrape_target("https://gw.example/testbed/") == ("https", "gw.example:443", "/testbed/metrics")
    with pytest.raises(MonitorError, match="give the testbed URL"):
        scrape_target("ftp://x")


def test_missing_prometheus_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no prometheus anywhere
    code = main(["monitor", "up", "--url", "http://127.0.0.1:1", "--state-dir", str(tmp_path / "state")])
    err = capsys.readouterr().err
    assert code == 1
    assert (
        "Prometheus is not installed" in err and "apt-get install --no-install-recommends prometheus" in err
    )
    assert read_state(tmp_path / "state") is None
    # Nothing else depends on it.
    assert main(["dashboards", "export", str(tmp_path / "dash")]) == 0
    code = main(["monitor", "up", "--url", "http://x:1", "--prometheus-bin", str(tmp_path / "nope")])
    assert code == 1 and "is not an executable Prometheus binary" in capsys.readouterr().err


def test_down_without_up_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["monitor", "down", "--state-dir", str(tmp_path)]) == 1
    assert "nothing was started with `testbed monitor up` there" in capsys.readouterr().err


@pytest.mark.slow
def test_monitor_up_and_down_by_pid(tmp_path: Path) -> None:
    _need_prometheus()
    state_dir = tmp_path / "state"
    state = monitor_up(["http://127.0.0.1:9/"], state_dir, port=0, scrape_interval="1s")
    try:
        assert httpx.get(f"{state.url}/-/ready", timeout=5).status_code == 200
        config = yaml.safe_load(state.config_path.read_text())
        assert [j["job_name"] for j in config["scrape_configs"]] == ["testbed", "ray"]
        with pytest.raises(MonitorError, match="already runs"):
            monitor_up(["http://127.0.0.1:9/"], state_dir, port=0)
    finally:
        stopped = monitor_down(state_dir)
    assert stopped.pid == state.pid
    assert (
        not Path(f"/proc/{state.pid}").exists()
        or b"prometheus" not in Path(f"/proc/{state.pid}/cmdline").read_bytes()
    )
    assert read_state(state_dir) is None


def test_grafana_provisioning_files(tmp_path: Path) -> None:
    written = grafana_provisioning(tmp_path, "http://127.0.0.1:9090", tmp_path / "dashboards")
    ds = yaml.safe_load((tmp_path / "provisioning" / "datasources" / "testbed.yaml").read_text())
    assert (
        ds["datasources"][0]["url"] == "http://127.0.0.1:9090"
        and ds["datasources"][0]["type"] == "prometheus"
    )
    prov = yaml.safe_load((tmp_path / "provisioning" / "dashboards" / "testbed.yaml").read_text())
    assert Path(prov["providers"][0]["options"]["path"]) == (tmp_path / "dashboards").resolve()
    assert len([p for p in written if p.suffix == ".json"]) == 4


def _drive_load(url: str, stop: threading.Event, counter: list[int]) -> None:
    """Closed-loop load from 4 threads (streaming and not) until ``stop``; counts completed requests."""

    def worker(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                body = {
                    "model": "llama-3.1-8b",
                    "prompt": "energy " * (20 + i),
                    "max_tokens": 24,
                    "ignore_eos": True,
                }
                if i % 2:
                    with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                        r.raise_for_status()
                        for _ in r.iter_lines():
                            pass
                else:
                    c.post("/v1/completions", json=body).raise_for_status()
                counter[0] += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(4)]
    for th in threads:
        th.start()
    stop.wait()
    for th in threads:
        th.join(timeout=60)


@dataclass
class LiveRun:
    prom: LocalPrometheus
    completed: Callable[[], int]


@pytest.fixture(scope="module")
def live(served) -> Iterator[LiveRun]:  # type: ignore[no-untyped-def]
    """Prometheus scraping the served deployment every second while 4 clients keep it busy."""
    _need_prometheus()
    config = prometheus_config([served.url], scrape_interval="1s")
    with LocalPrometheus(config) as prom:
        stop = threading.Event()
        counter = [0]
        loader = threading.Thread(target=_drive_load, args=(served.url, stop, counter), daemon=True)
        loader.start()
        try:
            deadline = time.monotonic() + 120
            ready = (
                "sum(rate(llm_energy_request_ttft_seconds_count[30s])) > 0"
                " and on() sum(rate(llm_energy_energy_joules_total[30s])) > 0"
            )
            while time.monotonic() < deadline and not (prom.query(ready) and _enough_samples(prom)):
                time.sleep(1)
            assert prom.query(ready), "Prometheus saw no requests within 120 s"
            yield LiveRun(prom, lambda: counter[0])
        finally:
            stop.set()
            loader.join(timeout=90)


@pytest.mark.slow
def test_every_dashboard_query_returns_data_from_a_real_run(live: LiveRun) -> None:
    outcomes = {}
    at = time.time() - 1.0  # one evaluation time for all queries, so their figures agree
    for d, panel, query in iter_queries():
        refid = chr(ord("A") + panel.queries.index(query))
        series = live.prom.query(substitute(query.expr, rate_interval="30s", range_="5m"), at=at)
        outcomes[(d.uid, panel.title, refid)] = [float(s["value"][1]) for s in series]
    assert live.completed() > 0
    empty = {k for k, v in outcomes.items() if not v}
    assert empty == EXPECTED_EMPTY, (
        f"unexpectedly empty: {empty - EXPECTED_EMPTY}; now with data: {EXPECTED_EMPTY - empty}"
    )
    for key, values in outcomes.items():
        if values:
            assert any(math.isfinite(v) for v in values), f"{key}: only NaN/Inf {values}"
    # Spot-check the meaning of a few figures against the run.
    energy_per_token = outcomes[("llm-energy-overview", "Energy per generated token", "A")][0]
    assert 0 < energy_per_token < 100, energy_per_token
    assert max(outcomes[("llm-energy-overview", "Power", "A")]) > 0
    assert max(outcomes[("llm-energy-overview", "Clock", "A")]) > 100
    # Water and carbon per token are the energy per token through the site profile (azure: the default).
    site = load_site_profile("azure")
    kwh = energy_per_token / 3.6e6
    water_ml = outcomes[("llm-energy-overview", "Water per generated token", "A")][0]
    carbon_g = outcomes[("llm-energy-overview", "Carbon per generated token", "A")][0]
    assert water_ml == pytest.approx(
        kwh * (site.wue_site_l_per_kwh + site.pue * site.wue_source_l_per_kwh) * 1e3, rel=1e-6
    )
    assert carbon_g == pytest.approx(kwh * site.pue * site.cif_kg_per_kwh * 1e3, rel=1e-6)


def _enough_samples(prom: LocalPrometheus) -> bool:
    """At least 20 s of scrapes, so every 30 s rate window has several points."""
    got = prom.query("count_over_time(llm_energy_power_watts[30s])")
    return bool(got) and min(float(s["value"][1]) for s in got) >= 20


def test_environment_does_not_leak_a_prometheus(tmp_path: Path) -> None:
    """LocalPrometheus as a context manager removes its temporary TSDB."""
    _need_prometheus()
    with LocalPrometheus(prometheus_config(["http://127.0.0.1:9"], "1s")) as prom:
        workdir = prom.workdir
        assert (workdir / "prometheus.yml").exists()
        pid = prom.proc.pid if prom.proc else -1
    assert not workdir.exists()
    assert not os.path.exists(f"/proc/{pid}") or prom.proc is None or prom.proc.returncode is not None


def _screenshot(url: str, out: Path, profile: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium is not installed: apt-get install --no-install-recommends chromium")
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=8000",
        f"--screenshot={out}",
        "--window-size=1400,900",
        url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.exists(), proc.stderr[-2000:]


def _coloured_pixels(png: Path) -> int:
    """Pixels of a clearly saturated colour: series lines and legend swatches (the UI is grey and blue)."""
    import matplotlib.image as mpimg
    import numpy as np

    rgb = mpimg.imread(png)[..., :3]
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    red_or_green = (rgb[..., 0] > rgb[..., 2] + 0.2) | (
        rgb[..., 1] > rgb[..., 2] + 0.2
    )  # not the blue buttons
    return int(np.count_nonzero((hi - lo > 0.35) & red_or_green))


@pytest.mark.slow
def test_prometheus_graph_of_energy_per_token_during_a_run(live: LiveRun, tmp_path: Path) -> None:
    """Headless Chromium screenshots Prometheus' graph of energy per token while the load runs; an empty
    query's graph is the baseline, so the series must add drawn pixels."""
    graph = f"{live.prom.url}/graph?g0.tab=0&g0.range_input=1m&g0.expr="
    with_data, without = tmp_path / "energy_per_token.png", tmp_path / "empty.png"
    _screenshot(graph + "llm_energy_energy_per_token_joules", with_data, tmp_path / "profile-a")
    _screenshot(graph + "llm_energy_no_such_metric", without, tmp_path / "profile-b")
    drawn, baseline = _coloured_pixels(with_data), _coloured_pixels(without)
    assert drawn > baseline + 100, (
        f"no series drawn: {drawn} coloured pixels vs {baseline} for an empty graph"
    )
    if keep := os.environ.get("TESTBED_SCREENSHOT_DIR"):
        shutil.copy(with_data, Path(keep) / with_data.name)


def test_monitor_up_refuses_a_busy_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(MonitorError, match=f"127.0.0.1:{port} is in use; choose another --port"):
            monitor_up(["http://127.0.0.1:9"], tmp_path, port=port)
    assert read_state(tmp_path) is None


def test_invalid_generated_config_is_reported_before_starting(tmp_path: Path) -> None:
    _need_prometheus()
    config = prometheus_config(["http://127.0.0.1:9"], scrape_interval="often")
    with pytest.raises(MonitorError, match="generated Prometheus config is invalid"):
        LocalPrometheus(config, workdir=tmp_path).start()


def test_prometheus_that_exits_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    _need_prometheus()
    import socket

    with socket.socket() as s:  # Prometheus cannot listen on a port already taken
        s.bind(("127.0.0.1", 0))
        s.listen()
        prom = LocalPrometheus(prometheus_config(["http://127.0.0.1:9"], "1s"), port=s.getsockname()[1])
        with pytest.raises(MonitorError, match="Prometheus exited with status") as err:
            prom.start()
    assert "address already in use" in str(err.value)
    prom.stop()
