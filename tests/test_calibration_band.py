"""The error travels with the figure: calibration reports, their loading errors, and the label on every point."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from deploy.cli import main
from profilers.exporter import DeviceSample, ExportSnapshot, build_registry
from profilers.footprint import load_site_profile
from profilers.scrape import parse_counters
from serving.config import EmulatedEngineConfig
from serving.emulated.calibration import (
    CalibrationReport,
    device_calibration,
    load_calibration,
    modeled_label,
    preset_name,
)
from serving.emulated.engine import EmulatedEngine
from serving.emulated.physics import PresetError, load_device
from workloads.results import POINT_COLUMNS, calibration_columns

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "serving" / "emulated" / "presets"
REPORT = """\
preset: h100_sxm
dataset: ML.ENERGY Benchmark v3
dataset_file: rows.csv
gpu: H100
rows: 48
command: python bench/calibration.py --gpu H100 --write
error:
  j_per_token: {median: 0.09, worst: 0.24}
  power: {median: 0.05, worst: 0.15}
  throughput: {median: 0.06, worst: 0.2}
  median_itl: {median: 0.08, worst: 0.25}
"""
BAND = "modeled: h100_sxm, J/token within 9% of ML.ENERGY Benchmark v3 (median of 48 rows; worst 24%)"


def _report(folder: Path, text: str = REPORT, name: str = "report.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rows.csv").write_text("gpu_model,j_per_token\nH100,0.5\n")
    path = folder / name
    path.write_text(text)
    return path


def _preset(folder: Path, calibration: str | None, name: str = "h100_sxm") -> Path:
    """A copy of the shipped H100 preset, naming ``calibration`` as its report."""
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(line for line in (PRESETS / "h100_sxm.yaml").read_text().splitlines(keepends=True)
                   if not line.startswith("calibration:"))  # the shipped preset names its own report
    if calibration is not None:
        text += f"calibration: {calibration}\n"
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def _line_of(path: Path, key: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.startswith(f"{key}:"))


# --- reports ---------------------------------------------------------------------------------------
def test_a_good_report_loads_and_labels_the_figures(tmp_path: Path) -> None:
    report = load_calibration(str(_report(tmp_path)))
    assert isinstance(report, CalibrationReport)
    assert report.rows == 48 and report.error.power.worst == 0.15
    assert modeled_label("h100_sxm", report) == BAND
    assert modeled_label("a40", None) == "modeled: a40, uncalibrated"
    small = report.model_copy(update={"error": report.error.model_copy(update={
        "j_per_token": report.error.j_per_token.model_copy(update={"median": 0.004})})})
    assert "within 0.4% of" in modeled_label("h100_sxm", small)


def test_a_missing_report_is_named() -> None:
    with pytest.raises(PresetError, match=r"no calibration report 'no_such_report'.*shipped"):
        load_calibration("no_such_report")


def test_bad_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = _report(tmp_path, REPORT.replace("gpu: H100", "gpu: H100: SXM"))
    with pytest.raises(PresetError, match=rf"{re.escape(str(path))} line 4: not valid YAML: mapping values"):
        load_calibration(str(path))


def test_a_bad_field_names_the_file_line_and_field(tmp_path: Path) -> None:
    path = _report(tmp_path, REPORT.replace("power: {median: 0.05", "power: {median: lots"))
    with pytest.raises(PresetError) as e:
        load_calibration(str(path))
    assert f"{path} line 9: error.power.median: Input should be a valid number" in str(e.value)


@pytest.mark.parametrize(
    ("change", "line", "what"),
    [
        (("rows: 48\n", ""), 1, "rows: Field required"),  # missing at the top: the file's first line
        (("  power: {median: 0.05, worst: 0.15}", "  power: {worst: 0.15}"), 9, "error.power.median: Field required"),
        (("gpu: H100\n", "gpu: H100\nnotes: extra\n"), 5, "notes: Extra inputs are not permitted"),
        (("worst: 0.24", "worst: 0.01"), 8, "error.j_per_token: Value error, worst must not be below median"),
        (("rows: 48", "rows: 0"), 5, "rows: Input should be greater than 0"),
        (("dataset_file: rows.csv", "dataset_file: gone.csv"), 3, "dataset_file: 'gone.csv' is not in the report"),
    ],
)
def test_each_problem_points_at_its_line(tmp_path: Path, change: tuple[str, str], line: int, what: str) -> None:
    path = _report(tmp_path, REPORT.replace(*change))
    with pytest.raises(PresetError) as e:
        load_calibration(str(path))
    assert f"{path} line {line}: {what}" in str(e.value)


# --- presets naming a report ----------------------------------------------------------------------
def test_a_preset_loads_its_report_from_its_own_folder(tmp_path: Path) -> None:
    _report(tmp_path)
    spec = load_device(str(_preset(tmp_path, "report.yaml")))
    assert spec.calibration == str((tmp_path / "report.yaml").resolve())
    assert modeled_label(preset_name(str(tmp_path / "h100_sxm.yaml")), device_calibration(spec)) == BAND
    assert device_calibration(load_device("a40")) is None  # an uncalibrated shipped preset claims no band
    assert device_calibration(load_device("h100_sxm")) is not None


def test_a_preset_naming_a_missing_report_does_not_load(tmp_path: Path) -> None:
    preset = _preset(tmp_path, "missing.yaml")
    with pytest.raises(PresetError) as e:
        load_device(str(preset))
    assert f"{preset} line {_line_of(preset, 'calibration')}: calibration: no calibration report" in str(e.value)


def test_a_preset_naming_a_broken_report_names_both_files(tmp_path: Path) -> None:
    report = _report(tmp_path, REPORT.replace("rows: 48", "rows: many"))
    preset = _preset(tmp_path, "report.yaml")
    with pytest.raises(PresetError) as e:
        load_device(str(preset))
    assert f"{preset} line {_line_of(preset, 'calibration')}: calibration: {report} line 5: rows:" in str(e.value)


def test_a_report_for_another_preset_is_refused(tmp_path: Path) -> None:
    _report(tmp_path)
    with pytest.raises(PresetError, match="is for preset 'h100_sxm', not 'my_gpu'"):
        load_device(str(_preset(tmp_path, "report.yaml", name="my_gpu")))


# --- the label on every point ---------------------------------------------------------------------
def test_point_columns_join_distinct_devices() -> None:
    assert {"device_preset", "calibration"} <= set(POINT_COLUMNS)
    a40 = ("a40", "modeled: a40, uncalibrated", "modeled")
    h100 = ("h100_sxm", BAND, "modeled")
    assert calibration_columns([a40, h100, a40], "modeled") == {
        "device_preset": "a40; h100_sxm", "calibration": f"modeled: a40, uncalibrated; {BAND}"}
    assert calibration_columns([(None, None, "measured")] * 2, "measured") == {
        "device_preset": "", "calibration": "measured"}
    assert calibration_columns([], "unavailable") == {"device_preset": "", "calibration": "unavailable"}


def test_the_label_crosses_metrics_to_the_campaign() -> None:
    """Real time: the replica's device info is exported and a campaign's scrape reads it back."""
    snap = ExportSnapshot([
        DeviceSample("r0", "emu0", "emulated", "modeled", 1.0, 1.0, None, preset="h100_sxm", calibration=BAND),
        DeviceSample("r1", "gpu0", "nvml", "measured", 1.0, 1.0, None),
    ])
    registry, _ = build_registry(lambda: snap, load_site_profile("azure"))
    counters = parse_counters(registry.render().decode())
    assert set(counters.device_labels()) == {("h100_sxm", BAND, "modeled"), (None, None, "measured")}
    assert calibration_columns(counters.device_labels(), "mixed")["calibration"] == f"{BAND}; measured"


def test_an_emulated_engine_tells_its_preset_and_band(tmp_path: Path) -> None:
    """The label starts where the backend does: the engine's devices(), which telemetry and /metrics carry on."""
    _report(tmp_path)
    for device, label in (("a40", "modeled: a40, uncalibrated"), (str(_preset(tmp_path, "report.yaml")), BAND)):
        (info,) = EmulatedEngine(EmulatedEngineConfig(device=device), "r0").devices()
        assert (info.preset, info.calibration, info.backend) == (preset_name(device), label, "emulated")


def _campaign(tmp_path: Path, device: str) -> Path:
    data = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    data.update(clock="virtual", sweep={"rate_rps": [4]})
    data["workload"]["duration_s"] = 4
    data["deployment"]["engine"]["device"] = device
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_virtual_points_summary_and_report_carry_the_label(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    _report(tmp_path / "presets")
    for name, device, label in (
        ("uncal", str(_preset(tmp_path / "bare", None)), "modeled: h100_sxm, uncalibrated"),
        ("band", str(_preset(tmp_path / "presets", "report.yaml")), BAND),
    ):
        out = tmp_path / name
        assert main(["campaign", "run", str(_campaign(tmp_path, device)), "--out", str(out)]) == 0
        points = pd.read_csv(out / "points.csv")
        assert (points["device_preset"] == "h100_sxm").all()
        assert (points["calibration"] == label).all() and (points["provenance"] == "modeled").all()
        printed = " ".join(capsys.readouterr().out.split())  # the caption wraps
        assert f"calibration: {label}" in printed
        assert f"<b>{label}</b>" in (out / "report.html").read_text()
