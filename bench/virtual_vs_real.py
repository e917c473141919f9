"""Real time vs virtual time on the same campaign: per-point energy per token and p50 latencies.

    python bench/virtual_vs_real.py [CAMPAIGN.yaml] [--out DIR] [--rate R ...] [--model M] [--repeat N]

Runs the campaign in real time (Ray + HTTP, latency trace on), then in virtual time (in-process, same seeds,
same requests): with the campaign's `virtual:` path latency (the measured defaults unless the file sets
it), and once per point with the path latency traced at that point of the real runs (``profilers/trace.py``),
which separates how well the engine model agrees from how busy the host was. Prints each point's figures and
their relative differences; ``--repeat`` runs the real side N times and reports the spread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml
from rich.console import Console
from rich.table import Table

from deploy.cli import main as testbed
from profilers.trace import TRACE_ENV, path_latency, read_trace

FIGURES = ["energy_per_token_j", "ttft_p50_s", "tpot_p50_s", "e2e_p50_s"]


def run(data: dict, out: Path, name: str) -> tuple[pd.DataFrame, float]:
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    t0 = time.perf_counter()
    code = testbed(["campaign", "run", str(path), "--out", str(out / name), "--overwrite"])
    if code != 0:
        raise SystemExit(f"the {name} run failed with exit code {code}")
    return pd.read_csv(out / name / "points.csv"), time.perf_counter() - t0


def split(traces: dict[str, dict[str, float]], counts: list[int]) -> list[list[dict[str, float]]]:
    """Traced requests per point: points run one after another, so requests in send order split by the points'
    request counts."""
    done = sorted((t for t in traces.values() if "client.send" in t), key=lambda t: t["client.send"])
    out, i = [], 0
    for n in counts:
        out.append(done[i:i + n])
        i += n
    return out


def engine_ttft_p50(traced: list[dict[str, float]]) -> float:
    """TTFT as the engine sees it: admission to the first token's modeled emission (no HTTP, no Ray)."""
    return statistics.median(t["engine.first_token_modeled"] - t["engine.admit"] for t in traced)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("campaign", nargs="?", type=Path, default=Path("examples/quickstart.yaml"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--rate", type=float, nargs="+", default=None, help="request rates instead of the sweep's")
    p.add_argument("--model", default=None, help="engine model instead of the campaign's")
    p.add_argument("--repeat", type=int, default=1, help="real-time runs (the spread shows the host's noise)")
    args = p.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="virtual-vs-real-"))
    out.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load(args.campaign.read_text())
    if args.rate:
        data["sweep"] = {"rate_rps": args.rate}
    if args.model:
        data["deployment"]["engine"]["model"] = args.model
    reals, walls, latencies, engine_side = [], [], [], []
    for i in range(args.repeat):
        trace_dir = out / f"trace-{i}"
        trace_dir.mkdir(exist_ok=True)
        os.environ[TRACE_ENV] = str(trace_dir)  # inherited by the deployment process and its Ray workers
        real, wall = run({**data, "clock": "real"}, out, f"real-{i}")
        del os.environ[TRACE_ENV]
        reals.append(real)
        walls.append(wall)
        points = split(read_trace(trace_dir), real["requests"].tolist())
        latencies.append([path_latency(dict(enumerate(p))) for p in points])
        engine_side.append([engine_ttft_p50(p) for p in points])
    virtual, virtual_wall = run({**data, "clock": "virtual"}, out, "virtual")
    console = Console(width=240)
    console.print(f"path latency of the virtual run: {data.get('virtual') or 'defaults'}")
    rows = []  # point p of a virtual run with the path latency traced at point p (median over the real runs)
    for point in range(len(virtual)):
        measured = {k: statistics.median(lat[point][k] for lat in latencies) for k in latencies[0][point]}
        console.print(f"point {point}: path latency measured in the real run(s): {measured}")
        frame, _ = run({**data, "clock": "virtual", "virtual": measured}, out, f"virtual-measured-{point}")
        rows.append(frame.iloc[point])
    calibrated = pd.DataFrame(rows)
    table = Table(title=f"virtual vs real ({args.campaign}, model {data['deployment']['engine']['model']}); "
                  f"wall {sum(walls) / len(walls):.0f} s real, {virtual_wall:.1f} s virtual; "
                  "diff = virtual vs real (min..max over real runs); measured = virtual with the real runs' "
                  "path latency")
    table.add_column("point", justify="right")
    table.add_column("req/s", justify="right")
    for f in FIGURES:
        table.add_column(f"{f}\nreal / virtual: diff [measured]", justify="right")
    for point in range(len(virtual)):
        v, c = virtual.iloc[point], calibrated.iloc[point]
        cells = []
        for f in FIGURES:
            rs = [r.iloc[point][f] for r in reals]
            r_mid = sorted(rs)[len(rs) // 2]
            d = sorted((v[f] - r) / r for r in rs)
            dc = sorted((c[f] - r) / r for r in rs)
            spread = f"{d[0]:+.1%}" if len(d) == 1 else f"{d[len(d) // 2]:+.1%} ({d[0]:+.1%}..{d[-1]:+.1%})"
            cells.append(f"{r_mid:.4g} / {v[f]:.4g}: {spread} [{dc[len(dc) // 2]:+.1%}]")
        table.add_row(str(v["point"]), f"{v['offered_rps']:g}", *cells)
    console.print(table)
    # What the virtual run simulates step by step, without the path: the engines' own TTFT.
    bare = {"request_latency_s": 0, "response_latency_s": 0}
    engines, _ = run({**data, "clock": "virtual", "virtual": bare}, out, "virtual-engines")
    view = Table(title="TTFT p50 inside the engines (admission to first token): real (trace) vs virtual (no path)")
    for col in ("point", "req/s", "real ms (runs)", "virtual ms", "diff"):
        view.add_column(col, justify="right")
    for point in range(len(engines)):
        rs = sorted(e[point] for e in engine_side)
        v = engines.iloc[point]["ttft_p50_s"]
        mid = rs[len(rs) // 2]
        view.add_row(str(point), f"{engines.iloc[point]['offered_rps']:g}",
                     " ".join(f"{r * 1e3:.2f}" for r in rs), f"{v * 1e3:.2f}", f"{(v - mid) / mid:+.1%}")
    console.print(view)


if __name__ == "__main__":
    main()
