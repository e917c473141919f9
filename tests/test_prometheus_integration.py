"""A real Prometheus scrapes a running testbed; its energy per token agrees with the campaign's."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pandas as pd
import pytest
from promserver import INSTALL_HINT, PromServer, prometheus_binary
from rich.console import Console

from workloads.arrivals import FixedLength, PoissonArrivals
from workloads.campaign import prepare_out_dir, run_campaign
from workloads.http_target import HttpTarget
from workloads.spec import CampaignSpec, Sweep, WorkloadSpec

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(prometheus_binary() is None, reason=f"no prometheus binary: {INSTALL_HINT}"),
]

# last_over_time: a scrape that timed out on a loaded machine leaves a staleness marker, which a plain
# instant selector would return as "no value"; the range form takes the last good sample.
ENERGY = "sum(last_over_time(llm_energy_energy_joules_total[2s] @ {t}))"
TOKENS = 'sum(last_over_time(llm_energy_tokens_total{{kind="generated"}}[2s] @ {t}))'


def per_token_promql(t0: float, t1: float) -> str:
    """Energy per generated token between two instants, from the device and token counters."""
    e = f"({ENERGY.format(t=f'{t1:.3f}')} - {ENERGY.format(t=f'{t0:.3f}')})"
    n = f"({TOKENS.format(t=f'{t1:.3f}')} - {TOKENS.format(t=f'{t0:.3f}')})"
    return f"{e} / {n}"


@contextmanager
def recording_proxy(upstream: str) -> Iterator[tuple[str, list[float]]]:
    """Relays GETs to ``upstream`` and records the wall time of each, to know when the campaign metered."""
    times: list[float] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            t = time.time()
            resp = httpx.get(upstream, timeout=10.0)
            times.append((t + time.time()) / 2)
            self.send_response(resp.status_code)
            self.send_header("Content-Type", resp.headers.get("content-type", "text/plain"))
            self.end_headers()
            self.wfile.write(resp.content)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics", times
    finally:
        server.shutdown()
        server.server_close()


def test_promql_energy_per_token_matches_the_campaign(served, tmp_path: Path) -> None:  # type: ignore
    host_port = served.url.removeprefix("http://")
    spec = CampaignSpec(
        name="prometheus-check",
        seed=3,
        workload=WorkloadSpec(
            arrival=PoissonArrivals(),
            prompt_tokens=FixedLength(value=256),
            output_tokens=FixedLength(value=48),
            duration_s=6.0,
        ),
        sweep=Sweep(rate_rps=[8.0]),
    )
    out = tmp_path / "run"
    prepare_out_dir(out, spec, resume=False, overwrite=False)
    with PromServer([host_port], interval="100ms") as prom, recording_proxy(f"{served.url}/metrics") as (
        metrics_url, metered_at,
    ):
        prom.wait_for_scrapes(3)
        points = run_campaign(spec, HttpTarget(served.url, metrics_url), out, Console(quiet=True))
        time.sleep(0.5)  # let Prometheus scrape past the campaign's last reading
        # The campaign's energy window runs from its first counter reading to its last (between them its
        # time-series sampler reads too): query Prometheus there. Its samples are up to one scrape interval
        # older than those instants, at both ends alike.
        t0, t1 = metered_at[0], metered_at[-1]
        promql = per_token_promql(t0, t1)
        from_prom = prom.scalar(promql)
        tokens = prom.scalar(f"{TOKENS.format(t=f'{t1:.3f}')} - {TOKENS.format(t=f'{t0:.3f}')}")
    (row,) = points.to_dict("records")
    errors = pd.read_parquet(out / "requests.parquet").query("status != 'ok'")[["status", "error"]]
    assert row["failed"] == 0 and row["completed"] > 10, errors.to_string()
    # The server's token counter against what the client received; Prometheus's last sample before the
    # campaign's final reading can miss the last few tokens (one scrape interval).
    assert tokens == pytest.approx(row["output_tokens"], rel=0.01)
    print(f"PromQL {from_prom:.4f} J/token, campaign {row['energy_per_token_j']:.4f} J/token")
    assert from_prom == pytest.approx(row["energy_per_token_j"], rel=0.02), (promql, from_prom, row)
