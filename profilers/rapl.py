"""CPU package and DRAM energy through RAPL (Linux powercap, ``/sys/class/powercap/intel-rapl*``).

Each zone has a cumulative ``energy_uj`` counter that wraps to zero after ``max_energy_range_uj``
(a few kJ: minutes, or seconds at high power), so the source must be read at least once per wrap
period, e.g. by a :class:`~profilers.sampler.Sampler`. One wrap between reads is undone; power is the
energy delta over the time between reads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from profilers.errors import SourcePermissionError, SourceReadError, SourceUnavailableError
from profilers.types import DeviceInfo, PowerReading, Provenance

log = logging.getLogger(__name__)
DEFAULT_ROOT = Path("/sys/class/powercap")
DOMAINS = ("package", "dram")


@dataclass
class _Zone:
    device: str
    path: Path
    max_range_uj: int
    last_uj: int
    energy_j: float = 0.0


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except PermissionError as e:
        raise SourcePermissionError(
            f"RAPL: cannot read {path} (root-only since Linux 5.10): run as root or `chmod a+r` the files"
        ) from e
    except FileNotFoundError as e:
        raise SourceReadError(f"RAPL: {path} vanished: the powercap driver was unloaded") from e
    except OSError as e:
        raise SourceReadError(f"RAPL: cannot read {path}: {e.strerror}") from e
    except ValueError as e:
        raise SourceReadError(f"RAPL: {path} does not hold an integer") from e


def _device_id(zone_dir: Path, name: str) -> str | None:
    """``package-0`` as named; ``dram-<package>`` from the zone path ``intel-rapl:<package>[:<sub>]``."""
    if name.startswith("package"):
        return name
    if name == "dram":
        return f"dram-{zone_dir.name.split(':')[1]}"
    return None  # core, uncore, psys: overlapping sub-domains, not counted


class RaplSource:
    """Package and DRAM domains of every CPU socket under ``root``."""

    backend = "rapl"

    def __init__(
        self, root: Path | str = DEFAULT_ROOT, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.clock = clock
        root = Path(root)
        dirs = sorted(root.glob("intel-rapl:*"))
        if not dirs:
            raise SourceUnavailableError(
                f"RAPL: no {root}/intel-rapl:* zones: no powercap driver here (a VM, or not Intel/AMD)"
            )
        self._zones: list[_Zone] = []
        for d in dirs:
            try:
                name = (d / "name").read_text().strip()
            except OSError as e:
                raise SourceUnavailableError(f"RAPL: cannot read {d / 'name'}: {e.strerror}") from e
            device = _device_id(d, name)
            if device is None or any(z.device == device for z in self._zones):
                continue
            max_uj = _read_int(d / "max_energy_range_uj")
            self._zones.append(_Zone(device, d / "energy_uj", max_uj, _read_int(d / "energy_uj")))
        if not self._zones:
            raise SourceUnavailableError(f"RAPL: {root} has no package or dram zone")
        self._last_t = self.clock()

    def devices(self) -> list[DeviceInfo]:
        """One device per RAPL zone read."""
        return [DeviceInfo(z.device, f"RAPL {z.device}", self.backend) for z in self._zones]

    def read(self) -> list[PowerReading]:
        """One reading per zone: cumulative energy (J, counter wraps handled) and power since the last read."""
        t = self.clock()
        dt = t - self._last_t
        out = []
        for z in self._zones:
            raw = _read_int(z.path)
            delta = raw - z.last_uj
            if delta < 0:  # wrapped once since the last read
                delta += z.max_range_uj
            z.last_uj = raw
            z.energy_j += delta / 1e6
            power = delta / 1e6 / dt if dt > 0 else 0.0
            out.append(PowerReading(t, z.device, z.energy_j, power, None, Provenance.MEASURED))
        self._last_t = t
        return out
