"""Per-point statistics and the on-disk results of a campaign (appended point by point, atomically)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from profilers.footprint import SiteProfile, footprint
from profilers.meter import Measurement
from serving.slo import SLO
from workloads.client import RequestRecord

POINT_COLUMNS = [
    "point", "setting", "clock_mhz_mean", "backend", "offered_rps", "concurrency", "requests", "completed", "failed",
    "prompt_tokens", "output_tokens",
    "client_output_tokens", "duration_s", "achieved_rps", "output_tokens_per_s", "energy_j", "energy_per_token_j",
    "attributed_energy_j", "mean_power_w", "water_l", "water_per_token_ml", "carbon_g", "carbon_per_token_g",
    "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "e2e_p50_s", "e2e_p99_s", "slo_attainment",
    "goodput_rps", "prefix_cache_hit_ratio", "spec_acceptance_ratio", "provenance", "device_preset", "calibration",
    "site", "dropped_devices", "status", "notes",
]
DeviceLabel = tuple[str | None, str | None, str]
"""A metered device's (preset, calibration label, provenance); preset and label are None for a real device."""


TIMESERIES_COLUMNS = ["point", "t_s", "replica", "device", "energy_j", "power_w", "clock_mhz"]


def _pct(values: pd.Series, q: float) -> float:
    v = values.dropna()
    return float(np.percentile(v, q)) if len(v) else math.nan


def token_share(begin: Mapping[str, float], end: Mapping[str, float], part: str, whole: str) -> float:
    """How much counter ``part`` grew over a window against counter ``whole`` (keys ``replica/name``, summed over
    replicas); NaN where ``whole`` did not grow or is not exported (no prefix cache, no speculation)."""

    def grew(name: str) -> float:
        return sum(max(0.0, v - begin.get(k, 0.0)) for k, v in end.items() if k.endswith(f"/{name}"))

    total = grew(whole)
    return grew(part) / total if total > 0 else math.nan


def engine_token_shares(begin: Mapping[str, float], end: Mapping[str, float]) -> dict[str, float]:
    """The window's prefix-cache hit share of prompt tokens looked up, and speculative draft acceptance."""
    return {
        "prefix_cache_hit_ratio": token_share(begin, end, "prefix_cache_hit", "prefix_cache_queried"),
        "spec_acceptance_ratio": token_share(begin, end, "spec_accepted", "spec_proposed"),
    }


def calibration_columns(devices: Sequence[DeviceLabel], provenance: str) -> dict[str, str]:
    """A point's ``device_preset`` and ``calibration``: its devices' distinct presets and labels joined with ``; ``.

    A real device's label is its provenance (``measured``); with no device known, ``provenance`` (the window's).
    """
    presets = dict.fromkeys(p for p, _, _ in devices if p)
    labels = dict.fromkeys(label or prov for _, label, prov in devices) or {provenance: None}
    return {"device_preset": "; ".join(presets), "calibration": "; ".join(labels)}


def meets_slo(df: pd.DataFrame, slo: SLO) -> pd.Series:
    """A request meets the SLO if it completed within both targets (TPOT is moot for one-token outputs)."""
    tpot_ok = df["tpot_s"].isna() | (df["tpot_s"] <= slo.tpot_s)
    return (df["status"] == "ok") & (df["ttft_s"] <= slo.ttft_s) & tpot_ok


def summarize_point(
    point: int,
    offered_rps: float,
    records: list[RequestRecord],
    measurement: Measurement,
    backend: str,
    site: SiteProfile,
    slo: SLO,
    window_tokens: int | None = None,
    devices: Sequence[DeviceLabel] = (),
) -> dict[str, object]:
    """One row of ``points.csv``.

    Counts (``requests``, ``completed``, ``failed``) cover every request sent, so nothing is lost from the
    books; latency, SLO and goodput cover the measured phase only (warm-up and cool-down excluded).
    ``output_tokens`` are the tokens generated inside the energy window, counted by the server where it
    exports ``llm_energy_tokens_total`` (so energy and tokens cover the same window), else by the client.
    ``devices``: what models or measures each metered device, so a modeled figure always says which preset made it.
    """
    df = records_frame(records)
    ok_all = df[df["status"] == "ok"]
    measured = df[df["phase"] == "measure"]
    ok = measured[measured["status"] == "ok"]
    client_tokens = int(ok["output_tokens"].sum())
    out_tokens = window_tokens if window_tokens is not None else client_tokens
    energy = measurement.total_j if measurement.energy_j else math.nan
    fp = footprint(energy, site)
    per_tok = (lambda x: x / out_tokens) if out_tokens > 0 else (lambda x: math.nan)
    duration = measurement.duration_s
    met = meets_slo(measured, slo) if len(measured) else pd.Series(dtype=bool)
    notes = _degradation(df, measurement)
    return {
        "point": point,
        "setting": "as deployed",
        "clock_mhz_mean": math.nan,
        "backend": backend,
        "offered_rps": offered_rps,
        "concurrency": math.nan,
        "requests": len(df),
        "completed": len(ok_all),
        "failed": int((df["status"] != "ok").sum()),
        "prompt_tokens": int(ok["prompt_tokens"].sum()),
        "output_tokens": out_tokens,
        "client_output_tokens": client_tokens,
        "duration_s": duration,
        "achieved_rps": len(ok) / duration if duration > 0 else math.nan,
        "output_tokens_per_s": out_tokens / duration if duration > 0 else math.nan,
        "energy_j": energy,
        "energy_per_token_j": per_tok(energy),
        "attributed_energy_j": float(ok["energy_j"].sum(min_count=1)) if len(ok) else math.nan,
        "mean_power_w": energy / duration if duration > 0 else math.nan,
        "water_l": fp.water_l,
        "water_per_token_ml": per_tok(fp.water_l * 1000.0),
        "carbon_g": fp.carbon_g,
        "carbon_per_token_g": per_tok(fp.carbon_g),
        "ttft_p50_s": _pct(ok["ttft_s"], 50),
        "ttft_p99_s": _pct(ok["ttft_s"], 99),
        "tpot_p50_s": _pct(ok["tpot_s"], 50),
        "tpot_p99_s": _pct(ok["tpot_s"], 99),
        "e2e_p50_s": _pct(ok["e2e_s"], 50),
        "e2e_p99_s": _pct(ok["e2e_s"], 99),
        "slo_attainment": float(met.mean()) if len(met) else math.nan,
        "goodput_rps": float(met.sum()) / duration if duration > 0 else math.nan,
        "prefix_cache_hit_ratio": math.nan,  # from the engines' counters: engine_token_shares
        "spec_acceptance_ratio": math.nan,
        "provenance": measurement.provenance_label,
        **calibration_columns(devices, measurement.provenance_label),
        "site": site.name,
        "dropped_devices": ";".join(measurement.dropped_devices),
        "status": "degraded" if notes else "ok",
        "notes": "; ".join(notes),
    }


