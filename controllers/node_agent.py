"""The DVFS node agent: a small authenticated HTTP service that locks this node's GPU clocks for a controller
and restores the defaults when the controller's lease runs out, on SIGTERM/SIGINT and at start-up."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from controllers.nvml_clocks import ClockKnobUnavailableError, NVMLClocks
from serving.api import error_response
from serving.knobs import ClockMHz

log = logging.getLogger(__name__)


class ClockRequest(BaseModel):
    """Body of ``POST /clocks``: the GPU clock to lock (MHz) and how long the lock holds without a heartbeat."""

    model_config = ConfigDict(extra="forbid")
    clock_mhz: ClockMHz
    lease_s: float = Field(default=10.0, gt=0, le=3600)


class Lease(BaseModel):
    """Body of ``POST /heartbeat``: how many more seconds the controller's clock lock holds."""

    model_config = ConfigDict(extra="forbid")
    lease_s: float = Field(default=10.0, gt=0, le=3600)


class NodeAgent:
    """Per-node GPU clock holder: locks clocks for a token-holding controller, restores them when its lease expires."""

    def __init__(self, token: str, clocks: NVMLClocks | None = None) -> None:
        if not token:
            raise ValueError("the node agent needs a token (TESTBED_NODE_AGENT_TOKEN): it changes GPU clocks")
        self.token = token
        self.clocks: NVMLClocks | None = None
        self.unavailable: str | None = None
        try:
            self.clocks = clocks or NVMLClocks()
        except ClockKnobUnavailableError as e:
            self.unavailable = str(e)
            log.error("node agent: clock knob unavailable: %s", e)
        self.lease_until: float | None = None
        self.restores = 0

    def restore(self, why: str) -> None:
        """Reset the GPU clocks to their defaults (a no-op without NVML); ``why`` goes to the log."""
        if self.clocks is None:
            return
        try:
            self.clocks.reset()
            self.restores += 1
            log.warning("node agent: default clocks restored (%s)", why)
        except ClockKnobUnavailableError as e:
            log.error("node agent: could not restore default clocks (%s): %s", why, e)

    async def watch(self) -> None:
        """Run forever: restore the default clocks as soon as the controller's lease runs out."""
        while True:
            await asyncio.sleep(0.2)
            if self.lease_until is not None and time.monotonic() > self.lease_until:
                self.lease_until = None
                self.restore("controller lease expired")

    def state(self) -> dict[str, Any]:
        """The clock knob for ``GET /clocks``: availability (or why not), supported and locked MHz, lease left."""
        return {
            "available": self.clocks is not None,
            "reason": self.unavailable,
            "supported_mhz": self.clocks.supported_mhz if self.clocks else [],
            "locked_mhz": self.clocks.locked_mhz if self.clocks else None,
            "lease_left_s": max(0.0, self.lease_until - time.monotonic()) if self.lease_until else None,
        }


def create_agent_app(agent: NodeAgent, restore_on_exit: bool = True) -> FastAPI:
    """The node agent's HTTP API (token-protected clock lock, heartbeat, reset) with its lease watcher running."""
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if restore_on_exit:
            agent.restore("agent start-up")  # a previous agent may have died holding a lock
        watcher = asyncio.create_task(agent.watch())
        try:
            yield
        finally:
            watcher.cancel()
            if restore_on_exit:
                agent.restore("agent shutdown")

    app = FastAPI(title="llm-energy-testbed node agent", lifespan=lifespan, docs_url=None, redoc_url=None)

    def authorized(request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), agent.token.encode())

    def refuse() -> JSONResponse:
        return error_response(401, "the node agent needs 'Authorization: Bearer <TESTBED_NODE_AGENT_TOKEN>'",
                              code="unauthorized")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "clock_knob": "available" if agent.clocks else "unavailable"}

    @app.get("/clocks")
    async def clocks() -> dict[str, Any]:
        return agent.state()

    @app.post("/clocks")
    async def set_clock(request: Request) -> JSONResponse:
        if not authorized(request):
            return refuse()
        try:
            body = ClockRequest.model_validate(await request.json())
        except (ValidationError, ValueError) as e:
            return error_response(400, f"invalid clock request: {e}", code="invalid_request")
        if agent.clocks is None:
            return error_response(409, f"clock knob unavailable: {agent.unavailable}", code="knob_unavailable")
        try:
            applied = agent.clocks.lock(body.clock_mhz)
        except ClockKnobUnavailableError as e:
            return error_response(409, f"clock knob unavailable: {e}", code="knob_unavailable")
        agent.lease_until = time.monotonic() + body.lease_s
        notes = [] if applied == body.clock_mhz else [f"clock {body.clock_mhz:g} MHz clamped to {applied} MHz"]
        return JSONResponse({**agent.state(), "applied_mhz": applied, "notes": notes})

    @app.post("/heartbeat")
    async def heartbeat(request: Request) -> JSONResponse:
        if not authorized(request):
            return refuse()
        try:
            body = Lease.model_validate(await request.json())
        except (ValidationError, ValueError) as e:
            return error_response(400, f"invalid lease: {e}", code="invalid_request")
        if agent.clocks is not None and agent.clocks.locked_mhz is not None:
            agent.lease_until = time.monotonic() + body.lease_s
        return JSONResponse(agent.state())

    @app.post("/reset")
    async def reset(request: Request) -> JSONResponse:
        if not authorized(request):
            return refuse()
        agent.lease_until = None
        agent.restore("controller asked")
        return JSONResponse(agent.state())

    return app
