"""Fleet-scale virtual time: how fast a campaign of many emulated replicas runs on this machine.

The shipped Azure conversation trace, time-scaled to the rate, served by N emulated H100 replicas (Llama-3.1-8B
shape) for a 600 s point, through the whole campaign path (VirtualTarget, campaign_loop, ResultStore):

    python bench/fleet_bench.py                       # 32 replicas @ 80 req/s and 256 @ 640 req/s, 600 s
    python bench/fleet_bench.py --only 32 --profile   # + cProfile of the run, top functions by own time
    python bench/fleet_bench.py --sweep 2             # 8 virtual points: serial, then as Ray tasks on 2 workers

The shipped trace holds 19,366 requests over about an hour (5.53 req/s): time-scaled to 80 req/s it spans ~242 s
of the 600 s point, to 640 req/s ~30 s; the simulated span is the whole point (the engines idle after the burst).
"""

from __future__ import annotations

import argparse
import cProfile
import io
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
    return {"replicas": replicas, "req/s": rate, "simulated s": simulated, "wall s": wall, "CPU s": cpu,
            "x real time": simulated / wall, "requests": int(row["requests"]), "requests ok": int(row["completed"]),
            "J/token": float(row["energy_per_token_j"])}


def sweep(workers: int) -> None:
    """8 points (16 replicas, the trace at 20 and 40 req/s, 4 clocks, 240 s each) serial in this process, then as
    Ray tasks on ``workers`` local workers: wall times, and whether points.csv agrees (sim_speed_x aside)."""
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
        t0 = time.perf_counter()
        serial = run_virtual_campaign(spec, spec.deployment, Path(tmp) / "serial", quiet)
        rows.append({"run": "serial, in process", "points": len(serial), "wall s": time.perf_counter() - t0})
        init_ray(num_cpus=workers)
        on_ray = spec.model_copy(update={"workers": workers})
        t0 = time.perf_counter()
        parallel = run_virtual_campaign(on_ray, on_ray.deployment, Path(tmp) / "ray", quiet)
        rows.append({"run": f"Ray tasks, {workers} local workers", "points": len(parallel),
                     "wall s": time.perf_counter() - t0})
        ray.shutdown()
        same = serial.drop(columns="sim_speed_x").equals(parallel.drop(columns="sim_speed_x"))
    frame = pd.DataFrame(rows)
    frame["x serial"] = frame["wall s"] / frame["wall s"].iloc[0]
    t = Table(title=f"8 virtual points, serial vs Ray ({workers} workers); points.csv identical: {same}")
    for c in frame.columns:
        t.add_column(str(c), justify="right")
    for _, r in frame.iterrows():
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r])
    Console(width=200).print(t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", type=int, choices=sorted(CASES), help="one case: its replica count")
    p.add_argument("--duration", type=float, default=600.0, help="simulated seconds per point")
    p.add_argument("--profile", action="store_true", help="cProfile the run(s) (slower) and print the top")
    p.add_argument("--sweep", type=int, metavar="WORKERS", help="serial vs Ray sweep of 8 points instead")
    args = p.parse_args()
    if args.sweep:
        sweep(args.sweep)
        return
    rows = [run_once(n, CASES[n], args.duration, args.profile) for n in ([args.only] if args.only else CASES)]
    frame = pd.DataFrame(rows)
    t = Table(title="Fleet-scale virtual time: Azure conv trace, time-scaled, emulated H100 x Llama-3.1-8B")
    for c in frame.columns:
        t.add_column(str(c), justify="right")
    for _, r in frame.iterrows():
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r])
    Console(width=200).print(t)


if __name__ == "__main__":
    main()
