"""The controller as a service of a deployment: loop task, control API routes and Prometheus metrics."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from controllers.actuators import KnobApplyError, NodeAgentActuator, ReplicaActuator
from controllers.config import ControllerConfig
from controllers.loop import ControlLoop
from controllers.observe import Observer, front_door_observer
from controllers.policies import Observation, build_policy, policy_names
from profilers.clock import RealClock
from profilers.exporter import NAMESPACE
from serving.api import ErrorResponse, FrontDoor, error_response
from serving.knobs import Knobs

log = logging.getLogger(__name__)


class PolicyChange(BaseModel):
    """Body of ``POST /control/policy``: the policy to switch to and its options."""

    model_config = ConfigDict(extra="forbid")
    policy: str
    options: dict[str, float | str] = Field(default_factory=dict)


def _with_agent_clocks(observe: Observer, agents: NodeAgentActuator) -> Callable[[], Awaitable[Observation]]:
    """GPU clocks come from the node agents, not from the replicas (a vLLM engine has no clock of its own)."""

    async def observe_with_clocks() -> Observation:
        if not agents.supported_clocks_mhz:
            await agents.discover()
        obs = await observe()
        if obs.supported_clocks_mhz or not agents.supported_clocks_mhz:
            return obs
        return dataclasses.replace(obs, supported_clocks_mhz=agents.supported_clocks_mhz)

    return observe_with_clocks


class Controller:
    """The in-process controller of a deployment: its control loop, actuators and the ``/control`` API state."""

    def __init__(self, config: ControllerConfig, door: FrontDoor) -> None:
        self.config = config
        self.door = door
        self.slo = config.slo
        self.token = config.token or secrets.token_urlsafe(24)
        replicas = ReplicaActuator(door.router)
        self.actuator: ReplicaActuator | NodeAgentActuator = replicas
        observe = front_door_observer(door, config.slo.percentile)
        if config.node_agents:
            agent_token = os.environ.get("TESTBED_NODE_AGENT_TOKEN", "")
            if not agent_token:
                raise ValueError("controller.node_agents needs TESTBED_NODE_AGENT_TOKEN (the agents' token)")
            self.actuator = NodeAgentActuator(config.node_agents, agent_token, replicas)
            observe = _with_agent_clocks(observe, self.actuator)
        self.loop = ControlLoop(
            build_policy(config.policy, self.slo, **config.options),
            observe,
            self.actuator,
            RealClock(),
            period_s=config.period_s,
            max_changes_per_min=config.max_changes_per_min,
            lease_s=config.heartbeat_lease_s,
        )
        self._task: asyncio.Task[None] | None = None
        door.registry.register(_ControllerCollector(self))

    def start(self) -> None:
        """Start the control loop as a background task on the running event loop."""
        self._task = asyncio.create_task(self.loop.run(), name="control-loop")

    async def stop(self) -> None:
        """Cancel the loop; its ``finally`` restores every replica's default knobs."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    def state(self) -> dict[str, Any]:
        """The state for ``GET /control``: policy, knobs applied per replica, SLO, errors, recent decisions."""
        last = list(self.loop.stats.history)[-10:]
        return {
            "policy": self.loop.policy.name,
            "policies": policy_names(),
            "running": self.loop.running,
            "errors": dict(self.loop.stats.errors),
            "last_error": self.loop.stats.last_error,
            "knobs": self.loop.current.model_dump(),
            "pack_per_replica": self.door.router.pack_per_replica,
            "applied": {r: {"clock_mhz": a.clock_mhz, "max_num_seqs": a.max_num_seqs, "notes": a.notes}
                        for r, a in self.actuator.last_applied.items()},
            "slo": self.slo.model_dump(),
            "recent_decisions": [
                {"t_s": d.t_s, "policy": d.policy, "reason": d.reason, "changed": d.changed,
                 "requested": d.requested.model_dump()} for d in last
            ],
        }

    def slo_attainment(self) -> float | None:
        """Share of recently completed requests whose TTFT and TPOT met the SLO; None when none completed."""
        completions = list(self.door.recent.completions)
        if not completions:
            return None
        return sum(1 for _, ttft, tpot in completions if self.slo.met(ttft, tpot)) / len(completions)


