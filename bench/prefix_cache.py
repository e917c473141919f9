"""What vLLM's prefix cache saves when prompts share a prefix: energy per token and latency, cache on and off.

    python bench/prefix_cache.py [CAMPAIGN.yaml] [--out DIR] [--repeat N] [--prefix-tokens P ...]

Runs the campaign (default ``examples/vllm_prefix_cache.yaml``: two vLLM-CPU replicas of the tiny model, 320-token
prompts) with ``enable_prefix_caching`` true and false, taking turns ``--repeat`` times so a drift of the host's
speed falls on both, for every shared-prefix length asked (0: no shared prefix, the cache can only lose). Prints
per point the median over the repeats of energy per token, TTFT p50/p99 and mean power, and the relative change
with the cache on. Each run starts its own deployment (the setting is fixed when an engine is built).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import pandas as pd
import yaml
from rich.console import Console
from rich.table import Table

from deploy.cli import main as testbed

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {"energy_per_token_j": "J/token", "ttft_p50_s": "TTFT p50 s", "ttft_p99_s": "TTFT p99 s",
           "mean_power_w": "power W"}


def run(data: dict, out: Path, name: str) -> pd.DataFrame:
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    if testbed(["campaign", "run", str(path), "--out", str(out / name), "--overwrite"]) != 0:
        raise SystemExit(f"the {name} run failed; see {out / name / 'deployment.log'}")
    return pd.read_csv(out / name / "points.csv")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("campaign", nargs="?", default=str(ROOT / "examples" / "vllm_prefix_cache.yaml"))
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--prefix-tokens", type=int, nargs="+", default=None,
                    help="shared-prefix lengths to run (default: the campaign's)")
    args = ap.parse_args()
    base = yaml.safe_load(Path(args.campaign).read_text())
    if base.get("deployment", {}).get("engine", {}).get("kind") != "vllm":
        raise SystemExit(f"{args.campaign}: the deployment must be a vLLM engine (engine.kind: vllm)")
    prefixes = args.prefix_tokens or [base["workload"].get("shared_prefix_tokens", 0)]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        results: dict[tuple[int, bool], list[pd.DataFrame]] = {}
        for rep in range(args.repeat):
            for prefix in prefixes:
                for cache in (True, False):
                    data = yaml.safe_load(yaml.safe_dump(base))
                    data["workload"]["shared_prefix_tokens"] = prefix
                    data["deployment"]["engine"]["enable_prefix_caching"] = cache
                    name = f"prefix{prefix}-{'on' if cache else 'off'}-{rep}"
                    results.setdefault((prefix, cache), []).append(run(data, out, name))
        print_table(results, args.repeat)


def print_table(results: dict[tuple[int, bool], list[pd.DataFrame]], repeat: int) -> None:
    table = Table(title=f"prefix cache on against off (median of {repeat} runs each, taking turns)")
    for col in ("shared prefix", "req/s", "cache", *FIGURES.values(), "J/token vs off", "TTFT p50 vs off"):
        table.add_column(col, justify="right")
    for prefix in sorted({p for p, _ in results}):
        off = results[(prefix, False)]
        for cache in (True, False):
            runs = results[(prefix, cache)]
            for i, rate in enumerate(runs[0]["offered_rps"]):
                med = {f: statistics.median(float(r[f].iloc[i]) for r in runs) for f in FIGURES}
                ref = {f: statistics.median(float(r[f].iloc[i]) for r in off) for f in FIGURES}
                change = [f"{med[f] / ref[f] - 1:+.1%}" if cache else "" for f in ("energy_per_token_j", "ttft_p50_s")]
                table.add_row(str(prefix), f"{rate:g}", "on" if cache else "off",
                              *(f"{med[f]:.4g}" for f in FIGURES), *change)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
