"""Self-contained HTML report of a campaign (tables plus matplotlib PNGs embedded as data URIs)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are written headless
import matplotlib.pyplot as plt
import pandas as pd

from workloads.results import ResultStore

SUMMARY_COLUMNS = {
    "point": "point", "setting": "setting", "backend": "power source", "offered_rps": "offered req/s",
    "completed": "done", "failed": "failed", "output_tokens": "out tokens", "energy_j": "energy J",
    "energy_per_token_j": "J/token accel.", "comprehensive_per_token_j": "J/token compr.",
    "floor_j_per_token": "floor J/token", "x_floor": "x floor",
    "water_per_token_ml": "mL water/token", "carbon_per_token_g": "gCO2e/token",
    "sci_per_token_g": "SCI gCO2e/token", "sci_status": "SCI", "ttft_p99_s": "TTFT p99 s",
    "tpot_p99_s": "TPOT p99 s", "slo_attainment": "SLO", "provenance": "provenance", "calibration": "calibration",
    "status": "status",
}


def figure_sources(points: pd.DataFrame) -> list[str]:
    """The distinct ``calibration`` labels of the points (older results without the column: their provenance)."""
    col = "calibration" if "calibration" in points.columns else "provenance"
    if col not in points.columns:
        return []
    return list(dict.fromkeys(str(v) for v in points[col].dropna() if str(v)))


def summary_frame(points: pd.DataFrame) -> pd.DataFrame:
    """The points' summary columns that exist, renamed to their report headings."""
    frame = points[[c for c in SUMMARY_COLUMNS if c in points.columns]]
    if "sci_status" in frame.columns:  # the parts an SCI lacks are in points.csv and the report; here its word
        frame = frame.assign(sci_status=frame["sci_status"].fillna("").astype(str).str.split(":").str[0])
    return frame.rename(columns=SUMMARY_COLUMNS)


FOOTPRINT_COLUMNS = {
    "point": "point", "offered_rps": "offered req/s", "concurrency": "users",
    "energy_per_token_j": "accelerator J/token", "comprehensive_per_token_j": "comprehensive J/token",
    "reference_j_per_token": "EcoLogits J/token (their estimate)", "reference_ratio": "ours / EcoLogits",
    "embodied_per_token_g": "embodied gCO2e/token", "sci_per_token_g": "SCI gCO2e/token",
    "sci_per_request_g": "SCI gCO2e/request", "embodied_share": "embodied share of SCI",
    "carbon_location_g": "operational gCO2e, location-based", "carbon_market_g": "operational gCO2e, market-based",
    "sci_status": "SCI",
}


def footprint_frame(points: pd.DataFrame) -> pd.DataFrame:
    """Both boundaries, embodied carbon, both carbon methods, the SCI and the reference estimate, per point."""
    p = points.copy()
    if {"embodied_per_token_g", "sci_per_token_g"} <= set(p.columns):
        p["embodied_share"] = p["embodied_per_token_g"] / p["sci_per_token_g"]
    return p[[c for c in FOOTPRINT_COLUMNS if c in p.columns]].rename(columns=FOOTPRINT_COLUMNS)


def _footprint_section(points: pd.DataFrame) -> list[str]:
    if "comprehensive_per_token_j" not in points.columns:
        return []
    out = [
        "<h2>Footprint: two boundaries, embodied carbon, SCI</h2>",
        "<p><b>accelerator</b>: the accelerators' energy only (what ML.ENERGY and most papers report); "
        "<b>comprehensive</b>: plus the host's CPU and DRAM for the replicas' share of their nodes (idle the whole "
        "window, dynamic at the accelerators' busy share), times PUE. <b>SCI</b> = ((E x I) + M) per R (Green "
        "Software Foundation, ISO/IEC 21031:2024): E comprehensive kWh, I location-based gCO2e/kWh, M embodied "
        "grams; a <i>partial</i> SCI lacks the parts named below and is a lower bound. Market-based carbon uses "
        "the site's contractual factor; – where the site declares none.</p>",
        footprint_frame(points).to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="–"),
    ]
    refs = [str(v) for v in points.get("reference", pd.Series(dtype=str)).dropna().unique() if str(v)]
    if refs:
        out.append("<p>Reference: " + "; ".join(html.escape(r) for r in refs) + ": per request energy from the "
                   "model's parameter count and output tokens at the point's mean output tokens and mean E2E "
                   "latency, with their own GPU and server figures and the site's PUE (their estimate, not a "
                   "measurement of this deployment).</p>")
    for col, title, sep in (("footprint_parts", "Where each part comes from", " | "),
                            ("sci_status", "SCI coverage", "; ")):
        values = [str(v) for v in points.get(col, pd.Series(dtype=str)).dropna().unique() if str(v)]
        if values:
            out.append(f"<h3>{title}</h3><ul>" + "".join(
                "<li>" + "</li><li>".join(html.escape(x.strip()) for x in v.split(sep)) + "</li>" for v in values
            ) + "</ul>")
    return out


