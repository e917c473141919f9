"""The emulated engine serves any device preset, and says clearly when a model cannot run on one."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from deploy.virtual import VirtualClock
from serving.config import EmulatedEngineConfig
from serving.emulated.devices import DeviceFitError
from serving.emulated.engine import EmulatedEngine
from serving.emulated.physics import PresetError
from serving.types import GenerationRequest

PRESETS = Path(__file__).resolve().parents[1] / "serving" / "emulated" / "presets"


def _generate(engine: EmulatedEngine, clock: VirtualClock, n_tokens: int) -> list:  # type: ignore[type-arg]
    async def go() -> list:  # type: ignore[type-arg]
        await engine.start()
        req = GenerationRequest("r1", prompt_token_ids=[1] * 32, max_tokens=n_tokens)
        events = [ev async for ev in engine.generate(req)]
        await engine.stop()
        return events

    return clock.execute(go())


@pytest.mark.parametrize(
    ("device", "dtype"),
    [("h100_sxm", None), ("hastily_cim", "int8"), ("kv260_fpga", "int8"), ("transpim", None)],
)
def test_every_kind_serves_a_small_decoder(device: str, dtype: str | None) -> None:
    clock = VirtualClock()
    cfg = EmulatedEngineConfig(device=device, model="smollm2-135m", dtype=dtype, max_model_len=1024,
                               stream_interval_s=0)  # one event per token
    engine = EmulatedEngine(cfg, "replica-0", clock=clock)
    events = _generate(engine, clock, 8)
    assert [e.index for e in events] == list(range(8)) and events[-1].finished
    stats = engine.stats()
    total = stats.attributed_prefill_j + stats.attributed_decode_j + stats.idle_j
    assert engine.read()[0].energy_j == pytest.approx(total, rel=1e-6)
    assert events[-1].energy_j == pytest.approx(stats.attributed_prefill_j + stats.attributed_decode_j)
    assert clock.now() > 0


def test_fpga_is_slower_and_leaner_than_a_gpu_per_token() -> None:
    results = {}
    for device, dtype in (("h100_sxm", None), ("kv260_fpga", "int8")):
        clock = VirtualClock()
        cfg = EmulatedEngineConfig(device=device, model="smollm2-135m", dtype=dtype, max_model_len=1024)
        engine = EmulatedEngine(cfg, "r", clock=clock)
        events = _generate(engine, clock, 16)
        results[device] = (clock.now(), events[-1].energy_j)
    assert results["kv260_fpga"][0] > 5 * results["h100_sxm"][0]
    assert results["kv260_fpga"][1] < results["h100_sxm"][1]


def test_model_too_big_for_the_device_names_the_numbers() -> None:
    cfg = EmulatedEngineConfig(device="kv260_fpga", model="llama-3.1-8b", max_model_len=1024)
    with pytest.raises(DeviceFitError, match=r"llama-3.1-8b does not fit KV260.*16\.06 GB of bf16 weights"):
        EmulatedEngine(cfg, "r")


def test_cim_device_needs_an_int8_model() -> None:
    with pytest.raises(ValueError, match=r"no bf16 datapath.*set the engine's dtype"):
        EmulatedEngine(EmulatedEngineConfig(device="hastily_cim", model="smollm2-135m"), "r")


def test_encoder_model_is_refused_by_the_serving_engine() -> None:
    with pytest.raises(ValueError, match="encoder"):
        EmulatedEngine(EmulatedEngineConfig(model="bert-base-uncased"), "r")


def test_unknown_device_name() -> None:
    with pytest.raises(PresetError, match="unknown preset 'h200_nvl'"):
        EmulatedEngine(EmulatedEngineConfig(device="h200_nvl"), "r")


def test_clock_outside_the_table_is_clamped_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        engine = EmulatedEngine(EmulatedEngineConfig(clock_mhz=3000, max_model_len=1024), "r")
    assert engine.clock_mhz == 1980
    assert "clamped to supported 1980 MHz" in caplog.text


class _OvershootingClock(VirtualClock):
    """A clock whose sleeps wake 1 ms late, like asyncio.sleep on a loaded host."""

    async def sleep(self, seconds: float) -> None:
        await super().sleep(max(0.0, seconds) + 0.001)


def test_sleep_overshoot_does_not_accumulate_into_the_timeline() -> None:
    clock = _OvershootingClock()
    engine = EmulatedEngine(EmulatedEngineConfig(max_model_len=1024, stream_interval_s=0), "r", clock=clock)
    events = _generate(engine, clock, 40)
    assert len(events) == 40
    # Back-to-back iterations follow the modeled timeline: at most one overshoot is charged as idle,
    # not one per iteration (40 ms x 70 W = 2.8 J).
    assert engine.stats().idle_j <= 0.0025 * engine.device.idle_power_w


def test_a_full_kv_cache_preempts_the_newest_request_and_every_request_still_completes() -> None:
    """Paged KV as in vLLM: slots are taken as tokens are processed; when the cache fills, the newest running
    request is preempted (its cache freed) and recomputed later, and no request is lost or cut short."""
    import asyncio

    from serving.emulated.devices import device_from_dict
    from serving.emulated.physics import load_model_shape
    model = load_model_shape("smollm2-135m")
    data = yaml.safe_load((PRESETS / "h100_sxm.yaml").read_text())
    data.pop("calibration")
    usable_kv = 3000 * model.kv_bytes_per_token
    data["memory"]["capacity_bytes"] = (model.weight_bytes + usable_kv) / data.get("kv_memory_fraction", 0.9)
    device = device_from_dict(data)
    clock = VirtualClock()
    cfg = EmulatedEngineConfig(model="smollm2-135m", max_model_len=1024, stream_interval_s=0)
    engine = EmulatedEngine(cfg, "r", clock=clock, device=device, model=model)
    assert 2900 <= engine.kv_capacity_tokens <= 3000
    peak = 0

    async def one(i: int) -> int:
        nonlocal peak
        req = GenerationRequest(f"r{i}", prompt_token_ids=[0] * 100, max_tokens=500, ignore_eos=True)
        last = None
        async for ev in engine.generate(req):
            peak = max(peak, engine.stats().kv_used_tokens)
            last = ev
        assert last is not None
        return last.output_tokens

    async def go() -> list[int]:
        await engine.start()
        outs = await asyncio.gather(*(one(i) for i in range(8)))  # 8 x 600 tokens: twice the cache
        await engine.stop()
        return list(outs)

    assert clock.execute(go()) == [500] * 8
    assert engine.preemptions > 0 and peak <= engine.kv_capacity_tokens
    assert engine.stats().kv_used_tokens == 0
