"""What a campaign reads before it starts: its traces (checked, skipped rows counted) and its prompt
synthesiser (the tokenizer prompt lengths are counted in)."""

from __future__ import annotations

from dataclasses import dataclass

from workloads.arrivals import (
    FixedLength,
    LengthDistribution,
    TraceArrivals,
    TraceLength,
    UniformLength,
    build_trace_requests,
)
from workloads.prompts import PromptFn, TokenizerError, prompt_synthesiser
from workloads.spec import CampaignSpec


@dataclass(frozen=True)
class Prompts:
    """How prompt texts are made: ``tokenizer`` (``word`` or a tokenizer path, recorded in the manifest)."""

    tokenizer: str
    fn: PromptFn


def campaign_prompts(spec: CampaignSpec, served_tokenizer: str | None = None) -> Prompts:
    """The prompt synthesiser of the campaign. ``served_tokenizer``: the tokenizer of the deployment the
    campaign starts (a vLLM model directory, or ``word`` for emulated engines), which ``auto`` resolves to;
    None for a target given by URL, where ``auto`` means ``word``. Loads the tokenizer now: a bad path fails
    before anything starts."""
    tokenizer = spec.workload.tokenizer
    if tokenizer == "auto":
        tokenizer = served_tokenizer or "word"
    fn = prompt_synthesiser(tokenizer, spec.workload.shared_prefix_tokens)
    shortest = getattr(fn, "special_tokens", 0) + 1
    lowest = _lowest_length(spec.workload.prompt_tokens)
    if lowest < shortest:
        raise TokenizerError(
            f"workload.prompt_tokens can ask for {lowest}-token prompts, but {tokenizer} adds "
            f"{shortest - 1} special token(s) to every prompt: set its minimum to at least {shortest}"
        )
    return Prompts(tokenizer, fn)


def _lowest_length(dist: LengthDistribution) -> int:
    if isinstance(dist, FixedLength):
        return dist.value
    return dist.low if isinstance(dist, UniformLength) else dist.min


def _trace_refs(spec: CampaignSpec) -> list[TraceArrivals | TraceLength]:
    w = spec.workload
    return [x for x in (w.arrival, w.prompt_tokens, w.output_tokens) if isinstance(x, TraceArrivals | TraceLength)]


def with_skip_bad_rows(spec: CampaignSpec) -> CampaignSpec:
    """The campaign with every trace it reads set to skip malformed rows (``--skip-bad-rows``)."""
    w = spec.workload
    fields = {"arrival": w.arrival, "prompt_tokens": w.prompt_tokens, "output_tokens": w.output_tokens}
    update = {
        name: dist.model_copy(update={"skip_bad_rows": True})
        for name, dist in fields.items() if isinstance(dist, TraceArrivals | TraceLength)
    }
    return spec.model_copy(update={"workload": w.model_copy(update=update)}) if update else spec


def trace_inputs(spec: CampaignSpec) -> list[dict[str, object]]:
    """Every trace the campaign reads, loaded (malformed rows raise :class:`~workloads.traces.TraceError`
    unless skipped) with its row and skipped-row counts, for the manifest and the console."""
    from workloads.traces import load_trace_cached

    out: list[dict[str, object]] = []
    if isinstance(spec.workload.arrival, TraceArrivals):  # a window too short or too slow fails now, not mid-sweep
        for rate in spec.sweep.rate_rps:
            build_trace_requests(spec.workload.arrival, rate, spec.workload.duration_s, spec.seed)
    for ref in _trace_refs(spec):
        trace = load_trace_cached(ref.path, ref.skip_bad_rows)
        entry = {"path": trace.source, "requests": len(trace), "skipped_rows": trace.skipped_rows,
                 "skip_bad_rows": ref.skip_bad_rows}
        if entry not in out:
            out.append(entry)
    return out
