"""Fleet-scale virtual time: how fast a campaign of many emulated replicas runs on this machine.

The shipped Azure conversation trace, time-scaled to the rate, served by N emulated H100 replicas (Llama-3.1-8B
shape) for a 600 s point, through the whole campaign path (VirtualTarget, campaign_loop, ResultStore):

    python bench/fleet_bench.py                       # 32 replicas @ 80 req/s and 256 @ 640 req/s, 600 s
    python bench/fleet_bench.py --only 32 --profile   # + cProfile of the run, top functions by own time
    python bench/fleet_bench.py --sweep 2             # 8 virtual points: serial, then as Ray tasks on 2 workers
    python bench/fleet_bench.py --memory 600 1200 2400   # peak RSS of one point against its window (seconds)

The shipped trace holds 19,366 requests over about an hour (5.53 req/s): time-scaled to 80 req/s it spans ~242 s
of the 600 s point, to 640 req/s ~30 s. A point ends when its last request completes, so the simulated span
(``simulated s``, ~246 s and ~36 s) is shorter than the window: ``x real time`` is simulated seconds per wall
second, ``x window`` the 600 s window per wall second (the issue's figure: 36 s of wall was "17x").
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import tempfile
import time
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

CASES = {32: 80.0, 256: 640.0}


def fleet_campaign(replicas: int, rate: float, duration_s: float = 600.0):  # type: ignore[no-untyped-def]
    from deploy.config import CampaignFile

    return CampaignFile.model_validate({
        "name": f"fleet-{replicas}", "seed": 0, "site": "azure", "clock": "virtual",
        "deployment": {
            "controller": {"slo": {"ttft_s": 2.0, "tpot_s": 0.1}},
            "replicas": replicas,
            "engine": {"kind": "emulated", "device": "h100_sxm", "model": "llama-3.1-8b", "max_model_len": 16384},
        },
        "workload": {"arrival": {"kind": "trace", "path": "azure_conv_2023"}, "duration_s": duration_s,
                     "sample_interval_s": 10},
        "slo": {"ttft_s": 2.0, "tpot_s": 0.1},
        "sweep": {"rate_rps": [rate]},
    })


def run_once(replicas: int, rate: float, duration_s: float, profile: bool, sort: str = "tottime") -> dict[str, object]:
    from deploy.compare import device_floor
    from deploy.virtual import VirtualTarget
    from workloads.campaign import prepare_out_dir, run_campaign

    spec = fleet_campaign(replicas, rate, duration_s)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        prepare_out_dir(out, spec, resume=False, overwrite=True)
        prof = cProfile.Profile() if profile else None
        t0, c0 = time.perf_counter(), time.process_time()
        if prof:
            prof.enable()
        target = VirtualTarget(spec.deployment, latency=spec.virtual)
        points = run_campaign(spec, target, out, Console(file=io.StringIO()), run=target.clock.execute,
                              floor=device_floor(spec.deployment))
        if prof:
            prof.disable()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        simulated = target.clock.now()
    if prof:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(sort).print_stats(30)
        print(s.getvalue())
    row = points.iloc[0]
    return {"replicas": replicas, "req/s": rate, "window s": duration_s, "simulated s": simulated, "wall s": wall,
            "CPU s": cpu, "x real time": simulated / wall, "x window": duration_s / wall,
            "requests": int(row["requests"]), "requests ok": int(row["completed"]),
            "J/token": float(row["energy_per_token_j"])}


def print_table(frame: pd.DataFrame, title: str) -> None:
    """One bench table: a column per field, floats to four significant figures."""
    t = Table(title=title)
    for c in frame.columns:
        t.add_column(str(c), justify="right")
    for _, r in frame.iterrows():
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r])
    Console(width=200).print(t)


def _ray_workers() -> dict[int, float]:
    """CPU seconds so far of every Ray worker process on this machine, by pid."""
    import psutil

    cpu = {}
    for proc in psutil.process_iter(["cmdline", "cpu_times"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "default_worker.py" in cmd or cmd.startswith("ray::"):
            t = proc.info["cpu_times"]
            cpu[proc.pid] = t.user + t.system
    return cpu


def sweep(workers: int) -> None:
    """8 points (16 replicas, the trace at 20 and 40 req/s, 4 clocks, 240 s each) serial in this process, then as
    Ray tasks on ``workers`` local workers: wall times, and whether points.csv agrees (sim_speed_x aside).

    Wall time on a shared machine says how busy it was as much as how fast the sweep is, so the CPU seconds are
    printed too: the serial run's (this process), and the Ray run's by process, of which the busiest worker's
    (started, imported, simulated its points, streamed their rows) is what the wall time tends to on a machine with
    a core per worker and the writer's share to spare."""
    import ray

    from deploy.raycluster import init_ray
    from deploy.virtual import run_virtual_campaign

    base = fleet_campaign(16, 20.0, 240.0)
    data = base.model_dump()
    data["sweep"] = {"rate_rps": [20.0, 40.0], "knobs": [{"clock_mhz": c} for c in (1980, 1560, 1260, 960)]}
    spec = type(base).model_validate(data)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        quiet = Console(file=io.StringIO())
        t0, c0 = time.perf_counter(), time.process_time()
        serial = run_virtual_campaign(spec, spec.deployment, Path(tmp) / "serial", quiet)
        cpu = time.process_time() - c0
        rows.append({"run": "serial, in process", "points": len(serial), "wall s": time.perf_counter() - t0,
                     "CPU s": cpu, "busiest process CPU s": cpu, "driver CPU s": cpu})
        init_ray(num_cpus=workers)
        on_ray = spec.model_copy(update={"workers": workers})
        before = _ray_workers()
        t0, c0 = time.perf_counter(), time.process_time()
        parallel = run_virtual_campaign(on_ray, on_ray.deployment, Path(tmp) / "ray", quiet)
        wall, driver = time.perf_counter() - t0, time.process_time() - c0
        used = {pid: c - before.get(pid, 0.0) for pid, c in _ray_workers().items()}
        rows.append({"run": f"Ray tasks, {workers} local workers", "points": len(parallel), "wall s": wall,
                     "CPU s": driver + sum(used.values()), "busiest process CPU s": max(used.values()),
                     "driver CPU s": driver})
        ray.shutdown()
        same = serial.drop(columns="sim_speed_x").equals(parallel.drop(columns="sim_speed_x"))
    frame = pd.DataFrame(rows)
    frame["x serial"] = frame["wall s"] / frame["wall s"].iloc[0]
    frame["x serial, busiest CPU"] = frame["busiest process CPU s"] / frame["CPU s"].iloc[0]
    print_table(frame, f"8 virtual points, serial vs Ray ({workers} workers); points.csv identical: {same}")
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")


