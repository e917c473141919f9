"""Policies: an observation of the deployment in, the knob settings to apply out. Registered by name."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from serving.types import Knobs


@dataclass(frozen=True)
class Observation:
    """What a policy sees each control period (latency over the recent window, in seconds)."""

    t_s: float
    arrival_rate_rps: float
    ttft_p95_s: float | None
    tpot_p95_s: float | None
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


@dataclass(frozen=True)
class Decision:
    knobs: Knobs
    reason: str
    """Short machine-readable cause, exported as the ``reason`` label (few distinct values)."""


@dataclass(frozen=True)
class SLOTargets:
    ttft_s: float
    tpot_s: float

    def pressure(self, obs: Observation) -> float | None:
        """Worst latency as a share of its target (1.0 = at the SLO); None without fresh data."""
        ratios = [v / t for v, t in ((obs.ttft_p95_s, self.ttft_s), (obs.tpot_p95_s, self.tpot_s)) if v is not None]
        return max(ratios) if ratios else None


class Policy(Protocol):
    name: str

    def decide(self, obs: Observation) -> Decision: ...


PolicyFactory = Callable[..., Policy]
_POLICIES: dict[str, PolicyFactory] = {}


def register_policy(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    def deco(factory: PolicyFactory) -> PolicyFactory:
        _POLICIES[name] = factory
        return factory

    return deco


def build_policy(name: str, slo: SLOTargets, **options: float | str) -> Policy:
    import controllers.model_based  # noqa: F401  (registers itself)

    try:
        factory = _POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(_POLICIES))}") from None
    try:
        return factory(slo=slo, **options)
    except TypeError as e:
        raise ValueError(f"policy {name!r} does not take these options ({', '.join(options)}): {e}") from None


def policy_names() -> list[str]:
    import controllers.model_based  # noqa: F401  (registers itself)

    return sorted(_POLICIES)


@register_policy("static")
@dataclass
class StaticPolicy:
    """The baseline: the highest supported clock (or a fixed one) and a fixed batch cap."""

    slo: SLOTargets
    clock_mhz: float | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    speculative_tokens: int | None = None
    name: str = "static"

    def __post_init__(self) -> None:
        # Options arrive as numbers from YAML/JSON.
        for name in ("max_num_seqs", "max_num_batched_tokens", "speculative_tokens"):
            if getattr(self, name) is not None:
                setattr(self, name, int(getattr(self, name)))

    def decide(self, obs: Observation) -> Decision:
        clock = self.clock_mhz
        if clock is None and obs.supported_clocks_mhz:
            clock = max(obs.supported_clocks_mhz)
        knobs = Knobs(clock, self.max_num_seqs, self.max_num_batched_tokens, self.speculative_tokens)
        return Decision(knobs, "static")


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
        if self.k <= 0:
            return None, None  # this policy does not touch speculation
        if obs.spec_acceptance is not None and obs.spec_acceptance < self.min_acceptance:
            return 0, "spec_low_acceptance"
        if obs.running + obs.waiting > self.max_running:
            return 0, "spec_off_high_load"
        return self.k, None


@register_policy("slo_feedback")
@dataclass
class SLOFeedbackPolicy:
    """PI control of the clock on SLO pressure (p95 latency / target), in velocity form.

    Holds pressure near ``setpoint`` (below 1 so there is headroom for bursts): lower pressure lets the clock
    fall, higher pressure raises it; above ``panic`` the clock jumps to the maximum at once, before violations
    pile up. The output is the clock as a fraction of the supported range, snapped up to a supported clock.
    The velocity form (change = kp x change of error + ki x error) has no integrator to wind up while the
    output sits at a bound, so leaving a bound does not overshoot.
    """

    slo: SLOTargets
    setpoint: float = 0.7
    panic: float = 0.95
    kp: float = 0.3
    ki: float = 0.25
    spec_k: int = 0
    """Speculative decoding depth when load is low (0: leave speculation alone)."""
    spec_max_running: float = 16
    name: str = "slo_feedback"
    _fraction: float = field(default=1.0, init=False)
    _last_error: float | None = field(default=None, init=False)

    def decide(self, obs: Observation) -> Decision:
        clocks = sorted(obs.supported_clocks_mhz)
        if not clocks:
            return Decision(Knobs(), "no_clock_knob")
        pressure = self.slo.pressure(obs)
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
        spec, why = SpeculationByLoad(int(self.spec_k), self.spec_max_running).choose(obs)
        return Decision(Knobs(clock_mhz=clock, speculative_tokens=spec), why or reason)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
