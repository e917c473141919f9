"""Per-request energy attribution: the one split both engines use.

Each engine iteration's (or metered interval's) energy is split among the requests that did work in it, in
proportion to the work's modeled cost, so the shares add up to the energy split (closure). An interval with no
work is idle energy, which the engines report on their own rather than spread over tokens.
"""

from __future__ import annotations

from collections.abc import Sequence


def split(energy_j: float, weights: Sequence[float]) -> list[float]:
    """``energy_j`` shared in proportion to ``weights`` (modeled costs or tokens; their sum must be positive)."""
    per_unit = energy_j / sum(weights)
    return [per_unit * w for w in weights]
