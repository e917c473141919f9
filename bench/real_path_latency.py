"""Where a request's time goes on the real serving path, stage by stage.

    python bench/real_path_latency.py [CAMPAIGN.yaml] [--rate R] [--duration S]

Runs the campaign (real time: httpx client -> uvicorn front door -> router -> Ray actor -> emulated engine)
with the latency trace on (``profilers/trace.py``) and prints, per stage, the median and p90 of the time
since the previous stage over the measured requests. The two sums at the bottom are what the virtual-time
simulation models as ``virtual.request_latency_s`` (client send to engine admission) and
``virtual.response_latency_s`` (engine emits a token to the client reads it): re-measure them with this
script on the machine whose real-time runs a virtual run should match.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from profilers.trace import TRACE_ENV, path_latency, read_trace

STAGES = [
    ("client.send", None),
    ("door.receive", "HTTP request: client send -> front door handler"),
    ("router.dispatch", "front door -> router picks a replica"),
    ("actor.receive", "Ray actor call: router -> replica actor"),
    ("engine.admit", "actor -> engine admission (tokenize, queue)"),
    ("engine.iteration_woke", "admission -> engine loop runs the iteration (wake-up, boundary wait)"),
    ("engine.iteration_start", "modeled start (back-to-back iterations start at the previous end)"),
    ("engine.first_token_modeled", "modeled prefill iteration"),
    ("engine.first_token", "sleep overshoot past the modeled end"),
    ("actor.first_event", "engine queue -> actor generator"),
    ("router.first_event", "Ray streaming: actor yield -> router"),
    ("door.first_chunk", "router -> front door SSE chunk"),
    ("client.first_chunk", "SSE chunk -> client reads it"),
]


def q(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("campaign", nargs="?", type=Path, default=Path("examples/quickstart.yaml"))
    p.add_argument("--rate", type=float, default=None, help="one request rate instead of the campaign's sweep")
    p.add_argument("--duration", type=float, default=None, help="seconds per point instead of the campaign's")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="real-path-"))
    out.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load(args.campaign.read_text())
    data["clock"] = "real"
    if args.rate is not None:
        data["sweep"] = {"rate_rps": [args.rate]}
    if args.duration is not None:
        data["workload"]["duration_s"] = args.duration
    (out / "campaign.yaml").write_text(yaml.safe_dump(data))
    trace_dir = out / "trace"
    trace_dir.mkdir(exist_ok=True)
    os.environ[TRACE_ENV] = str(trace_dir)  # inherited by the deployment process and its Ray workers
    from deploy.cli import main as testbed

    if testbed(["campaign", "run", str(out / "campaign.yaml"), "--out", str(out / "run"), "--overwrite"]) != 0:
        raise SystemExit("the campaign failed")
    traces = [t for t in read_trace(trace_dir).values() if "client.first_chunk" in t]
    table = Table(title=f"real path, {len(traces)} requests ({args.campaign}); ms since the previous stage")
    for col in ("stage", "what", "p50 ms", "p90 ms"):
        table.add_column(col, justify="right" if "ms" in col else "left")
    for (prev, _), (stage, what) in itertools.pairwise(STAGES):
        d = [(t[stage] - t[prev]) * 1e3 for t in traces if stage in t and prev in t]
        table.add_row(stage, what or "", f"{q(d, 0.5):.2f}", f"{q(d, 0.9):.2f}")
    spans = {
        "request latency (client send -> engine admit)": ("client.send", "engine.admit"),
        "response latency, first token (modeled -> client)": ("engine.first_token_modeled", "client.first_chunk"),
        "response latency, last token (modeled -> client)": ("engine.last_token_modeled", "client.last_chunk"),
        "TTFT as the client sees it": ("client.send", "client.first_chunk"),
        "TTFT as the engine sees it (admit -> first token)": ("engine.admit", "engine.first_token"),
    }
    for name, (a, b) in spans.items():
        d = [(t[b] - t[a]) * 1e3 for t in traces if a in t and b in t]
        table.add_row(name, "", f"{q(d, 0.5):.2f}", f"{q(d, 0.9):.2f}", style="bold")
    Console(width=160).print(table)
    print(f"trace: {trace_dir}\nmeasured path latency (log-normal: median, ln(p75 / p50) / 0.6745), for the "
          "campaign file's `virtual:` section:")
    print(f"virtual: {path_latency(read_trace(trace_dir))}".replace("'", ""))


if __name__ == "__main__":
    main()