MEMORY_RUN = """
import resource, sys, time
from deploy.cli import main
t0 = time.perf_counter()
rc = main(["campaign", "run", sys.argv[1], "--out", sys.argv[2], "--overwrite"])
print("RESULT", rc, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - t0)
"""


def memory(windows: list[float], rate: float, code_root: Path) -> None:
    """Peak RSS of a virtual campaign of one point against the point's window: Poisson arrivals at ``rate`` on 8
    emulated H100 replicas (below saturation, so the requests in flight do not pile up), 128 prompt and 512 output
    tokens, each window in a fresh process running ``testbed campaign run``
    from ``code_root`` (another checkout: the figures before a change)."""
    import subprocess
    import sys

    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import yaml

    rows = []
    for window in windows:
        with tempfile.TemporaryDirectory() as tmp:
            campaign = Path(tmp) / "c.yaml"
            campaign.write_text(yaml.safe_dump({
                "name": "memory", "seed": 0, "site": "azure", "clock": "virtual",
                "deployment": {"replicas": 8, "engine": {"kind": "emulated", "device": "h100_sxm",
                                                          "model": "llama-3.1-8b", "max_model_len": 4096}},
                "workload": {"arrival": {"kind": "poisson"}, "duration_s": window, "sample_interval_s": 10,
                             "prompt_tokens": {"kind": "fixed", "value": 128},
                             "output_tokens": {"kind": "fixed", "value": 512}},
                "sweep": {"rate_rps": [rate]},
            }))
            proc = subprocess.run([sys.executable, "-c", MEMORY_RUN, str(campaign), str(Path(tmp) / "out")],
                                  capture_output=True, text=True, cwd=code_root,
                                  env={**os.environ, "PYTHONPATH": str(code_root)})
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
            if proc.returncode or line is None:
                raise SystemExit(f"window {window:g} s failed:\n{proc.stderr[-3000:]}")
            _, _, rss_kib, wall = line.split()
            tokens = pq.read_table(Path(tmp) / "out" / "requests.parquet", columns=["output_tokens"])["output_tokens"]
            rows.append({"window s": window, "requests": len(tokens),
                         "inter-token latencies": int(pc.sum(pc.subtract(tokens, 1)).as_py()),
                         "peak RSS MiB": int(rss_kib) / 1024, "wall s": float(wall)})
    frame = pd.DataFrame(rows)
    print_table(frame, f"Peak RSS of one virtual point at {rate:g} req/s against its window ({code_root})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", type=int, choices=sorted(CASES), help="one case: its replica count")
    p.add_argument("--duration", type=float, default=600.0, help="simulated seconds per point")
    p.add_argument("--profile", action="store_true", help="cProfile the run(s) (slower) and print the top")
    p.add_argument("--sweep", type=int, metavar="WORKERS", help="serial vs Ray sweep of 8 points instead")
    p.add_argument("--memory", type=float, nargs="+", metavar="WINDOW_S",
                   help="peak RSS of one point per window length (seconds) instead")
    p.add_argument("--rate", type=float, default=20.0, help="--memory: the point's rate (req/s)")
    p.add_argument("--code-root", type=Path, default=Path(__file__).resolve().parents[1],
                   help="--memory: the checkout whose testbed runs the points (default: this one)")
    args = p.parse_args()
    if args.memory:
        memory(args.memory, args.rate, args.code_root)
        return
    if args.sweep:
        sweep(args.sweep)
        return
    rows = [run_once(n, CASES[n], args.duration, args.profile) for n in ([args.only] if args.only else CASES)]
    frame = pd.DataFrame(rows)
    print_table(frame, "Fleet-scale virtual time: Azure conv trace, time-scaled, emulated H100 x Llama-3.1-8B")


if __name__ == "__main__":
    main()
