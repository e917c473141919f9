"""Request traces (Azure LLM inference traces 2023 and 2024, BurstGPT CSV; Mooncake JSON lines) read with
line-precise errors, then windowed, sampled and time-scaled for replay."""

from __future__ import annotations

import csv
import functools
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TextIO

import numpy as np

from profilers.errors import ConfigError

BUILTIN_TRACES = {"azure_conv_2023": "azure_llm_2023_conv.csv"}


class TraceError(ConfigError):
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
        """Mean arrival rate of the trace in req/s (NaN with fewer than two requests)."""
        span = float(self.t_s[-1] - self.t_s[0]) if len(self) > 1 else 0.0
        return (len(self) - 1) / span if span > 0 else float("nan")


@dataclass(frozen=True)
class _Format:
    name: str
    time_col: str
    prompt_col: str
    output_col: str
    absolute_time: bool
    seconds_per_unit: float = 1.0
    """Numeric timestamps' unit (Mooncake's are milliseconds)."""


FORMATS = (
    _Format("azure", "TIMESTAMP", "ContextTokens", "GeneratedTokens", absolute_time=True),
    _Format("burstgpt", "Timestamp", "Request tokens", "Response tokens", absolute_time=False),
)
# JSON lines, one request per line (Mooncake's traces; their hash_ids, the prompt's shared blocks, are not used).
JSONL_FORMATS = (
    _Format("mooncake", "timestamp", "input_length", "output_length", absolute_time=False, seconds_per_unit=1e-3),
)


def resolve_trace_path(name_or_path: str) -> Path:
    """The file of a shipped trace name or an existing path; TraceError otherwise."""
    if name_or_path in BUILTIN_TRACES:
        res = resources.files("workloads") / "data" / BUILTIN_TRACES[name_or_path]
        return Path(str(res))
    path = Path(name_or_path)
    if not path.is_file():
        raise TraceError(
            f"trace {name_or_path!r} not found: give a CSV or JSONL path or one of {sorted(BUILTIN_TRACES)}"
        )
    return path


def _expected() -> str:
    return "; ".join(f"{f.name}: {f.time_col}, {f.prompt_col}, {f.output_col}" for f in (*FORMATS, *JSONL_FORMATS))


def _detect(path: Path, header: list[str], formats: tuple[_Format, ...] = FORMATS, line: int = 1) -> _Format:
    for fmt in formats:
        if fmt.time_col in header:
            missing = [c for c in (fmt.prompt_col, fmt.output_col) if c not in header]
            if missing:
                raise TraceError(f"{path}: line {line}: {fmt.name} trace lacks column(s) {', '.join(missing)}")
            return fmt
    raise TraceError(f"{path}: line {line}: unknown trace header {header!r}; expected columns ({_expected()})")


_FRACTION = re.compile(r"\.(\d+)")


def _parse_time(value: object, fmt: _Format) -> float:
    if not fmt.absolute_time:
        if isinstance(value, bool):  # JSON true is no time, though float() takes it
            raise ValueError(f"not a number: {value!r}")
        return float(value) * fmt.seconds_per_unit  # type: ignore[arg-type]
    # ISO 8601 with any number of fractional digits (Azure 2023 has 7, datetime keeps 6) and an optional zone
    # (Azure 2024 writes "+00:00"). A zone-less time is UTC: the host's own zone and its DST must not bend the clock.
    text = str(value).strip()
    fraction = 0.0
    if (m := _FRACTION.search(text)) is not None:
        fraction = float(f"0.{m.group(1)}")
        text = text[: m.start()] + text[m.end() :]
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp() + fraction


