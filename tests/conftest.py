"""Shared fixtures: one local Ray for the session, and a running deployment on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from deploy.serve import BackgroundServer

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
CONTROL_TOKEN = "test-control-token"


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    import ray

    from deploy.raycluster import init_ray

    init_ray(num_cpus=4)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def served(ray_local: None) -> Iterator[BackgroundServer]:
    """The real front door (uvicorn) over two real Ray replica actors with a controller, on a free loopback port."""
    from controllers.config import ControllerConfig
    from controllers.service import Controller, add_control_routes
    from deploy.serve import serve_in_background
    from serving.config import EmulatedEngineConfig, ServingConfig

    def with_controller(app, deployment, loop):  # type: ignore[no-untyped-def]
        controller = Controller(ControllerConfig(token=CONTROL_TOKEN, period_s=0.5), deployment.door)
        add_control_routes(app, controller)
        loop.call_soon_threadsafe(controller.start)
        return controller.stop

    config = ServingConfig(replicas=2, port=0, engine=EmulatedEngineConfig(max_model_len=1024))
    server = serve_in_background(config, with_controller)
    yield server
    server.stop()
