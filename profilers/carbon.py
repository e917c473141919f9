"""Carbon beyond a constant grid factor: a CIF time series, and embodied carbon of the hardware.

* A CIF series is a CSV of ``timestamp,gco2e_per_kwh`` rows (timestamp: Unix seconds or ISO 8601);
  each value holds until the next row. Operational carbon of an interval is its facility energy times
  the time-weighted mean CIF over the interval (power assumed steady inside it).
* Embodied carbon (manufacturing, transport, end of life) of a device is amortised linearly over its
  service life and charged per second of use; it is reported beside operational carbon, never in it.
"""

from __future__ import annotations

import bisect
import csv
import itertools
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from profilers.errors import ConfigError
from profilers.footprint import J_PER_KWH, SECONDS_PER_YEAR, EmbodiedCarbon, SiteProfile

log = logging.getLogger(__name__)
__all__ = ["SECONDS_PER_YEAR", "CarbonAccumulator", "CifSeries", "EmbodiedCarbon", "operational_carbon_g"]


class CifSeriesError(ConfigError):
    """A carbon-intensity series file is missing or malformed; the message names the file and line."""


def _parse_time(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError as e:
        raise CifSeriesError(f"timestamp {text!r} is neither Unix seconds nor ISO 8601") from e


@dataclass(frozen=True)
class CifSeries:
    """Grid carbon intensity over time, gCO2e per kWh, as a step function."""

    t_s: tuple[float, ...]
    g_per_kwh: tuple[float, ...]

    @classmethod
    def load_csv(cls, path: Path | str) -> CifSeries:
        """Read a ``timestamp,gco2e_per_kwh`` CSV (Unix seconds or ISO 8601; header and ``#`` comments skipped)."""
        path = Path(path)
        if not path.is_file():
            raise CifSeriesError(f"CIF series {path} does not exist")
        rows: list[tuple[float, float]] = []
        with path.open(newline="") as f:
            for n, row in enumerate(csv.reader(f), start=1):
                if not row or row[0].startswith("#") or (n == 1 and not row[0][:1].isdigit()):
                    continue  # blank, comment or header
                if len(row) < 2:
                    raise CifSeriesError(f"{path}:{n}: expected `timestamp,gco2e_per_kwh`, got {row}")
                try:
                    value = float(row[1])
                except ValueError as e:
                    raise CifSeriesError(f"{path}:{n}: CIF {row[1]!r} is not a number") from e
                if not 0.0 <= value <= 2000.0:
                    raise CifSeriesError(f"{path}:{n}: CIF {value} gCO2e/kWh is outside 0-2000")
                rows.append((_parse_time(row[0].strip()), value))
        if not rows:
            raise CifSeriesError(f"CIF series {path} has no rows")
        rows.sort()
        return cls(tuple(r[0] for r in rows), tuple(r[1] for r in rows))

    def at(self, t_s: float) -> float:
        """CIF in force at ``t_s``; before the first row the first value is used."""
        i = bisect.bisect_right(self.t_s, t_s) - 1
        return self.g_per_kwh[max(i, 0)]

    def mean(self, t0_s: float, t1_s: float) -> float:
        """Time-weighted mean CIF over ``[t0_s, t1_s]``."""
        if t1_s <= t0_s:
            return self.at(t0_s)
        cuts = [t0_s, *[t for t in self.t_s if t0_s < t < t1_s], t1_s]
        total = sum((b - a) * self.at(a) for a, b in itertools.pairwise(cuts))
        return total / (t1_s - t0_s)


def site_cif_series(site: SiteProfile) -> CifSeries | None:
    """The site's CIF series, if its profile names one."""
    return CifSeries.load_csv(site.cif_series_csv) if site.cif_series_csv else None


def operational_carbon_g(
    energy_it_j: float, site: SiteProfile, t0_s: float, t1_s: float, cif: CifSeries | None = None
) -> float:
    """Operational gCO2e of IT energy spent over ``[t0_s, t1_s]`` (Unix seconds)."""
    g_per_kwh = cif.mean(t0_s, t1_s) if cif is not None else site.cif_kg_per_kwh * 1000.0
    return energy_it_j * site.pue / J_PER_KWH * g_per_kwh


class CarbonAccumulator:
    """Operational carbon of cumulative energy counters under a time-varying CIF.

    Each new counter value charges its increase at the CIF in force at that moment; a counter that goes
    backwards (reset) restarts the baseline without negative carbon.
    """

    def __init__(self, site: SiteProfile, cif: CifSeries) -> None:
        self._site, self._cif = site, cif
        self._last: dict[str, tuple[float, float]] = {}
        self._grams: dict[str, float] = {}

    def update(self, key: str, energy_j: float, t_s: float) -> float:
        """Charge the counter ``key``'s energy increase (J) up to ``t_s`` at the CIF then; returns its total gCO2e."""
        last = self._last.get(key)
        grams = self._grams.get(key, 0.0)
        if last is not None and energy_j >= last[1]:
            grams += operational_carbon_g(energy_j - last[1], self._site, last[0], t_s, self._cif)
        elif last is None and energy_j > 0:
            grams += operational_carbon_g(energy_j, self._site, t_s, t_s, self._cif)
        self._last[key] = (t_s, energy_j)
        self._grams[key] = grams
        return grams
