"""The engine protocol and the registry that builds an engine from its config's ``kind``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, runtime_checkable

from profilers.errors import TestbedError
from serving.types import AppliedKnobs, EngineStats, GenerationRequest, Knobs, TokenEvent


@runtime_checkable
class Engine(Protocol):
    """An inference engine a replica serves: streams requests, reports stats, applies knobs."""

    backend: str

    async def start(self) -> None:
        """Load the model and start serving (idempotent)."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream the request's tokens; raise :class:`RequestRejectedError` before the first event."""
        ...

    def stats(self) -> EngineStats:
        """Load, token and attributed energy counters now."""

    async def apply(self, knobs: Knobs) -> AppliedKnobs:
        """Apply the knobs it supports (clamped); report what took effect."""

    async def stop(self) -> None:
        """Stop serving and release the model."""


class MissingExtraError(TestbedError, ImportError):
    """An optional dependency (an install extra) is missing; the message names the extra to install."""


EngineFactory = Callable[[Any, str], Engine]
_ENGINES: dict[str, EngineFactory] = {}


def register_engine(kind: str) -> Callable[[EngineFactory], EngineFactory]:
    """Decorator registering an engine factory under the ``engine.kind`` it serves."""
    def deco(factory: EngineFactory) -> EngineFactory:
        _ENGINES[kind] = factory
        return factory

    return deco


def build_engine(config: Any, replica: str) -> Engine:
    """Build the engine registered for ``config.kind`` (config is that engine's pydantic model)."""
    # Importing the implementations registers them; done here so importing the protocol stays cheap.
    import serving.emulated.engine
    import serving.vllm_engine  # noqa: F401  # imports vllm itself only when an engine is built

    try:
        factory = _ENGINES[config.kind]
    except KeyError:
        raise ValueError(f"unknown engine kind {config.kind!r}; known: {sorted(_ENGINES)}") from None
    return factory(config, replica)
