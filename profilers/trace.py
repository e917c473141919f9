"""Request latency trace: timestamps of one request's stages across processes (client, front door, router,
Ray actor, engine), to find where a real serving path spends time the model does not.

Off unless ``TESTBED_LATENCY_TRACE`` names a directory: then every process appends ``(request_id, stage,
t)`` lines to its own file there, ``t`` from ``time.monotonic()`` (CLOCK_MONOTONIC on Linux, one time line
for every process of the host). ``bench/real_path_latency.py`` turns it on and reads the files back.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

TRACE_ENV = "TESTBED_LATENCY_TRACE"

_file: TextIO | None = None
_key: tuple[int, str] | None = None


def enabled() -> bool:
    """Whether latency tracing is on (``TESTBED_LATENCY_TRACE`` names a directory to write the trace to)."""
    return bool(os.environ.get(TRACE_ENV))


def mark(request_id: str, stage: str, t: float | None = None) -> None:
    """Record that ``request_id`` reached ``stage`` now (or at monotonic time ``t``); a no-op when off."""
    directory = os.environ.get(TRACE_ENV)
    if not directory:
        return
    global _file, _key
    if _file is None or _key != (os.getpid(), directory):  # a forked child or a new directory: a new file
        _key = (os.getpid(), directory)
        _file = (Path(directory) / f"trace-{_key[0]}.tsv").open("a", buffering=1)
    _file.write(f"{request_id}\t{stage}\t{time.monotonic() if t is None else t:.7f}\n")


def mark_first_tokens(batch: Iterable[object], stage: str) -> None:
    """Mark ``stage`` for each request whose first token is in ``batch`` (a channel frame's events): where a frame
    is written and read splits a process crossing into the wire and the code on either side of it."""
    if not os.environ.get(TRACE_ENV):
        return
    t = time.monotonic()
    for item in batch:
        if getattr(item, "index", None) == 0:
            mark(item.request_id, stage, t)  # type: ignore[attr-defined]


def read_trace(directory: Path) -> dict[str, dict[str, float]]:
    """{request_id: {stage: first time it was reached}} from every process's file in ``directory``."""
    out: dict[str, dict[str, float]] = {}
    for path in sorted(directory.glob("trace-*.tsv")):
        for line in path.read_text().splitlines():
            rid, stage, t = line.split("\t")
            out.setdefault(rid, {}).setdefault(stage, float(t))
    return out


def _quantile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def lognormal_fit(xs: list[float]) -> tuple[float, float]:
    """Median and shape ``sigma`` of the log-normal through the sample's p50 and p75: the body of the
    distribution, which sets the median of a sum, not the tail of a host's stalls."""
    if not xs:
        raise ValueError("no samples to fit")
    median = statistics.median(xs)
    p75 = _quantile(xs, 0.75)
    return median, (math.log(p75 / median) / 0.6745 if median > 0 and p75 > median else 0.0)


def path_latency(traces: dict[str, dict[str, float]]) -> dict[str, float]:
    """What the serving path added to the traced requests, in the terms of a virtual-time run's ``virtual:``
    section: client send to engine admission, and a token's modeled emission to the client reading it (first
    and last tokens pooled)."""
    req = [t["engine.admit"] - t["client.send"] for t in traces.values() if {"engine.admit", "client.send"} <= t.keys()]
    resp = [
        t[f"client.{w}_chunk"] - t[f"engine.{w}_token_modeled"]
        for t in traces.values() for w in ("first", "last")
        if {f"client.{w}_chunk", f"engine.{w}_token_modeled"} <= t.keys()
    ]
    if not req or not resp:
        raise ValueError("the trace holds no complete request: was the trace on in every process?")
    (m_req, s_req), (m_resp, s_resp) = lognormal_fit(req), lognormal_fit(resp)
    return {"request_latency_s": round(m_req, 5), "request_sigma": round(s_req, 3),
            "response_latency_s": round(m_resp, 5), "response_sigma": round(s_resp, 3)}
