"""Stopping a campaign that started its own deployment: SIGTERM stops everything it started and keeps every finished
point; kill -9 leaves nothing running that keeps sending or serving (its children watch it)."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _campaign(tmp_path: Path) -> Path:
    cfg = {
        "name": "stop", "seed": 1,
        "deployment": {"replicas": 1, "engine": {"kind": "emulated", "max_model_len": 1024}},
        "workload": {"arrival": {"kind": "constant"}, "duration_s": 2, "client_processes": 1,
                     "prompt_tokens": {"kind": "fixed", "value": 16}, "output_tokens": {"kind": "fixed", "value": 8}},
        "sweep": {"rate_rps": [2, 3, 4, 5, 6, 7]},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """The campaign's TMPDIR, short enough for Ray's socket paths (107 bytes at most)."""
    path = Path(tempfile.mkdtemp(prefix="tbt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _start(tmp_path: Path, tmp: Path) -> tuple[subprocess.Popen[str], Path]:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "campaign", "run", str(_campaign(tmp_path)),
                             "--out", str(out)], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (out / "points.csv").exists():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.2)
    assert (out / "points.csv").exists(), "no point finished in time"
    return proc, out


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _gone(procs: list[psutil.Process], timeout_s: float) -> list[str]:
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    return [f"{p.pid} {p.name()}" for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_sigterm_stops_the_load_and_the_deployment_and_keeps_finished_points(tmp_path: Path, short_tmp: Path) -> None:
    proc, out = _start(tmp_path, short_tmp)
    children = _descendants(proc.pid)
    assert any("loadworker" in " ".join(c.cmdline()) for c in children)  # the load generator runs
    assert any("serve" in c.cmdline() for c in children)  # and the deployment the campaign started
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=90)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "interrupted" in output and "continue with --resume" in output
    assert not _gone(children, 30), "left running after SIGTERM"
    assert list(short_tmp.glob("testbed-deploy-*")) == []  # the control token's directory is gone
    points = pd.read_csv(out / "points.csv")
    assert len(points) >= 1 and (points["status"] == "ok").all()


@pytest.mark.slow
def test_kill_9_leaves_nothing_sending_or_serving(tmp_path: Path, short_tmp: Path) -> None:
    proc, _ = _start(tmp_path, short_tmp)
    children = _descendants(proc.pid)
    serve = [c for c in children if "serve" in c.cmdline()]
    workers = [c for c in children if "loadworker" in " ".join(c.cmdline())]
    assert serve and workers
    proc.kill()
    proc.wait()
    assert not _gone(workers + serve, 60), "left running after kill -9"
    assert list(short_tmp.glob("testbed-deploy-*")) == []  # serve removed it on its way out
