"""Starting or attaching to Ray with settings that keep tests and local runs on this machine."""

from __future__ import annotations

import os
import secrets

import ray
from ray._raylet import Config

# Ray 2.60's GCS, raylet and workers listen on every interface whatever the node address (no bind setting), so a
# cluster without authentication runs code for anyone who reaches the host: ours use Ray's token authentication,
# with a token made for the cluster unless one is given (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH). Every process of a
# cluster must agree on the mode, so it is fixed here for ours; RAY_AUTH_MODE=disabled is an explicit opt-out. Ray
# starts its workers at niceness 15 (worker_niceness) unless told otherwise: the replicas, and their engines'
# processes, would lose the CPU to the front door and every other process on a busy host
# (serving.replica.run_at_normal_priority).
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_worker_niceness": "0"}


def ray_env() -> dict[str, str]:
    """Set (where unset) the environment every process of our Ray clusters shares; returns it for child processes."""
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    token_given = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if os.environ["RAY_AUTH_MODE"] == "token" and not token_given:
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # inherited by the cluster's processes, never written
    # Ray reads its settings once, when imported: refresh them as ray.init does when it turns token auth on itself.
    Config.initialize("")
    names = [*RAY_ENV, "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"]
    return {k: os.environ[k] for k in names if k in os.environ}


def init_ray(address: str | None = None, num_cpus: float | None = None) -> None:
    """Local Ray (its own head, on loopback) unless ``address`` names a cluster to join."""
    ray_env()
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(
            # "local": a new instance even when another one runs on this host (`ray start`, another
            # deployment): without an address Ray joins the latest cluster started here, and fails on num_cpus.
            address="local",
            num_cpus=int(num_cpus) if num_cpus else None,
            include_dashboard=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
