"""The device model: roofline timing, energy accounting, DVFS, kinds, memory fit and preset errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from serving.emulated.devices import DeviceFitError, device_kinds
from serving.emulated.physics import (
    PresetError,
    SequenceWork,
    energy_floor_per_token,
    iteration_cost,
    load_device,
    load_model_shape,
)
from serving.emulated.shapes import ModelShape, count_work
from serving.emulated.technology import mac_energy_pj, node_scale

PRESETS = Path(__file__).resolve().parents[1] / "serving" / "emulated" / "presets"


def _decode(n: int, ctx: int = 512) -> list[SequenceWork]:
    return [SequenceWork(f"r{i}", 1, ctx, False) for i in range(n)]


def test_registry_has_every_kind() -> None:
    assert set(device_kinds()) >= {"gpu", "cpu", "fpga", "sram_cim", "digital_cim", "dram_pim"}


def test_horowitz_anchors_and_node_scaling() -> None:
    assert mac_energy_pj("int8", 45, 0.9) == pytest.approx(0.3)
    assert mac_energy_pj("fp32", 45, 0.9) == pytest.approx(4.6)
    assert node_scale(22.5, 0.9) == pytest.approx(0.5)
    assert node_scale(45, 0.45) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="unknown dtype"):
        mac_energy_pj("fp4", 45, 0.9)


def test_shares_add_up_to_the_iteration_energy() -> None:
    dev, model = load_device("h100_sxm"), load_model_shape("llama-3.1-8b")
    work = [*_decode(8), SequenceWork("p", 300, 0, True)]
    cost = iteration_cost(dev, model, work, dev.f_max_mhz)
    assert sum(cost.per_request_j.values()) == pytest.approx(cost.energy_j, rel=1e-9)
    # GEMMs and attention on their own rooflines: never faster than one roofline over the whole iteration
    assert cost.time_s >= max(cost.compute_s, cost.memory_s) + dev.overhead_s


def test_lower_clock_saves_energy_on_memory_bound_decode_only() -> None:
    dev, model = load_device("h100_sxm"), load_model_shape("llama-3.1-8b")
    hi, lo = dev.f_max_mhz, 1110
    d_hi, d_lo = (iteration_cost(dev, model, _decode(16), f) for f in (hi, lo))
    assert d_lo.energy_j < d_hi.energy_j and d_lo.time_s < d_hi.time_s * 1.3  # decode slows far less than f
    p_hi, p_lo = (iteration_cost(dev, model, [SequenceWork("p", 4096, 0, True)], f) for f in (hi, lo))
    assert p_hi.throttled and p_lo.time_s > p_hi.time_s * 1.2  # prefill: power-capped at f_max, slower below
    assert dev.voltage(dev.f_max_mhz) == dev.v_max and dev.voltage(dev.f_floor_mhz / 2) == dev.v_min
    assert d_lo.power_w < d_hi.power_w  # dynamic power ~ C V^2 f


def test_throttled_to_tdp() -> None:
    dev = load_device("a40")
    cost = iteration_cost(
        dev, load_model_shape("llama-3.1-8b"), [SequenceWork("p", 8192, 0, True)], dev.f_max_mhz
    )
    assert cost.power_w <= dev.tdp_w * (1 + 1e-9)


def test_cim_keeps_weights_stationary_and_tiles_when_they_do_not_fit() -> None:
    cim = load_device("hastily_cim")
    bert = load_model_shape("bert-base-uncased", "int8")
    ex = cim.execute(bert, count_work(bert, SequenceWork("a", 128, 0, True)), 200)
    assert ex.weight_stream_bytes == 0 and ex.weight_stream_j == 0  # 85 MB fit in the arrays
    qwen = load_model_shape("qwen2.5-0.5b", "int8")
    tiled = iteration_cost(cim, qwen, _decode(1), 200)
    ex = cim.execute(qwen, count_work(qwen, _decode(1)[0]), 200)
    assert ex.weight_stream_bytes == pytest.approx(qwen.matmul_weight_bytes - cim.array_capacity_bytes)
    assert tiled.memory_s > tiled.compute_s  # tiling from DDR dominates a decode step


def test_cim_rejects_a_dtype_it_has_no_datapath_for() -> None:
    cim = load_device("hastily_cim")
    with pytest.raises(ValueError, match="no bf16 datapath"):
        iteration_cost(cim, load_model_shape("qwen2.5-0.5b"), _decode(1), 200)


def test_model_that_does_not_fit_says_so_with_numbers() -> None:
    pim = load_device("transpim")
    big = load_model_shape("llama-3.1-8b").model_copy(update={"n_params": 40e9})
    with pytest.raises(DeviceFitError, match=r"80\.00 GB of bf16 weights .* need 80\.00 GB of .* 28\.80 GB are usable"):
        pim.kv_capacity_tokens(big)
    assert pim.kv_capacity_tokens(load_model_shape("llama-3.1-8b")) > 10_000


def test_clock_outside_table_is_clamped() -> None:
    dev = load_device("h100_sxm")
    assert dev.nearest_clock(5000) == 1980 and dev.nearest_clock(1) == 345 and dev.nearest_clock(1000) == 960


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(PresetError, match=r"unknown preset 'tpu_v9'.*h100_sxm"):
        load_device("tpu_v9")
    with pytest.raises(PresetError, match="unknown model shape"):
        load_model_shape("gpt-17")


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d.pop("tdp_w"), "tdp_w"),
        (lambda d: d.update(idle_power_w=-5), "idle_power_w"),
        (lambda d: d["memory"].update(bandwidth_bps=-1), "memory.bandwidth_bps"),
        (lambda d: d["peak_ops"].update(bf16=-1), "peak_ops"),
        (lambda d: d.update(kind="quantum"), "unknown device kind 'quantum'"),
    ],
)
def test_bad_preset_names_file_and_field(tmp_path: Path, edit, field: str) -> None:  # type: ignore[no-untyped-def]
    data = yaml.safe_load((PRESETS / "h100_sxm.yaml").read_text())
    edit(data)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PresetError) as err:
        load_device(str(path))
    assert str(path) in str(err.value) and field in str(err.value)


def test_model_shapes_from_hf_configs() -> None:
    llama = load_model_shape("llama-3.1-8b")
    assert llama.n_params == pytest.approx(8.03e9, rel=0.01)
    bert = load_model_shape("bert-base-uncased")
    assert bert.architecture == "encoder" and bert.n_params == pytest.approx(109.5e6, rel=0.01)
    distil = load_model_shape("distilbert-base-uncased")
    assert distil.n_layers == 6 and distil.n_params == pytest.approx(66.4e6, rel=0.01)
    assert load_model_shape("mistral-7b").n_params == pytest.approx(7.24e9, rel=0.01)
    assert load_model_shape("qwen2.5-0.5b").n_params == pytest.approx(0.494e9, rel=0.01)
    assert load_model_shape("bert-base-uncased", "int8").weight_bytes == pytest.approx(bert.n_params)


def test_shape_from_a_config_file_path(tmp_path: Path) -> None:
    cfg = tmp_path / "tiny" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(
        json.dumps(
            {
                "hidden_size": 64,
                "num_attention_heads": 4,
                "num_hidden_layers": 2,
                "vocab_size": 100,
                "intermediate_size": 128,
                "model_type": "llama",
            }
        )
    )
    shape = load_model_shape(str(cfg))
    assert shape.name == "tiny" and shape.architecture == "decoder"
    cfg.write_text(json.dumps({"num_attention_heads": 4}))
    with pytest.raises(PresetError, match="hidden_size"):
        load_model_shape(str(cfg))


def test_encoder_attention_is_bidirectional_and_has_no_kv_cache() -> None:
    from serving.emulated.shapes import count_work

    bert = load_model_shape("bert-base-uncased")
    w = count_work(bert, SequenceWork("a", 128, 0, True))
    assert w.kv_bytes == 0
    assert w.attn_macs == pytest.approx(2 * 12 * 768 * 128 * 128)
    assert w.weight_macs == pytest.approx(bert.matmul_params * 128)


def test_energy_floor_is_below_what_the_engine_model_charges() -> None:
    dev, model = load_device("h100_sxm"), load_model_shape("llama-3.1-8b")
    floor = energy_floor_per_token(dev, model, prompt_tokens=256, output_tokens=128)
    assert floor.clock_mhz in dev.clocks_mhz and floor.bound in {"compute", "memory"}
    # The same requests as the engine would run them at a large batch: one prefill, then 127 decode steps.
    for batch in (1, 16, 256):
        prefill = iteration_cost(
            dev, model, [SequenceWork(f"r{i}", 256, 0, True) for i in range(batch)], dev.f_max_mhz
        )
        step = iteration_cost(dev, model, _decode(batch, 256 + 64), dev.f_max_mhz)
        actual = (prefill.energy_j + 127 * step.energy_j) / (batch * 128)
        assert 0 < floor.joules_per_token < actual


def test_energy_floor_rejects_empty_work() -> None:
    with pytest.raises(ValueError, match="output_tokens"):
        energy_floor_per_token(load_device("h100_sxm"), load_model_shape("llama-3.1-8b"), 10, 0)


def test_shape_round_trip_keeps_defaults_for_old_fields() -> None:
    s = ModelShape(
        name="x",
        n_params=1e6,
        n_layers=2,
        hidden_size=64,
        n_heads=4,
        n_kv_heads=4,
        head_dim=16,
        vocab_size=10,
        dtype_bytes=2,
        max_position_embeddings=128,
    )
    assert s.architecture == "decoder" and s.matmul_params > 0


def test_overlapped_host_time_bounds_the_step_and_the_device_waits_at_idle_power() -> None:
    """Async scheduling: host work of the next step runs while the device computes this one, so it sets a floor
    under the step rather than adding to it; a device done sooner waits at idle power."""
    base, model = load_device("h100_sxm"), load_model_shape("llama-3.1-8b")
    device_bound = iteration_cost(base, model, _decode(64), base.f_max_mhz)
    hidden = base.model_copy(update={"overlapped_overhead_s": 1e-4})
    assert iteration_cost(hidden, model, _decode(64), base.f_max_mhz).time_s == pytest.approx(device_bound.time_s)
    host = 2 * device_bound.time_s
    bound = base.model_copy(update={"overlapped_overhead_s": host / 2, "overlapped_sequence_s": host / 2 / 64})
    host_bound = iteration_cost(bound, model, _decode(64), base.f_max_mhz)
    assert host_bound.time_s == pytest.approx(host + base.sequence_overhead_s * 64)
    # the same work and kernels, plus idle power while the device waits
    waited = host_bound.time_s - device_bound.time_s
    assert host_bound.energy_j == pytest.approx(device_bound.energy_j + base.idle_power_w * waited)


def test_gemm_overlap_runs_a_skinny_gemm_s_arithmetic_after_its_weights() -> None:
    base, model = load_device("h100_sxm"), load_model_shape("llama-3.1-8b")
    roofline = iteration_cost(base, model, _decode(32, ctx=1), base.f_max_mhz)
    serial = base.model_copy(update={"gemm_overlap": 0.0})
    summed = iteration_cost(serial, model, _decode(32, ctx=1), base.f_max_mhz)
    c = model.work_constants
    gemm_compute_s = 32 * (c.matmul_params + c.lm_head_params) / (
        base.peak_macs_per_s(model.dtype, base.f_max_mhz) * base.compute_efficiency
    )
    assert summed.time_s - roofline.time_s == pytest.approx(gemm_compute_s, rel=1e-6)
