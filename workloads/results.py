"""Per-point statistics and the on-disk results of a campaign (appended point by point, atomically)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from profilers.footprint import SiteProfile, footprint
from profilers.lifecycle import window_lifecycle
from profilers.meter import Measurement
from profilers.reference import ReferenceEstimate
from serving.slo import SLO
from workloads.client import RequestRecord


@dataclass(frozen=True)
class PointRow:
    """One row of ``points.csv``: one sweep point (a setting at a load), built once by :func:`summarize_point`.

    Counts cover every request sent, so nothing is lost from the books; latency, SLO and goodput cover the
    measured phase only (warm-up and cool-down excluded); energy, tokens and power cover the metering window.
    """

    point: int
    setting: str
    """The sweep setting: ``as deployed``, pinned knobs (``clock_mhz=1200 max_num_seqs=64``) or ``policy=...``."""
    clock_mhz_mean: float
    """Mean device clock over the point's power time series (NaN where no device reports one)."""
    backend: str
    offered_rps: float
    """The sweep's rate; for closed-loop users, the rate they sent at within the measured window."""
    concurrency: float
    """Closed-loop users (NaN for an open-loop point)."""
    requests: int
    completed: int
    failed: int
    prompt_tokens: int
    output_tokens: int
    """Tokens generated inside the energy window: the server's count where it exports one, else the client's."""
    client_output_tokens: int
    duration_s: float
    """The metering window."""
    achieved_rps: float
    output_tokens_per_s: float
    energy_j: float
    """Accelerator-boundary energy: the metered devices' own (GPU/accelerator only, as ML.ENERGY reports it)."""
    energy_per_token_j: float
    """The accelerator-boundary figure, as it always was; the comprehensive one is ``comprehensive_per_token_j``."""
    attributed_energy_j: float
    """The engines' per-request energy summed over the completed measured requests."""
    mean_power_w: float
    water_l: float
    water_per_token_ml: float
    carbon_g: float
    """Operational gCO2e of the accelerator energy x PUE at the site's CIF (location-based)."""
    carbon_per_token_g: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    e2e_p50_s: float
    e2e_p99_s: float
    slo_attainment: float
    """Share of measured requests that completed within both SLO targets."""
    goodput_rps: float
    prefix_cache_hit_ratio: float
    """Prompt tokens found in the prefix cache over those looked up, from the engines' counters (NaN: none)."""
    spec_acceptance_ratio: float
    """Accepted over proposed speculative tokens, from the engines' counters (NaN: no speculation)."""
    provenance: str
    """``measured``, ``modeled``, ``mixed`` or ``unavailable``: where the energy came from."""
    device_preset: str
    """The presets that model the point's emulated devices (empty for real devices)."""
    calibration: str
    """How far the modeled figures are from measurements (the preset's calibration label), or ``measured``."""
    site: str
    dropped_devices: str
    """Devices whose counter reset or vanished in the window (their energy is not counted)."""
    status: str
    """``ok``; ``degraded``, its figures not to be trusted as they are; ``failed``, no request succeeded (``--resume``
    measures it again). The reasons are in ``notes``."""
    notes: str
    floor_j_per_token: float = math.nan
    """The emulated device's physical floor of energy per output token at the point's mean lengths (NaN: real)."""
    x_floor: float = math.nan
    """``energy_per_token_j`` over the floor: never below 1."""
    # The footprint as the standards count it (profilers/lifecycle.py). Boundaries: accelerator (above) and
    # comprehensive; a part that cannot be measured is modeled or missing, and a missing part gives NaN, never 0.
    host_energy_j: float = math.nan
    """Host CPU + DRAM energy of the replicas' share of their nodes (idle for the whole window plus dynamic at the
    accelerators' busy share); modeled from a host power preset, NaN where the host is unknown."""
    comprehensive_energy_j: float = math.nan
    """Comprehensive boundary: (accelerator + host CPU + DRAM) x PUE; NaN where a host part is missing."""
    comprehensive_per_token_j: float = math.nan
    """``comprehensive_energy_j`` per output token."""
    carbon_location_g: float = math.nan
    """Operational gCO2e of the SCI's energy (comprehensive where known) at the grid's intensity (location-based)."""
    carbon_market_g: float = math.nan
    """The same energy at the site's contractual factor (market-based); NaN: the site declares none."""
    embodied_g: float = math.nan
    """Embodied gCO2e charged to the window: devices and host share, amortised over their service lives."""
    embodied_per_token_g: float = math.nan
    sci_per_token_g: float = math.nan
    """GSF SCI per output token: ((E x I) + M) / R, E the comprehensive kWh (accelerator x PUE where the host is
    missing), I location-based, M embodied."""
    sci_per_request_g: float = math.nan
    """The same SCI per completed request."""
    sci_status: str = ""
    """``complete``, or ``partial: <parts with no figure>`` (the SCI lacks them: it is a lower bound)."""
    footprint_parts: str = ""
    """Each part of the footprint and where it comes from (measured, modeled, site, the embodied figures' sources),
    separated by `` | ``."""
    reference_j_per_token: float = math.nan
    """A third party's estimate for the same model and tokens, PUE included (EcoLogits: their GPUs plus their
    server share): J per output token at the point's mean output tokens and mean E2E latency. NaN: none."""
    reference_ratio: float = math.nan
    """``comprehensive_per_token_j`` over ``reference_j_per_token`` (ours / theirs)."""
    reference: str = ""
    """Whose estimate ``reference_j_per_token`` is (``EcoLogits 0.11.3 estimate ...``), or why there is none."""
    energy_source: str = ""
    """Where the window's energy came from: ``family: endpoint(s)`` (``ours``: llm_energy_energy_joules_total,
    ``dcgm``, ``kepler_node``, ``kepler_container``; ``prometheus: ...`` for a query), or ``target /metrics``."""
    energy_uncertainty_j: float = math.nan
    """What the energy window may be off by, where it is read through Prometheus: the mean power times the scrape
    interval (an edge's sample is up to one interval old); NaN for direct scrapes (exact to the scrape)."""
    token_source: str = ""
    """Where ``output_tokens`` came from: ``family: endpoint(s)`` of a server token counter (``ours``, ``vllm``,
    ``sglang``, ``tgi``), or ``client usage`` (the responses' ``usage``, no server counter)."""
    sim_speed_x: float = math.nan
    """Virtual time only: the point's simulated seconds per wall-clock second of simulating it (its target built,
    run and stopped; NaN in real time). The one column that differs between two runs of the same campaign."""


