"""Requests, token events, statistics and knobs exchanged between the front door, router and engines."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from profilers.errors import ConfigError
from profilers.exporter import ReplicaSample
from serving.knobs import Knobs as Knobs  # re-exported: the engine protocol's knobs


@dataclass(frozen=True)
class GenerationRequest:
    """One generation request as engines see it: prompt (text or ids), token limits, sampling settings."""

    request_id: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    max_tokens: int | None = None
    """``None``: up to the model's context length."""
    ignore_eos: bool = False
    temperature: float = 1.0
    seed: int | None = None
    messages: list[dict[str, str]] | None = None
    """Chat requests: the messages, for engines that apply the model's own chat template."""
    default_max_tokens: int | None = None
    """The cap when ``max_tokens`` is None (the front door's ``default_max_tokens``), within the context length."""


@dataclass(frozen=True)
class TokenEvent:
    """Tokens produced for a request, streamed from engine to client, with timing and attributed energy."""

    request_id: str
    replica: str
    text: str
    token_ids: list[int]
    index: int
    """Position of the first token of this event in the output."""
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    energy_j: float | None = None
    """Energy attributed to the request so far (final event: the whole request)."""
    provenance: str | None = None


def merge_events(events: list[TokenEvent]) -> TokenEvent:
    """Coalesce consecutive events of one request into one (a reader slower than the engine)."""
    if len(events) == 1:
        return events[0]
    last = events[-1]
    return TokenEvent(
        request_id=last.request_id,
        replica=last.replica,
        text="".join(e.text for e in events),
        token_ids=[t for e in events for t in e.token_ids],
        index=events[0].index,
        finished=last.finished,
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        output_tokens=last.output_tokens,
        energy_j=last.energy_j,
        provenance=last.provenance,
    )


@dataclass(frozen=True)
class EngineStats:
    """An engine's counters: load, tokens, energy attributed to prefill/decode/idle (J), KV cache, speculation."""

    replica: str
    backend: str
    running: int
    waiting: int
    prompt_tokens_total: int
    generated_tokens_total: int
    attributed_prefill_j: float
    attributed_decode_j: float
    idle_j: float
    iterations: int
    kv_used_tokens: int
    kv_capacity_tokens: int
    max_num_seqs: int
    spec_proposed_tokens: int = 0
    spec_accepted_tokens: int = 0
    prefix_cache_queried_tokens: int | None = None
    """Prompt tokens looked up in the engine's prefix cache (None: the engine has no prefix cache)."""
    prefix_cache_hit_tokens: int | None = None
    """Of those, tokens found there: their prefill was not computed again."""

    def export_sample(self, replica: str) -> ReplicaSample:
        """This replica's row of the exporter's snapshot: every field the two share by name, plus the totals."""
        shared = {f.name: getattr(self, f.name) for f in fields(ReplicaSample) if hasattr(self, f.name)}
        return ReplicaSample(**{**shared, "replica": replica, "prompt_tokens": self.prompt_tokens_total,
                                "generated_tokens": self.generated_tokens_total})


@dataclass(frozen=True)
class AppliedKnobs:
    """What really took effect (clamped to what the device supports) and what it cost."""

    clock_mhz: float | None
    max_num_seqs: int
    took_s: float
    restarted: bool = False
    notes: list[str] = field(default_factory=list)
    speculative_tokens: int | None = None
    """Speculative decoding depth in effect (None: the engine does not report it)."""
    max_num_batched_tokens: int | None = None
    """Token budget of an engine step in effect (None: the engine does not report it)."""
    prefix_caching: bool | None = None
    """Whether the prefix cache is on (None: the engine has none)."""

    def as_knobs(self) -> Knobs:
        """The knobs that put an engine back in this state (what a replica restores when a controller lets go)."""
        return Knobs(clock_mhz=self.clock_mhz, max_num_seqs=self.max_num_seqs,
                     max_num_batched_tokens=self.max_num_batched_tokens, speculative_tokens=self.speculative_tokens,
                     prefix_caching=self.prefix_caching)


class RequestRejectedError(ConfigError):
    """The engine cannot serve this request as asked (e.g. the prompt exceeds the context length)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def __reduce__(self):  # keeps fields across Ray's pickling of task errors
        return (type(self), (self.message, self.param, self.code))
