"""A virtual-time sweep on a two-node Ray cluster (``ray.cluster_utils.Cluster`` on this machine, one CPU per node,
token authentication as our clusters run it), with one point's worker killed once, against the same sweep run
serially. Run as a script (its own Ray, apart from the test session's): prints one JSON line of outcomes."""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def scenario(campaign: Path) -> dict[str, object]:
    import pandas as pd
    import ray
    import yaml
    from ray.cluster_utils import Cluster
    from rich.console import Console

    from deploy.config import CampaignFile
    from deploy.raycluster import ray_env
    from deploy.virtual import FAULT_ENV, run_virtual_campaign

    data = yaml.safe_load(campaign.read_text())
    serial_spec = CampaignFile.model_validate(data)
    ray_env()  # both nodes share one token
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            serial = run_virtual_campaign(serial_spec, serial_spec.deployment, out / "serial",
                                          Console(file=io.StringIO()))
            # Two at a time, not 0 (= the CPUs the cluster reports): a driver that has just connected may not see the
            # second node yet, and would then run every point on one.
            spec = CampaignFile.model_validate({**data, "workers": 2, "ray_address": cluster.address})
            os.environ[FAULT_ENV] = f"1:{out / 'killed-once'}"
            log = io.StringIO()
            on_ray = run_virtual_campaign(spec, spec.deployment, out / "ray", Console(file=log, width=400))
            nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
            text = log.getvalue()
            line = next(ln for ln in text.splitlines() if ln.startswith("points simulated on"))
            requests = [pd.read_parquet(out / d / "requests.parquet") for d in ("serial", "ray")]
            keep = [c for c in serial.columns if c != "sim_speed_x"]
            return {
                "nodes": nodes,
                "used": [n for n in nodes if n[:12] in line],
                "ran_on": line,
                "killed": (out / "killed-once").exists(),
                "rerun_noted": "point 1: its Ray worker died" in text,
                "points": on_ray["point"].tolist(),
                "same_points": serial[keep].equals(on_ray[keep]),
                "same_requests": requests[0].equals(requests[1]),
                "requests": len(requests[1]),
            }
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    print("RESULT " + json.dumps(scenario(Path(sys.argv[1]))), flush=True)


if __name__ == "__main__":
    main()
