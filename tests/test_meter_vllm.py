"""Real parts (issue #19): vLLM's own OpenAI server (the CPU build, the tiny local model) as a separate process,
``testbed meter --pid`` of it, and ``testbed campaign run --url`` against it with ``--energy-metrics`` (the meter)
and ``--token-metrics`` (vLLM's /metrics): the server's output-token count matches the clients', and the energy is
the CPU power model's."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed: scripts/install-vllm.sh"),
]
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, proc: subprocess.Popen[bytes], timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not up after {timeout_s:g} s: {log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_campaign_against_vllms_own_server_metered_by_testbed_meter(tmp_path: Path) -> None:
    from deploy.models import build_tiny

    model = build_tiny(tmp_path / "tiny-llama", seed=0)
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(REPO)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    vlog = tmp_path / "vllm.log"
    vllm = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
         "tiny-llama", "--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--host", "127.0.0.1",
         "--port", str(port)],
        env=env, stdout=vlog.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    ready = tmp_path / "meter-url"
    mlog = tmp_path / "meter.log"
    meter = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "meter", "--pid", str(vllm.pid), "--port", "0", "--sources", "",
         "--node", "cpu-node", "--ready-file", str(ready)],
        env=env, stdout=mlog.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(f"{url}/v1/models", vllm, 120, vlog)
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        meter_url = ready.read_text().strip()
        campaign = {
            "name": "meter-vllm", "seed": 3, "model": "tiny-llama",
            "workload": {"duration_s": 8, "tokenizer": str(model), "sample_interval_s": 0.5,
                         "prompt_tokens": {"kind": "fixed", "value": 16},
                         "output_tokens": {"kind": "uniform", "low": 8, "high": 48}},
            "sweep": {"rate_rps": [6]},
            "metering": {"energy_metrics": [meter_url], "token_metrics": [f"{url}/metrics"]},
        }
        path = tmp_path / "campaign.yaml"
        path.write_text(yaml.safe_dump(campaign))
        out = tmp_path / "out"
        done = subprocess.run([sys.executable, "-m", "deploy.cli", "campaign", "run", str(path), "--out", str(out),
                               "--url", url], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        p = pd.read_csv(out / "points.csv").iloc[0]
        print({k: p[k] for k in ("requests", "output_tokens", "client_output_tokens", "energy_j", "duration_s",
                                 "energy_per_token_j", "provenance", "backend", "energy_source", "token_source")})
        assert p["status"] == "ok", p["notes"]
        assert p["completed"] == p["requests"] > 20
        assert p["token_source"] == f"vllm: {url}/metrics"
        assert p["output_tokens"] == pytest.approx(p["client_output_tokens"], rel=0.02)
        assert p["energy_j"] > 0 and p["provenance"] == "modeled" and p["backend"] == "cpu_model"
        assert p["energy_source"] == f"ours: {meter_url}"
    finally:
        _stop(meter)
        _stop(vllm)