POINT_COLUMNS = [f.name for f in dataclasses.fields(PointRow)]
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


FloorFn = Callable[[int, int], float]
"""A device's floor of joules per output token for mean (prompt, output) lengths (``deploy`` supplies it)."""
ReferenceFn = Callable[[int, float, float], "ReferenceEstimate | None"]
"""A third party's energy of a request of (output tokens, E2E seconds) at a PUE, for the served model (``deploy``
supplies it, from the model's shape)."""


def summarize_point(
    point: int,
    setting: str,
    offered_rps: float,
    requests: pd.DataFrame,
    measurement: Measurement,
    backend: str,
    site: SiteProfile,
    slo: SLO,
    *,
    window_tokens: int | None = None,
    devices: Sequence[DeviceLabel] = (),
    concurrency: float = math.nan,
    clock_mhz_mean: float = math.nan,
    token_shares: Mapping[str, float] | None = None,
    notes: Sequence[str] = (),
    floor: FloorFn | None = None,
    reference: ReferenceFn | None = None,
    energy_source: str = "",
    token_source: str = "",
    energy_uncertainty_j: float = math.nan,
) -> PointRow:
    """The :class:`PointRow` of a measured point.

    ``requests``: its requests' scalars in request order (:meth:`RecordWriter.scalars`, :data:`SUMMARY_COLUMNS`).
    ``window_tokens``: tokens the server counted inside the energy window (None: the client's count).
    ``devices``: what models or measures each metered device, so a modeled figure always says which preset made it.
    ``token_shares``: :func:`engine_token_shares` of the window; ``notes``: why the point is degraded, found by
    the caller; ``floor``: the device's energy floor, for emulated devices.
    """
    df = requests
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
    reasons = [*(["no request succeeded"] if ok_all.empty else []), *_degradation(df, measurement), *notes]
    shares = token_shares or {}
    floor_j = (floor(max(1, round(ok_all["prompt_tokens"].mean())), max(1, round(ok_all["output_tokens"].mean())))
               if floor is not None and len(ok_all) else math.nan)
    life = window_lifecycle(
        energy, duration, [p for p, _, _ in devices], site,
        busy_share=_busy_share(ok, energy), accelerator_provenance=measurement.provenance_label,
    )
    ref = (reference(max(1, round(ok["output_tokens"].mean())), float(ok["e2e_s"].mean()), site.pue)
           if reference is not None and len(ok) else None)
    comprehensive_per_tok = per_tok(life.comprehensive_j)
    return PointRow(
        point=point,
        setting=setting,
        clock_mhz_mean=clock_mhz_mean,
        backend=backend,
        offered_rps=offered_rps,
        concurrency=concurrency,
        requests=len(df),
        completed=len(ok_all),
        failed=int((df["status"] != "ok").sum()),
        prompt_tokens=int(ok["prompt_tokens"].sum()),
        output_tokens=out_tokens,
        client_output_tokens=client_tokens,
        duration_s=duration,
        achieved_rps=len(ok) / duration if duration > 0 else math.nan,
        output_tokens_per_s=out_tokens / duration if duration > 0 else math.nan,
        energy_j=energy,
        energy_per_token_j=per_tok(energy),
        attributed_energy_j=float(ok["energy_j"].sum(min_count=1)) if len(ok) else math.nan,
        mean_power_w=energy / duration if duration > 0 else math.nan,
        water_l=fp.water_l,
        water_per_token_ml=per_tok(fp.water_l * 1000.0),
        carbon_g=fp.carbon_g,
        carbon_per_token_g=per_tok(fp.carbon_g),
        ttft_p50_s=_pct(ok["ttft_s"], 50),
        ttft_p99_s=_pct(ok["ttft_s"], 99),
        tpot_p50_s=_pct(ok["tpot_s"], 50),
        tpot_p99_s=_pct(ok["tpot_s"], 99),
        e2e_p50_s=_pct(ok["e2e_s"], 50),
        e2e_p99_s=_pct(ok["e2e_s"], 99),
        slo_attainment=float(met.mean()) if len(met) else math.nan,
        goodput_rps=float(met.sum()) / duration if duration > 0 else math.nan,
        prefix_cache_hit_ratio=shares.get("prefix_cache_hit_ratio", math.nan),
        spec_acceptance_ratio=shares.get("spec_acceptance_ratio", math.nan),
        provenance=measurement.provenance_label,
        **calibration_columns(devices, measurement.provenance_label),
        site=site.name,
        dropped_devices=";".join(measurement.dropped_devices),
        status="failed" if ok_all.empty else "degraded" if reasons else "ok",
        notes="; ".join(reasons),
        floor_j_per_token=floor_j,
        x_floor=per_tok(energy) / floor_j if floor_j > 0 else math.nan,
        host_energy_j=life.host_cpu_j + life.host_dram_j,
        comprehensive_energy_j=life.comprehensive_j,
        comprehensive_per_token_j=comprehensive_per_tok,
        carbon_location_g=life.carbon_location_g,
        carbon_market_g=life.carbon_market_g,
        embodied_g=life.embodied_g,
        embodied_per_token_g=per_tok(life.embodied_g),
        sci_per_token_g=life.sci_per(out_tokens) if math.isfinite(energy) else math.nan,
        sci_per_request_g=life.sci_per(len(ok)) if math.isfinite(energy) else math.nan,
        sci_status=life.sci_status if math.isfinite(energy) else "missing: no energy",
        footprint_parts=" | ".join(life.parts),
        reference_j_per_token=ref.j_per_token if ref else math.nan,
        reference_ratio=comprehensive_per_tok / ref.j_per_token if ref and ref.j_per_token > 0 else math.nan,
        reference=ref.label if ref else ("" if reference is None else "none: ecologits not installed"),
        energy_source=energy_source,
        energy_uncertainty_j=energy_uncertainty_j,
        token_source=token_source if window_tokens is not None else "client usage",
    )


