"""The project's own exceptions. Every error a user can see derives from :class:`TestbedError`: its message is
one line (or a short block) that says what to do, and the CLI prints it without a traceback and exits with its
``exit_code``. Vendor errors (NVML, pydantic, YAML, OS) are converted to these at the boundary."""

from __future__ import annotations

from pydantic import ValidationError


class TestbedError(Exception):
    """Root of the testbed's errors; ``exit_code``: 1 for a runtime failure, 2 for a usage or config error."""

    __test__ = False  # not a pytest test class, though its name starts with "Test"
    exit_code = 1


class ConfigError(TestbedError, ValueError):
    """A config file, input or argument that cannot be used; the message is meant for the user as it is."""

    exit_code = 2


class PowerSourceError(TestbedError, RuntimeError):
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


def validation_problems(err: ValidationError) -> str:
    """A pydantic error as one line: ``field: message (got value)`` for each problem, joined by ``; ``."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
        + ("" if isinstance(e.get("input"), dict | list) or "input" not in e else f" (got {e['input']!r})")
        for e in err.errors()
    )
