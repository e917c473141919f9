"""Replicas spread over Ray nodes (``ray.cluster_utils.Cluster`` on this machine) survive node removal: every
request is served or recorded failed with its reason; requests not yet started are retried elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIO = Path(__file__).with_name("multinode_scenario.py")


def _tiny_model(tmp_path: Path) -> str:
    pytest.importorskip("vllm", reason="vllm is not installed: pip install 'llm-energy-testbed[cpu]'")
    from deploy.models import build_tiny

    return str(build_tiny(tmp_path / "tiny-llama", seed=0))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["emulated", "vllm"])
def test_node_removal_mid_stream_and_while_idle(engine: str, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "RAY_USAGE_STATS_ENABLED": "0"}
    model = [_tiny_model(tmp_path)] if engine == "vllm" else []
    proc = subprocess.run(
        [sys.executable, str(SCENARIO), "8", "6", *model],
        capture_output=True,
        text=True,
        timeout=600 if model else 300,
        env=env,
        cwd=root,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"scenario failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    out = json.loads(lines[-1][len("RESULT ") :])
    assert out["distinct_nodes"] == 3  # strict_spread: one replica per node

    inflight = out["inflight"]
    assert len(inflight) == 8  # every request has an outcome
    failed = [r for r in inflight if r["status"] == "failed"]
    ok = [r for r in inflight if r["status"] == "ok"]
    assert failed and ok
    assert all(r["tokens"] == 400 and r["replica"] != "replica-0" for r in ok)
    assert all(
        "replica replica-0 died after streaming part" in r["error"] and r["cause"] == "ActorDiedError"
        for r in failed
    )
    assert out["alive_after_first"] == {"replica-0": False, "replica-1": True, "replica-2": True}

    # The second node went away while idle: requests routed to it were retried on replica-2, none lost.
    assert [(r["status"], r["replica"], r["tokens"]) for r in out["after"]] == [("ok", "replica-2", 20)] * 6
    assert out["alive"] == {"replica-0": False, "replica-1": False, "replica-2": True}
