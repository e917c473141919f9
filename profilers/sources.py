"""Choose a power source: probe hardware in order (NVML, then RAPL), fall back to what the caller gives.

Every source that cannot be used leaves a one-line reason; the choice says what was used and why the
others were not, so a figure's provenance can always be traced to a device or a model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from profilers.errors import PowerSourceError, SourceUnavailableError
from profilers.nvml import NVMLSource
from profilers.rapl import RaplSource
from profilers.source import PowerSource

log = logging.getLogger(__name__)
SourceFactory = Callable[..., PowerSource]

_FACTORIES: dict[str, SourceFactory] = {"nvml": NVMLSource, "rapl": RaplSource}
DEFAULT_ORDER = ("nvml", "rapl")


def known_sources() -> list[str]:
    """Names of the registered power sources, sorted."""
    return sorted(_FACTORIES)


@dataclass(frozen=True)
class SourceChoice:
    """The power source picked, its name and provenance, and why the others were skipped."""

    source: PowerSource
    name: str
    """The registry name of the source used, e.g. ``nvml``."""
    provenance: str
    """What was used, e.g. ``nvml: gpu0=counter, gpu1=integrated``."""
    skipped: list[str] = field(default_factory=list)
    """One line per source that was tried and not used, with the reason."""


def describe(name: str, source: PowerSource) -> str:
    """Provenance line of a source: its name and each device's energy method, e.g. ``nvml: gpu0=counter``."""
    return f"{name}: " + ", ".join(f"{d.device}={d.energy_method}" for d in source.devices())


def probe_sources(
    order: Sequence[str] = DEFAULT_ORDER,
    fallback: tuple[str, Callable[[], PowerSource]] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> SourceChoice:
    """The first source in ``order`` that opens and has devices, else ``fallback``.

    Args:
        order: registry names to try, in order.
        fallback: ``(name, factory)`` used when none of ``order`` works (a CPU model, an emulated device).
        options: keyword arguments per source name (e.g. ``{"rapl": {"root": path}}``).

    Raises:
        SourceUnavailableError: nothing worked and there is no fallback; the message lists every reason.
    """
    unknown = [n for n in order if n not in _FACTORIES]
    if unknown:
        raise ValueError(f"unknown power source(s) {unknown}: use {known_sources()}")
    options = options or {}
    skipped: list[str] = []
    candidates = [(n, _FACTORIES[n], options.get(n, {})) for n in order]
    if fallback is not None:
        candidates.append((fallback[0], fallback[1], {}))
    for name, factory, kwargs in candidates:
        try:
            source = factory(**kwargs)
        except PowerSourceError as e:
            skipped.append(f"{name}: {e}")
            log.info("power source %s not used: %s", name, e)
            continue
        if not source.devices():
            skipped.append(f"{name}: no devices")
            continue
        choice = SourceChoice(source, name, describe(name, source), skipped)
        log.info("power source: %s", choice.provenance)
        return choice
    raise SourceUnavailableError("no power source available: " + "; ".join(skipped))
