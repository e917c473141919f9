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
    "point": "point", "backend": "backend", "offered_rps": "offered req/s", "completed": "done",
    "failed": "failed", "output_tokens": "out tokens", "energy_j": "energy J", "energy_per_token_j": "J/token",
    "water_per_token_ml": "mL water/token", "carbon_per_token_g": "gCO2e/token", "ttft_p99_s": "TTFT p99 s",
    "tpot_p99_s": "TPOT p99 s", "slo_attainment": "SLO", "provenance": "provenance",
}


def summary_frame(points: pd.DataFrame) -> pd.DataFrame:
    return points[[c for c in SUMMARY_COLUMNS if c in points.columns]].rename(columns=SUMMARY_COLUMNS)


def _png(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plot_energy(points: pd.DataFrame) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for backend, grp in points.groupby("backend"):
        grp = grp.sort_values("offered_rps")
        ax.plot(grp["offered_rps"], grp["energy_per_token_j"], marker="o", label=str(backend))
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


def write_report(out: Path) -> Path:
    store = ResultStore(out)
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
        parts.append("<h2>Summary</h2>")
        parts.append(summary_frame(points).to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="–"))
        parts.append("<h2>Energy per token</h2>")
        parts.append(f"<img alt='energy per token against offered load' src='{_plot_energy(points)}'>")
        parts.append("<h2>Latency</h2>")
        parts.append(f"<img alt='latency percentiles against offered load' src='{_plot_latency(points)}'>")
        parts.append("<h2>Water and carbon</h2>")
        parts.append(f"<img alt='water and carbon per token' src='{_plot_footprint(points)}'>")
        parts.append("<h2>All point columns</h2>")
        parts.append(points.to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="–"))
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path
