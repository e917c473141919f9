"""Window energy through Prometheus against direct scrapes of the meter (issue #19 part 3); prints one table.

One ``testbed meter`` (in-process, over the NVML fake: one GPU whose power steps between 120 and 650 W every 3.7 s,
so a window's edges fall at different powers) is scraped by real Prometheus servers at several scrape intervals at
once. The bench scrapes the meter itself at the window edges (exact: every scrape reads the counter afresh) and
reads each window through each Prometheus with ``profilers.promread.increase`` (what ``campaign run --prometheus``
uses), reporting the relative difference and the uncertainty the campaign would report (mean power x interval).
Target: within 2% for windows >= 20 s.

Usage: python bench/meter_prometheus_bench.py [--intervals 1s,5s,15s] [--edges 0,20,40,60]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from promserver import PromServer

from profilers import nvml, nvml_fake
from profilers.node_meter import NodeMeter, choose_source, meter_registry, serve_metrics
from profilers.promread import _duration_s, increase
from profilers.scrape import parse_counters


def power_trace(seconds: float) -> list[tuple[float, float]]:
    points, t, high = [], 0.0, False
    while t < seconds:
        w = 650.0 if high else 120.0
        points += [(t, w), (t + 3.69, w)]
        t += 3.7
        high = not high
    return points


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--intervals", default="1s,5s,15s")
    ap.add_argument("--edges", default="0,20,40,60", help="seconds after the start at which windows begin/end")
    a = ap.parse_args()
    edges = [float(x) for x in a.edges.split(",")]
    intervals = a.intervals.split(",")
    nvml.pynvml = nvml_fake  # type: ignore[assignment]
    nvml_fake.configure([nvml_fake.FakeGPU(power_trace=power_trace(edges[-1] + 120))])
    source, text = choose_source(gpus=None)
    meter = NodeMeter(source, node="bench", description=text)
    server = serve_metrics(meter_registry(meter), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host = f"127.0.0.1:{server.server_address[1]}"
    url = f"http://{host}/metrics"
    proms = [PromServer([host], interval=i).start() for i in intervals]
    try:
        for p in proms:
            p.wait_for_scrapes(2, timeout_s=60)
        time.sleep(max(_duration_s(i) for i in intervals))  # a sample before the first edge in every Prometheus
        start = time.monotonic()
        direct: list[tuple[float, float]] = []  # (wall time, joules)
        for e in edges:
            time.sleep(max(0.0, start + e - time.monotonic()))
            t = time.time()
            direct.append((t, parse_counters(httpx.get(url).text).energy["bench/gpu0"].energy_j))
        time.sleep(max(_duration_s(i) for i in intervals) + 0.5)  # the sample after the last edge
        windows = [(i, j) for i in range(len(edges)) for j in range(i + 1, len(edges))]

        async def read() -> list[tuple[str, float, float, float, float]]:
            rows = []
            async with httpx.AsyncClient() as client:
                for interval, p in zip(intervals, proms, strict=True):
                    for i, j in windows:
                        (t0, e0), (t1, e1) = direct[i], direct[j]
                        inc = await increase(client, p.url, "llm_energy_energy_joules_total", t0, t1,
                                             _duration_s(interval))
                        unc = inc.total / (t1 - t0) * _duration_s(interval)
                        rows.append((interval, t1 - t0, e1 - e0, inc.total, unc))
            return rows

        rows = asyncio.run(read())
    finally:
        for p in proms:
            p.stop()
        server.shutdown()
        meter.stop()
    print("window energy: Prometheus (the counter interpolated between its samples at the window's edges) vs direct "
          "scrapes of the meter; 1 fake GPU stepping 120/650 W every 3.7 s")
    print(f"{'scrape':>7} {'window s':>9} {'direct J':>10} {'prometheus J':>13} {'diff %':>8} {'reported +/- J':>15}")
    for interval, w, d, p, u in rows:
        print(f"{interval:>7} {w:>9.1f} {d:>10.1f} {p:>13.1f} {(p - d) / d * 100:>8.2f} {u:>15.1f}")
    print("target: |diff| <= 2% for windows >= 20 s")


if __name__ == "__main__":
    main()
