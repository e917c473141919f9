"""Actuators: apply knobs to every replica of a deployment and report what really took effect."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from profilers.errors import TestbedError
from serving.router import REPLICA_GONE, Router
from serving.types import AppliedKnobs, Knobs

log = logging.getLogger(__name__)


class KnobApplyError(TestbedError, TimeoutError):
    """A replica did not confirm a knob change (or a restore) in time; the message names it."""


class ReplicaActuator:
    """Knobs through the replicas' own ``apply`` (engine config, emulated clock), each clamped by the engine."""

    def __init__(self, router: Router, timeout_s: float = 30.0, restart_timeout_s: float = 900.0) -> None:
        self.router = router
        self.timeout_s = timeout_s
        # A vLLM knob rebuilds the engine (drain, then load and profile: ~10 s for the tiny model on a CPU, minutes
        # for a large one with CUDA graphs): applying knobs may take that long.
        self.restart_timeout_s = restart_timeout_s
        self.last_applied: dict[str, AppliedKnobs] = {}

    async def _each(self, method: str, *args: object, timeout_s: float | None = None) -> list[AppliedKnobs]:
        live = self.router.live()
        limit = self.timeout_s if timeout_s is None else timeout_s

        async def call(r) -> AppliedKnobs | None:  # type: ignore[no-untyped-def]
            try:
                result = await asyncio.wait_for(getattr(r.actor, method).remote(*args), limit)
            except REPLICA_GONE as e:
                self.router.mark_dead(r, e)
                return None
            except TimeoutError:
                raise KnobApplyError(
                    f"replica {r.name} did not finish {method} within {limit:g} s (an engine restart for a knob "
                    "can take minutes for a large model: raise the actuator's restart_timeout_s); its knobs are "
                    "unknown until it answers"
                ) from None
            if isinstance(result, AppliedKnobs):
                self.last_applied[r.name] = result
            return result

        results = await asyncio.gather(*(call(r) for r in live))
        return [a for a in results if isinstance(a, AppliedKnobs)]

    async def apply(self, knobs: Knobs) -> list[AppliedKnobs]:
        """Apply the knobs on every live replica (waiting out engine restarts) and set the router's packing."""
        applied = await self._each("apply", knobs, timeout_s=self.restart_timeout_s)
        route(self.router, knobs)
        for a in applied:
            for note in a.notes:
                log.info("actuator: %s", note)
        return applied

    async def restore_defaults(self) -> None:
        """Put every live replica back on its default knobs and turn router packing off."""
        self.router.pack_per_replica = 0
        await self._each("restore_defaults", timeout_s=self.restart_timeout_s)

    async def heartbeat(self, lease_s: float) -> None:
        """Renew each replica's lease: a replica restores its default knobs if no heartbeat comes for ``lease_s`` s."""
        await self._each("heartbeat", lease_s)


def route(router: Router | None, knobs: Knobs) -> None:
    """The router's share of the knobs: admission that packs the load onto as few replicas as it can."""
    if router is not None and knobs.pack_per_replica is not None:  # Knobs holds it in [0, MAX_NUM_SEQS]
        router.pack_per_replica = knobs.pack_per_replica


class EngineActuator:
    """Knobs applied to engines in this process (virtual-time runs); defaults are their start-up knobs."""

    def __init__(self, engines: list, router: Router | None = None) -> None:  # type: ignore[type-arg]
        self.engines = engines
        self.router = router
        self.defaults: list[Knobs] | None = None
        self.last_applied: dict[str, AppliedKnobs] = {}

    async def _capture_defaults(self) -> None:
        if self.defaults is None:
            now = [await e.apply(Knobs()) for e in self.engines]
            self.defaults = [a.as_knobs() for a in now]

    async def apply(self, knobs: Knobs) -> list[AppliedKnobs]:
        """Apply the knobs to each engine in turn (defaults captured first) and set the router's packing."""
        await self._capture_defaults()
        applied = [await e.apply(knobs) for e in self.engines]
        self.last_applied.update({e.replica: a for e, a in zip(self.engines, applied, strict=True)})
        route(self.router, knobs)
        return applied

    async def restore_defaults(self) -> None:
        """Re-apply each engine's knobs as captured before the first change, and turn router packing off."""
        await self._capture_defaults()
        if self.router is not None:
            self.router.pack_per_replica = 0
        for e, d in zip(self.engines, self.defaults or [], strict=True):
            await e.apply(d)

    async def heartbeat(self, lease_s: float) -> None:
        """In-process engines die with their controller: nothing to watch."""


