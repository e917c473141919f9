"""Emulated devices: each preset on standard workloads, the calibration targets, and how fast the model runs.

python bench/emulator_bench.py                    # tables only (seconds)
python bench/emulator_bench.py --virtual          # + virtual-time speed: 10,000 synthetic requests
python bench/emulator_bench.py --virtual --trace PATH/azure_llm_2023_conv.csv   # + trace replay
"""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from serving.emulated.physics import (
    SequenceWork,
    encoder_batch,
    energy_floor_per_token,
    iteration_cost,
    load_device,
    load_model_shape,
    peak_tops_per_w,
    run_metrics,
)

console = Console(width=200)


def presets() -> list[str]:
    folder = resources.files("serving.emulated") / "presets"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _table(title: str, frame: pd.DataFrame) -> None:
    t = Table(title=title)
    for c in frame.columns:
        t.add_column(str(c), justify="right")
    for _, row in frame.iterrows():
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    console.print(t)


def preset_table() -> pd.DataFrame:
    """BERT-base pass (1 x 128 tokens), a SmolLM2-135M decode step (16 sequences at 512 context), INT8,
    and the roofline floor of a whole request (256 prompt + 128 output tokens, prefill included)."""
    bert = load_model_shape("bert-base-uncased", "int8")
    lm = load_model_shape("smollm2-135m", "int8")
    decode = [SequenceWork(f"r{i}", 1, 512, False) for i in range(16)]
    rows = []
    for name in presets():
        dev = load_device(name)
        enc = run_metrics(dev, bert, encoder_batch(1, 128))
        step = run_metrics(dev, lm, decode)
        floor = energy_floor_per_token(dev, lm, prompt_tokens=256, output_tokens=128)
        rows.append(
            {
                "preset": name,
                "kind": dev.kind,
                "BERT tok/s": enc.tokens_per_s,
                "BERT TOPS": enc.tops,
                "BERT W": enc.power_w,
                "BERT TOPS/W": enc.tops_per_w,
                "BERT J/tok": enc.joules_per_token,
                "LM tok/s": step.tokens_per_s,
                "LM W": step.power_w,
                "LM J/tok": step.joules_per_token,
                "floor J/out-tok 256in+128out": floor.joules_per_token,
                "floor MHz": floor.clock_mhz,
                "peak TOPS/W": peak_tops_per_w(dev, "int8"),
            }
        )
    return pd.DataFrame(rows)


def calibration_table() -> pd.DataFrame:
    def bert(dev: str, model: str, dtype: str):  # type: ignore[no-untyped-def]
        return run_metrics(load_device(dev), load_model_shape(model, dtype), encoder_batch(1, 128))

    a40, cim = bert("a40", "bert-base-uncased", "int8"), bert("hastily_cim", "bert-base-uncased", "int8")
    fpga = bert("kv260_fpga", "distilbert-base-uncased", "fp32")
    arm = bert("arm_a53", "distilbert-base-uncased", "fp32")
    macro = peak_tops_per_w(load_device("digital_cim_macro"), "int8")
    rows = [
        ("HASTILY-style CIM / A40 throughput, BERT-base INT8", "4.4-9.8x", cim.ops_per_s / a40.ops_per_s),
        ("HASTILY-style CIM / A40 TOPS/W, BERT-base INT8", "16-36x", cim.tops_per_w / a40.tops_per_w),
        ("digital SRAM CIM macro TOPS/W", "34.1 +-15%", macro),
        ("KV260-style FPGA GFLOPS, DistilBERT FP32", "3.1 +-20%", fpga.ops_per_s / 1e9),
        ("KV260-style FPGA / ARM A53 throughput", "5-9x (~7x)", fpga.ops_per_s / arm.ops_per_s),
    ]
    return pd.DataFrame(rows, columns=["published figure", "target", "model"])


def evaluation_speed(seconds: float = 2.0) -> pd.DataFrame:
    dev, model = load_device("h100_sxm"), load_model_shape("llama-3.1-8b")
    rows = []
    for batch in (1, 32, 256):
        work = [SequenceWork(f"r{i}", 1, 1024, False) for i in range(batch)]
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            iteration_cost(dev, model, work, 1980)
            n += 1
        rows.append({"decode batch": batch, "iterations/s": n / (time.perf_counter() - t0)})
    return pd.DataFrame(rows)


def _virtual_run(specs: list, replicas: int = 2) -> tuple[float, float, int, float]:  # type: ignore[type-arg]
    from deploy.virtual import VirtualClock, VirtualTarget
    from serving.config import EmulatedEngineConfig, ServingConfig

    config = ServingConfig(replicas=replicas, engine=EmulatedEngineConfig(max_model_len=32768))
    clock = VirtualClock()

    async def go() -> int:
        target = VirtualTarget(config, clock)
        await target.start()
        target.request_timeout_s = 1e6
        records = await target.send(0, specs, 0, lambda _: None, lambda _: None)
        await target.stop()
        return sum(r.status == "ok" for r in records)

    t0, c0 = time.perf_counter(), time.process_time()
    ok = clock.execute(go())
    return time.perf_counter() - t0, clock.now(), ok, time.process_time() - c0


def virtual_speed(trace: Path | None) -> pd.DataFrame:
    from workloads.arrivals import PoissonArrivals, RequestSpec, UniformLength, build_requests

    rows = []
    specs = build_requests(
        PoissonArrivals(),
        UniformLength(low=64, high=512).sample,
        UniformLength(low=16, high=128).sample,
        rate_rps=20.0,
        duration_s=500.0,
        seed=1,
    )[:10_000]
    wall, simulated, ok, cpu = _virtual_run(specs)
    rows.append(
        {
            "run": f"{len(specs)} synthetic requests, 20 req/s",
            "requests ok": ok,
            "simulated s": simulated,
            "wall s": wall,
            "CPU s": cpu,  # what wall time would be on an idle core (the host may be shared)
            "x real time": simulated / wall,
        }
    )
    if trace is not None:
        df = pd.read_csv(trace)
        t = pd.to_datetime(df["TIMESTAMP"])
        t_s = (t - t.min()).dt.total_seconds().to_numpy()
        specs = [
            RequestSpec(float(ts), int(max(1, c)), int(max(1, g)))
            for ts, c, g in zip(t_s, df["ContextTokens"], df["GeneratedTokens"], strict=True)
        ]
        wall, simulated, ok, cpu = _virtual_run(specs)
        rows.append(
            {
                "run": f"Azure conv trace, {len(specs)} requests",
                "requests ok": ok,
                "simulated s": simulated,
                "wall s": wall,
            "CPU s": cpu,  # what wall time would be on an idle core (the host may be shared)
                "x real time": simulated / wall,
            }
        )
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--virtual", action="store_true", help="also measure virtual-time simulation speed")
    p.add_argument("--trace", type=Path, help="Azure trace CSV: TIMESTAMP, ContextTokens, GeneratedTokens")
    args = p.parse_args()
    np.set_printoptions(precision=4)
    _table("Presets: BERT-base 1x128 INT8 pass; SmolLM2-135M INT8 decode, 16 seqs at 512 ctx", preset_table())
    _table("Calibration: published figures vs the model", calibration_table())
    _table("Model evaluation speed (iteration_cost, H100, Llama-3.1-8B decode)", evaluation_speed())
    if args.virtual:
        _table("Virtual time: 2 emulated H100 replicas, Llama-3.1-8B", virtual_speed(args.trace))


if __name__ == "__main__":
    main()
