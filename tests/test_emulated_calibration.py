"""Calibration: the presets reproduce published figures through the model (no stored answers)."""

from __future__ import annotations

import pytest

from serving.emulated.physics import (
    encoder_batch,
    load_device,
    load_model_shape,
    peak_tops_per_w,
    run_metrics,
)


def _bert(device: str, model: str, dtype: str, seq_len: int = 128):  # type: ignore[no-untyped-def]
    return run_metrics(load_device(device), load_model_shape(model, dtype), encoder_batch(1, seq_len))


def test_hastily_cim_vs_a40_on_bert_base_int8() -> None:
    # HASTILY (65 nm CIM) vs NVIDIA A40, BERT-base INT8: 4.4-9.8x throughput, 16-36x TOPS/W.
    gpu = _bert("a40", "bert-base-uncased", "int8")
    cim = _bert("hastily_cim", "bert-base-uncased", "int8")
    assert 4.4 <= cim.ops_per_s / gpu.ops_per_s <= 9.8
    assert 16 <= cim.tops_per_w / gpu.tops_per_w <= 36
    assert not gpu.throttled and not cim.throttled


def test_digital_cim_macro_reaches_34_tops_per_w() -> None:
    tops_w = peak_tops_per_w(load_device("digital_cim_macro"), "int8")
    assert tops_w == pytest.approx(34.1, rel=0.15)


def test_kv260_fpga_on_distilbert() -> None:
    fpga = _bert("kv260_fpga", "distilbert-base-uncased", "fp32")
    arm = _bert("arm_a53", "distilbert-base-uncased", "fp32")
    assert fpga.ops_per_s / 1e9 == pytest.approx(3.1, rel=0.20)
    assert 5 <= fpga.ops_per_s / arm.ops_per_s <= 9
    assert fpga.power_w <= 10.5  # ~10 W class envelope


def test_gpu_presets_follow_their_datasheets() -> None:
    """Peak rates and bandwidth ordering: H100 > A100 > A40, and each stays under its TDP in prefill."""
    from serving.emulated.physics import SequenceWork, iteration_cost

    llama = load_model_shape("llama-3.1-8b")
    peaks, bws = [], []
    for name in ("h100_sxm", "a100_sxm", "a40"):
        dev = load_device(name)
        peaks.append(dev.peak_macs_per_s("bf16", dev.f_max_mhz))
        bws.append(dev.memory.bandwidth_bps)
        prefill = iteration_cost(dev, llama, [SequenceWork("p", 2048, 0, True)], dev.f_max_mhz)
        decode = iteration_cost(
            dev, llama, [SequenceWork(str(i), 1, 512, False) for i in range(32)], dev.f_max_mhz
        )
        assert prefill.compute_s > prefill.memory_s  # prefill compute-bound
        assert decode.memory_s > decode.compute_s  # decode memory-bound
        assert decode.power_w < prefill.power_w <= dev.tdp_w + 1e-6
    assert peaks == sorted(peaks, reverse=True) and bws == sorted(bws, reverse=True)


def test_every_preset_documents_its_sources() -> None:
    from importlib import resources

    names = [
        p.name.removesuffix(".yaml")
        for p in (resources.files("serving.emulated") / "presets").iterdir()
        if p.name.endswith(".yaml")
    ]
    assert {
        "h100_sxm",
        "a100_sxm",
        "a40",
        "hastily_cim",
        "digital_cim_macro",
        "transpim",
        "kv260_fpga",
        "arm_a53",
    } <= set(names)
    for name in names:
        dev = load_device(name)
        assert dev.sources, f"{name} lists no sources"
