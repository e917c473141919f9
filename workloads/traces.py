"""Request traces (Azure LLM inference trace, BurstGPT) read with line-precise errors, then windowed,
sampled and time-scaled for replay."""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path

import numpy as np

BUILTIN_TRACES = {"azure_conv_2023": "azure_llm_2023_conv.csv"}


class TraceError(ValueError):
    """A trace that cannot be replayed; the message names file, line and column."""


@dataclass(frozen=True)
class Trace:
    """Requests of a trace: arrival times (s from the first request) and token counts."""

    source: str
    t_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    skipped_rows: int = 0

    def __len__(self) -> int:
        return len(self.t_s)

    @property
    def mean_rate_rps(self) -> float:
        span = float(self.t_s[-1] - self.t_s[0]) if len(self) > 1 else 0.0
        return (len(self) - 1) / span if span > 0 else float("nan")


@dataclass(frozen=True)
class _Format:
    name: str
    time_col: str
    prompt_col: str
    output_col: str
    absolute_time: bool


FORMATS = (
    _Format("azure", "TIMESTAMP", "ContextTokens", "GeneratedTokens", absolute_time=True),
    _Format("burstgpt", "Timestamp", "Request tokens", "Response tokens", absolute_time=False),
)


def resolve_trace_path(name_or_path: str) -> Path:
    if name_or_path in BUILTIN_TRACES:
        res = resources.files("workloads") / "data" / BUILTIN_TRACES[name_or_path]
        return Path(str(res))
    path = Path(name_or_path)
    if not path.is_file():
        raise TraceError(
            f"trace {name_or_path!r} not found: give a CSV path or one of {sorted(BUILTIN_TRACES)}"
        )
    return path


def _detect(path: Path, header: list[str]) -> _Format:
    for fmt in FORMATS:
        if fmt.time_col in header:
            missing = [c for c in (fmt.prompt_col, fmt.output_col) if c not in header]
            if missing:
                raise TraceError(f"{path}: line 1: {fmt.name} trace lacks column(s) {', '.join(missing)}")
            return fmt
    expected = "; ".join(f"{f.name}: {f.time_col}, {f.prompt_col}, {f.output_col}" for f in FORMATS)
    raise TraceError(f"{path}: line 1: unknown trace header {header!r}; expected columns ({expected})")


def _parse_time(value: str, fmt: _Format) -> float:
    if not fmt.absolute_time:
        return float(value)
    # Azure timestamps carry 7 fractional digits; datetime takes at most 6.
    head, _, frac = value.strip().partition(".")
    t = datetime.fromisoformat(head).timestamp()
    return t + (float(f"0.{frac}") if frac else 0.0)


def load_trace(name_or_path: str, skip_bad_rows: bool = False) -> Trace:
    """Read a trace; bad rows raise :class:`TraceError` naming line and column unless ``skip_bad_rows``."""
    path = resolve_trace_path(name_or_path)
    times: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    skipped = 0
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise TraceError(f"{path}: the file is empty")
        fmt = _detect(path, [h.strip() for h in header])
        cols = [h.strip() for h in header]
        i_t, i_p, i_o = cols.index(fmt.time_col), cols.index(fmt.prompt_col), cols.index(fmt.output_col)
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                t, p, o = _row(path, line_no, row, fmt, (i_t, i_p, i_o), times[-1] if times else None)
            except TraceError:
                if not skip_bad_rows:
                    raise
                skipped += 1
                continue
            times.append(t)
            prompts.append(p)
            outputs.append(o)
    if not times:
        raise TraceError(f"{path}: no usable request rows" + (f" ({skipped} skipped)" if skipped else ""))
    t = np.asarray(times)
    return Trace(str(path), t - t[0], np.asarray(prompts), np.asarray(outputs), skipped)


def load_trace_cached(name_or_path: str, skip_bad_rows: bool = False) -> Trace:
    """:func:`load_trace`, read once per file version (points of a campaign reuse it)."""
    path = resolve_trace_path(name_or_path)
    return _load_cached(str(path), path.stat().st_mtime_ns, skip_bad_rows)


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int, skip_bad_rows: bool) -> Trace:
    return load_trace(path, skip_bad_rows=skip_bad_rows)


def _row(
    path: Path, line: int, row: list[str], fmt: _Format, idx: tuple[int, int, int], previous: float | None
) -> tuple[float, int, int]:
    i_t, i_p, i_o = idx
    if len(row) <= max(idx):
        raise TraceError(f"{path}: line {line}: expected at least {max(idx) + 1} columns, got {len(row)}")
    try:
        t = _parse_time(row[i_t], fmt)
    except ValueError:
        raise TraceError(f"{path}: line {line}, column {fmt.time_col}: bad timestamp {row[i_t]!r}") from None
    if previous is not None and t < previous:
        raise TraceError(
            f"{path}: line {line}, column {fmt.time_col}: timestamp {row[i_t]!r} is earlier than the previous "
            "row (timestamps must not decrease); sort the trace or pass --skip-bad-rows"
        )
    counts = []
    for i, col in ((i_p, fmt.prompt_col), (i_o, fmt.output_col)):
        try:
            n = int(float(row[i]))
        except ValueError:
            raise TraceError(f"{path}: line {line}, column {col}: not a token count: {row[i]!r}") from None
        if n < 0 or (col == fmt.prompt_col and n == 0):
            raise TraceError(f"{path}: line {line}, column {col}: token count must be positive, got {n}")
        counts.append(n)
    return t, counts[0], counts[1]


def replay_window(
    trace: Trace,
    *,
    start_s: float = 0.0,
    duration_s: float | None = None,
    speedup: float = 1.0,
    sample: float = 1.0,
    seed: int = 0,
) -> Trace:
    """The requests of ``[start_s, start_s + duration_s)`` of the trace's own time, optionally thinned to a
    ``sample`` fraction (seeded), then time-scaled by ``speedup`` (2 = twice the rate) and shifted to start at 0."""
    if speedup <= 0 or not 0 < sample <= 1:
        raise ValueError("speedup must be > 0 and sample in (0, 1]")
    end = np.inf if duration_s is None else start_s + duration_s
    keep = (trace.t_s >= start_s) & (trace.t_s < end)
    if sample < 1:
        keep &= np.random.default_rng(seed).random(len(trace)) < sample
    t = trace.t_s[keep]
    if len(t) == 0:
        raise TraceError(f"{trace.source}: no request in the window starting at {start_s:g} s")
    return Trace(
        trace.source, (t - start_s) / speedup, trace.prompt_tokens[keep], trace.output_tokens[keep],
        trace.skipped_rows,
    )