class _Reader:
    """Collects a trace's rows; a bad row raises, or is counted when skipping bad rows. ``fmt`` is None until a
    JSON-lines trace's first record names it."""

    def __init__(self, path: Path, fmt: _Format | None, skip_bad_rows: bool) -> None:
        self.path, self.fmt, self.skip_bad_rows = path, fmt, skip_bad_rows
        self.times: list[float] = []
        self.prompts: list[int] = []
        self.outputs: list[int] = []
        self.skipped = 0

    def reject(self, message: str) -> None:
        self._skip_or_raise(TraceError(f"{self.path}: {message}"))

    def _skip_or_raise(self, error: TraceError) -> None:
        if not self.skip_bad_rows:
            raise error
        self.skipped += 1

    def add(self, line: int, t: object, prompt: object, output: object) -> None:
        assert self.fmt is not None
        try:
            row = _row(self.path, line, self.fmt, (t, prompt, output), self.times[-1] if self.times else None)
        except TraceError as e:
            self._skip_or_raise(e)
            return
        self.times.append(row[0])
        self.prompts.append(row[1])
        self.outputs.append(row[2])

    def trace(self) -> Trace:
        if self.fmt is None:
            raise TraceError(f"{self.path}: no JSON object on any line ({self.skipped} skipped)")
        if not self.times:
            raise TraceError(
                f"{self.path}: no usable request rows" + (f" ({self.skipped} skipped)" if self.skipped else "")
            )
        t = np.asarray(self.times)
        return Trace(str(self.path), t - t[0], np.asarray(self.prompts), np.asarray(self.outputs), self.skipped)


def load_trace(name_or_path: str, skip_bad_rows: bool = False) -> Trace:
    """Read a trace; bad rows raise :class:`TraceError` naming line and column unless ``skip_bad_rows``."""
    path = resolve_trace_path(name_or_path)
    with path.open(newline="") as f:
        first = f.readline()
        f.seek(0)
        if not first:
            raise TraceError(f"{path}: the file is empty")
        if first.lstrip().startswith("{"):
            return _load_jsonl(path, f, skip_bad_rows)
        reader = csv.reader(f)
        cols = [h.strip() for h in next(reader)]
        fmt = _detect(path, cols)
        i_t, i_p, i_o = cols.index(fmt.time_col), cols.index(fmt.prompt_col), cols.index(fmt.output_col)
        need = max(i_t, i_p, i_o) + 1
        rows = _Reader(path, fmt, skip_bad_rows)
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < need:
                rows.reject(f"line {line_no}: expected at least {need} columns, got {len(row)}")
            else:
                rows.add(line_no, row[i_t], row[i_p], row[i_o])
    return rows.trace()


def _load_jsonl(path: Path, lines: TextIO, skip_bad_rows: bool) -> Trace:
    rows = _Reader(path, None, skip_bad_rows)
    for line_no, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text.strip())
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
        except ValueError as e:
            rows.reject(f"line {line_no}: not a JSON object ({e})")
            continue
        if rows.fmt is None:  # the first record names the format, as a CSV header does
            rows.fmt = _detect(path, list(record), JSONL_FORMATS, line_no)
        fmt = rows.fmt
        if missing := [c for c in (fmt.time_col, fmt.prompt_col, fmt.output_col) if c not in record]:
            rows.reject(f"line {line_no}: record lacks key(s) {', '.join(missing)}")
        else:
            rows.add(line_no, record[fmt.time_col], record[fmt.prompt_col], record[fmt.output_col])
    return rows.trace()


def load_trace_cached(name_or_path: str, skip_bad_rows: bool = False) -> Trace:
    """:func:`load_trace`, read once per file version (points of a campaign reuse it)."""
    path = resolve_trace_path(name_or_path)
    return _load_cached(str(path), path.stat().st_mtime_ns, skip_bad_rows)


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int, skip_bad_rows: bool) -> Trace:
    return load_trace(path, skip_bad_rows=skip_bad_rows)


def _row(
    path: Path, line: int, fmt: _Format, values: tuple[object, object, object], previous: float | None
) -> tuple[float, int, int]:
    raw_t, raw_p, raw_o = values
    try:
        t = _parse_time(raw_t, fmt)
    except (ValueError, TypeError, OverflowError):
        raise TraceError(f"{path}: line {line}, column {fmt.time_col}: bad timestamp {raw_t!r}") from None
    if previous is not None and t < previous:
        raise TraceError(
            f"{path}: line {line}, column {fmt.time_col}: timestamp {raw_t!r} is earlier than the previous "
            "row (timestamps must not decrease); sort the trace or pass --skip-bad-rows"
        )
    counts = []
    for raw, col in ((raw_p, fmt.prompt_col), (raw_o, fmt.output_col)):
        try:
            if isinstance(raw, bool):
                raise ValueError
            n = int(float(raw))  # type: ignore[arg-type]
        except (ValueError, TypeError, OverflowError):
            raise TraceError(f"{path}: line {line}, column {col}: not a token count: {raw!r}") from None
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