def _busy_share(ok: pd.DataFrame, energy_j: float) -> float:
    """The accelerators' busy share, for the host's dynamic power: the measured requests' attributed energy over
    the window's (1 where the engines attribute none, the conservative side)."""
    attributed = float(ok["energy_j"].sum(min_count=1)) if len(ok) else math.nan
    if not (math.isfinite(attributed) and energy_j > 0):
        return 1.0
    return min(1.0, max(0.0, attributed / energy_j))


def server_side_failures(records: pd.DataFrame) -> pd.DataFrame:
    """Requests that failed in transport or on the server (not refused as invalid): the target's fault."""
    failed = records[records["status"] != "ok"]
    return failed[(failed["http_status"] == 0) | (failed["http_status"] >= 500)]


def _degradation(df: pd.DataFrame, measurement: Measurement) -> list[str]:
    """Why a point's figures are not to be trusted as they are (empty: they are)."""
    notes = []
    server_side = server_side_failures(df)
    if len(server_side):
        notes.append(f"{len(server_side)} request(s) failed on the server side or in transport")
    if not measurement.energy_j:
        notes.append("energy unavailable (no energy counters could be scraped)")
    if measurement.dropped_devices:
        notes.append(f"energy of {', '.join(measurement.dropped_devices)} dropped (counter reset or device gone)")
    return notes


