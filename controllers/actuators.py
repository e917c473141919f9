"""Actuators: apply knobs to every replica of a deployment and report what really took effect."""

from __future__ import annotations

import asyncio
import logging

from serving.router import REPLICA_GONE, Router
from serving.types import AppliedKnobs, Knobs

log = logging.getLogger(__name__)


class ReplicaActuator:
    """Knobs through the replicas' own ``apply`` (engine config, emulated clock), each clamped by the engine."""

    def __init__(self, router: Router, timeout_s: float = 30.0) -> None:
        self.router = router
        self.timeout_s = timeout_s
        self.last_applied: dict[str, AppliedKnobs] = {}

    async def _each(self, method: str, *args: object) -> list[AppliedKnobs]:
        live = self.router.live()

        async def call(r) -> AppliedKnobs | None:  # type: ignore[no-untyped-def]
            try:
                result = await asyncio.wait_for(getattr(r.actor, method).remote(*args), self.timeout_s)
            except REPLICA_GONE as e:
                self.router.mark_dead(r, e)
                return None
            if isinstance(result, AppliedKnobs):
                self.last_applied[r.name] = result
            return result

        results = await asyncio.gather(*(call(r) for r in live))
        return [a for a in results if isinstance(a, AppliedKnobs)]

    async def apply(self, knobs: Knobs) -> list[AppliedKnobs]:
        applied = await self._each("apply", knobs)
        for a in applied:
            for note in a.notes:
                log.info("actuator: %s", note)
        return applied

    async def restore_defaults(self) -> None:
        await self._each("restore_defaults")

    async def heartbeat(self, lease_s: float) -> None:
        await self._each("heartbeat", lease_s)