def _png(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plot_energy(points: pd.DataFrame) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    by = "setting" if "setting" in points.columns and points["setting"].nunique() > 1 else "backend"
    for label, grp in points.groupby(by):
        grp = grp.sort_values("offered_rps")
        ax.plot(grp["offered_rps"], grp["energy_per_token_j"], marker="o", label=str(label))
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("energy per output token (J)")
    ax.set_title("Energy per token against offered load")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def _plot_latency(points: pd.DataFrame) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    p = points.sort_values("offered_rps")
    for col, label in (("ttft_p50_s", "TTFT p50"), ("ttft_p99_s", "TTFT p99"),
                       ("tpot_p50_s", "TPOT p50"), ("tpot_p99_s", "TPOT p99")):
        ax.plot(p["offered_rps"], p[col], marker="o", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("seconds")
    ax.set_title("Latency percentiles against offered load")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _png(fig)


def _plot_footprint(points: pd.DataFrame) -> str:
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    p = points.sort_values("offered_rps")
    labels = [f"{r:g}" for r in p["offered_rps"]]
    a.bar(labels, p["water_per_token_ml"], color="tab:blue")
    a.set_title("water per token (mL)")
    a.set_xlabel("offered req/s")
    b.bar(labels, p["carbon_per_token_g"], color="tab:gray")
    b.set_title("carbon per token (gCO2e)")
    b.set_xlabel("offered req/s")
    return _png(fig)


def pareto_front(points: pd.DataFrame, x: str = "tpot_p99_s", y: str = "energy_per_token_j") -> pd.Series:
    """True for points no other point beats on both ``x`` and ``y`` (lower is better on both)."""
    valid = points[[x, y]].notna().all(axis=1)
    front = pd.Series(False, index=points.index)
    for i, row in points[valid].iterrows():
        others = points[valid].drop(index=i)
        dominated = ((others[x] <= row[x]) & (others[y] <= row[y]) & ((others[x] < row[x]) | (others[y] < row[y])))
        front[i] = not dominated.any()
    return front


def _plot_pareto(points: pd.DataFrame) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    front = pareto_front(points)
    ax.scatter(points["tpot_p99_s"], points["energy_per_token_j"], c="tab:gray", label="points")
    f = points[front].sort_values("tpot_p99_s")
    ax.plot(f["tpot_p99_s"], f["energy_per_token_j"], "o-", c="tab:red", label="Pareto front")
    several = "setting" in points.columns and points["setting"].nunique() > 1
    for _, r in points.iterrows():
        tag = f"{r['offered_rps']:g}/s" + (f" {r['setting']}" if several else "")
        ax.annotate(tag, (r["tpot_p99_s"], r["energy_per_token_j"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("p99 time per output token (s)")
    ax.set_ylabel("energy per output token (J)")
    ax.set_title("Energy per token against tail latency")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def _plot_power(ts: pd.DataFrame) -> str:
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 4.8), sharex=True)
    offset = 0.0
    for point, grp in ts.groupby("point", sort=True):
        # Mean power over each sampling interval from the energy counters: instantaneous readings alias
        # with iteration boundaries (a prefill at TDP, then a decode at a third of it).
        per_device = grp.sort_values("t_s").groupby(["replica", "device"])
        mean_w = (per_device["energy_j"].diff() / per_device["t_s"].diff()).rename("w")
        total = grp.assign(w=mean_w).dropna(subset=["w"]).groupby("t_s")["w"].sum()
        a.plot(total.index + offset, total.values, label=f"point {point}")
        clock = grp.groupby("t_s")["clock_mhz"].mean()
        b.plot(clock.index + offset, clock.values)
        offset += float(grp["t_s"].max()) + 1.0
    a.set_ylabel("mean power, all devices (W)")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    b.set_ylabel("mean clock (MHz)")
    b.set_xlabel("time (s, points back to back)")
    b.grid(alpha=0.3)
    a.set_title("Power and clock over time")
    return _png(fig)


REPLICA_COLUMNS = ["point", "replica", "status", "output_tokens", "energy_j", "ttft_s", "tpot_s"]
"""What :func:`replica_breakdown` reads of ``requests.parquet``."""


def replica_breakdown(requests: pd.DataFrame) -> pd.DataFrame:
    """Per point and replica: successful requests, output tokens, attributed energy (J) and J per token."""
    ok = requests[requests["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame()
    g = ok.groupby(["point", "replica"])
    return pd.DataFrame({
        "requests": g.size(),
        "output tokens": g["output_tokens"].sum(),
        "attributed J": g["energy_j"].sum(),
        "J/token (attributed)": g["energy_j"].sum() / g["output_tokens"].sum(),
        "TTFT p50 s": g["ttft_s"].median(),
        "TPOT p50 s": g["tpot_s"].median(),
    }).reset_index()


def write_report(out: Path) -> Path:
    """Write ``report.html`` (summary, figures, per-replica breakdown) for the campaign in ``out``; returns its path."""
    store = ResultStore(out)
    store.repair()
    points = store.points()
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    title = html.escape(str(manifest.get("name", out.name)))
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title} — energy report</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;"
        "text-align:right}th{background:#f3f3f3}img{margin:8px 0}</style></head><body>",
        f"<h1>{title}</h1>",
        f"<p>site profile <b>{html.escape(str(manifest.get('site', '?')))}</b>, seed {manifest.get('seed', '?')}, "
        f"target {html.escape(str(manifest.get('target', '?')))}, status {manifest.get('status', '?')}.</p>",
    ]
    if points.empty:
        parts.append("<p>No point has been measured yet.</p>")
    else:
        sources = figure_sources(points)
        if sources:  # above every table and plot: a modeled figure never reads as measured
            parts.append("<p>Figures: " + "; ".join(f"<b>{html.escape(s)}</b>" for s in sources) + ".</p>")
        parts.append("<h2>Summary</h2>")
        parts.append(summary_frame(points).to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="–"))
        parts.extend(_footprint_section(points))
        parts.append("<h2>Energy per token</h2>")
        parts.append(f"<img alt='energy per token against offered load' src='{_plot_energy(points)}'>")
        parts.append("<h2>Latency</h2>")
        parts.append(f"<img alt='latency percentiles against offered load' src='{_plot_latency(points)}'>")
        parts.append("<h2>Pareto front</h2>")
        parts.append(f"<img alt='energy per token against p99 TPOT' src='{_plot_pareto(points)}'>")
        parts.append("<h2>Water and carbon</h2>")
        parts.append(f"<img alt='water and carbon per token' src='{_plot_footprint(points)}'>")
        ts = store.timeseries()
        if not ts.empty:
            parts.append("<h2>Power and clock over time</h2>")
            parts.append(f"<img alt='power and clock over time' src='{_plot_power(ts)}'>")
        per_replica = replica_breakdown(store.requests(REPLICA_COLUMNS))
        if not per_replica.empty:
            parts.append("<h2>Per replica</h2>")
            parts.append(per_replica.to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="–"))
        parts.append("<h2>All point columns</h2>")
        parts.append(points.to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="–"))
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path