def records_frame(records: list[RequestRecord]) -> pd.DataFrame:
    """Request records as a DataFrame with one column per RequestRecord field."""
    # Column by column with getattr: dataclasses.asdict deep-copies every ITL list and took ~30% of a
    # virtual-time run's CPU.
    cols = [f.name for f in dataclasses.fields(RequestRecord)]
    return pd.DataFrame({c: [getattr(r, c) for r in records] for c in cols}, columns=cols)


REQUEST_SCHEMA = pa.Schema.from_pandas(records_frame([RequestRecord(0, 0, 0.0, 1, 1, itl_s=[0.0])]),
                                       preserve_index=False)
"""``requests.parquet``'s schema, as pandas writes a frame of records. Fixed, because a chunk whose requests have no
inter-token latency (all failed, or one token each) would otherwise be typed ``list<null>``."""
SUMMARY_COLUMNS = ["request_index", "intended_send_s", "prompt_tokens", "output_tokens", "ttft_s", "tpot_s", "e2e_s",
                   "energy_j", "phase", "status", "http_status", "error"]
"""The per-request scalars a point's summary reads (:func:`summarize_point`, the offered rate, whether the target
is down): what a point keeps of its requests once they are written."""
CHUNK_ROWS = 1024
"""Requests per row group of a point's part: what a point holds of its requests' token timelines at most (plus
those that finished ahead of an earlier request still running)."""


def records_table(records: list[RequestRecord]) -> pa.Table:
    """Request records as an Arrow table of :data:`REQUEST_SCHEMA` (a row group of ``requests.parquet``)."""
    return pa.Table.from_pandas(records_frame(records), schema=REQUEST_SCHEMA, preserve_index=False)