class _ControllerCollector(Collector):
    def __init__(self, controller: Controller) -> None:
        self.c = controller

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        knob = GaugeMetricFamily("llm_energy_knob_value", "Knob values in effect, per replica.",
                                 labels=["replica", "knob"])
        for replica, a in self.c.actuator.last_applied.items():
            if a.clock_mhz is not None:
                knob.add_metric([replica, "clock_mhz"], a.clock_mhz)
            knob.add_metric([replica, "max_num_seqs"], a.max_num_seqs)
            for name in ("max_num_batched_tokens", "speculative_tokens", "prefix_caching"):
                if (value := getattr(a, name)) is not None:
                    knob.add_metric([replica, name], float(value))
        knob.add_metric(["router", "pack_per_replica"], self.c.door.router.pack_per_replica)
        decisions = CounterMetricFamily("llm_energy_controller_decisions", "Control decisions by policy and reason.",
                                        labels=["policy", "reason"])
        for (policy, reason), n in self.c.loop.stats.decisions.items():
            decisions.add_metric([policy, reason], n)
        errors = CounterMetricFamily(
            f"{NAMESPACE}_controller_errors", "Failed control steps by reason (the stage that failed: observe, decide, "
            "apply, heartbeat; restore: putting the defaults back failed too). The loop restores the default knobs "
            "and goes on.", labels=["reason"])
        for reason, n in self.c.loop.stats.errors.items():
            errors.add_metric([reason], n)
        slo = GaugeMetricFamily("llm_energy_slo_attainment_ratio",
                                "Share of recent requests meeting both the TTFT and TPOT targets.")
        value = self.c.slo_attainment()
        if value is not None:
            slo.add_metric([], value)
        yield from (knob, decisions, errors, slo)


_CONTROL_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Not a valid change; nothing changed."},
    401: {"model": ErrorResponse, "description": "No or wrong bearer token."},
}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI request body for a route that reads its JSON itself (validated with the same model)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def add_control_routes(app: FastAPI, controller: Controller) -> None:
    """``GET /control`` is open; changing anything needs ``Authorization: Bearer <token>``."""

    def authorized(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), controller.token.encode())

    def unauthorized() -> JSONResponse:
        return error_response(401, "changing the controller needs 'Authorization: Bearer <token>' "
                                   "(the token printed at start-up, or controller.token in the config)",
                              code="unauthorized")

    @app.get("/control")
    async def get_control() -> dict[str, Any]:
        return controller.state()

    @app.post("/control/policy", responses=_CONTROL_RESPONSES,
              openapi_extra=_json_body(PolicyChange.model_json_schema()))
    async def set_policy(request: Request) -> JSONResponse:
        if not authorized(request):
            return unauthorized()
        try:
            change = PolicyChange.model_validate(await request.json())
            policy = build_policy(change.policy, controller.slo, **change.options)
        except (ValidationError, ValueError, TypeError, OSError) as e:  # nothing changed: built before the swap
            return error_response(400, f"invalid policy change: {e}", param="policy", code="invalid_request")
        controller.loop.set_policy(policy)
        return JSONResponse(controller.state())

    @app.post("/control/knobs", responses={**_CONTROL_RESPONSES, 504: {
        "model": ErrorResponse, "description": "The engines did not confirm the knobs in time."}},
              openapi_extra=_json_body(Knobs.model_json_schema()))
    async def set_knobs(request: Request) -> JSONResponse:
        """Pin knobs: switches to the static policy with these values."""
        if not authorized(request):
            return unauthorized()
        try:
            change = Knobs.model_validate(await request.json())
        except ValidationError as e:  # the same words as a campaign file's or Knobs(...)'s refusal
            words = "; ".join(x["msg"] for x in e.errors())
            return error_response(400, f"invalid knobs: {words}", code="invalid_request")
        except ValueError as e:  # not JSON
            return error_response(400, f"invalid knobs: {e}", code="invalid_request")
        controller.loop.set_policy(build_policy("static", controller.slo, **change.model_dump(exclude_none=True)))
        try:
            record = await controller.loop.step(force=True)  # apply now rather than at the next period
        except KnobApplyError as e:
            return error_response(504, str(e), code="knob_apply_timeout")
        body = controller.state()
        body["applied_now"] = record.changed
        return JSONResponse(body)