def _degradation(df: pd.DataFrame, measurement: Measurement) -> list[str]:
    """Why a point's figures are not to be trusted as they are (empty: they are)."""
    notes = []
    server_side = df[(df["status"] != "ok") & ((df["http_status"] == 0) | (df["http_status"] >= 500))]
    if len(server_side):
        notes.append(f"{len(server_side)} request(s) failed on the server side or in transport")
    if not measurement.energy_j:
        notes.append("energy unavailable (no llm_energy_* counters could be scraped)")
    if measurement.dropped_devices:
        notes.append(f"energy of {', '.join(measurement.dropped_devices)} dropped (counter reset or device gone)")
    return notes


def records_frame(records: list[RequestRecord]) -> pd.DataFrame:
    # Column by column with getattr: dataclasses.asdict deep-copies every ITL list and took ~30% of a
    # virtual-time run's CPU.
    cols = [f.name for f in dataclasses.fields(RequestRecord)]
    return pd.DataFrame({c: [getattr(r, c) for r in records] for c in cols}, columns=cols)


def _atomic_write(path: Path, write) -> None:  # type: ignore[no-untyped-def]
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


class ResultStore:
    """``points.csv`` and ``requests.parquet`` under one directory, rewritten atomically after each point,
    with one parquet part per point so a crash loses at most the point in flight."""

    def __init__(self, out_dir: Path) -> None:
        self.out = out_dir
        self.parts = out_dir / "parts"

    @property
    def points_path(self) -> Path:
        return self.out / "points.csv"

    @property
    def requests_path(self) -> Path:
        return self.out / "requests.parquet"

    def points(self) -> pd.DataFrame:
        if not self.points_path.exists():
            return pd.DataFrame(columns=POINT_COLUMNS)
        return pd.read_csv(self.points_path)

    def finished_points(self) -> set[int]:
        return set(int(p) for p in self.points()["point"])

    def add_point(
        self, summary: dict[str, object], records: list[RequestRecord], timeseries: list[dict[str, object]]
    ) -> None:
        """Write one measured point; the per-point files land before ``points.csv`` names the point done."""
        self.parts.mkdir(parents=True, exist_ok=True)
        frame = records_frame(records)
        point = int(summary["point"])  # type: ignore[call-overload]
        ts = pd.DataFrame(timeseries, columns=TIMESERIES_COLUMNS)
        _atomic_write(self.parts / f"timeseries-{point:04d}.parquet", lambda p: ts.to_parquet(p, index=False))
        _atomic_write(self.parts / f"point-{point:04d}.parquet", lambda p: frame.to_parquet(p, index=False))
        points = self.points()
        points = points[points["point"] != point]
        row = pd.DataFrame([summary], columns=POINT_COLUMNS)
        points = row if points.empty else pd.concat([points, row], ignore_index=True)
        points = points.sort_values("point")
        _atomic_write(self.points_path, lambda p: points.to_csv(p, index=False))
        self._rebuild_requests()

    def repair(self) -> None:
        """Rebuild the derived files from the per-point parts (after a kill between writes)."""
        if self.points_path.exists():
            self._rebuild_requests()

    def _rebuild_requests(self) -> None:
        done = self.finished_points()
        for pattern, target, empty in (
            ("point-*.parquet", self.requests_path, records_frame([])),
            ("timeseries-*.parquet", self.timeseries_path, pd.DataFrame(columns=TIMESERIES_COLUMNS)),
        ):
            # Parts of a point that never made it into points.csv (killed mid-write) are left out.
            parts = [p for p in sorted(self.parts.glob(pattern)) if int(p.stem.split("-")[1]) in done]
            frames = [pd.read_parquet(p) for p in parts]
            frame = pd.concat(frames, ignore_index=True) if frames else empty
            _atomic_write(target, lambda p, f=frame: f.to_parquet(p, index=False))

    @property
    def timeseries_path(self) -> Path:
        return self.out / "timeseries.parquet"

    def timeseries(self) -> pd.DataFrame:
        if not self.timeseries_path.exists():
            return pd.DataFrame(columns=TIMESERIES_COLUMNS)
        return pd.read_parquet(self.timeseries_path)

    def requests(self) -> pd.DataFrame:
        return pd.read_parquet(self.requests_path) if self.requests_path.exists() else records_frame([])
