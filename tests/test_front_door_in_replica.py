"""``front_door: in_replica``: `testbed serve` runs the front door (and its controller) on a replica actor's event
loop, and takes the door over on the same address when that replica dies."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from controllers.config import ControllerConfig
from deploy.config import DeploymentConfig
from deploy.local import LocalDeployment
from serving.config import EmulatedEngineConfig

TOKEN = "in-replica-test-token"


def _config() -> DeploymentConfig:
    return DeploymentConfig(
        replicas=2, front_door="in_replica", engine=EmulatedEngineConfig(max_num_seqs=64),
        controller=ControllerConfig(token=TOKEN, period_s=0.5),
    )


def _metric(text: str, name: str, replica: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and f'replica="{replica}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.slow
def test_the_door_in_a_replica_serves_meters_controls_and_survives_its_host(tmp_path: Path) -> None:
    log = tmp_path / "deployment.log"
    deployment = LocalDeployment(_config(), log)
    with deployment as url:
        announced = re.search(r"front door in (replica-\d), pid (\d+)", log.read_text())
        assert announced is not None, log.read_text()
        host, host_pid = announced.group(1), int(announced.group(2))
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        for i in range(6):  # sequential: least-outstanding spreads them by count routed, over both replicas
            stream = client.completions.create(model=model, prompt=f"hello {i}", max_tokens=8, stream=True,
                                               stream_options={"include_usage": True})
            chunks = list(stream)
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        generated = {r: _metric(metrics, "llm_energy_tokens_total", r) for r in ("replica-0", "replica-1")}
        assert all(v > 0 for v in generated.values()), generated  # the host in process, the other over its channel
        control = httpx.get(f"{url}/control", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert control.status_code == 200 and control.json()["policy"] == "static"
        assert httpx.post(f"{url}/control/knobs", json={"max_num_seqs": 8}, timeout=10).status_code == 401

        os.kill(host_pid, signal.SIGKILL)  # the replica and the door it hosts go together
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail(f"nobody took the door over:\n{log.read_text()[-3000:]}")
        for i in range(3):  # the same address, now served by testbed serve itself, routing around the dead host
            done = client.completions.create(model=model, prompt=f"after {i}", max_tokens=4)
            assert done.usage is not None and done.usage.completion_tokens == 4
        assert f"the front door in {host} ended" in log.read_text()
        assert "(1 of 2 replicas live)" in log.read_text()  # the taken-over door's announcement
    assert deployment.proc is not None and deployment.proc.returncode == 0
    assert "testbed: stopped cleanly" in log.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("front_door", ["in_replica", "separate"])
def test_sigterm_stops_the_door_and_its_replicas_cleanly_with_exit_code_0(tmp_path: Path, front_door: str) -> None:
    log = tmp_path / "deployment.log"
    deployment = LocalDeployment(_config().model_copy(update={"front_door": front_door}), log)
    with deployment as url:
        set_knobs = httpx.post(f"{url}/control/knobs", json={"max_num_seqs": 8},
                               headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert set_knobs.status_code == 200, set_knobs.text
        hosted = re.search(r"front door in replica-\d, pid (\d+)\)", log.read_text())
        assert (hosted is not None) == (front_door == "in_replica")
    assert deployment.proc is not None and deployment.proc.returncode == 0
    assert "testbed: stopped cleanly" in log.read_text()
    if hosted is not None:
        with pytest.raises(ProcessLookupError):
            os.kill(int(hosted.group(1)), 0)  # the hosting replica's process is gone


def test_a_ray_client_address_is_refused_before_anything_starts(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from deploy.cli import main

    cfg = tmp_path / "serve.yaml"
    cfg.write_text("front_door: in_replica\nray_address: ray://head:10001\n")
    assert main(["serve", str(cfg), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "front_door: in_replica needs testbed serve on a node of the Ray cluster" in err and "ray://head" in err


def test_no_replica_on_the_serving_node_names_the_nodes_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from deploy.serve import Deployment, DeploymentError, door_replica
    from serving.router import ReplicaHandle, Router

    class Here:
        @staticmethod
        def get_node_id() -> str:
            return "a" * 56

    monkeypatch.setattr(ray, "get_runtime_context", lambda: Here())
    router = Router([ReplicaHandle(f"replica-{i}", object()) for i in range(2)])
    infos = [{"replica": f"replica-{i}", "node_id": ("b", "c")[i] * 56} for i in range(2)]
    deployment = Deployment(_config(), router, None, infos)  # type: ignore[arg-type]
    with pytest.raises(DeploymentError, match=r"node where testbed serve runs \(aaaaaaaa\).*bbbbbbbb, cccccccc"):
        door_replica(deployment)
    infos[1]["node_id"] = "a" * 56
    assert door_replica(deployment).name == "replica-1"
