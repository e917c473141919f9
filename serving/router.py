"""Chooses a replica for each request and routes around dead ones."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray.exceptions

from profilers import trace
from profilers.exporter import DeviceSample, ExportSnapshot, ReplicaSample
from serving.replica import Telemetry
from serving.types import GenerationRequest, RequestRejectedError, TokenEvent

log = logging.getLogger(__name__)

# Errors that mean the replica (its actor, process or node) is gone, not that the request was bad.
REPLICA_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class NoReplicaError(RuntimeError):
    """No live replica can take the request."""


class ReplicaFailedError(RuntimeError):
    """The replica died after it had streamed tokens; the request cannot be resumed transparently."""


@dataclass
class ReplicaHandle:
    name: str
    actor: Any
    outstanding: int = 0
    routed: int = 0
    alive: bool = True
    backend: str = "emulated"


def _unwrap(error: BaseException) -> BaseException:
    """Ray wraps exceptions raised in actors; recover the engine's own error when there is one."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


class Router:
    """Least-outstanding-requests (default) or round-robin; one retry on another replica if the chosen
    replica dies before the first token (nothing was streamed, so the retry is invisible to the client)."""

    def __init__(self, replicas: list[ReplicaHandle], policy: str = "least_outstanding", retries: int = 1) -> None:
        if not replicas:
            raise ValueError("a router needs at least one replica")
        self.replicas = replicas
        self.policy = policy
        self.retries = retries
        self._rr = itertools.cycle(range(len(replicas)))
        self.pack_per_replica = 0
        """Set by a controller (knob ``pack_per_replica``): fill replicas in order up to this many requests."""

    def live(self) -> list[ReplicaHandle]:
        return [r for r in self.replicas if r.alive]

    def pick(self, exclude: set[str] = frozenset()) -> ReplicaHandle:  # type: ignore[assignment]
        candidates = [r for r in self.live() if r.name not in exclude]
        if not candidates:
            dead = [r.name for r in self.replicas if not r.alive]
            raise NoReplicaError(f"no live replica to serve the request (dead: {', '.join(dead) or 'none'})")
        if self.policy == "round_robin":
            for _ in range(len(self.replicas)):
                r = self.replicas[next(self._rr)]
                if r in candidates:
                    return r
        if self.pack_per_replica > 0:
            # The busiest replica with room (ties: the first listed): the load packs onto as few replicas as the
            # limit allows and the others drain; every replica full: the least loaded.
            room = [r for r in candidates if r.outstanding < self.pack_per_replica]
            if room:
                return max(room, key=lambda r: (r.outstanding, -self.replicas.index(r)))
        # Ties go to the replica that was given the fewest requests, so light load still spreads.
        return min(candidates, key=lambda r: (r.outstanding, r.routed))

    def mark_dead(self, replica: ReplicaHandle, error: BaseException) -> None:
        if replica.alive:
            log.error("replica %s is gone (%s); routing around it", replica.name, type(error).__name__)
        replica.alive = False

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        tried: set[str] = set()
        while True:
            replica = self.pick(tried)
            tried.add(replica.name)
            started = False
            replica.outstanding += 1
            replica.routed += 1
            try:
                trace.mark(request.request_id, "router.dispatch")
                gen = replica.actor.generate.options(num_returns="streaming").remote(request)
                async for ref in gen:
                    event: TokenEvent = await ref
                    if not started:
                        trace.mark(request.request_id, "router.first_event")
                    started = True
                    yield event
                return
            except REPLICA_GONE as e:
                self.mark_dead(replica, e)
                if started:
                    raise ReplicaFailedError(
                        f"replica {replica.name} died after streaming part of the response"
                    ) from e
                if len(tried) > self.retries:
                    raise NoReplicaError(f"replica {replica.name} died and the retry budget is spent") from e
            except ray.exceptions.RayTaskError as e:
                cause = _unwrap(e)
                if isinstance(cause, RequestRejectedError):
                    raise cause from None
                raise
            finally:
                replica.outstanding -= 1

    async def telemetry(self, timeout_s: float = 2.0) -> list[tuple[ReplicaHandle, Telemetry]]:
        """Telemetry of every live replica that answers in time; a replica whose actor is gone is marked dead."""
        live = self.live()

        async def fetch(r: ReplicaHandle) -> Telemetry | None:
            try:
                return await asyncio.wait_for(r.actor.telemetry.remote(), timeout_s)
            except REPLICA_GONE as e:
                self.mark_dead(r, e)
            except TimeoutError:
                log.warning("replica %s did not report telemetry within %.1f s", r.name, timeout_s)
            return None

        results = await asyncio.gather(*(fetch(r) for r in live))
        return [(r, tel) for r, tel in zip(live, results, strict=True) if tel is not None]

    async def snapshot(self, timeout_s: float = 2.0) -> ExportSnapshot:
        snap = ExportSnapshot()
        for r, tel in await self.telemetry(timeout_s):
            infos = {d.device: d for d in tel.devices}
            for rd in tel.readings:
                backend = infos[rd.device].backend if rd.device in infos else r.backend
                snap.devices.append(
                    DeviceSample(r.name, rd.device, backend, str(rd.provenance), rd.energy_j, rd.power_w, rd.clock_mhz)
                )
            s = tel.stats
            snap.replicas.append(
                ReplicaSample(
                    r.name, s.backend, s.prompt_tokens_total, s.generated_tokens_total,
                    s.attributed_prefill_j, s.attributed_decode_j, s.idle_j, s.running, s.waiting,
                )
            )
        return snap
