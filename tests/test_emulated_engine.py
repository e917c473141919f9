import asyncio

import pytest

from serving.config import EmulatedEngineConfig
from serving.emulated.engine import EmulatedEngine
from serving.types import GenerationRequest, Knobs, RequestRejectedError


class StepClock:
    """Virtual time: sleeping advances the clock at once (one engine, so no interleaving to model)."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)
        await asyncio.sleep(0)


def engine(**cfg) -> tuple[EmulatedEngine, StepClock]:
    clock = StepClock()
    return EmulatedEngine(EmulatedEngineConfig(model="qwen2.5-0.5b", max_model_len=512, **cfg), "r0", clock), clock


async def collect(eng: EmulatedEngine, rid: str, prompt_words: int, max_tokens: int):
    events = [e async for e in eng.generate(GenerationRequest(rid, prompt=" ".join(["w"] * prompt_words),
                                                               max_tokens=max_tokens))]
    return events


async def test_streams_exact_token_counts_and_energy() -> None:
    eng, _ = engine()
    await eng.start()
    events = await collect(eng, "a", 20, 7)
    await eng.stop()
    assert sum(len(e.token_ids) for e in events) == 7
    last = events[-1]
    assert last.finished and last.finish_reason == "length"
    assert (last.prompt_tokens, last.output_tokens) == (20, 7)
    assert last.energy_j > 0 and last.provenance == "modeled"


async def test_concurrent_requests_share_iterations() -> None:
    eng, _ = engine()
    await eng.start()
    await asyncio.gather(*(collect(eng, f"r{i}", 10, 16) for i in range(8)))
    stats = eng.stats()
    await eng.stop()
    assert stats.generated_tokens_total == 8 * 16
    assert stats.iterations < 8 * 16 / 2  # continuous batching: far fewer iterations than tokens


async def test_energy_counter_closes_on_idle_plus_attributed() -> None:
    eng, clock = engine()
    await eng.start()
    clock.t += 5.0  # idle time before traffic
    await asyncio.gather(*(collect(eng, f"r{i}", 50, 10) for i in range(4)))
    clock.t += 2.0
    stats = eng.stats()
    total = eng.read()[0].energy_j
    await eng.stop()
    parts = stats.idle_j + stats.attributed_prefill_j + stats.attributed_decode_j
    assert parts == pytest.approx(total, rel=1e-9)
    assert stats.idle_j >= eng.device.idle_power_w * 7.0 * 0.99


async def test_prompt_longer_than_context_is_rejected() -> None:
    eng, _ = engine()
    with pytest.raises(RequestRejectedError, match="maximum context length is 512") as err:
        eng.generate(GenerationRequest("x", prompt=" ".join(["w"] * 600), max_tokens=4))
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(RequestRejectedError, match="empty"):
        eng.generate(GenerationRequest("y", prompt="   ", max_tokens=4))


async def test_batch_cap_limits_running_sequences() -> None:
    eng, _ = engine(max_num_seqs=2)
    await eng.start()
    tasks = [asyncio.create_task(collect(eng, f"r{i}", 10, 30)) for i in range(5)]
    await asyncio.sleep(0)
    for _ in range(20):
        await asyncio.sleep(0)
        assert eng.stats().running <= 2
    await asyncio.gather(*tasks)
    await eng.stop()


async def test_apply_clamps_clock_to_supported_table() -> None:
    eng, _ = engine()
    applied = await eng.apply(Knobs(clock_mhz=1000, max_num_seqs=8))
    assert applied.clock_mhz in eng.device.clocks_mhz
    assert applied.max_num_seqs == 8
    assert applied.notes and "clamped" in applied.notes[0]


async def test_abandoned_stream_frees_its_slot() -> None:
    eng, _ = engine()
    await eng.start()
    gen = eng.generate(GenerationRequest("gone", prompt="a b c", max_tokens=100))
    await anext(gen)
    await gen.aclose()
    stats = eng.stats()
    await eng.stop()
    assert stats.running == 0 and stats.kv_used_tokens == 0


def test_model_too_large_for_device_memory() -> None:
    from serving.emulated.physics import ModelShape

    huge = ModelShape(name="huge", n_params=1e12, n_layers=100, hidden_size=16384, n_heads=128, n_kv_heads=8,
                      head_dim=128, vocab_size=32000, dtype_bytes=2, max_position_embeddings=4096)
    with pytest.raises(ValueError, match="does not fit"):
        EmulatedEngine(EmulatedEngineConfig(), "r0", model=huge)


async def test_speculative_decoding_cuts_steps_and_energy_at_low_load() -> None:
    async def run(k: int) -> tuple[int, float, object]:
        eng, _ = engine(speculative_tokens=k, spec_acceptance=0.7)
        await eng.start()
        events = await collect(eng, "s", 20, 64)
        stats = eng.stats()
        await eng.stop()
        assert sum(len(e.token_ids) for e in events) == 64  # exactly max_tokens, never more
        return stats.iterations, events[-1].energy_j, stats

    plain_steps, plain_j, _ = await run(0)
    spec_steps, spec_j, stats = await run(4)
    assert spec_steps < plain_steps * 0.6  # ~2.8 tokens per step at 70% acceptance and k=4
    assert spec_j < plain_j  # one weight read yields several tokens in a memory-bound step
    # Accepted share of proposals: only the prefix up to the first rejection counts, E = (0.7+0.7^2+0.7^3+0.7^4)/4.
    assert stats.spec_accepted_tokens / stats.spec_proposed_tokens == pytest.approx(0.443, abs=0.12)


async def test_speculation_knob_applies_live() -> None:
    eng, _ = engine()
    await eng.apply(Knobs(speculative_tokens=3))
    assert eng.speculative_tokens == 3
    with pytest.raises(ValueError, match=r"knob speculative_tokens: must be an integer in \[0, 16\]"):
        Knobs(speculative_tokens=40)  # refused before any engine sees it


async def test_without_max_tokens_the_default_cap_holds_within_the_context() -> None:
    """The front door's default_max_tokens (DoorConfig) caps a request without max_tokens; the context length
    minus the prompt caps the default (vLLM's behaviour without a default)."""
    eng, _ = engine()
    await eng.start()
    prompt = " ".join(["w"] * 500)
    capped = [e async for e in eng.generate(GenerationRequest("a", prompt="w w", default_max_tokens=5))]
    in_context = [e async for e in eng.generate(GenerationRequest("b", prompt=prompt, default_max_tokens=100))]
    uncapped = [e async for e in eng.generate(GenerationRequest("c", prompt=prompt))]
    await eng.stop()
    assert capped[-1].output_tokens == 5
    assert in_context[-1].output_tokens == 12 and uncapped[-1].output_tokens == 12  # 512 - 500