COMPARE_COLUMNS = ["energy_per_token_j", "water_per_token_ml", "carbon_per_token_g", "tpot_p99_s", "ttft_p99_s",
                   "slo_attainment"]


def compare_frame(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Points of two campaigns joined on offered load, with B/A ratios of the cost and latency figures."""
    keys = ["offered_rps"]
    merged = a[keys + COMPARE_COLUMNS].merge(b[keys + COMPARE_COLUMNS], on=keys, suffixes=("_a", "_b"))
    for col in COMPARE_COLUMNS[:-1]:
        merged[f"{col}_b/a"] = merged[f"{col}_b"] / merged[f"{col}_a"]
    return merged


def write_comparison(dir_a: Path, dir_b: Path, out: Path) -> tuple[Path, pd.DataFrame]:
    """Write an HTML comparison of two campaigns (J/token against load) to ``out``; returns it and the joined points."""
    a, b = ResultStore(dir_a).points(), ResultStore(dir_b).points()
    merged = compare_frame(a, b)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, pts in ((dir_a.name or str(dir_a), a), (dir_b.name or str(dir_b), b)):
        p = pts.sort_values("offered_rps")
        ax.plot(p["offered_rps"], p["energy_per_token_j"], marker="o", label=label)
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("energy per output token (J)")
    ax.grid(alpha=0.3)
    ax.legend()
    body = [
        "<!doctype html><html><head><meta charset='utf-8'><title>campaign comparison</title></head><body>",
        f"<h1>{html.escape(str(dir_a))} (A) against {html.escape(str(dir_b))} (B)</h1>",
        merged.to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="–"),
        f"<img alt='energy per token of both campaigns' src='{_png(fig)}'>",
        "</body></html>",
    ]
    out.write_text("\n".join(body))
    return out, merged
