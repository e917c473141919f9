"""A controller in its own process (``testbed controller run``), as on Kubernetes: it observes a deployment
through its Prometheus endpoint, locks GPU clocks through the nodes' DVFS agents and serves its own control API.

Latency percentiles come from the front door's histograms, differenced between consecutive scrapes (what
``histogram_quantile(rate(...))`` computes in PromQL); node agents are listed or found by resolving a
(headless) Service name to every agent pod's address.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from controllers import NODE_AGENT_PORT
from controllers.actuators import NodeAgentActuator
from controllers.loop import ControlLoop
from controllers.policies import Observation, build_policy, policy_names
from profilers.clock import RealClock
from profilers.scrape import ascrape_counters
from serving.api import error_response
from serving.slo import SLO
from serving.types import AppliedKnobs, Knobs

log = logging.getLogger(__name__)


class RemoteControllerConfig(BaseModel):
    """The controller file the Helm chart renders (``controller.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    policy: str = "slo_feedback"
    options: dict[str, float | str] = Field(default_factory=dict)
    interval_s: float = Field(default=10.0, gt=0, le=600)
    slo: SLO = Field(description="Targets and the percentile compared with them (the chart renders p99).")
    metrics_url: str = Field(description="The front door's /metrics.")
    node_agents: list[str] = Field(default_factory=list, description="Agent URLs, when not found by service.")
    node_agent_service: str | None = Field(default=None, description="DNS name resolving to every agent pod.")
    node_agent_port: int = Field(default=NODE_AGENT_PORT, ge=1, le=65535)
    max_changes_per_min: int = Field(default=6, ge=1, le=600)
    lease_s: float = Field(default=60.0, gt=0, description="Agents restore default clocks if not renewed.")


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative (upper bound, count) pairs."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            span = count - prev_count
            return prev_le + (le - prev_le) * ((rank - prev_count) / span if span > 0 else 0.0)
        prev_le, prev_count = le, count
    return prev_le


class MetricsObserver:
    """Observations from consecutive scrapes of a testbed ``/metrics``."""

    def __init__(self, metrics_url: str, http: httpx.AsyncClient, percentile: float = 95.0) -> None:
        self.url = metrics_url
        self.http = http
        self.q = percentile / 100
        self._last: dict[str, Any] | None = None

    async def scrape(self) -> dict[str, Any]:
        """One scrape of ``/metrics``: latency histograms, completions, energy (J), tokens, power, load, clocks."""
        snap = await ascrape_counters(self.url, self.http)
        return {"t": time.monotonic(), **snap.latency_buckets, "e2e_count": snap.requests_completed,
                "energy": sum(c.energy_j for c in snap.energy.values()), "tokens": snap.generated_total,
                "power": sum(snap.power_w.values()), "running": snap.running, "waiting": snap.waiting,
                "clocks": list(snap.clock_mhz.values())}

    async def __call__(self) -> Observation:
        """Observe from the change since the previous scrape: rate, tail TTFT/TPOT from histograms, energy per token."""
        now = await self.scrape()
        last, self._last = self._last, now
        if last is None:
            last = {**now, "ttft": {}, "tpot": {}, "e2e_count": now["e2e_count"], "energy": now["energy"],
                    "tokens": now["tokens"]}
        dt = max(1e-9, now["t"] - last["t"])

        def quantile(key: str) -> float | None:
            deltas = [(le, c - last[key].get(le, 0.0)) for le, c in now[key].items()]
            return histogram_quantile(self.q, deltas)

        completed = now["e2e_count"] - last["e2e_count"]
        tokens = now["tokens"] - last["tokens"]
        energy = now["energy"] - last["energy"]
        return Observation(
            t_s=now["t"],
            arrival_rate_rps=completed / dt,
            ttft_s=quantile("ttft"),
            tpot_s=quantile("tpot"),
            completed=int(completed),
            power_w=now["power"],
            energy_per_token_j=energy / tokens if tokens > 0 and energy >= 0 else None,
            tokens=tokens if tokens > 0 else None,
            running=int(now["running"]),
            waiting=int(now["waiting"]),
            clock_mhz=max(now["clocks"]) if now["clocks"] else None,
            max_num_seqs=None,
        )


class _NoOtherKnobs:
    """Batch cap and speculation stay with the deployment; this controller only moves clocks."""

    last_applied: dict[str, AppliedKnobs] = {}  # noqa: RUF012  (never written)

    async def apply(self, knobs: Knobs) -> list[AppliedKnobs]:
        return [AppliedKnobs(None, knobs.max_num_seqs or 0, 0.0)]

    async def restore_defaults(self) -> None: ...

    async def heartbeat(self, lease_s: float) -> None: ...


def resolve_agents(config: RemoteControllerConfig) -> list[str]:
    """Node agent base URLs: the configured list, else one per address the agents' service name resolves to."""
    if config.node_agents:
        return config.node_agents
    if not config.node_agent_service:
        return []
    try:
        infos = socket.getaddrinfo(config.node_agent_service, config.node_agent_port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        log.error("cannot resolve node agents at %s: %s", config.node_agent_service, e)
        return []
    hosts = sorted({i[4][0] for i in infos})
    return [f"http://{h if ':' not in h else f'[{h}]'}:{config.node_agent_port}" for h in hosts]


class RemoteController:
    """The out-of-process controller: observes a deployment's ``/metrics`` and sets GPU clocks through node agents."""

    def __init__(self, config: RemoteControllerConfig, agent_token: str, control_token: str) -> None:
        self.config = config
        self.control_token = control_token
        self.slo = config.slo
        self.http = httpx.AsyncClient(timeout=10.0)
        self.agents = NodeAgentActuator(resolve_agents(config), agent_token, _NoOtherKnobs())  # type: ignore[arg-type]
        observer = MetricsObserver(config.metrics_url, self.http, config.slo.percentile)

        async def observe() -> Observation:
            if not self.agents.supported_clocks_mhz:
                await self.agents.discover()
            obs = await observer()
            return Observation(**{**obs.__dict__, "supported_clocks_mhz": self.agents.supported_clocks_mhz})

        self.loop = ControlLoop(
            build_policy(config.policy, self.slo, **config.options), observe, self.agents, RealClock(),
            period_s=config.interval_s, max_changes_per_min=config.max_changes_per_min, lease_s=config.lease_s,
        )

    def state(self) -> dict[str, Any]:
        """The controller's state for ``GET /control``: policy, agents, clocks, errors and the last 10 decisions."""
        last = list(self.loop.stats.history)[-10:]
        return {
            "policy": self.loop.policy.name, "policies": policy_names(), "running": self.loop.running,
            "node_agents": self.agents.agents, "unavailable": self.agents.unavailable,
            "supported_clocks_mhz": list(self.agents.supported_clocks_mhz),
            "clock_mhz": self.loop.current.clock_mhz,
            "errors": dict(self.loop.stats.errors), "last_error": self.loop.stats.last_error,
            "recent_decisions": [{"t_s": d.t_s, "reason": d.reason, "changed": d.changed} for d in last],
        }


def create_remote_app(controller: RemoteController) -> FastAPI:
    """The remote controller's HTTP API (state, policy switch, token-protected) running its control loop."""
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_run_forever(controller))
        try:
            yield
        finally:
            task.cancel()  # the loop's finally asks every agent to restore default clocks
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    app = FastAPI(title="llm-energy-testbed controller", lifespan=lifespan, docs_url=None, redoc_url=None)

    def authorized(request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), controller.control_token.encode())

    @app.get("/control")
    async def get_control() -> dict[str, Any]:
        return controller.state()

    @app.post("/control/policy")
    async def set_policy(request: Request) -> JSONResponse:
        if not authorized(request):
            return error_response(401, "needs 'Authorization: Bearer <TESTBED_CONTROL_TOKEN>'", code="unauthorized")
        try:
            body = await request.json()
            policy = build_policy(str(body["policy"]), controller.slo, **body.get("options", {}))
        except (KeyError, ValueError, TypeError, ValidationError) as e:
            return error_response(400, f"invalid policy change: {e}", param="policy", code="invalid_request")
        controller.loop.set_policy(policy)
        return JSONResponse(controller.state())

    return app


async def _run_forever(controller: RemoteController) -> None:
    """Keep controlling through transient failures (front door restarting): defaults are restored by each
    failed run's ``finally``; the next run starts after a pause."""
    while True:
        try:
            await controller.loop.run()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.error("controller: %s; default clocks restored, retrying in %.0f s", e, controller.config.interval_s)
            await asyncio.sleep(controller.config.interval_s)


def tokens_from_env() -> tuple[str, str]:
    """The node agents' token and the control API's token from the environment (empty when unset)."""
    agent = os.environ.get("TESTBED_NODE_AGENT_TOKEN", "")
    control = os.environ.get("TESTBED_CONTROL_TOKEN", "")
    return agent, control
