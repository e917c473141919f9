"""The summary the campaign prints: every figure whole, whatever the terminal's width."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from deploy.cli import _print_summary


def _points(statuses: list[str]) -> pd.DataFrame:
    n = len(statuses)
    return pd.DataFrame({
        "point": range(n), "setting": ["as deployed"] * n, "backend": ["emulated"] * n,
        "offered_rps": [2.0 * (i + 1) for i in range(n)], "completed": [32] * n, "failed": [0] * n,
        "output_tokens": [2525] * n, "energy_j": [11912.5] * n, "energy_per_token_j": [2.71316] * n,
        "floor_j_per_token": [1.177] * n, "x_floor": [2.305] * n, "water_per_token_ml": [0.00287812] * n,
        "carbon_per_token_g": [0.000297812] * n, "ttft_p99_s": [0.02061] * n, "tpot_p99_s": [0.006863] * n,
        "slo_attainment": [1.0] * n, "provenance": ["modeled"] * n, "status": statuses,
    })


def _printed(points: pd.DataFrame, width: int) -> str:
    console = Console(width=width, record=True)
    _print_summary(console, points, Path("runs/x"))
    return console.export_text()


@pytest.mark.parametrize("width", [60, 80, 120, 200])
def test_per_token_figures_are_never_cut_short(width: int) -> None:
    text = _printed(_points(["ok", "ok", "ok"]), width)
    for figure in ("2.713", "0.002878", "0.0002978", "1.191e+04"):
        assert figure in text
    assert "…" not in text


def test_a_text_shared_by_every_point_goes_to_the_caption_and_a_differing_one_stays() -> None:
    text = _printed(_points(["ok", "slo_missed"]), 200)
    assert "power source: emulated" in text and "provenance: modeled" in text
    assert "status:" not in text and "slo_missed" in text


@pytest.mark.parametrize("width", [120, 170, 250])
def test_the_full_footprint_table_is_never_cropped(width: int) -> None:
    """With both boundaries and the SCI the table is wider than a log's 170 columns: rich would crop its last
    columns, so it turns to a row per figure instead."""
    points = _points(["ok", "ok"]).assign(
        comprehensive_per_token_j=[6.116, 2.443], sci_per_token_g=[0.0007893, 0.0002848], sci_status="complete",
    )
    text = _printed(points, width)
    for figure in ("6.116", "0.0007893", "0.006863", "SLO"):
        assert figure in text, text
    assert max(map(len, text.splitlines())) <= width
