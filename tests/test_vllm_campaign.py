"""The vllm_cpu.yaml campaign end to end: two real vLLM-CPU replicas on the tiny model, through the CLI, writing
the same points.csv/requests.parquet schema as the quickstart, with the power figure's provenance."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not installed: scripts/install-vllm.sh",
    ),
]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vllm_cpu.yaml"


def test_vllm_cpu_example_campaign_writes_the_quickstart_schema(tmp_path: Path, capsys) -> None:
    from deploy.cli import main
    from workloads.client import RequestRecord
    from workloads.results import POINT_COLUMNS

    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["deployment"]["engine"]["model"] = str(tmp_path / "tiny-llama")  # built on first use (build_tiny_seed)
    cfg["workload"]["duration_s"] = 4
    # Two pinned settings: the first is the deployment's own (no restart), the second restarts both engines with a
    # smaller batch cap and no prefix cache, through the control API, as any vLLM knob sweep does.
    cfg["sweep"] = {"rate_rps": [2], "knobs": [{"max_num_seqs": 32}, {"max_num_seqs": 8, "prefix_caching": False}]}
    path = tmp_path / "vllm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    rc = main(["campaign", "run", str(path), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err

    points = pd.read_csv(out / "points.csv")
    assert list(points.columns) == POINT_COLUMNS
    p = points.iloc[0]
    assert p["completed"] == p["requests"] > 0 and p["failed"] == 0 and p["status"] == "ok"
    assert p["energy_j"] > 0 and p["energy_per_token_j"] > 0
    # vLLM's prefix cache looked every prompt up (a share, 0 for these unrelated prompts); nothing speculated.
    assert 0.0 <= p["prefix_cache_hit_ratio"] <= 1.0 and pd.isna(p["spec_acceptance_ratio"])
    restarted = points.iloc[1]
    assert restarted["setting"] == "max_num_seqs=8 prefix_caching=off" and restarted["status"] == "ok"
    assert restarted["completed"] == restarted["requests"] > 0 and pd.isna(restarted["prefix_cache_hit_ratio"])
    requests = pd.read_parquet(out / "requests.parquet")
    assert list(requests.columns) == [f.name for f in dataclasses.fields(RequestRecord)]
    measured = requests[requests["phase"] == "measure"]
    assert (measured["status"] == "ok").all() and (measured["output_tokens"] > 0).all()
    # Without a readable power counter the CPU power model is used, and every figure says so.
    log = (out / "deployment.log").read_text()
    assert "power source" in log and "stopped cleanly" in log
    modeled = "CPU power model (modeled)" in log
    source, backend = ("modeled", "cpu_model") if modeled else ("measured", p["backend"])
    assert p["provenance"] == source and p["backend"] == backend  # backend: the device that was metered
    assert set(measured["energy_provenance"]) == {source}
