"""Model-based policy: pick the cheapest knob setting that meets the SLO at the current load.

Curves of energy per token and tail latency against load come either from a knob-sweep campaign's
``points.csv`` (``profile``), or from profiling online: the policy walks the clock down from the maximum,
holding each setting for ``dwell`` periods and stopping as soon as latency nears the SLO, then runs at the
cheapest setting that kept the SLO; it profiles again when the arrival rate moves by more than ``replan``
(DynamoLLM / throttLL'eM style).
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from controllers.policies import Decision, Observation, SLOTargets, register_policy
from serving.types import Knobs


@dataclass(frozen=True)
class OperatingPoint:
    knobs: Knobs
    rate_rps: float
    energy_per_token_j: float
    ttft_s: float
    tpot_s: float


def load_profile(path: str | Path) -> list[OperatingPoint]:
    """Operating points from a knob sweep's ``points.csv`` (rows whose setting pins knobs)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model_based profile {path} not found: give the points.csv of a knob-sweep campaign")
    out = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            knobs = dict(re.findall(r"(clock_mhz|max_num_seqs)=([0-9.]+)", row.get("setting", "")))
            if not knobs:
                continue
            try:
                values = [float(row[c]) for c in ("offered_rps", "energy_per_token_j", "ttft_p99_s", "tpot_p99_s")]
            except (KeyError, ValueError):
                continue
            if any(math.isnan(v) for v in values):
                continue
            out.append(OperatingPoint(
                Knobs(clock_mhz=float(knobs["clock_mhz"]) if "clock_mhz" in knobs else None,
                      max_num_seqs=int(float(knobs["max_num_seqs"])) if "max_num_seqs" in knobs else None),
                *values,
            ))
    if not out:
        raise ValueError(f"{path}: no point with pinned knobs and finite energy/latency: not a knob-sweep result")
    return out


@dataclass
class _Trial:
    knobs: Knobs
    periods: int = 0
    energy: list[float] = field(default_factory=list)
    worst_pressure: float = 0.0


@register_policy("model_based")
@dataclass
class ModelBasedPolicy:
    slo: SLOTargets
    profile: str | None = None
    margin: float = 0.85
    """Keep tail latency below this share of the SLO."""
    dwell: int = 5
    hold: int = 120
    replan: float = 0.3
    name: str = "model_based"
    _table: list[OperatingPoint] | None = field(default=None, init=False)
    _queue: list[Knobs] = field(default_factory=list, init=False)
    _trials: list[_Trial] = field(default_factory=list, init=False)
    _chosen: Knobs | None = field(default=None, init=False)
    _planned_rate: float | None = field(default=None, init=False)
    _held: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.dwell, self.hold = int(self.dwell), int(self.hold)
        if self.profile:
            self._table = load_profile(self.profile)

    def decide(self, obs: Observation) -> Decision:
        if self._table is not None:
            return self._from_table(obs)
        return self._online(obs)

    # --- from a sweep ----------------------------------------------------------------------------
    def _from_table(self, obs: Observation) -> Decision:
        rates = sorted({p.rate_rps for p in self._table or []})
        # The smallest profiled load at least as high as now (conservative); the highest if load is above all.
        rate = next((r for r in rates if r >= obs.arrival_rate_rps), rates[-1])
        ok = [p for p in self._table or [] if p.rate_rps == rate
              and p.ttft_s <= self.margin * self.slo.ttft_s and p.tpot_s <= self.margin * self.slo.tpot_s]
        if not ok:
            clock = max(obs.supported_clocks_mhz) if obs.supported_clocks_mhz else None
            return Decision(Knobs(clock_mhz=clock), "no_feasible_point")
        best = min(ok, key=lambda p: p.energy_per_token_j)
        return Decision(best.knobs, "cheapest_meeting_slo")

    # --- online profiling ------------------------------------------------------------------------
    def _online(self, obs: Observation) -> Decision:
        clocks = sorted(obs.supported_clocks_mhz, reverse=True)
        if not clocks:
            return Decision(Knobs(), "no_clock_knob")
        pressure = self.slo.pressure(obs)
        moved = (self._planned_rate is not None and obs.arrival_rate_rps > 0
                 and abs(obs.arrival_rate_rps - self._planned_rate) > self.replan * max(self._planned_rate, 1e-9))
        if self._chosen is not None and not self._queue:
            self._held += 1
            if pressure is not None and pressure >= 1.0:
                self._restart(clocks, obs)
                return Decision(Knobs(clock_mhz=clocks[0]), "slo_risk")
            if not moved and self._held < self.hold:
                return Decision(self._chosen, "hold")
            self._restart(clocks, obs)
        if not self._queue and not self._trials:
            self._restart(clocks, obs)
        trial = self._trials[-1]
        trial.periods += 1
        if obs.energy_per_token_j is not None:
            trial.energy.append(obs.energy_per_token_j)
        if pressure is not None:
            trial.worst_pressure = max(trial.worst_pressure, pressure)
        if trial.worst_pressure > self.margin:
            self._queue.clear()  # lower clocks would only be slower: stop walking down
        elif trial.periods < self.dwell:
            return Decision(trial.knobs, "profiling")
        if self._queue:
            self._trials.append(_Trial(self._queue.pop(0)))
            return Decision(self._trials[-1].knobs, "profiling")
        return self._choose(clocks)

    def _restart(self, clocks: list[float], obs: Observation) -> None:
        candidates = clocks[:: max(1, len(clocks) // 6)]
        self._queue = [Knobs(clock_mhz=c) for c in candidates[1:]]
        self._trials = [_Trial(Knobs(clock_mhz=candidates[0]))]
        self._chosen, self._held, self._planned_rate = None, 0, obs.arrival_rate_rps

    def _choose(self, clocks: list[float]) -> Decision:
        feasible = [t for t in self._trials if t.worst_pressure <= self.margin and t.energy]
        if feasible:
            best = min(feasible, key=lambda t: sum(t.energy) / len(t.energy))
            self._chosen = best.knobs
        else:
            self._chosen = Knobs(clock_mhz=clocks[0])
        self._trials, self._held = [], 0
        return Decision(self._chosen, "cheapest_meeting_slo" if feasible else "no_feasible_point")
