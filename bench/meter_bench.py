"""Bench of ``testbed meter`` (issue #19); prints one table.

* scrape: ``GET /metrics`` over loopback of a meter with 8 GPUs (the NVML fake; every scrape reads the devices
  afresh), median and p99 of ``--scrapes`` scrapes, client-side wall time. Target: <= 10 ms.
* CPU: the meter process's own CPU time (``/proc/<pid>/stat``) over ``--seconds`` at the default sampling
  (one background read per second) with a Prometheus-like scrape every 15 s, as % of one core. Target: <= 1%.
  Two meters: 8 fake GPUs, and the CPU power model of pid 1's tree (every process of the machine).

Usage: python bench/meter_bench.py [--seconds 30] [--scrapes 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from profilers.cpu_model import process_cpu_seconds

REPO = Path(__file__).resolve().parents[1]
FAKE_METER = """
import sys
from profilers import nvml, nvml_fake
nvml.pynvml = nvml_fake
nvml_fake.configure([nvml_fake.FakeGPU(power_trace=[(0, 100.0 + i)]) for i in range(8)])
from deploy.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_meter(kind: str, ready: Path) -> subprocess.Popen[bytes]:
    args = ["meter", "--port", "0", "--ready-file", str(ready), "--node", f"bench-{kind}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if kind == "nvml-fake-8":
        cmd = [sys.executable, "-c", FAKE_METER, *args]
    else:
        cmd = [sys.executable, "-m", "deploy.cli", *args, "--sources", "rapl", "--pid", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"meter {kind} did not start")
        time.sleep(0.05)
    return proc


def render_ms(n: int = 500) -> tuple[float, float]:
    """In this process: the meter's own work per scrape (read 8 fake GPUs afresh + write the text), p50 and p99."""
    from profilers import nvml, nvml_fake
    from profilers.node_meter import NodeMeter, choose_source, meter_registry

    nvml.pynvml = nvml_fake  # type: ignore[assignment]
    nvml_fake.configure([nvml_fake.FakeGPU(power_trace=[(0, 100.0 + i)]) for i in range(8)])
    source, _ = choose_source(gpus=None)
    meter = NodeMeter(source, node="bench")
    registry = meter_registry(meter)
    times = []
    for _ in range(n):
        time.sleep(0.06)  # past the 50 ms within which a scrape reuses the last read
        t = time.perf_counter()
        registry.render()
        times.append((time.perf_counter() - t) * 1000)
    meter.stop()
    times.sort()
    return statistics.median(times), times[int(0.99 * (n - 1))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--scrapes", type=int, default=200)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("nvml-fake-8", "cpu-model-pid1"):
            ready = Path(tmp) / kind
            proc = start_meter(kind, ready)
            try:
                url = ready.read_text().strip()
                with httpx.Client() as client:
                    client.get(url)
                    times = []
                    for _ in range(a.scrapes):
                        t = time.perf_counter()
                        resp = client.get(url)
                        times.append((time.perf_counter() - t) * 1000)
                        assert resp.status_code == 200
                    times.sort()
                    time.sleep(2.0)  # let the scrapes' own CPU settle out of the idle measurement
                    cpu0, t0 = process_cpu_seconds(proc.pid), time.monotonic()
                    next_scrape = t0 + 15.0
                    while time.monotonic() - t0 < a.seconds:
                        time.sleep(min(0.5, max(0.0, next_scrape - time.monotonic())))
                        if time.monotonic() >= next_scrape:
                            client.get(url)
                            next_scrape += 15.0
                    cpu = (process_cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0) * 100
                rows.append((kind, statistics.median(times), times[int(0.99 * (len(times) - 1))], cpu))
            finally:
                proc.terminate()
                proc.wait(10)
    print(f"meter bench: {a.scrapes} scrapes, CPU over {a.seconds:g} s at 1 read/s + 1 scrape/15 s, "
          f"{os.cpu_count()} CPUs")
    print(f"{'meter':<16} {'scrape p50 ms':>14} {'scrape p99 ms':>14} {'CPU % of a core':>16}")
    for kind, p50, p99, cpu in rows:
        print(f"{kind:<16} {p50:>14.2f} {p99:>14.2f} {cpu:>16.2f}")
    p50, p99 = render_ms(200)
    print(f"{'in-process read+render, 8 fake GPUs':<38} p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    print("targets: scrape with 8 devices <= 10 ms; CPU <= 1% of a core")


if __name__ == "__main__":
    main()
