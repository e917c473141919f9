"""Benchmarks of the measuring instrument; prints one table.

* attribution closure: an emulated H100 engine runs a quickstart-like and a bursty workload in real
  time; its books (each iteration's energy split among its requests by profilers.attribution.split, idle
  energy apart) are checked against its energy counter: |sum(request) + idle - metered| / metered, and the
  requests' own energies against the engine's attributed total.
* sampler CPU: CPU time of sampling threads at 10 Hz (8 NVML GPUs through the NVML fake, counter and
  integrated-power modes; a RAPL tree with 2 sockets), as % of one core.
* /metrics render time with 64 replicas x 8 devices.

Usage: python bench/profilers_bench.py [--seconds 8] [--sampler-seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prometheus_client import generate_latest

from profilers import nvml, nvml_fake
from profilers.carbon import EmbodiedCarbon
from profilers.exporter import DeviceSample, ExportSnapshot, ReplicaSample, build_registry
from profilers.footprint import load_site_profile
from profilers.nvml import NVMLSource
from profilers.rapl import RaplSource
from profilers.sampler import Sampler
from serving.config import EmulatedEngineConfig
from serving.emulated.engine import EmulatedEngine
from serving.types import GenerationRequest


@dataclass
class Row:
    what: str
    value: str
    target: str


# --- attribution closure ---------------------------------------------------------------------------
def arrivals(kind: str, seconds: float, rng: np.random.Generator) -> list[float]:
    if kind == "quickstart":  # Poisson, 8 req/s
        gaps = rng.exponential(1 / 8.0, int(seconds * 8 * 2))
        return [t for t in np.cumsum(gaps) if t < seconds]
    # bursty: 24 requests at once every 2 s, idle in between
    return [b + i * 1e-3 for b in np.arange(0.0, seconds, 2.0) for i in range(24)]


async def drive(kind: str, seconds: float, seed: int) -> tuple[float, float, int]:
    rng = np.random.default_rng(seed)
    engine = EmulatedEngine(EmulatedEngineConfig(max_model_len=4096, max_num_seqs=16), f"bench-{kind}")
    await engine.start()
    per_request: dict[str, float] = {}

    async def one(i: int, at: float, t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        prompt = int(np.clip(rng.lognormal(np.log(256), 0.6), 8, 2048))
        max_tokens = int(rng.integers(16, 129))
        req = GenerationRequest(f"{kind}-{i}", prompt_token_ids=[1] * prompt, max_tokens=max_tokens)
        async for ev in engine.generate(req):
            if ev.finished:
                per_request[req.request_id] = ev.energy_j or 0.0

    t0 = time.monotonic()
    await asyncio.gather(*(one(i, at, t0) for i, at in enumerate(arrivals(kind, seconds, rng))))
    await asyncio.sleep(0.5)  # some idle at the end, as in a real window
    st, (last,) = engine.stats(), engine.read()
    attributed = st.attributed_prefill_j + st.attributed_decode_j
    books = abs(attributed + st.idle_j - last.energy_j) / last.energy_j
    requests = abs(sum(per_request.values()) - attributed) / attributed
    await engine.stop()
    return books, requests, len(per_request)


def attribution_rows(seconds: float) -> list[Row]:
    rows = []
    for kind in ("quickstart", "bursty"):
        books, requests, n = asyncio.run(drive(kind, seconds, seed=1))
        rows += [
            Row(f"closure, engine books, {kind} ({n} requests)", f"{books:.2e}", "<= 1e-2"),
            Row(f"sum(request) against attributed, {kind}", f"{requests:.2e}", "<= 1e-2"),
        ]
    return rows


# --- sampler overhead ------------------------------------------------------------------------------
def rapl_tree(root: Path) -> Path:
    for zone, name in (("intel-rapl:0", "package-0"), ("intel-rapl:0:0", "dram"),
                       ("intel-rapl:1", "package-1"), ("intel-rapl:1:0", "dram")):
        d = root / zone
        d.mkdir()
        (d / "name").write_text(name + "\n")
        (d / "energy_uj").write_text("1000\n")
        (d / "max_energy_range_uj").write_text("262143328850\n")
    return root


def sampler_rows(seconds: float) -> list[Row]:
    nvml.pynvml = nvml_fake  # type: ignore[assignment]  # no GPU here: the fake has pynvml's call surface
    gpus = [nvml_fake.FakeGPU(power_trace=[(0, 300.0)], has_energy_counter=i < 8) for i in range(16)]
    nvml_fake.configure(gpus)
    counter_src = NVMLSource(indices=range(8))
    integrated_src = NVMLSource(indices=range(8, 16), sample_hz=10)  # its own thread integrates at 10 Hz
    with tempfile.TemporaryDirectory() as tmp:
        rapl_src = RaplSource(rapl_tree(Path(tmp)))
        samplers = {"NVML, 8 GPUs, energy counter": Sampler(counter_src, hz=10).start(),
                    "RAPL, 2 sockets (package + dram)": Sampler(rapl_src, hz=10).start()}
        t0 = time.monotonic()
        time.sleep(seconds)
        wall = time.monotonic() - t0
        for s in samplers.values():
            s.stop()
    integrated = integrated_src.sampler_status()
    integrated_src.close()
    counter_src.close()
    rows = [Row(f"sampler CPU at 10 Hz, {k}", f"{s.status().cpu_s / wall:.3%} of a core", "<= 1%")
            for k, s in samplers.items()]
    assert integrated is not None
    rows.append(Row("sampler CPU at 10 Hz, NVML, 8 GPUs, integrated power",
                    f"{integrated.cpu_s / wall:.3%} of a core", "<= 1%"))
    return rows


# --- /metrics render -------------------------------------------------------------------------------
def render_rows(replicas: int = 64, devices: int = 8, renders: int = 50) -> list[Row]:
    snap = ExportSnapshot(
        [DeviceSample(f"replica-{r}", f"gpu{d}", "nvml", "measured", 1e5 + r * d, 350.0, 1980.0, 0)
         for r in range(replicas) for d in range(devices)],
        [ReplicaSample(f"replica-{r}", "nvml", 10_000, 5_000, 4e4, 5e4, 1e4, 32, 4)
         for r in range(replicas)],
    )
    embodied = EmbodiedCarbon(kg_per_device=150, service_life_years=5)
    registry, latency = build_registry(lambda: snap, load_site_profile("azure"), embodied=embodied)
    for r in range(replicas):
        latency.observe(f"replica-{r}", 0.2, 0.02, 2.0)
    rows = []
    variants = [("ExporterRegistry.render", registry.render, "<= 20 ms"),
                ("generate_latest", lambda: generate_latest(registry), "(reference)")]
    for how, render, target in variants:
        render()
        wall, cpu = [], []
        for _ in range(renders):
            t, c = time.perf_counter(), time.process_time()
            body = render()
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        wall.sort()
        rows += [
            Row(f"/metrics {how}, {replicas}x{devices} devices ({len(body) // 1024} KiB), wall median",
                f"{statistics.median(wall) * 1e3:.1f} ms", target),
            Row(f"/metrics {how}, wall p95", f"{wall[int(0.95 * len(wall)) - 1] * 1e3:.1f} ms", ""),
            Row(f"/metrics {how}, CPU median", f"{statistics.median(cpu) * 1e3:.1f} ms", ""),
        ]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="sending window of each attribution workload")
    ap.add_argument("--sampler-seconds", type=float, default=10.0, help="how long the samplers run")
    args = ap.parse_args(argv)
    rows = attribution_rows(args.seconds) + sampler_rows(args.sampler_seconds) + render_rows()
    width = max(len(r.what) for r in rows)
    print(f"{'measurement':<{width}}  {'value':>20}  target")
    print("-" * (width + 36))
    for r in rows:
        print(f"{r.what:<{width}}  {r.value:>20}  {r.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
