"""The CLI's errors: one message and exit code 2 for a bad input, no traceback, before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.cli import main
from profilers.errors import ConfigError, PowerSourceError, TestbedError

QUICKSTART = (Path(__file__).parent.parent / "examples" / "quickstart.yaml").read_text()


def _run(tmp_path: Path, campaign: str | bytes, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "campaign.yaml"
    path.write_bytes(campaign if isinstance(campaign, bytes) else campaign.encode())
    code = main(["campaign", "run", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # failed before anything started
    return code, err


def test_a_binary_file_is_not_a_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(tmp_path, b"\x00\x01\xff\xfe binary", capsys)
    assert code == 2 and "campaign.yaml: not a text (YAML) file" in err


def test_an_unknown_site(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(tmp_path, QUICKSTART.replace("site: azure ", "site: mars "), capsys)
    assert code == 2 and "unknown site profile 'mars'" in err


def test_a_pue_below_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("name: low\npue: 0.9\nwue_site_l_per_kwh: 0.3\nwue_source_l_per_kwh: 3\ncif_kg_per_kwh: 0.3\n")
    code, err = _run(tmp_path, QUICKSTART.replace("site: azure ", f"site: {site} "), capsys)
    assert code == 2 and f"site profile {site}: pue: Input should be greater than or equal to 1 (got 0.9" in err


def test_an_unknown_device_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(tmp_path, QUICKSTART.replace("device: h100_sxm", "device: h999"), capsys)
    assert code == 2 and "unknown preset 'h999': use one of" in err and "h100_sxm" in err


def test_every_error_of_ours_is_a_testbed_error_with_its_exit_code() -> None:
    from deploy.local import DeploymentStartError
    from profilers.footprint import UnknownSiteError
    from serving.emulated.physics import PresetError
    from workloads.traces import TraceError

    assert issubclass(PresetError, ConfigError) and issubclass(PresetError, ValueError)
    assert UnknownSiteError.exit_code == TraceError.exit_code == 2
    assert issubclass(DeploymentStartError, TestbedError) and DeploymentStartError.exit_code == 1
    assert issubclass(PowerSourceError, RuntimeError) and PowerSourceError.exit_code == 1
