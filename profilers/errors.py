"""The project's own power-source exceptions; vendor errors are converted to these at the boundary."""

from __future__ import annotations


class PowerSourceError(RuntimeError):
    """A power source failed; the message is one line that says what to do."""


class SourceUnavailableError(PowerSourceError):
    """The library, driver or hardware is absent: the caller falls back to the next source."""


class SourcePermissionError(PowerSourceError):
    """The source exists but this process may not read it."""


class CounterUnsupportedError(PowerSourceError):
    """The device has no cumulative energy counter (power must be sampled and integrated)."""


class SourceReadError(PowerSourceError):
    """A reading failed after the source had started."""


class SamplerDiedError(PowerSourceError):
    """The background sampling thread stopped: energy from it after that moment is unknown."""
