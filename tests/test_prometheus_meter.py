"""``campaign run --prometheus``: a real Prometheus scrapes a ``testbed meter`` (over the NVML fake); the window's
energy read through it matches the meter's exact counter, with the scrape interval's uncertainty reported."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from promserver import INSTALL_HINT, PromServer, prometheus_binary
from test_energy_sources import Exporter, run, spec, stub_url, vllm_tokens  # noqa: F401 (the stub server fixture)

from profilers import nvml, nvml_fake
from profilers.node_meter import NodeMeter, choose_source, meter_registry, serve_metrics
from profilers.nvml_fake import FakeGPU
from profilers.promread import _duration_s, increase
from profilers.scrape import parse_counters
from workloads.http_target import HttpTarget, MeteringError

pytestmark = pytest.mark.skipif(prometheus_binary() is None, reason=f"no prometheus binary: {INSTALL_HINT}")
WATTS = 300.0


@pytest.fixture
def meter_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(nvml, "pynvml", nvml_fake)
    nvml_fake.configure([FakeGPU(power_trace=[(0, WATTS)])])
    source, text = choose_source(gpus=None)
    meter = NodeMeter(source, node="n", description=text)
    server = serve_metrics(meter_registry(meter), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()
    server.server_close()
    meter.stop()
    nvml_fake.reset()


@pytest.fixture
def prom(meter_url: str) -> Iterator[PromServer]:
    host = meter_url.split("/")[2]
    with PromServer([host], interval="200ms") as p:
        p.wait_for_scrapes(3)
        yield p


def test_durations() -> None:
    assert _duration_s("15s") == 15 and _duration_s("100ms") == 0.1 and _duration_s("1m30s") == 90


def test_window_increase_matches_the_meter(prom: PromServer, meter_url: str) -> None:
    t0 = time.time()
    direct0 = parse_counters(httpx.get(meter_url).text).energy["n/gpu0"].energy_j
    time.sleep(3.0)
    t1 = time.time()
    direct1 = parse_counters(httpx.get(meter_url).text).energy["n/gpu0"].energy_j
    time.sleep(0.3)

    async def read() -> float:
        async with httpx.AsyncClient() as client:
            inc = await increase(client, prom.url, "llm_energy_energy_joules_total", t0, t1)
        assert list(inc.per_series) == ["n/gpu0"] and inc.provenance == {"n/gpu0": "measured"}
        return inc.total

    assert asyncio.run(read()) == pytest.approx(direct1 - direct0, rel=0.02)


def test_campaign_through_prometheus_reports_the_uncertainty(prom: PromServer, stub_url: str,  # noqa: F811
                                                             tmp_path: Path) -> None:
    row = run(spec({"prometheus": prom.url}, duration_s=3.0), stub_url, tmp_path)
    assert row["status"] == "ok", row["notes"]
    assert row["energy_j"] == pytest.approx(WATTS * row["duration_s"], rel=0.05)
    assert row["energy_uncertainty_j"] == pytest.approx(WATTS * 0.2, rel=0.1)
    assert row["energy_source"].startswith(f"prometheus: {prom.url} increase(llm_energy_energy_joules_total)")
    assert "scrape interval 0.2 s" in row["energy_source"]
    assert row["token_source"] == "client usage"  # the meter exports no token counter


def test_a_query_with_no_series_is_refused_before_load(prom: PromServer, stub_url: str) -> None:  # noqa: F811
    s = spec({"prometheus": prom.url, "energy_query": "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION / 1000"})

    async def go() -> None:
        target = HttpTarget(stub_url, metering=s.metering)
        try:
            await target.start(s)
        finally:
            await target.stop()

    with pytest.raises(MeteringError, match="no series for the energy query"):
        asyncio.run(go())


def test_tokens_through_prometheus_from_a_vllm_counter(meter_url: str, stub_url: str,  # noqa: F811
                                                        tmp_path: Path) -> None:
    tokens = Exporter(lambda t: vllm_tokens(round(40 * t)))  # 40 tokens/s
    try:
        with PromServer([meter_url.split("/")[2], tokens.url.split("/")[2]], interval="200ms") as p:
            p.wait_for_scrapes(3)
            row = run(spec({"prometheus": p.url, "token_query": "vllm:generation_tokens_total"}, duration_s=3.0),
                      stub_url, tmp_path)
    finally:
        tokens.close()
    assert row["status"] == "ok", row["notes"]
    assert row["token_source"] == f"prometheus: {p.url} vllm:generation_tokens_total"
    assert row["output_tokens"] == pytest.approx(40 * row["duration_s"], rel=0.1)
