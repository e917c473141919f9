"""Shared fixtures: one local Ray for the session, and a running deployment on loopback."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
CONTROL_TOKEN = "test-control-token"


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    import ray

    from deploy.raycluster import init_ray

    init_ray(num_cpus=4)
    yield
    ray.shutdown()


@dataclass
class Served:
    url: str
    deployment: object
    loop: asyncio.AbstractEventLoop


@pytest.fixture(scope="session")
def served(ray_local: None) -> Iterator[Served]:
    """The real front door (uvicorn) over two real Ray replica actors, on a free loopback port."""
    import uvicorn

    from controllers.config import ControllerConfig
    from controllers.service import Controller, add_control_routes
    from deploy.serve import bind_socket, start_deployment
    from serving.api import create_app
    from serving.config import EmulatedEngineConfig, ServingConfig

    config = ServingConfig(replicas=2, port=0, engine=EmulatedEngineConfig(max_model_len=1024))
    loop = asyncio.new_event_loop()
    deployment = loop.run_until_complete(start_deployment(config))
    app = create_app(deployment.door)
    controller = Controller(ControllerConfig(token=CONTROL_TOKEN, period_s=0.5), deployment.door)
    add_control_routes(app, controller)
    loop.call_soon_threadsafe(controller.start)
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=lambda: loop.run_until_complete(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    while not server.started:
        threading.Event().wait(0.05)
    host, port = sock.getsockname()[:2]
    yield Served(f"http://{host}:{port}", deployment, loop)
    server.should_exit = True
    thread.join(timeout=10)
    loop.run_until_complete(controller.stop())
    loop.run_until_complete(deployment.stop())