class RecordWriter:
    """A point's request records on their way to disk, in chunks of ``chunk_rows``, so a long window never holds
    every request's token timeline: each chunk goes to ``write`` (a part file, or a Ray task's stream to the
    driver that writes it) and the point keeps only the :data:`SUMMARY_COLUMNS` of its requests.

    Rows are written in request order, as the target numbers them (0, 1, ...), whatever order requests finish
    in: :meth:`add` holds a finished request until every earlier one has finished (so ``requests.parquet`` is
    the same as when a point's records were written at once). A record written has its ITL list emptied (the
    target may still hold the record object; the list is the bulk of it).
    """

    def __init__(self, write: Callable[[pa.Table], None], chunk_rows: int | None = None) -> None:
        self._write = write
        self.chunk_rows = chunk_rows or CHUNK_ROWS
        self._early: dict[int, RequestRecord] = {}  # finished ahead of an earlier request
        self._next = 0
        self._ready: list[RequestRecord] = []
        self._scalars: list[pd.DataFrame] = []
        self.rows = 0
        self.peak_held = 0
        """The most records held at once, written or not (for the tests: bounded by the chunk and the requests
        in flight, not the window)."""

    def add(self, rec: RequestRecord) -> None:
        """A finished request (streamed: numbered by the target in the order it sends)."""
        self._early[rec.request_index] = rec
        while (nxt := self._early.pop(self._next, None)) is not None:
            self._ready.append(nxt)
            self._next += 1
        self.peak_held = max(self.peak_held, len(self._early) + len(self._ready))
        if len(self._ready) >= self.chunk_rows:
            self._flush()

    def extend(self, records: list[RequestRecord]) -> None:
        """Every record of a point at once, in the order given (a target that returns them only at the end)."""
        for i in range(0, len(records), self.chunk_rows):
            self._ready = list(records[i:i + self.chunk_rows])
            self.peak_held = max(self.peak_held, len(self._ready))
            self._flush()

    def _flush(self) -> None:
        if not self._ready:
            return
        frame = records_frame(self._ready)
        self._write(pa.Table.from_pandas(frame, schema=REQUEST_SCHEMA, preserve_index=False))
        self._scalars.append(frame[SUMMARY_COLUMNS])
        self.rows += len(self._ready)
        for r in self._ready:
            r.itl_s = []  # on disk now; the target's list of records may outlive the chunk
        self._ready = []

    def close(self) -> pd.DataFrame:
        """Write what is left (requests that never finished in order are written in request order) and return
        the point's scalars (:data:`SUMMARY_COLUMNS`, index 0..n-1, one row per request, as written)."""
        self._ready.extend(self._early[i] for i in sorted(self._early))
        self._early.clear()
        self._flush()
        if not self._scalars:
            return records_frame([])[SUMMARY_COLUMNS]
        frame = pd.concat(self._scalars, ignore_index=True) if len(self._scalars) > 1 else self._scalars[0]
        self._scalars = [frame]
        return frame


class RequestPart:
    """One point's ``parts/point-NNNN.parquet``, written a row group at a time under a hidden temporary name and
    renamed by :meth:`commit` (a killed run leaves no half part a rebuild would read)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmp = path.with_name(f".{path.name}.tmp")
        self._writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        """Append ``table`` (:data:`REQUEST_SCHEMA`) as a row group."""
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self._tmp, REQUEST_SCHEMA)
        self._writer.write_table(table)

    def commit(self) -> None:
        """Close the part under its final name (a point with no requests gets an empty part)."""
        if self._writer is None:
            self.write(records_table([]))
        assert self._writer is not None
        self._writer.close()
        self._writer = None
        os.replace(self._tmp, self.path)

    def discard(self) -> None:
        """Drop what was written (the point runs again: a Ray worker died under it)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._tmp.unlink(missing_ok=True)


def _atomic_write(path: Path, write) -> None:  # type: ignore[no-untyped-def]
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


