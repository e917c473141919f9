"""Emulated GPUs against measured vLLM serving (ML.ENERGY Benchmark v3): per-row and per-GPU error tables.

Replays every measured configuration on the emulated engine in virtual time, as ML.ENERGY measured it
(steady state, ``max_num_seqs`` closed-loop users, the task's prompt and output lengths), and prints measured
vs emulated J/token, power, throughput and median ITL with the relative error, then the median and worst
|error| per GPU. ``--write`` stores each GPU's errors as its preset's calibration report
(``serving/emulated/calibration/<preset>.yaml``), the band every modeled figure then carries.
``--fit`` refits a preset's constants to the rows (fast aggregate model) and prints them as YAML.

    python bench/calibration.py                          # every row, ~3 min on 2 cores
    python bench/calibration.py --gpu H100 --write       # the H100 rows; update h100_sxm's report
    python bench/calibration.py --data other.csv --model-configs DIR   # rows of models not shipped
    python bench/calibration.py --gpu B200 --fit         # refit b200's constants
    python bench/calibration.py --cross-validate         # each model held out of the fit in turn
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.calibration import (
    DATASET_NAME,
    GPU_PRESETS,
    METRICS,
    Figures,
    MeasuredRow,
    dataset_path,
    fit_parameters,
    fit_preset,
    load_measurements,
    mean_field,
    measured,
    model_for,
    preset_data,
    preset_for,
    relative_errors,
    replay_row,
)
from serving.emulated.devices import device_from_dict
from serving.emulated.physics import load_device

REPORT_KEYS = {"j_per_token": "j_per_token", "power_w": "power", "throughput": "throughput",
               "median_itl_s": "median_itl"}


def _fmt(figs: Figures) -> list[str]:
    return [f"{figs.j_per_token:.3f}", f"{figs.power_w:.0f}", f"{figs.throughput:.0f}",
            f"{figs.median_itl_s * 1e3:.1f}"]


def run(rows: list[MeasuredRow], mode: str, config_dir: Path | None) -> dict[str, list[dict[str, float]]]:
    header = ["row", "configuration", "J/tok meas", "J/tok emu", "W meas", "W emu", "tok/s meas", "tok/s emu",
              "ITL ms meas", "ITL ms emu", "err J/tok", "err W", "err tok/s", "err ITL", "wall s"]
    print(" | ".join(header))
    print("|".join("---" for _ in header))
    errors: dict[str, list[dict[str, float]]] = {}
    for row in rows:
        device, model = load_device(preset_for(row)), model_for(row, config_dir)
        t0 = time.perf_counter()
        emulated = replay_row(row, device, model) if mode == "replay" else mean_field(row, device, model)
        wall = time.perf_counter() - t0
        err = relative_errors(emulated, measured(row))
        errors.setdefault(row.gpu, []).append(err)
        m, e = _fmt(measured(row)), _fmt(emulated)
        cells = [str(row.line), row.label, m[0], e[0], m[1], e[1], m[2], e[2], m[3], e[3],
                 *(f"{err[k]:+.0%}" for k in METRICS), f"{wall:.1f}"]
        print(" | ".join(cells), flush=True)
    return errors


def summary(errors: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    print("\nGPU | rows | " + " | ".join(f"{k} median/worst" for k in REPORT_KEYS.values()))
    print("---|---|" + "|".join("---" for _ in REPORT_KEYS))
    for gpu, errs in errors.items():
        out[gpu] = {}
        cells = []
        for k, name in REPORT_KEYS.items():
            v = np.abs([e[k] for e in errs])
            out[gpu][name] = {"median": round(float(np.median(v)), 4), "worst": round(float(v.max()), 4)}
            cells.append(f"{np.median(v):.1%} / {v.max():.1%}")
        print(f"{gpu} | {len(errs)} | " + " | ".join(cells))
    return out


def write_reports(bands: dict[str, dict[str, dict[str, float]]], counts: dict[str, int], command: str) -> None:
    folder = dataset_path().parent
    for gpu, band in bands.items():
        preset = GPU_PRESETS[gpu]
        report = {
            "preset": preset,
            "dataset": DATASET_NAME,
            "dataset_file": dataset_path().name,
            "gpu": gpu,
            "rows": counts[gpu],
            "command": command,
            "error": band,
        }
        path = folder / f"{preset}.yaml"
        path.write_text("# Written by bench/calibration.py: |emulated - measured| / measured over the rows.\n"
                        + yaml.safe_dump(report, sort_keys=False))
        print(f"wrote {path}")


def fit(gpu: str, rows: list[MeasuredRow], config_dir: Path | None, iterations: int) -> None:
    pairs = [(r, model_for(r, config_dir)) for r in rows if r.gpu == gpu]
    preset = preset_for(pairs[0][0])
    best, score = fit_preset(preset_data(preset), pairs, iterations=iterations)
    device = device_from_dict(best)
    print(f"# {preset}: fitted to {len(pairs)} {gpu} rows (lines {', '.join(str(r.line) for r, _ in pairs)}), "
          f"loss (mean Huber of the log errors) {score:.4f}")
    for p in fit_parameters(best):
        head, _, leaf = p.path.rpartition(".")
        print(f"{p.path}: {(best[head] if head else best)[leaf]:.6g}")
    errs = [relative_errors(mean_field(r, device, m), measured(r)) for r, m in pairs]
    summary({gpu: errs})


def cross_validate(gpu: str, rows: list[MeasuredRow], config_dir: Path | None, iterations: int) -> None:
    """Leave one model out: fit the preset to the other models' rows, report the held-out model's errors (how
    the constants carry to a model they were not fitted on)."""
    pairs = [(r, model_for(r, config_dir)) for r in rows if r.gpu == gpu]
    preset = preset_for(pairs[0][0])
    print(f"\n{gpu}: each model held out of the fit ({iterations} iterations)")
    print("held-out model | rows | " + " | ".join(f"{k} median/worst" for k in REPORT_KEYS.values()))
    print("---|---|" + "|".join("---" for _ in REPORT_KEYS))
    for held in sorted({r.model_id for r, _ in pairs}):
        train = [(r, m) for r, m in pairs if r.model_id != held]
        best, _ = fit_preset(preset_data(preset), train, iterations=iterations)
        device = device_from_dict(best)
        errs = [relative_errors(mean_field(r, device, m), measured(r)) for r, m in pairs if r.model_id == held]
        cells = [f"{np.median(np.abs([e[k] for e in errs])):.1%} / {np.max(np.abs([e[k] for e in errs])):.1%}"
                 for k in REPORT_KEYS]
        print(f"{held.split('/')[-1]} | {len(errs)} | " + " | ".join(cells), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="measurements CSV (default: the shipped ML.ENERGY v3)")
    ap.add_argument("--gpu", default="all", help="H100, B200 or all")
    ap.add_argument("--model-configs", type=Path, default=None, help="folder of HF config.json for other models")
    ap.add_argument("--mode", choices=("replay", "mean-field"), default="replay")
    ap.add_argument("--write", action="store_true", help="store the errors as the presets' calibration reports")
    ap.add_argument("--fit", action="store_true", help="refit the preset's constants and print them")
    ap.add_argument("--cross-validate", action="store_true",
                    help="fit without each model in turn and report the held-out model's errors")
    ap.add_argument("--iterations", type=int, default=3000)
    args = ap.parse_args()
    rows = load_measurements(args.data)
    if args.gpu != "all":
        rows = [r for r in rows if r.gpu == args.gpu]
    if args.fit or args.cross_validate:
        for gpu in sorted({r.gpu for r in rows}):
            (cross_validate if args.cross_validate else fit)(gpu, rows, args.model_configs, args.iterations)
        return
    errors = run(rows, args.mode, args.model_configs)
    bands = summary(errors)
    if args.write:
        if args.data is not None:
            sys.exit("--write stores reports of the shipped data only")
        command = ("python bench/calibration.py" + (f" --gpu {args.gpu}" if args.gpu != "all" else "")
                   + (" --mode mean-field" if args.mode != "replay" else "") + " --write")
        write_reports(bands, {g: len(e) for g, e in errors.items()}, command)


if __name__ == "__main__":
    main()
