"""Calibration reports: how far a preset's modeled figures lie from real measurements, and the label saying so.

A preset may name a report (``calibration: h100_sxm`` in its YAML): a file in this package's ``calibration/``
folder, or a path (relative paths are taken from the preset's own folder first). The report records the error
band of the emulator against a measured data set, replayed configuration by configuration; every modeled figure
carries :func:`modeled_label` of its preset, so a reader always sees which model produced it and how far to trust
it. :func:`attach_calibration` runs inside ``load_device``: a preset naming a report that is missing or broken
does not load, so the emulator never runs while claiming a band it cannot back.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving.emulated.devices import DeviceSpec
from serving.emulated.physics import PresetError

FOLDER = "calibration"
"""Package folder of the shipped reports and the data sets they were computed from."""
UNCALIBRATED = "uncalibrated"


class ErrorBand(BaseModel):
    """|emulated - measured| / measured over the replayed rows, as fractions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    median: float = Field(ge=0)
    worst: float = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> ErrorBand:
        if self.worst < self.median:
            raise ValueError("worst must not be below median")
        return self


class ErrorBands(BaseModel):
    """The error band of each figure the emulator is checked on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    j_per_token: ErrorBand
    power: ErrorBand
    throughput: ErrorBand
    median_itl: ErrorBand


class CalibrationReport(BaseModel):
    """A preset's emulated figures against a measured data set, as ``bench/calibration.py`` writes them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str = Field(min_length=1, description="Preset the report is for (its name or file stem).")
    dataset: str = Field(min_length=1, description="Human name of the measured data, e.g. ML.ENERGY Benchmark v3.")
    dataset_file: str = Field(min_length=1, description="The measured rows, in the report's own folder.")
    gpu: str = Field(min_length=1, description="The rows' gpu_model.")
    rows: int = Field(gt=0, description="Measured configurations replayed on the emulator.")
    command: str = Field(min_length=1, description="Command that regenerates the report.")
    error: ErrorBands


def preset_name(name_or_path: str) -> str:
    """A preset's short name: the shipped name itself, or a preset file's stem."""
    return Path(name_or_path).stem


def _pct(fraction: float) -> str:
    return f"{fraction * 100:.0f}%" if fraction >= 0.01 else f"{fraction * 100:.1f}%"


def modeled_label(preset: str, report: CalibrationReport | None) -> str:
    """What every modeled figure says about itself: the preset, and its J/token error band or ``uncalibrated``."""
    if report is None:
        return f"modeled: {preset}, {UNCALIBRATED}"
    band = report.error.j_per_token
    return (f"modeled: {preset}, J/token within {_pct(band.median)} of {report.dataset} "
            f"(median of {report.rows} rows; worst {_pct(band.worst)})")


# --- reading reports, with the file and line of every problem ------------------------------------
def _key_line(text: str, loc: tuple[str | int, ...]) -> int:
    """1-based line of the deepest key of ``loc`` present in the YAML ``text`` (1 if none)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return 1
    line = 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if found is None:
                break
            line, node = found[0].start_mark.line + 1, found[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _locate(name_or_path: str) -> tuple[Traversable | Path, Traversable | Path, str]:
    """The report file, its folder, and how messages name it: a ``.yaml`` path that exists, else a shipped name."""
    path = Path(name_or_path)
    if path.suffix == ".yaml" and path.is_file():
        return path, path.parent, str(path)
    name = name_or_path.removesuffix(".yaml")
    folder = resources.files("serving.emulated") / FOLDER
    res = folder / f"{name}.yaml"
    if not res.is_file():
        known = sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")) \
            if folder.is_dir() else []
        raise PresetError(f"no calibration report {name_or_path!r}: not a .yaml file, nor a shipped report "
                          f"(shipped: {known or 'none'})")
    return res, folder, f"{FOLDER}/{name}.yaml"


@lru_cache(maxsize=64)
def load_calibration(name_or_path: str) -> CalibrationReport:
    """A shipped report by name (e.g. ``h100_sxm``) or a report YAML path; problems name the file and line."""
    file, folder, where = _locate(name_or_path)
    text = file.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise PresetError(f"{where} line {line}: not valid YAML: {getattr(e, 'problem', None) or e}") from e
    if not isinstance(data, dict):
        raise PresetError(f"{where} line 1: expected a mapping of report fields, got {type(data).__name__}")
    try:
        report = CalibrationReport.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"line {_key_line(text, err['loc'])}: {'.'.join(map(str, err['loc'])) or '(top level)'}: {err['msg']}"
            for err in e.errors()
        )
        raise PresetError(f"{where} {problems}") from e
    if not (folder / report.dataset_file).is_file():
        raise PresetError(f"{where} line {_key_line(text, ('dataset_file',))}: dataset_file: "
                          f"{report.dataset_file!r} is not in the report's folder")
    return report


def device_calibration(spec: DeviceSpec) -> CalibrationReport | None:
    """The report a loaded preset names (cached), or None for an uncalibrated preset."""
    return load_calibration(spec.calibration) if spec.calibration else None


def _preset_text(name_or_path: str) -> str:
    path = Path(name_or_path)
    if path.suffix == ".yaml" and path.is_file():
        return path.read_text()
    return (resources.files("serving.emulated") / "presets" / f"{name_or_path}.yaml").read_text()


def attach_calibration(spec: DeviceSpec, name_or_path: str, where: str) -> DeviceSpec:
    """``spec`` with its report resolved and loaded (``load_device``'s hook); raises :class:`PresetError`.

    ``name_or_path`` is how the preset was asked for and ``where`` how messages name it. A relative report path
    is taken from the preset file's folder first, then the working directory, then the shipped reports; the
    returned spec names the report so that :func:`device_calibration` finds it again from anywhere.
    """
    if spec.calibration is None:
        return spec
    preset_file = Path(name_or_path)
    value = Path(spec.calibration)
    if preset_file.suffix == ".yaml" and preset_file.is_file() and not value.is_absolute() \
            and (preset_file.parent / value).is_file():
        value = preset_file.parent / value
    ref = str(value.resolve()) if value.suffix == ".yaml" and value.is_file() else spec.calibration
    at = f"{where} line {_key_line(_preset_text(name_or_path), ('calibration',))}: calibration"
    try:
        report = load_calibration(ref)
    except PresetError as e:
        raise PresetError(f"{at}: {e}") from e
    name = preset_name(name_or_path)
    if report.preset != name:
        raise PresetError(f"{at}: the report {spec.calibration!r} is for preset {report.preset!r}, not {name!r}: "
                          "a preset claims only a band measured for it")
    return spec.model_copy(update={"calibration": ref})