class NodeAgentActuator:
    """GPU clocks through the nodes' DVFS agents (the only privileged component); every other knob through
    ``inner``. An agent that refuses the clock (no permission, not supported) marks the clock knob unavailable
    with its reason, and the other knobs keep working."""

    def __init__(self, agents: list[str], token: str, inner: ReplicaActuator, timeout_s: float = 5.0) -> None:
        import httpx

        self.agents = [a.rstrip("/") for a in agents]
        self.inner = inner
        self.http = httpx.AsyncClient(timeout=timeout_s, headers={"authorization": f"Bearer {token}"})
        self.unavailable: dict[str, str] = {}
        self.supported_clocks_mhz: tuple[float, ...] = ()
        self.lease_s = 10.0

    @property
    def last_applied(self) -> dict[str, AppliedKnobs]:
        """What each replica last confirmed, by replica name (the clock comes from the agents)."""
        return self.inner.last_applied

    async def discover(self) -> None:
        """Supported clocks common to every agent (the policy chooses among them)."""
        sets = []
        for agent in self.agents:
            try:
                state = (await self.http.get(f"{agent}/clocks")).json()
            except Exception as e:  # an unreachable agent must not stop the controller
                self.unavailable[agent] = f"unreachable: {e!r}"
                continue
            if not state.get("available"):
                self.unavailable[agent] = state.get("reason") or "clock knob unavailable"
            else:
                sets.append(set(state["supported_mhz"]))
        self.supported_clocks_mhz = tuple(sorted(set.intersection(*sets))) if sets else ()

    async def apply(self, knobs: Knobs) -> list[AppliedKnobs]:
        """Lock the GPU clock through every available agent, other knobs through ``inner``; report what took effect."""
        notes: list[str] = []
        clock: float | None = None
        if knobs.clock_mhz is not None:
            for agent in self.agents:
                if agent in self.unavailable:
                    continue
                resp = await self.http.post(f"{agent}/clocks", json={"clock_mhz": knobs.clock_mhz,
                                                                      "lease_s": self.lease_s})
                if resp.status_code == 200:
                    body = resp.json()
                    clock = float(body["applied_mhz"])
                    notes.extend(body.get("notes", []))
                else:
                    reason = resp.json().get("error", {}).get("message", f"HTTP {resp.status_code}")
                    self.unavailable[agent] = reason
                    log.error("clock knob unavailable on %s: %s; carrying on with the other knobs", agent, reason)
        rest = knobs.model_copy(update={"clock_mhz": None})
        applied = await self.inner.apply(rest)
        return [dataclasses.replace(a, clock_mhz=clock, notes=[*a.notes, *notes]) for a in applied]

    async def restore_defaults(self) -> None:
        """Ask every agent to reset its GPU clocks, then restore the replicas' default knobs."""
        for agent in self.agents:
            try:
                (await self.http.post(f"{agent}/reset")).raise_for_status()
            except Exception as e:  # the other agents and knobs are restored all the same
                log.warning("could not restore the default clocks on %s: %r (the agent restores them when the "
                            "controller's lease runs out)", agent, e)
        await self.inner.restore_defaults()

    async def heartbeat(self, lease_s: float) -> None:
        """Renew the clock lease on every available agent and the replicas' lease (``lease_s`` seconds)."""
        self.lease_s = lease_s
        for agent in self.agents:
            if agent not in self.unavailable:
                try:
                    (await self.http.post(f"{agent}/heartbeat", json={"lease_s": lease_s})).raise_for_status()
                except Exception as e:  # a missed heartbeat: the agent restores its defaults if the lease runs out
                    log.warning("heartbeat to the node agent %s failed: %r", agent, e)
        await self.inner.heartbeat(lease_s)