class ResultStore:
    """``points.csv``, ``requests.parquet`` and ``timeseries.parquet`` under one directory. Each point's requests
    and time series are parts of their own (``parts/``), written before ``points.csv`` names the point, which is
    rewritten atomically after each point; the derived tables are rebuilt from the parts by :meth:`finish` (at
    the end of a campaign, however it ends) and :meth:`repair`, so a crash loses at most the point in flight."""

    def __init__(self, out_dir: Path) -> None:
        self.out = out_dir
        self.parts = out_dir / "parts"

    @property
    def points_path(self) -> Path:
        """Path of the per-point summary table, ``points.csv``."""
        return self.out / "points.csv"

    @property
    def requests_path(self) -> Path:
        """Path of the per-request table, ``requests.parquet``."""
        return self.out / "requests.parquet"

    def points(self) -> pd.DataFrame:
        """The per-point summary table (empty with the expected columns if there is none yet)."""
        if not self.points_path.exists():
            return pd.DataFrame(columns=POINT_COLUMNS)
        return pd.read_csv(self.points_path)

    def finished_points(self) -> set[int]:
        """Points measured for good: a ``failed`` point is measured again on ``--resume``."""
        points = self.points()
        return set(int(p) for p in points[points["status"] != "failed"]["point"])

    def open_part(self, point: int) -> RequestPart:
        """A new part for ``point``'s requests (what an earlier, uncommitted one wrote is replaced on commit)."""
        return RequestPart(self.parts / f"point-{point:04d}.parquet")

    def add_point(self, row: PointRow, requests: RequestPart, timeseries: list[dict[str, object]]) -> None:
        """Write one measured point: its requests' part is committed and its time series written before
        ``points.csv`` names the point done."""
        self.parts.mkdir(parents=True, exist_ok=True)
        requests.commit()
        ts = pd.DataFrame(timeseries, columns=TIMESERIES_COLUMNS)
        _atomic_write(self.parts / f"timeseries-{row.point:04d}.parquet", lambda p: ts.to_parquet(p, index=False))
        points = self.points()
        points = points[points["point"] != row.point]
        new = pd.DataFrame([dataclasses.asdict(row)], columns=POINT_COLUMNS)
        points = new if points.empty else pd.concat([points, new], ignore_index=True)
        points = points.sort_values("point")
        _atomic_write(self.points_path, lambda p: points.to_csv(p, index=False))

    def finish(self) -> None:
        """Rebuild ``requests.parquet`` and ``timeseries.parquet`` from the parts of the points in ``points.csv``.
        Once per campaign, not per point: rebuilding after every point read every earlier point's requests again
        (quadratic in the points, and on the writer's core while Ray tasks simulate)."""
        if self.points_path.exists():
            self._rebuild()

    def repair(self) -> None:
        """Rebuild the derived files from the per-point parts where a point was written after them (a campaign
        killed before :meth:`finish`); up-to-date ones are left as they are (a long campaign's are gigabytes)."""
        if not self.points_path.exists():
            return
        written = self.points_path.stat().st_mtime_ns
        if any(not p.exists() or p.stat().st_mtime_ns < written for p in (self.requests_path, self.timeseries_path)):
            self._rebuild()

    def _committed(self, pattern: str) -> list[Path]:
        done = set(int(p) for p in self.points()["point"])  # failed points too: their requests are on the books
        # Parts of a point that never made it into points.csv (killed mid-write) are left out.
        return [p for p in sorted(self.parts.glob(pattern)) if int(p.stem.split("-")[1]) in done]

    def _rebuild(self) -> None:
        parts = self._committed("point-*.parquet")
        if parts:
            # A row group at a time: a campaign's requests need not fit in memory. Cast: parts written before the
            # schema was fixed may type an all-empty ITL column as list<null>.
            def write(path: Path) -> None:
                with pq.ParquetWriter(path, REQUEST_SCHEMA) as out:
                    for part in parts:
                        f = pq.ParquetFile(part)
                        for i in range(f.num_row_groups):
                            if len(group := f.read_row_group(i)):  # an old empty part is typed double throughout
                                out.write_table(group.cast(REQUEST_SCHEMA))
            _atomic_write(self.requests_path, write)
        else:
            _atomic_write(self.requests_path, lambda p: records_frame([]).to_parquet(p, index=False))
        frames = [pd.read_parquet(p) for p in self._committed("timeseries-*.parquet")]
        ts = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TIMESERIES_COLUMNS)
        _atomic_write(self.timeseries_path, lambda p: ts.to_parquet(p, index=False))

    @property
    def timeseries_path(self) -> Path:
        """Path of the power and clock time series, ``timeseries.parquet``."""
        return self.out / "timeseries.parquet"

    def timeseries(self) -> pd.DataFrame:
        """The power and clock time series (empty with the expected columns if there is none yet)."""
        if not self.timeseries_path.exists():
            return pd.DataFrame(columns=TIMESERIES_COLUMNS)
        return pd.read_parquet(self.timeseries_path)

    def requests(self, columns: list[str] | None = None) -> pd.DataFrame:
        """Every request record so far (an empty frame with the record columns if there is none); ``columns``: only
        those (leaving out ``itl_s``, the bulk of a long campaign's requests, when it is not needed)."""
        if not self.requests_path.exists():
            return records_frame([])[columns or slice(None)]
        return pd.read_parquet(self.requests_path, columns=columns)
