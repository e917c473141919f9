"""Bring up a deployment (Ray replica actors + front door) and serve until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from dataclasses import dataclass
from pathlib import Path

import ray
import uvicorn

from controllers.service import Controller, add_control_routes
from deploy.config import DeploymentConfig
from deploy.raycluster import init_ray
from profilers.footprint import load_site_profile
from serving.api import FrontDoor, create_app
from serving.config import ServingConfig
from serving.replica import ReplicaActor
from serving.router import ReplicaHandle, Router

log = logging.getLogger(__name__)


@dataclass
class Deployment:
    config: ServingConfig
    router: Router
    door: FrontDoor

    async def stop(self) -> None:
        for r in self.router.replicas:
            if r.alive:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(r.actor.stop.remote(), 5)
            with contextlib.suppress(Exception):
                ray.kill(r.actor)


async def start_deployment(config: ServingConfig) -> Deployment:
    """Start the replica actors and wait until every engine is ready."""
    site = load_site_profile(config.site)  # fail before starting anything if the profile is bad
    init_ray(config.ray_address, num_cpus=max(2, math.ceil(config.replicas * config.num_cpus_per_replica)))
    handles = []
    for i in range(config.replicas):
        name = f"replica-{i}"
        actor = ReplicaActor.options(
            num_cpus=config.num_cpus_per_replica, max_concurrency=4096, max_restarts=0,
        ).remote(name, config.engine.model_dump())
        handles.append(ReplicaHandle(name, actor, backend=config.engine.kind))
    infos = await asyncio.gather(*(h.actor.start.remote() for h in handles))
    for info in infos:
        log.info("replica %s ready (pid %s, node %s)", info["replica"], info["pid"], info["node_id"][:8])
    router = Router(handles, policy=config.router)
    door = FrontDoor(router, config.model_name, config.engine.max_model_len, site)
    return Deployment(config, router, door)


def bind_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise OSError(
            f"cannot listen on {host}:{port}: {e.strerror}; choose another --port (0 picks a free one)"
        ) from e
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def serve(config: DeploymentConfig, ready_file: Path | None = None) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn handles both), then restore default knobs, stop the replicas and Ray."""
    sock = bind_socket(config.host, config.port)
    deployment = await start_deployment(config)
    app = create_app(deployment.door)
    controller = None
    if config.controller.enabled:
        controller = Controller(config.controller, deployment.door)
        add_control_routes(app, controller)
        controller.start()
        if config.controller.token is None:
            print(f"testbed: control API token (shown once): {controller.token}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    host, port = sock.getsockname()[:2]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    print(f"testbed: serving {config.model_name} on {url} ({config.replicas} replicas); metrics at {url}/metrics",
          flush=True)
    if ready_file is not None:
        ready_file.write_text(url)
    try:
        await server.serve(sockets=[sock])
    finally:
        if controller is not None:
            await controller.stop()
        await deployment.stop()
        ray.shutdown()
        print("testbed: stopped cleanly", flush=True)
