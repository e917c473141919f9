"""Bring up a deployment (Ray replica actors + front door) and serve until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import ray
import uvicorn
from fastapi import FastAPI

from controllers.service import Controller, add_control_routes
from deploy.config import DeploymentConfig, DeploymentError
from deploy.raycluster import init_ray
from profilers.footprint import load_site_profile
from serving.api import FrontDoor, create_app
from serving.config import ServingConfig
from serving.http_door import door_protocol
from serving.replica import ReplicaActor
from serving.router import REPLICA_GONE, ReplicaHandle, Router

log = logging.getLogger(__name__)


@dataclass
class Deployment:
    """A running deployment: its config, router, front door, replica actors' info and placement group."""

    config: ServingConfig
    router: Router
    door: FrontDoor
    replica_info: list[dict[str, Any]] = field(default_factory=list)
    placement_group: Any = None

    async def stop(self) -> None:
        """Stop the router, then every replica actor (killed), and remove the placement group."""
        await self.router.stop()
        for r in self.router.replicas:
            if r.alive:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(r.actor.stop.remote(), 5)
            with contextlib.suppress(Exception):
                ray.kill(r.actor)
        if self.placement_group is not None:
            with contextlib.suppress(Exception):
                ray.util.remove_placement_group(self.placement_group)


def preflight(config: ServingConfig) -> None:
    """Checks that fail in seconds what would otherwise fail inside every replica actor: the engine's
    optional dependencies and its model directory (local clusters only: remote nodes have their own)."""
    if config.engine.kind == "vllm" and config.ray_address is None:
        from serving.vllm_engine import preflight as vllm_preflight

        model = Path(config.engine.model)
        if config.engine.build_tiny_seed is not None and not model.exists():
            from deploy.models import build_tiny

            log.warning("building the tiny model (seed %d) into %s", config.engine.build_tiny_seed, model)
            build_tiny(model, seed=config.engine.build_tiny_seed)
        vllm_preflight(config.engine)


def replica_gpus(config: ServingConfig, cluster_gpus: float) -> float:
    """GPUs each replica actor asks Ray for: the configured number, else one per vLLM replica on a cluster with
    GPUs. An actor given none keeps the node's environment (Ray leaves CUDA_VISIBLE_DEVICES as it was): every
    replica of the node would run on its first GPU, and NVML would show each replica all of the node's GPUs."""
    if config.num_gpus_per_replica is not None:
        return config.num_gpus_per_replica
    return 1.0 if config.engine.kind == "vllm" and cluster_gpus >= 1 else 0.0


def unplaceable(config: ServingConfig, gpus: float) -> str:
    """Message for a placement that did not fit: what was asked against the cluster's CPUs and GPUs, and what to do."""
    total, free = ray.cluster_resources(), ray.available_resources()

    def have(name: str) -> str:
        return f"{total.get(name, 0.0):g} {name} ({free.get(name, 0.0):g} free)"

    asked = f"{config.num_cpus_per_replica:g} CPU" + (f" and {gpus:g} GPU" if gpus else "")
    return (
        f"Ray found no room for {config.replicas} replica(s) of {asked} each (placement {config.placement!r}) within "
        f"{config.placement_timeout_s:g} s; the cluster has {have('CPU')}, {have('GPU')} over "
        f"{len([n for n in ray.nodes() if n.get('Alive')])} node(s). Lower num_cpus_per_replica or "
        "num_gpus_per_replica, use fewer replicas, add nodes, or raise placement_timeout_s."
    )


def _placement(config: ServingConfig, gpus: float) -> tuple[Any, list[dict[str, Any]]]:
    """A placement group with one bundle per replica, and the scheduling options that pin each replica."""
    if config.placement == "none":
        return None, [{} for _ in range(config.replicas)]
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = {"CPU": config.num_cpus_per_replica, **({"GPU": gpus} if gpus else {})}
    bundles = [dict(bundle) for _ in range(config.replicas)]
    pg = placement_group(bundles, strategy=config.placement.upper())
    options = [
        {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)}
        for i in range(config.replicas)
    ]
    return pg, options


