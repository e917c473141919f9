"""The control loop: observe, decide, actuate (rate-limited), log and export every decision; restore the
devices' defaults on exit, on cancellation and when a step fails (the policy, the observation or the actuator);
a failed step is logged and counted by reason, and the loop goes on at the next period."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from controllers.policies import Decision, Observation, Policy
from profilers.clock import Clock
from serving.types import AppliedKnobs, Knobs

log = logging.getLogger(__name__)


class Actuator(Protocol):
    """Applies knobs to a deployment and restores its defaults; the control loop's only way to change it."""

    async def apply(self, knobs: Knobs) -> list[AppliedKnobs]:
        """Apply the knobs to every replica and return what each one really runs."""

    async def restore_defaults(self) -> None:
        """Put every replica back on its default knobs (on stop, or after a failed step)."""

    async def heartbeat(self, lease_s: float) -> None:
        """Keep the knobs: replicas restore their defaults if no heartbeat comes within ``lease_s`` seconds."""


@dataclass(frozen=True)
class DecisionRecord:
    """One control step's outcome: the policy's reason, knobs asked for, knobs applied, and whether they changed."""

    t_s: float
    policy: str
    reason: str
    requested: Knobs
    applied: tuple[AppliedKnobs, ...]
    changed: bool


@dataclass
class LoopStats:
    """Counters of the loop's decisions (by policy and reason) and failed steps, plus the last 1000 decisions."""

    decisions: dict[tuple[str, str], int] = field(default_factory=dict)
    history: deque[DecisionRecord] = field(default_factory=lambda: deque(maxlen=1000))
    errors: dict[str, int] = field(default_factory=dict)
    """Failed steps by reason: the stage that failed (observe, decide, apply, heartbeat) or ``restore`` (putting
    the defaults back after a failure failed too)."""
    last_error: str | None = None

    def count(self, policy: str, reason: str) -> None:
        """Count one decision of ``policy`` for ``reason`` (exported as a metric)."""
        self.decisions[(policy, reason)] = self.decisions.get((policy, reason), 0) + 1

    def error(self, reason: str, exc: BaseException) -> None:
        """Count a failed step under its stage (``reason``) and keep the exception's message as ``last_error``."""
        self.errors[reason] = self.errors.get(reason, 0) + 1
        self.last_error = f"{reason}: {type(exc).__name__}: {exc}"


class ControlLoop:
    """Every ``period_s``: observe, let the policy decide, apply the knobs (rate-limited), heartbeat the lease."""

    def __init__(
        self,
        policy: Policy,
        observe: Callable[[], Awaitable[Observation]],
        actuator: Actuator,
        clock: Clock,
        period_s: float = 1.0,
        max_changes_per_min: int = 12,
        lease_s: float = 5.0,
    ) -> None:
        self.policy = policy
        self.observe = observe
        self.actuator = actuator
        self.clock = clock
        self.period_s = period_s
        self.max_changes_per_min = max_changes_per_min
        self.lease_s = lease_s
        self.stats = LoopStats()
        self.current = Knobs()
        self._changes: deque[float] = deque()
        self.running = False
        # One step at a time: an operator's forced step (POST /control/knobs) during a periodic one would otherwise
        # apply its knobs while the other's are still being applied (an engine restart takes seconds), and the
        # knobs recorded as current would be whichever finished last, not what the replicas run.
        self._step_lock = asyncio.Lock()
        self.stage = "observe"
        """The stage of the step in progress (or of the last one): what a failure is counted under."""

    def set_policy(self, policy: Policy) -> None:
        """Switch to another policy from the next step on (the knobs in effect stay until it decides)."""
        log.info("policy %s -> %s", self.policy.name, policy.name)
        self.policy = policy

    async def step(self, force: bool = False) -> DecisionRecord:
        """One period; ``force`` (an operator's explicit setting) bypasses the rate limit. Steps never overlap:
        one that arrives during another runs after it, deciding on what that one applied."""
        async with self._step_lock:
            self.stage = "observe"
            obs = await self.observe()
            self.stage = "decide"
            decision = self.policy.decide(obs)
            self.stage = "apply"
            record = await self._actuate(obs.t_s, decision, force)
            self.stage = "heartbeat"
            await self.actuator.heartbeat(self.lease_s)
            return record

    async def _actuate(self, now: float, decision: Decision, force: bool = False) -> DecisionRecord:
        wanted = _merge(self.current, decision.knobs)
        reason = decision.reason
        applied: tuple[AppliedKnobs, ...] = ()
        changed = wanted != self.current
        if changed:
            while self._changes and now - self._changes[0] >= 60.0:
                self._changes.popleft()
            if len(self._changes) >= self.max_changes_per_min and not force:
                reason, changed = "rate_limited", False
            else:
                applied = tuple(await self.actuator.apply(wanted))
                self._changes.append(now)
                self.current = wanted
                log.info("%s (%s): applied %s", self.policy.name, reason, wanted)
        self.stats.count(self.policy.name, reason)
        record = DecisionRecord(now, self.policy.name, reason, decision.knobs, applied, changed)
        self.stats.history.append(record)
        return record

    async def run(self) -> None:
        """Run until cancelled; defaults are restored however the loop ends, and after a step that fails (logged,
        counted in ``stats.errors``), after which the loop goes on at the next period."""
        self.running = True
        try:
            while True:
                try:
                    await self.step()
                except Exception as e:  # any failure of a step: the loop must not die of it
                    await self._recover(e)
                await self.clock.sleep(self.period_s)
        finally:
            self.running = False
            await asyncio.shield(self.actuator.restore_defaults())
            self.current = Knobs()

    async def _recover(self, exc: Exception) -> None:
        """After a failed step: count it, and put the devices' defaults back (the safe setting: what the engines
        started with) unless they are known to be in force already."""
        reason = self.stage
        self.stats.error(reason, exc)
        self.stats.count(self.policy.name, "error")
        log.error("control step failed in %s (%s: %s); restoring the devices' default knobs, retrying in %.3g s",
                  reason, type(exc).__name__, exc, self.period_s, exc_info=exc)
        if self.current == Knobs() and reason in ("observe", "decide"):
            return  # nothing was changed: the defaults are in force
        async with self._step_lock:  # not while an operator's forced step applies its knobs
            try:
                await asyncio.shield(self.actuator.restore_defaults())
            except Exception as e:
                self.stats.error("restore", e)
                log.error("restoring the default knobs failed too (%s: %s); retrying at the next failure or exit",
                          type(e).__name__, e)
            self.current = Knobs()


def _merge(current: Knobs, wanted: Knobs) -> Knobs:
    """The knobs in force after ``wanted``: a knob it leaves as None keeps its current value."""
    return current.model_copy(update=wanted.model_dump(exclude_none=True))
