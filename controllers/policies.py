"""Policies: an observation of the deployment in, the knob settings to apply out. Registered by name."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import TypeAdapter, ValidationError

from serving.knobs import Knobs
from serving.slo import SLO


@dataclass(frozen=True)
class Observation:
    """What a policy sees each control period (latency over the recent window, in seconds)."""

    t_s: float
    arrival_rate_rps: float
    ttft_s: float | None
    """TTFT at the SLO's percentile over the recent window (None: no request finished in it)."""
    tpot_s: float | None
    """TPOT at the SLO's percentile likewise."""
    completed: int
    power_w: float
    energy_per_token_j: float | None
    running: int
    waiting: int
    clock_mhz: float | None
    max_num_seqs: int | None
    supported_clocks_mhz: tuple[float, ...] = ()
    spec_acceptance: float | None = None
    """Share of proposed tokens accepted so far (None: speculation never ran)."""
    tokens: float | None = None
    """Tokens generated since the previous observation (what ``energy_per_token_j`` divides by)."""


@dataclass(frozen=True)
class Decision:
    """A policy's choice for one period: the knobs to apply and why."""

    knobs: Knobs
    reason: str
    """Short machine-readable cause, exported as the ``reason`` label (few distinct values)."""


class Policy(Protocol):
    """A control policy: turns each period's observation into the knobs to apply, keeping the SLO."""

    name: str
    slo: SLO

    def decide(self, obs: Observation) -> Decision:
        """The knobs for this period, given the observation, with a short reason."""


PolicyFactory = Callable[..., Policy]
_POLICIES: dict[str, PolicyFactory] = {}


def register_policy(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    """Class decorator registering a policy factory under ``name`` for ``build_policy`` and the control API."""
    def deco(factory: PolicyFactory) -> PolicyFactory:
        _POLICIES[name] = factory
        return factory

    return deco


def build_policy(name: str, slo: SLO, **options: float | str) -> Policy:
    """Build the registered policy ``name`` for this SLO, options type-checked; ValueError if unknown or unfit."""
    import controllers.model_based  # noqa: F401  (registers itself)

    try:
        factory = _POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(_POLICIES))}") from None
    options = _typed_options(name, factory, options)
    try:
        return factory(slo=slo, **options)
    except TypeError as e:
        raise ValueError(f"policy {name!r} does not take these options ({', '.join(options)}): {e}") from None


def _typed_options(name: str, factory: PolicyFactory, options: dict[str, float | str]) -> dict[str, Any]:
    """The options converted to the types the policy's fields declare (``"1500"`` to 1500.0), refused when they do
    not convert (``clock_mhz: "fast"``): a policy that builds with a bad option fails at every decision instead."""
    if not dataclasses.is_dataclass(factory):
        return dict(options)
    hints = typing.get_type_hints(factory)
    typed: dict[str, Any] = {}
    for key, value in options.items():
        hint = hints.get(key)
        if hint is None:  # not a field: the factory refuses it (TypeError)
            typed[key] = value
            continue
        try:
            typed[key] = TypeAdapter(hint).validate_python(value)
        except ValidationError as e:
            problem = e.errors()[0]["msg"] if e.errors() else str(e)
            raise ValueError(f"policy {name!r}: option {key}={value!r}: {problem}") from None
    return typed


def policy_names() -> list[str]:
    """Names of every registered policy, sorted (what the control API accepts)."""
    import controllers.model_based  # noqa: F401  (registers itself)

    return sorted(_POLICIES)


@register_policy("static")
class StaticPolicy:
    """The baseline: the highest supported clock (or a fixed one) and fixed knobs (options: a :class:`Knobs`)."""

    name = "static"

    def __init__(self, slo: SLO, **knobs: float | str) -> None:
        self.slo = slo
        self.knobs = Knobs.model_validate(knobs)  # options arrive as numbers from YAML/JSON

    def decide(self, obs: Observation) -> Decision:
        """The fixed knobs, at the highest supported clock when no clock is given."""
        if self.knobs.clock_mhz is None and obs.supported_clocks_mhz:
            return Decision(self.knobs.model_copy(update={"clock_mhz": max(obs.supported_clocks_mhz)}), "static")
        return Decision(self.knobs, "static")


@dataclass
class SpeculationByLoad:
    """Speculative decoding on at low load, off at high load: a decode step is memory-bound when few sequences
    run, so verifying k proposals costs little more than one token and every accepted proposal saves a step;
    in a full batch the step turns compute-bound and verification is paid in full. Off as well when the
    measured acceptance is too low to pay for it."""

    k: int = 0
    max_running: float = 16
    min_acceptance: float = 0.1
    """Accepted share of proposals below which verification costs more than it saves. The share counts only the
    prefix before the first rejection, so it runs well below the per-position acceptance (0.33 at 0.6, k=4)."""

    def choose(self, obs: Observation) -> tuple[int | None, str | None]:
        """Speculation depth for this load (0: off, None: leave as is) and the reason when it is turned off."""
        if self.k <= 0:
            return None, None  # this policy does not touch speculation
        if obs.spec_acceptance is not None and obs.spec_acceptance < self.min_acceptance:
            return 0, "spec_low_acceptance"
        if obs.running + obs.waiting > self.max_running:
            return 0, "spec_off_high_load"
        return self.k, None


