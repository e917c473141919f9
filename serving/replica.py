"""A replica: one engine hosted in a Ray actor, streaming token events back to the router."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray

from profilers import trace
from profilers.types import DeviceInfo, PowerReading
from serving.config import parse_engine_config
from serving.engine import Engine, build_engine
from serving.types import AppliedKnobs, EngineStats, GenerationRequest, Knobs, TokenEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Telemetry:
    """What the exporter needs from a replica, fetched in one round trip."""

    stats: EngineStats
    devices: list[DeviceInfo]
    readings: list[PowerReading]
    supported_clocks_mhz: tuple[float, ...] = ()


class Replica:
    """Actor body (wrapped with ``ray.remote`` by :func:`replica_actor_class`)."""

    def __init__(self, replica: str, engine_config: dict[str, Any]) -> None:
        self.replica = replica
        self.engine: Engine = build_engine(parse_engine_config(engine_config), replica)
        self.defaults = Knobs()
        self._lease_until: float | None = None
        self._watchdog: asyncio.Task[None] | None = None

    async def start(self) -> dict[str, Any]:
        await self.engine.start()
        current = await self.engine.apply(Knobs())  # a no-op that reports the engine's start-up knobs
        self.defaults = Knobs(clock_mhz=current.clock_mhz, max_num_seqs=current.max_num_seqs,
                              speculative_tokens=current.speculative_tokens)
        node = ray.get_runtime_context().get_node_id()
        info = {"replica": self.replica, "pid": os.getpid(), "node_id": node}
        describe = getattr(self.engine, "describe", None)
        return {**info, **describe()} if describe else info

    async def describe(self) -> dict[str, Any]:
        describe = getattr(self.engine, "describe", None)
        return {"replica": self.replica, "backend": self.engine.backend, **(describe() if describe else {})}

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        trace.mark(request.request_id, "actor.receive")
        async for event in self.engine.generate(request):
            if event.index == 0:
                trace.mark(request.request_id, "actor.first_event")
            yield event

    async def telemetry(self) -> Telemetry:
        source = self.engine
        devices = source.devices() if hasattr(source, "devices") else []
        readings = source.read() if hasattr(source, "read") else []
        clocks = tuple(source.supported_clocks_mhz()) if hasattr(source, "supported_clocks_mhz") else ()
        return Telemetry(self.engine.stats(), devices, readings, clocks)

    async def apply(self, knobs: Knobs) -> AppliedKnobs:
        return await self.engine.apply(knobs)

    async def restore_defaults(self) -> AppliedKnobs:
        return await self.engine.apply(self.defaults)

    async def heartbeat(self, lease_s: float) -> None:
        """A controller's promise to call again within ``lease_s``; if it does not (killed, hung, partitioned),
        the replica's watchdog restores the default knobs itself."""
        self._lease_until = time.monotonic() + lease_s
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            if self._lease_until is not None and time.monotonic() > self._lease_until:
                self._lease_until = None
                log.warning("replica %s: controller heartbeat lost; restoring default knobs", self.replica)
                await self.restore_defaults()

    async def stop(self) -> None:
        await self.engine.stop()


ReplicaActor = ray.remote(Replica)
