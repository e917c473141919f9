"""Per-request energy attribution, its closure error, and the ML.ENERGY steady-state figure.

Each metered interval's energy is split among the requests that did work in it, in proportion to the
work's modeled cost (prefill tokens x prefill cost + decode tokens x decode cost). An interval with no
work is idle energy, reported on its own rather than spread over tokens. By construction
``sum(per request) + idle == metered``; :func:`closure_error` checks that any accounting does.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CostModel:
    """Modeled energy per token of each phase, in joules; only their ratio affects the split."""

    prefill_j_per_token: float
    decode_j_per_token: float

    def __post_init__(self) -> None:
        if self.prefill_j_per_token < 0 or self.decode_j_per_token < 0:
            raise ValueError("modeled costs per token must be non-negative")
        if self.prefill_j_per_token + self.decode_j_per_token == 0:
            raise ValueError("at least one phase must have a positive modeled cost")


@dataclass(frozen=True)
class Work:
    """Tokens one request processed at time ``t_s`` (or within one interval)."""

    request_id: str
    prefill_tokens: int = 0
    decode_tokens: int = 0
    t_s: float = 0.0


@dataclass
class Attribution:
    prefill_j: dict[str, float] = field(default_factory=dict)
    decode_j: dict[str, float] = field(default_factory=dict)
    idle_j: float = 0.0
    metered_j: float = 0.0
    dropped_intervals: int = 0
    """Intervals whose counter went backwards (reset): neither metered nor attributed."""

    def request_j(self, request_id: str) -> float:
        return self.prefill_j.get(request_id, 0.0) + self.decode_j.get(request_id, 0.0)

    @property
    def per_request_j(self) -> dict[str, float]:
        return {r: self.request_j(r) for r in self.prefill_j.keys() | self.decode_j.keys()}

    @property
    def attributed_j(self) -> float:
        return sum(self.prefill_j.values()) + sum(self.decode_j.values())

    def closure_error(self) -> float:
        return closure_error(self.attributed_j, self.idle_j, self.metered_j)


def closure_error(attributed_j: float, idle_j: float, metered_j: float) -> float:
    """``|attributed + idle - metered| / metered``; 0 when nothing was metered and nothing attributed."""
    gap = abs(attributed_j + idle_j - metered_j)
    if metered_j <= 0:
        return 0.0 if gap == 0 else float("inf")
    return gap / metered_j


class Attributor:
    """Accumulates the split of successive intervals."""

    def __init__(self, cost: CostModel) -> None:
        self.cost = cost
        self.result = Attribution()

    def add_interval(self, energy_j: float, work: Iterable[Work]) -> None:
        if energy_j < 0:
            raise ValueError(f"negative interval energy {energy_j} J: drop counter resets before attributing")
        r = self.result
        r.metered_j += energy_j
        items = [w for w in work if w.prefill_tokens or w.decode_tokens]
        pre = [w.prefill_tokens * self.cost.prefill_j_per_token for w in items]
        dec = [w.decode_tokens * self.cost.decode_j_per_token for w in items]
        total = sum(pre) + sum(dec)
        if total <= 0:
            r.idle_j += energy_j
            return
        for w, p, d in zip(items, pre, dec, strict=True):
            r.prefill_j[w.request_id] = r.prefill_j.get(w.request_id, 0.0) + energy_j * p / total
            r.decode_j[w.request_id] = r.decode_j.get(w.request_id, 0.0) + energy_j * d / total


def attribute_timeline(
    counter: Sequence[tuple[float, float]], work: Iterable[Work], cost: CostModel
) -> Attribution:
    """Split a cumulative counter's intervals among the work done in each.

    Args:
        counter: ``(t_s, cumulative energy J)`` samples in time order.
        work: token work stamped with ``t_s``; work at ``t`` belongs to the interval ``(t_prev, t_next]``.
            Work outside the counter's span is not attributed.
        cost: modeled cost per token of each phase.
    """
    attributor = Attributor(cost)
    times = [t for t, _ in counter]
    buckets: list[list[Work]] = [[] for _ in counter]
    for w in work:
        i = bisect.bisect_left(times, w.t_s)
        if 0 < i < len(times):
            buckets[i].append(w)
    for i in range(1, len(counter)):
        delta = counter[i][1] - counter[i - 1][1]
        if delta < 0:
            log.warning("energy counter went backwards at t=%.3f s: interval dropped (reset)", counter[i][0])
            attributor.result.dropped_intervals += 1
            continue
        attributor.add_interval(delta, buckets[i])
    return attributor.result


@dataclass(frozen=True)
class BatchSample:
    """Cumulative counters and batch occupancy of one device (or replica) at ``t_s``."""

    t_s: float
    energy_j: float
    output_tokens: int
    running: int
    max_batch: int


@dataclass(frozen=True)
class SteadyState:
    energy_j: float
    output_tokens: int
    duration_s: float

    @property
    def j_per_token(self) -> float:
        return self.energy_j / self.output_tokens


def steady_state(samples: Sequence[BatchSample], full_fraction: float = 1.0) -> SteadyState | None:
    """ML.ENERGY's figure: energy per output token over the intervals in which the batch is full.

    An interval counts when the batch is full (``running >= full_fraction x max_batch``) at both of its
    ends. Returns None when the batch was never full over an interval that produced tokens.
    """
    energy, tokens, duration = 0.0, 0, 0.0
    for a, b in itertools.pairwise(samples):
        full = all(s.max_batch > 0 and s.running >= full_fraction * s.max_batch for s in (a, b))
        if not full or b.energy_j < a.energy_j or b.output_tokens < a.output_tokens:
            continue  # not steady, or a counter reset
        energy += b.energy_j - a.energy_j
        tokens += b.output_tokens - a.output_tokens
        duration += b.t_s - a.t_s
    return SteadyState(energy, tokens, duration) if tokens > 0 else None
