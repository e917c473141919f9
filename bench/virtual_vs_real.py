"""Real time vs virtual time on the same campaign: per-point energy per token and p50 latencies.

    python bench/virtual_vs_real.py [CAMPAIGN.yaml] [--out DIR]

Runs the campaign twice (Ray + HTTP in real time, then in-process in virtual time, same seeds, same
requests) and prints the relative difference of each point's figures.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml
from rich.console import Console
from rich.table import Table

from deploy.cli import main as testbed

FIGURES = ["energy_per_token_j", "output_tokens_per_s", "ttft_p50_s", "tpot_p50_s", "e2e_p50_s"]


def run(campaign: Path, out: Path, clock: str) -> tuple[pd.DataFrame, float]:
    data = yaml.safe_load(campaign.read_text())
    data["clock"] = clock
    path = out / f"{clock}.yaml"
    path.write_text(yaml.safe_dump(data))
    t0 = time.perf_counter()
    code = testbed(["campaign", "run", str(path), "--out", str(out / clock), "--overwrite"])
    if code != 0:
        raise SystemExit(f"{clock}-time run failed with exit code {code}")
    return pd.read_csv(out / clock / "points.csv"), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("campaign", nargs="?", type=Path, default=Path("examples/quickstart.yaml"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="virtual-vs-real-"))
    out.mkdir(parents=True, exist_ok=True)
    real, real_wall = run(args.campaign, out, "real")
    virtual, virtual_wall = run(args.campaign, out, "virtual")
    table = Table(
        title=f"virtual vs real ({args.campaign}); wall {real_wall:.0f} s real, {virtual_wall:.1f} s virtual",
    )
    table.add_column("point", justify="right")
    table.add_column("req/s", justify="right")
    for f in FIGURES:
        table.add_column(f"{f} real / virtual / diff", justify="right")
    for (_, r), (_, v) in zip(real.iterrows(), virtual.iterrows(), strict=True):
        cells = [f"{r[f]:.4g} / {v[f]:.4g} / {(v[f] - r[f]) / r[f]:+.1%}" for f in FIGURES]
        table.add_row(str(r["point"]), f"{r['offered_rps']:g}", *cells)
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
