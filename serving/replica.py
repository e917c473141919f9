"""A replica: one engine hosted in a Ray actor, streaming token events back to the router."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray

from profilers.types import DeviceInfo, PowerReading
from serving.config import parse_engine_config
from serving.engine import Engine, build_engine
from serving.types import AppliedKnobs, EngineStats, GenerationRequest, Knobs, TokenEvent


@dataclass(frozen=True)
class Telemetry:
    """What the exporter needs from a replica, fetched in one round trip."""

    stats: EngineStats
    devices: list[DeviceInfo]
    readings: list[PowerReading]


class Replica:
    """Actor body (wrapped with ``ray.remote`` by :func:`replica_actor_class`)."""

    def __init__(self, replica: str, engine_config: dict[str, Any]) -> None:
        self.replica = replica
        self.engine: Engine = build_engine(parse_engine_config(engine_config), replica)

    async def start(self) -> dict[str, Any]:
        await self.engine.start()
        node = ray.get_runtime_context().get_node_id()
        info = {"replica": self.replica, "pid": os.getpid(), "node_id": node}
        describe = getattr(self.engine, "describe", None)
        return {**info, **describe()} if describe else info

    async def describe(self) -> dict[str, Any]:
        describe = getattr(self.engine, "describe", None)
        return {"replica": self.replica, "backend": self.engine.backend, **(describe() if describe else {})}

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        async for event in self.engine.generate(request):
            yield event

    async def telemetry(self) -> Telemetry:
        source = self.engine
        devices = source.devices() if hasattr(source, "devices") else []
        readings = source.read() if hasattr(source, "read") else []
        return Telemetry(self.engine.stats(), devices, readings)

    async def apply(self, knobs: Knobs) -> AppliedKnobs:
        return await self.engine.apply(knobs)

    async def stop(self) -> None:
        await self.engine.stop()


ReplicaActor = ray.remote(Replica)
