"""Policies against the static baseline, replaying the Azure conversation trace in virtual time.

Two emulated H100 replicas serve a Llama-2-7B-shaped model; TTFT SLO 2 s, TPOT SLO 100 ms. For each rate
scale (0.5x, 1x, 2x the trace's own mean rate, by time-scaling the replay) every policy runs the same requests;
the table gives energy per output token, its change against `static`, SLO attainment (and its ratio to
`static`'s) and tail latency. Requests longer than the 4,096-token context fail alike under every policy.

`model_based(profile)` plans from energy/latency curves measured beforehand by a knob sweep (every clock of a
ladder x packing on/off x speculation on/off, pinned, at several rates) on a different part of the trace
(from 1,800 s on; the replayed windows start at 0 s), as DynamoLLM profiles offline; `--profile FILE`
keeps that sweep's points.csv (reused when it exists).

Usage: python bench/controllers_bench.py [--window-s 600] [--scales 0.5 1 2] [--policies static slo_feedback ...]
                                         [--profile points.csv]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import yaml
from rich.console import Console
from rich.table import Table

from deploy.config import CampaignFile
from deploy.virtual import run_virtual_campaign
from workloads.traces import load_trace

# "+spec": speculative decoding (k=4) switched on at low load and off at high load, on top of DVFS. The emulated
# engine's acceptance is 0.6 per position (an assumption: the trace has no text to measure it on).
# "+batch": the batch cap in the router: each replica is filled up to 32 requests before the next takes load, so
# at light load one replica runs a fuller batch while the other idles (70 W instead of ~200 W of small batches);
# 32 keeps a step memory-bound with k=4 (160 tokens) and is spread again on SLO pressure or a queue.
SPEC = {"spec_k": 4, "spec_max_running": 64}
POLICIES = {
    "static": {"policy": "static"},
    "slo_feedback": {"policy": "slo_feedback"},
    # Off above 64 sequences in flight (2 replicas): an H100 step of a 7B model stays memory-bound up to ~240
    # tokens (989 TFLOP/s x 0.7 / (3.35 TB/s x 0.85) per weight byte), i.e. ~48 sequences x (k+1) per replica.
    "slo_feedback+spec": {"policy": "slo_feedback", "options": SPEC},
    "slo_feedback+batch": {"policy": "slo_feedback", "options": {"batch_cap": 32}},
    "slo_feedback+batch+spec": {"policy": "slo_feedback", "options": {"batch_cap": 32, **SPEC}},
    "model_based": {"policy": "model_based"},
    # Profiles online: every (packing, speculation) structure with a ladder of clocks, plans kept per load.
    "model_based+batch+spec": {"policy": "model_based", "options": {"batch_cap": 32, "spec_k": 4, "hold": 0}},
    # Plans from the curves of a knob sweep (clock x packing x speculation x rate) run beforehand.
    "model_based(profile)": {"policy": "model_based", "options": {"profile": None}},
}


PROFILE_CLOCKS = (345, 660, 1110, 1980)
PROFILE_SCALES = (0.6, 1.0, 1.4, 2.1)
"""Rates of the profiling sweep, as multiples of the trace's mean rate (the planner takes the smallest
profiled rate at least as high as the one it observes)."""


def profile_campaign(base_rate: float, window_s: float = 45.0) -> CampaignFile:
    knobs = [{"clock_mhz": c, "pack_per_replica": pack, "speculative_tokens": k}
             for c, pack, k in itertools.product(PROFILE_CLOCKS, (0, 32), (0, 4))]
    spec = _spec(base_rate, window_s, warmup_s=10.0, start_s=1800.0)
    spec["sweep"] = {"rate_rps": [base_rate * x for x in PROFILE_SCALES], "knobs": knobs}
    return CampaignFile.model_validate(spec)


def profile(path: Path | None, base_rate: float) -> Path:
    """The knob sweep's points.csv: ``path`` if it exists, else measured now (and kept at ``path`` if given)."""
    if path is not None and path.is_file():
        return path
    out = Path(tempfile.mkdtemp(prefix="controllers-profile-"))
    spec = profile_campaign(base_rate)
    run_virtual_campaign(spec, spec.deployment, out, Console(quiet=True))
    if path is None:
        return out / "points.csv"
    shutil.copy(out / "points.csv", path)
    return path


def campaign(rate: float, window_s: float, policies: list[str], options: dict | None = None) -> CampaignFile:
    spec = _spec(rate, window_s)
    spec["sweep"] = {"rate_rps": [rate], "policies": [_with(POLICIES[p], options or {}) for p in policies]}
    return CampaignFile.model_validate(spec)


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "controllers.yaml"


def _spec(rate: float, window_s: float, warmup_s: float = 60.0, start_s: float = 0.0) -> dict:
    """examples/controllers.yaml (deployment, trace, SLO) at one rate, window and trace offset."""
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec["name"] = "controllers-bench"
    spec["workload"].update(duration_s=window_s, warmup_s=warmup_s)
    spec["workload"]["arrival"]["start_s"] = start_s
    spec["sweep"] = {"rate_rps": [rate]}
    return spec


def _with(setting: dict, options: dict) -> dict:
    """A policy setting with the bench's run-time options (the profile's path) filled in."""
    opts = {k: options.get(k, v) if v is None else v for k, v in setting.get("options", {}).items()}
    return {**setting, "options": opts} if "options" in setting else setting


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window-s", type=float, default=600.0, help="seconds of replay per run")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    ap.add_argument("--policies", nargs="+", choices=sorted(POLICIES), default=list(POLICIES))
    ap.add_argument("--profile", type=Path, help="knob sweep points.csv for model_based(profile): reused if present")
    args = ap.parse_args()
    base_rate = load_trace("azure_conv_2023").mean_rate_rps
    options = {}
    if "model_based(profile)" in args.policies:
        options["profile"] = str(profile(args.profile, base_rate))
    console = Console(width=150)
    frames = []
    for scale in args.scales:
        with tempfile.TemporaryDirectory() as tmp:
            spec = campaign(base_rate * scale, args.window_s, args.policies, options)
            points = run_virtual_campaign(spec, spec.deployment, Path(tmp), Console(quiet=True))
        frames.append(points.assign(scale=scale, name=args.policies))
    df = pd.concat(frames, ignore_index=True)
    table = Table(title=f"Policies against static: Azure conversation trace, {args.window_s:g} s windows, "
                        "2 x emulated H100, Llama-2-7B shape, SLO TTFT 2 s / TPOT 0.1 s")
    for col in ("rate scale", "req/s", "policy", "J/token", "vs static", "SLO attainment", "vs static ",
                "TTFT p99 s", "TPOT p99 s", "mean clock MHz"):
        table.add_column(col, justify="right")
    for scale, grp in df.groupby("scale"):
        base = grp[grp["name"] == "static"].iloc[0]
        for _, r in grp.iterrows():
            table.add_row(
                f"{scale:g}x", f"{r['offered_rps']:.2f}", r["name"],
                f"{r['energy_per_token_j']:.4f}", f"{r['energy_per_token_j'] / base['energy_per_token_j'] - 1:+.1%}",
                f"{r['slo_attainment']:.4f}", f"{r['slo_attainment'] / base['slo_attainment']:.4f}",
                f"{r['ttft_p99_s']:.3f}", f"{r['tpot_p99_s']:.4f}", f"{r['clock_mhz_mean']:.0f}",
            )
    console.print(table)


if __name__ == "__main__":
    main()