async def start_deployment(config: ServingConfig) -> Deployment:
    """Start the replica actors and wait until every engine is ready."""
    site = load_site_profile(config.site)  # fail before starting anything if the profile is bad
    preflight(config)
    init_ray(config.ray_address, num_cpus=max(2, math.ceil(config.replicas * config.num_cpus_per_replica)))
    gpus = replica_gpus(config, ray.cluster_resources().get("GPU", 0.0))
    pg, placement = _placement(config, gpus)
    handles = []
    for i in range(config.replicas):
        name = f"replica-{i}"
        actor = ReplicaActor.options(
            num_cpus=config.num_cpus_per_replica, num_gpus=gpus, max_concurrency=4096, max_restarts=0,
            **placement[i],
        ).remote(name, config.engine.model_dump(), channel_host(config))
        handles.append(ReplicaHandle(name, actor, backend=config.engine.kind))
    # Ray waits for room for an actor (and for its placement group's bundles) indefinitely, since an autoscaler may
    # add a node: bound it, or a deployment asking for GPUs the cluster lacks would hang here without a word.
    ready = asyncio.gather(*(h.actor.__ray_ready__.remote() for h in handles))
    try:
        await asyncio.wait_for(ready, timeout=config.placement_timeout_s)
    except TimeoutError:
        message = unplaceable(config, gpus)  # what the cluster has before these actors are killed
        for h in handles:
            ray.kill(h.actor)
        if pg is not None:
            ray.util.remove_placement_group(pg)
        raise DeploymentError(message) from None
    try:
        infos = await asyncio.gather(*(h.actor.start.remote() for h in handles))
    except Exception:
        await Deployment(config, Router(handles), None, placement_group=pg).stop()  # type: ignore[arg-type]
        raise
    for info in infos:
        log.info("replica %s ready (pid %s, node %s, GPUs %s)", info["replica"], info["pid"], info["node_id"][:8],
                 ",".join(info.get("gpu_ids", [])) or "none")
        if "power_source" in info:
            log.warning("replica %s: %s, started in %.1f s; power source: %s", info["replica"],
                        info.get("engine", "?"), info.get("engine_start_s") or 0.0, info["power_source"])
    router = Router(handles, policy=config.router)
    router.start_watch(config.heartbeat_s, config.replica_deadline_s)
    door = FrontDoor(router, config.model_name, config.engine.max_model_len, site, config.door_limits)
    return Deployment(config, router, door, list(infos), pg)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` with Nagle off, inheritable; OSError naming the address if taken."""
    # proto=IPPROTO_TCP matters: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are TCP,
    # and with Nagle on, a response written as headers then body waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted connections on Linux
    try:
        sock.bind((host, port))
    except OSError as e:
        raise OSError(
            f"cannot listen on {host}:{port}: {e.strerror}; choose another --port (0 picks a free one)"
        ) from e
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def front_door_server(app: FastAPI, door_http: bool = True) -> uvicorn.Server:
    """uvicorn as the front door runs everywhere (serve, tests, benches): uvloop, the door's own HTTP protocol
    (httptools; the generation endpoints answered on the connection, ``serving/http_door.py``), no access log and
    no lifespan, so a bench measures the configuration users serve with. It freezes the process's heap as it is
    (``gc.freeze``): build it once the deployment is up. ``app`` comes from ``create_app``;
    ``door_http=False`` serves every request through ASGI with uvicorn's own protocol (benches compare the two), without
    the door's limits but uvicorn's keep-alive timeout (serving.config.DoorConfig)."""
    door = app.state.door
    http: Any = door_protocol(door) if door_http else "httptools"
    # What start-up built (FastAPI, pydantic, Ray, engines: 100k objects for a door over an emulated engine) goes
    # to the permanent generation, so the cyclic collector's full passes walk only what serving makes: each pass
    # over everything held the door's event loop 50-300 ms, and a burst of requests set off several (a 503 waited).
    gc.collect()
    gc.freeze()
    return uvicorn.Server(uvicorn.Config(app, http=http, log_level="warning", access_log=False, lifespan="off",
                                         timeout_keep_alive=door.limits.keep_alive_timeout_s))  # type: ignore[arg-type]


def build_app(config: DeploymentConfig, door: FrontDoor) -> tuple[FastAPI, Controller | None]:
    """The front door's application, with the control API when the deployment has a controller (not started)."""
    app = create_app(door)
    controller = None
    if config.controller.enabled:
        controller = Controller(config.controller, door)
        add_control_routes(app, controller)
    return app, controller


def channel_host(config: ServingConfig) -> str | None:
    """Where the replicas' channels listen: as configured, else loopback for a local Ray (None: the node's address)."""
    return config.channel_host or (None if config.ray_address else "127.0.0.1")


def _url(host: str, port: int) -> str:
    return f"http://{host if ':' not in host else f'[{host}]'}:{port}"


async def serve(config: DeploymentConfig, ready_file: Path | None = None) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn handles both), then restore default knobs, stop the replicas and Ray."""
    sock = bind_socket(config.host, config.port)  # a port in use fails now, not after the replicas started
    deployment = await start_deployment(config)
    try:
        if config.front_door == "in_replica":
            sock.close()  # the hosting replica binds it
            sock = await _serve_in_replica(config, deployment, ready_file)
            if sock is None:
                return
            ready_file = None  # the door moves here, on the same address
        await _serve_here(config, deployment, sock, ready_file)
    finally:
        await deployment.stop()
        ray.shutdown()
        print("testbed: stopped cleanly", flush=True)


async def _serve_here(
    config: DeploymentConfig, deployment: Deployment, sock: socket.socket, ready_file: Path | None
) -> None:
    """The front door in this process, until SIGINT/SIGTERM."""
    app, controller = build_app(config, deployment.door)
    if controller is not None:
        controller.start()
        if config.controller.token is None:
            print(f"testbed: control API token (shown once): {controller.token}", flush=True)
    server = front_door_server(app)
    url = _url(*sock.getsockname()[:2])
    _announce(config, deployment, url)
    if ready_file is not None:
        ready_file.write_text(url)
    try:
        await server.serve(sockets=[sock])
    finally:
        if controller is not None:
            await controller.stop()


def _announce(config: DeploymentConfig, deployment: Deployment, url: str, where: str = "") -> None:
    live = len(deployment.router.live())
    replicas = f"{live} replicas" if live == config.replicas else f"{live} of {config.replicas} replicas live"
    print(f"testbed: serving {config.model_name} on {url} ({replicas}{where}); metrics at {url}/metrics", flush=True)
    for info in deployment.replica_info:
        if "power_source" in info:
            print(f"testbed: {info['replica']}: power source: {info['power_source']}", flush=True)


def door_replica(deployment: Deployment) -> ReplicaHandle:
    """The replica that hosts the front door (``front_door: in_replica``): the first on this node, so the door
    listens on the address this process was given."""
    here = ray.get_runtime_context().get_node_id()
    nodes = {info["replica"]: info["node_id"] for info in deployment.replica_info}
    for handle in deployment.router.replicas:
        if nodes.get(handle.name) == here:
            return handle
    raise DeploymentError(
        f"front_door: in_replica needs a replica on the node where testbed serve runs ({here[:8]}), but the "
        f"replicas run on {', '.join(sorted({n[:8] for n in nodes.values()}))}: use placement 'pack' or 'none' "
        "(or more replicas), or front_door: separate"
    )


async def _serve_in_replica(
    config: DeploymentConfig, deployment: Deployment, ready_file: Path | None
) -> socket.socket | None:
    """The front door on a replica's event loop, watched from here until SIGINT/SIGTERM (returns None). If the
    replica dies, its door goes with it: returns a socket bound to the door's address, for this process to serve
    on in its place (requests in flight through the dead door are lost; the next ones are served)."""
    host = door_replica(deployment)
    replicas = [(h.name, h.actor, h.backend) for h in deployment.router.replicas]
    carried = {k: v for k in HostedFrontDoor.CARRIED_ENV if (v := os.environ.get(k))}
    info = await host.actor.host.remote(HostedFrontDoor(config, replicas, carried))
    if info.get("token"):
        print(f"testbed: control API token (shown once): {info['token']}", flush=True)
    _announce(config, deployment, info["url"], where=f", front door in {host.name}, pid {info['pid']}")
    if ready_file is not None:
        ready_file.write_text(info["url"])
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Put back afterwards (remove_signal_handler would leave the defaults): the door may move here, and uvicorn
    # re-raises the signal it stopped on under the handlers it found (Ray's driver handler exits with code 15,
    # which `testbed serve` reports as the clean stop it is).
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        loop.add_signal_handler(sig, stop.set)
    done = asyncio.ensure_future(host.actor.hosted_done.remote())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([done, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)
    if stopping.done():
        done.cancel()
        try:  # restores the knobs the controller set, then stops the door
            await asyncio.wait_for(host.actor.stop_hosted.remote(), 60)
        except Exception as e:
            log.warning("replica %s: could not restore the default knobs and stop the front door: %r",
                        host.name, e)
        return None
    stopping.cancel()
    why = done.exception()
    if isinstance(why, REPLICA_GONE):
        deployment.router.mark_dead(host, why)
    log.error("the front door in %s ended (%s); serving it from this process on %s from now on", host.name,
              type(why).__name__ if why else "its server exited", info["url"])
    return bind_socket(config.host, int(info["url"].rsplit(":", 1)[1]))


@dataclass
class HostedFrontDoor:
    """The front door, controller included, as a replica actor runs it (``front_door: in_replica``): built there
    from the deployment's config and every replica's handle. The hosting replica is called in process, the others
    over their channels; telemetry and knobs reach every replica, the host too, through its Ray handle."""

    config: DeploymentConfig
    replicas: list[tuple[str, Any, str]]
    """(name, actor handle, engine kind) of every replica."""
    env: dict[str, str] = field(default_factory=dict)
    """The controller's secrets from `testbed serve`'s environment: a replica of a cluster started elsewhere
    does not inherit it."""
    _server: uvicorn.Server | None = field(default=None, repr=False)
    _task: asyncio.Task[None] | None = field(default=None, repr=False)
    _controller: Controller | None = field(default=None, repr=False)
    _router: Router | None = field(default=None, repr=False)

    CARRIED_ENV: ClassVar[tuple[str, ...]] = ("TESTBED_NODE_AGENT_TOKEN",)

    async def start(self, replica: Any) -> dict[str, Any]:
        """Build the router, front door and controller in this replica and serve; returns the URL, token and pid."""
        cfg = self.config
        for name, value in self.env.items():
            os.environ.setdefault(name, value)
        handles = [
            ReplicaHandle(name, actor, backend=kind, local=replica if name == replica.replica else None)
            for name, actor, kind in self.replicas
        ]
        self._router = Router(handles, policy=cfg.router)
        self._router.start_watch(cfg.heartbeat_s, cfg.replica_deadline_s)
        door = FrontDoor(self._router, cfg.model_name, cfg.engine.max_model_len, load_site_profile(cfg.site),
                         cfg.door_limits)
        app, self._controller = build_app(cfg, door)
        sock = bind_socket(cfg.host, cfg.port)
        if self._controller is not None:
            self._controller.start()
        self._server = front_door_server(app)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the front door exited before it started serving")
            await asyncio.sleep(0.01)
        generated = self._controller is not None and cfg.controller.token is None
        return {"url": _url(*sock.getsockname()[:2]), "token": self._controller.token if generated else None,
                "pid": os.getpid()}

    async def wait(self) -> None:
        """Wait until the hosted front door's server exits."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        """Stop the controller, the front door's server and the router."""
        if self._controller is not None:
            await self._controller.stop()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await self._task
        if self._router is not None:
            await self._router.stop()


@dataclass
class BackgroundServer:
    """A deployment and its front door served on a thread of their own (tests, benchmarks, notebooks), so the
    caller's own event loop stays free for clients."""

    url: str
    deployment: Deployment
    loop: asyncio.AbstractEventLoop
    _server: uvicorn.Server
    _thread: threading.Thread
    _cleanups: list[Callable[[], Awaitable[None]]]

    def stop(self) -> None:
        """Stop the server thread, run the cleanups and stop the deployment."""
        self._server.should_exit = True
        self._thread.join(timeout=10)
        for cleanup in self._cleanups:
            self.loop.run_until_complete(cleanup())
        self.loop.run_until_complete(self.deployment.stop())


def serve_in_background(
    config: ServingConfig,
    customize: Callable[[FastAPI, Deployment, asyncio.AbstractEventLoop], Callable[[], Awaitable[None]] | None]
    | None = None,
) -> BackgroundServer:
    """Start the replicas and the front door on a free loopback port; ``customize`` may add routes (and return an
    async cleanup run before the replicas stop)."""
    if config.front_door != "separate":
        raise ValueError("serve_in_background runs the front door in this process: front_door: in_replica is "
                         "`testbed serve`'s (deploy.local.LocalDeployment runs it for a campaign)")
    loop = asyncio.new_event_loop()
    deployment = loop.run_until_complete(start_deployment(config))
    app = create_app(deployment.door)
    cleanups = [c] if customize is not None and (c := customize(app, deployment, loop)) is not None else []
    sock = bind_socket("127.0.0.1", 0)
    server = front_door_server(app)
    thread = threading.Thread(target=lambda: loop.run_until_complete(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the front door thread exited before it started serving")
        time.sleep(0.02)
    host, port = sock.getsockname()[:2]
    return BackgroundServer(f"http://{host}:{port}", deployment, loop, server, thread, cleanups)