@dataclass
class Consolidation:
    """Batch cap in the router, used for energy: fill each replica up to ``cap`` requests before the next.

    A decode step streams the weights once whatever the batch, so a replica decoding 4 sequences draws almost
    the power of one decoding 30 (H100, 7B: ~200 W at 510 MHz either way), while a replica without work
    draws idle power (~70 W). Spreading a light load over every replica keeps them all busy with small
    batches; packing it onto as few as the cap allows lets the rest idle. The cap bounds the batch where the
    step stops being memory-bound (larger batches only lengthen the step: no energy left to amortize).
    Packing costs latency (one replica does all the prefills), so the load is spread again as soon as the
    SLO pressure passes ``limit`` or requests queue; packing is retried after ``hold`` periods, a hold that
    doubles each time packing fails again soon (up to ``max_hold``).
    """

    cap: int = 0
    """Requests per replica before the next one takes load (0: leave routing alone)."""
    limit: float = 0.7
    max_waiting: int = 4
    """Requests queued for admission beyond which packing is given up (the early sign of overload)."""
    hold: int = 30
    max_hold: int = 480
    _spread_for: int = field(default=0, init=False)
    _packed_for: int = field(default=0, init=False)
    _backoff: int = field(default=0, init=False)

    def choose(self, pressure: float | None, waiting: int = 0) -> tuple[int | None, str | None]:
        """The router's ``pack_per_replica`` (None: not this policy's knob) and why it changed, if it did."""
        if self.cap <= 0:
            return None, None
        if self._spread_for > 0:
            self._spread_for -= 1
            return 0, None
        # Latency is seen only once requests complete (a long answer later); a queue is seen at once.
        if (pressure is not None and pressure >= self.limit) or waiting > self.max_waiting:
            failed_soon = self._packed_for < 2 * max(self._backoff, self.hold)
            self._backoff = min(self.max_hold, 2 * self._backoff if failed_soon and self._backoff else self.hold)
            self._spread_for, self._packed_for = self._backoff, 0
            return 0, "spread_slo_risk"
        self._packed_for += 1
        if self._packed_for > 4 * self.max_hold:
            self._backoff = 0
        return self.cap, None


@register_policy("slo_feedback")
@dataclass
class SLOFeedbackPolicy:
    """PI control of the clock on SLO pressure (latency at the SLO's percentile / target), in velocity form.

    Holds pressure near ``setpoint`` (below 1 so there is headroom for bursts): lower pressure lets the clock
    fall, higher pressure raises it; above ``panic`` the clock jumps to the maximum at once, before violations
    pile up. The output is the clock as a fraction of the supported range, snapped up to a supported clock.
    The velocity form (change = kp x change of error + ki x error) has no integrator to wind up while the
    output sits at a bound, so leaving a bound does not overshoot.

    With ``batch_cap`` the load is packed onto as few replicas as that cap allows while pressure stays below
    the setpoint, and spread again (the cheaper way back to the setpoint) when it does not
    (:class:`Consolidation`). With ``spec_k`` speculation follows load (:class:`SpeculationByLoad`).
    """

    slo: SLO
    setpoint: float = 0.7
    panic: float = 0.95
    kp: float = 0.3
    ki: float = 0.25
    spec_k: int = 0
    """Speculative decoding depth when load is low (0: leave speculation alone)."""
    spec_max_running: float = 16
    batch_cap: int = 0
    """Pack up to this many requests per replica while there is headroom (0: leave routing alone)."""
    name: str = "slo_feedback"
    _fraction: float = field(default=1.0, init=False)
    _last_error: float | None = field(default=None, init=False)
    _packing: Consolidation = field(init=False)

    def __post_init__(self) -> None:
        self.spec_k, self.batch_cap = int(self.spec_k), int(self.batch_cap)
        self._packing = Consolidation(self.batch_cap, limit=self.setpoint)

    def decide(self, obs: Observation) -> Decision:
        """Clock by PI control of SLO pressure toward the setpoint (max on risk); speculation and packing by load."""
        clocks = sorted(obs.supported_clocks_mhz)
        if not clocks:
            return Decision(Knobs(), "no_clock_knob")
        pressure = self.slo.pressure(obs.ttft_s, obs.tpot_s)
        if pressure is None:
            reason = "no_data"  # nothing completed in the window: keep the clock
        elif pressure >= self.panic:
            self._fraction, self._last_error, reason = 1.0, None, "slo_risk"
        else:
            error = pressure - self.setpoint
            change = self.ki * error + (self.kp * (error - self._last_error) if self._last_error is not None else 0.0)
            self._fraction = max(0.0, min(1.0, self._fraction + change))
            self._last_error = error
            reason = "hold" if abs(error) < 0.02 else ("raise" if error > 0 else "headroom")
        target = clocks[0] + self._fraction * (clocks[-1] - clocks[0])
        clock = min((c for c in clocks if c >= target - 1e-9), default=clocks[-1])
        spec, why = SpeculationByLoad(self.spec_k, self.spec_max_running).choose(obs)
        pack, why_cap = self._packing.choose(pressure, obs.waiting)
        knobs = Knobs(clock_mhz=clock, speculative_tokens=spec, pack_per_replica=pack)
        return Decision(knobs, why or why_cap or reason)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values``, linearly interpolated; None when there are none."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
