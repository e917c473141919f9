"""Model-based policy: pick the cheapest (clock, batch cap, speculation) setting that meets the SLO at the
current load.

Curves of energy per token and tail latency against load come either from a knob-sweep campaign's
``points.csv`` (``profile``), or from profiling online. Online, the candidate settings are every
*structure* (router packing up to ``batch_cap`` requests per replica or spreading; speculation depth
``spec_k`` or none; only the knobs enabled) crossed with a ladder of clocks: for each structure, cheapest
first, the policy walks the clock down from the maximum, holding each setting for ``dwell`` periods and
abandoning that structure's lower clocks as soon as latency nears the SLO. It then runs the cheapest
setting that kept the SLO, and remembers it for that load (rate bins ``replan`` wide): when the arrival
rate moves to another bin it re-plans, reusing the plan of a bin it has seen (or of the nearest heavier one,
which still meets the SLO at less load) and profiling only a heavier load than any planned
(DynamoLLM / throttLL'eM style). Latency at or over the SLO drops the plan of the current bin and profiles
again from the safe end.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from controllers.policies import Decision, Observation, register_policy
from serving.knobs import Knobs
from serving.slo import SLO


@dataclass(frozen=True)
class OperatingPoint:
    """One profiled setting at one load: knobs, arrival rate (req/s), energy per token (J), tail TTFT and TPOT (s)."""

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
            knobs = Knobs.from_label(row.get("setting", ""))
            if knobs is None:
                continue
            try:
                values = [float(row[c]) for c in ("offered_rps", "energy_per_token_j", "ttft_p99_s", "tpot_p99_s")]
            except (KeyError, ValueError):
                continue
            if any(math.isnan(v) for v in values):
                continue
            out.append(OperatingPoint(knobs, *values))
    if not out:
        raise ValueError(f"{path}: no point with pinned knobs and finite energy/latency: not a knob-sweep result")
    return out


@dataclass
class _Trial:
    knobs: Knobs
    structure: int
    periods: int = 0
    energy: list[float] = field(default_factory=list)
    tokens: list[float] = field(default_factory=list)
    worst_pressure: float = 0.0

    def per_token(self) -> float:
        """Energy per token over the whole trial (a ratio of sums: a quiet second does not weigh like a busy
        one); per-period means when token counts are not observed."""
        if len(self.tokens) == len(self.energy) and sum(self.tokens) > 0:
            return sum(e * n for e, n in zip(self.energy, self.tokens, strict=True)) / sum(self.tokens)
        return sum(self.energy) / len(self.energy)


@register_policy("model_based")
@dataclass
class ModelBasedPolicy:
    """Picks the cheapest setting that meets the SLO at the current load, from a sweep's profile or profiled online."""

    slo: SLO
    profile: str | None = None
    margin: float = 0.85
    """Keep tail latency below this share of the SLO."""
    dwell: int = 5
    hold: int = 120
    """Periods a plan is kept before it is checked again by profiling (0: never)."""
    replan: float = 0.3
    """Width of a rate bin (relative): a rate this far from the planned one is another load."""
    batch_cap: int = 0
    """Candidate packing: fill each replica up to this many requests before the next (0: do not try)."""
    spec_k: int = 0
    """Candidate speculation depth (0: do not try)."""
    ladder: int = 6
    """Clocks tried per structure (evenly spaced over the supported ones, highest first)."""
    name: str = "model_based"
    _table: list[OperatingPoint] | None = field(default=None, init=False)
    _queue: list[_Trial] = field(default_factory=list, init=False)
    _trials: list[_Trial] = field(default_factory=list, init=False)
    _dead: set[int] = field(default_factory=set, init=False)
    _chosen: Knobs | None = field(default=None, init=False)
    _planned_rate: float | None = field(default=None, init=False)
    _held: int = field(default=0, init=False)
    _plans: dict[int, Knobs] = field(default_factory=dict, init=False)
    _table_bin: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.dwell, self.hold, self.ladder = int(self.dwell), int(self.hold), max(1, int(self.ladder))
        self.batch_cap, self.spec_k = int(self.batch_cap), int(self.spec_k)
        if self.profile:
            self._table = load_profile(self.profile)

    def decide(self, obs: Observation) -> Decision:
        """Knobs for this period: looked up in the profile at the current load, or the next step of online profiling."""
        if self._table is not None:
            return self._from_table(obs)
        return self._online(obs)

    # --- from a sweep ----------------------------------------------------------------------------
    def _from_table(self, obs: Observation) -> Decision:
        rates = sorted({p.rate_rps for p in self._table or []})
        # The smallest profiled load at least as high as now (conservative); the highest if load is above all.
        # Down a bin only once the rate is clearly below the lower bin (hysteresis: no flapping at a border).
        i = next((i for i, r in enumerate(rates) if r >= obs.arrival_rate_rps), len(rates) - 1)
        held = self._table_bin
        if held is not None and i < held and obs.arrival_rate_rps > (1 - self.replan / 2) * rates[i]:
            i = held
        # Latency at the SLO means the load is heavier than the rate says (a burst): plan one bin up.
        pressure = self.slo.pressure(obs.ttft_s, obs.tpot_s)
        if pressure is not None and pressure >= 1.0:
            i = min(i + 1, len(rates) - 1)
        self._table_bin = i
        ok = [p for p in self._table or [] if p.rate_rps == rates[i]
              and p.ttft_s <= self.margin * self.slo.ttft_s and p.tpot_s <= self.margin * self.slo.tpot_s]
        if not ok:
            clock = max(obs.supported_clocks_mhz) if obs.supported_clocks_mhz else None
            spread = 0 if any(p.knobs.pack_per_replica for p in self._table or []) else None
            return Decision(Knobs(clock_mhz=clock, pack_per_replica=spread), "no_feasible_point")
        best = min(ok, key=lambda p: p.energy_per_token_j)
        return Decision(best.knobs, "cheapest_meeting_slo")

    # --- online profiling ------------------------------------------------------------------------
    def _bin(self, rate: float) -> int:
        return round(math.log(max(rate, 1e-3)) / math.log1p(self.replan))

    def _structures(self) -> list[tuple[int | None, int | None]]:
        """(pack_per_replica, speculative_tokens) combinations to try, the likely cheapest first."""
        packs = [self.batch_cap, 0] if self.batch_cap > 0 else [None]
        specs = [self.spec_k, 0] if self.spec_k > 0 else [None]
        return [(p, k) for p in packs for k in specs]

    def _online(self, obs: Observation) -> Decision:
        clocks = sorted(obs.supported_clocks_mhz, reverse=True)
        if not clocks:
            return Decision(Knobs(), "no_clock_knob")
        pressure = self.slo.pressure(obs.ttft_s, obs.tpot_s)
        if self._chosen is not None and not self._queue:
            self._held += 1
            if pressure is not None and pressure >= 1.0:
                self._plans.pop(self._bin(self._planned_rate or obs.arrival_rate_rps), None)
                self._restart(clocks, obs)
                return Decision(self._trials[-1].knobs, "slo_risk")
            moved = (self._planned_rate is not None and obs.arrival_rate_rps > 0
                     and abs(obs.arrival_rate_rps - self._planned_rate) > self.replan * self._planned_rate)
            if not moved and (self.hold <= 0 or self._held < self.hold):
                return Decision(self._chosen, "hold")
            if moved:
                b = self._bin(obs.arrival_rate_rps)
                known = self._plans.get(b)
                if known is not None:  # a load seen before: its plan, no profiling
                    self._chosen, self._held, self._planned_rate = known, 0, obs.arrival_rate_rps
                    return Decision(known, "replan_known_load")
                # A lighter load than one already planned: that plan still meets the SLO (latency grows with
                # load), so it is used rather than profiling again; only heavier loads are profiled anew.
                heavier = [k for k in self._plans if k > b]
                if heavier:
                    plan = self._plans[min(heavier)]
                    self._chosen, self._held, self._planned_rate = plan, 0, obs.arrival_rate_rps
                    return Decision(plan, "replan_heavier_load_plan")
            self._restart(clocks, obs)
        if not self._queue and not self._trials:
            self._restart(clocks, obs)
        trial = self._trials[-1]
        trial.periods += 1
        if obs.energy_per_token_j is not None:
            trial.energy.append(obs.energy_per_token_j)
            if obs.tokens is not None:
                trial.tokens.append(obs.tokens)
        if pressure is not None:
            trial.worst_pressure = max(trial.worst_pressure, pressure)
        if trial.worst_pressure > self.margin:
            # Lower clocks of this structure would only be slower: skip them.
            self._dead.add(trial.structure)
            self._queue = [t for t in self._queue if t.structure != trial.structure]
        elif trial.periods < self.dwell:
            return Decision(trial.knobs, "profiling")
        if self._queue:
            self._trials.append(self._queue.pop(0))
            return Decision(self._trials[-1].knobs, "profiling")
        return self._choose(clocks, obs)

    def _restart(self, clocks: list[float], obs: Observation) -> None:
        step = max(1, round(len(clocks) / self.ladder))
        ladder = clocks[::step]
        trials = [
            _Trial(Knobs(clock_mhz=c, pack_per_replica=pack, speculative_tokens=k), s)
            for s, (pack, k) in enumerate(self._structures()) for c in ladder
        ]
        # The first trial is the safest setting (top clock, load spread, no speculation when those are knobs).
        safe = next(t for t in trials if t.knobs.clock_mhz == clocks[0] and t.structure == len(self._structures()) - 1)
        self._queue = [t for t in trials if t is not safe]
        self._trials, self._dead = [safe], set()
        self._chosen, self._held, self._planned_rate = None, 0, obs.arrival_rate_rps

    def _choose(self, clocks: list[float], obs: Observation) -> Decision:
        feasible = [t for t in self._trials if t.worst_pressure <= self.margin and t.energy]
        if feasible:
            best = min(feasible, key=_Trial.per_token)
            self._chosen = best.knobs
            self._plans[self._bin(self._planned_rate or obs.arrival_rate_rps)] = best.knobs
        else:
            self._chosen = Knobs(clock_mhz=clocks[0], pack_per_replica=0 if self.batch_cap else None,
                                 speculative_tokens=0 if self.spec_k else None)
        self._trials, self._held = [], 0
        return Decision(self._chosen, "cheapest_meeting_slo" if feasible else "no_feasible_point")
