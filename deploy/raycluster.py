"""Starting or attaching to Ray with settings that keep tests and local runs on this machine."""

from __future__ import annotations

import os

import ray

# Token auth turns on when ~/.ray/auth_token exists; every process must agree, so fix it for ours. Ray starts its
# workers at niceness 15 (worker_niceness) unless told otherwise: the replicas, and their engines' processes, would
# lose the CPU to the front door and every other process on a busy host (serving.replica.run_at_normal_priority).
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_worker_niceness": "0"}


def ray_env() -> None:
    """Set the Ray environment every testbed process must agree on (auth off, no usage stats, normal niceness)."""
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)


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
