"""Energy over windows of a cumulative counter (begin/end), resets dropped rather than counted negative."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from profilers.types import PowerReading, Provenance

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CounterSample:
    """A cumulative energy counter of one device at one moment."""

    energy_j: float
    provenance: Provenance | str


@dataclass
class Measurement:
    """Energy of each device over one window."""

    duration_s: float
    energy_j: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, str] = field(default_factory=dict)
    dropped_devices: list[str] = field(default_factory=list)
    """Devices whose counter went backwards (reset) or vanished: their energy is not counted."""

    @property
    def total_j(self) -> float:
        """Energy of every counted device over the window, in joules."""
        return sum(self.energy_j.values())

    @property
    def provenance_label(self) -> str:
        """One label for the window: the single provenance, or ``mixed``; ``unavailable`` if no device."""
        kinds = set(self.provenance.values())
        if not kinds:
            return "unavailable"
        return kinds.pop() if len(kinds) == 1 else "mixed"


def window_energy(
    begin: Mapping[str, CounterSample], end: Mapping[str, CounterSample], duration_s: float
) -> Measurement:
    """Energy per device between two counter snapshots.

    A negative delta means the counter was reset inside the window: that device's energy for the
    window is unknown, so it is dropped with a warning instead of being counted as negative.
    """
    out = Measurement(duration_s=duration_s)
    for device, start in begin.items():
        stop = end.get(device)
        if stop is None:
            log.warning("device %s disappeared during the window; its energy is not counted", device)
            out.dropped_devices.append(device)
            continue
        delta = stop.energy_j - start.energy_j
        if delta < 0:
            log.warning(
                "energy counter of %s went backwards (%.3f J -> %.3f J): counter reset, window dropped",
                device, start.energy_j, stop.energy_j,
            )
            out.dropped_devices.append(device)
            continue
        out.energy_j[device] = delta
        out.provenance[device] = str(stop.provenance)
    return out


def snapshot(readings: Iterable[PowerReading]) -> dict[str, CounterSample]:
    """Each reading's cumulative energy and provenance by device, a window's start or stop."""
    return {r.device: CounterSample(r.energy_j, r.provenance) for r in readings}
