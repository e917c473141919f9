"""Engine configs: a union on ``kind`` (emulated | vllm), model directories, and vLLM as an optional extra."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from deploy.cli import main
from deploy.config import ConfigError, load_yaml_model
from serving.config import EmulatedEngineConfig, ServingConfig, VLLMEngineConfig
from serving.engine import MissingExtraError, build_engine
from serving.model_dir import ModelDirError, check_model_dir
from serving.types import GenerationRequest


def test_engine_union_defaults_to_emulated_and_picks_vllm_by_kind() -> None:
    assert isinstance(ServingConfig().engine, EmulatedEngineConfig)
    assert isinstance(ServingConfig(engine={"device": "h100_sxm"}).engine, EmulatedEngineConfig)
    cfg = ServingConfig(engine={"kind": "vllm", "model": "/models/tiny-llama"})
    assert isinstance(cfg.engine, VLLMEngineConfig)
    assert cfg.model_name == "tiny-llama"
    cpu = cfg.engine.resolved(on_gpu=False)
    assert cpu.dtype == "float32" and cpu.enforce_eager and cpu.kv_cache_memory_bytes == 256 << 20
    with pytest.raises(ValidationError, match="'emulated', 'vllm'"):
        ServingConfig(engine={"kind": "tpu"})
    with pytest.raises(ValidationError, match="model"):
        ServingConfig(engine={"kind": "vllm"})


def test_yaml_vllm_engine_with_an_unknown_key_names_it(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("engine:\n  kind: vllm\n  model: /m\n  max_num_seqz: 4\n")
    with pytest.raises(ConfigError, match=r"engine\.vllm\.max_num_seqz: unknown key"):
        load_yaml_model(f, ServingConfig)
    f.write_text("engine:\n  kind: vllm\n  model: /m\n  speculative: {num_speculative_tokens: 2}\n")
    assert load_yaml_model(f, ServingConfig).engine.speculative.num_speculative_tokens == 2


def test_missing_model_directory_names_the_path_and_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match=rf"{tmp_path / 'nope'} does not exist: expected a Hugging Face"):
        check_model_dir(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelDirError, match="is not a directory"):
        check_model_dir(tmp_path / "file")
    d = tmp_path / "notamodel"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(
        ModelDirError, match=r"notamodel is not a model checkpoint: missing weights .*tokenizer"
    ):
        check_model_dir(d)


def test_cli_model_check_and_serve_report_a_bad_model_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["model", "check", str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"engine:\n  kind: vllm\n  model: {tmp_path / 'missing'}\n")
    if "vllm" not in sys.modules and not _vllm_installed():
        pytest.skip("vllm not installed: serve stops at the missing extra first (see the test below)")
    assert main(["serve", str(cfg), "--port", "0"]) == 2  # fails before starting Ray
    assert "deployment.engine.model" in capsys.readouterr().err


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def test_without_vllm_a_clear_error_names_the_extra_and_emulated_still_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails as if it were not installed
    with pytest.raises(MissingExtraError, match=r"scripts/install-vllm.sh.*llm-energy-testbed\[gpu\]"):
        build_engine(VLLMEngineConfig(model=str(tmp_path)), "replica-0")
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"engine:\n  kind: vllm\n  model: {tmp_path}\n")
    assert main(["serve", str(cfg), "--port", "0"]) == 1
    assert "scripts/install-vllm.sh" in capsys.readouterr().err

    async def one_token() -> str:
        engine = build_engine(EmulatedEngineConfig(), "replica-0")
        await engine.start()
        try:
            events = [e async for e in engine.generate(GenerationRequest("r", prompt="a b c", max_tokens=2))]
        finally:
            await engine.stop()
        return "".join(e.text for e in events)

    import asyncio

    assert len(asyncio.run(one_token()).split()) == 2


def test_power_source_falls_back_to_the_cpu_model_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    from profilers.cpu_model import CpuPowerModel
    from serving.vllm_engine import select_power_source

    source, text = select_power_source(VLLMEngineConfig(model="/m", power_sources=[]), "replica-0")
    assert isinstance(source, CpuPowerModel) and text.startswith("CPU power model (modeled)")
    assert source.read()[0].provenance == "modeled" and source.devices()[0].energy_method == "modeled"

    with caplog.at_level("WARNING", logger="serving.vllm_engine"):
        source, text = select_power_source(VLLMEngineConfig(model="/m"), "replica-0")
    assert "replica-0: power source:" in caplog.text
    if isinstance(source, CpuPowerModel):  # no readable NVML or RAPL here: both reasons are given
        assert "not used: nvml:" in text and "rapl:" in text
    else:
        assert source.devices()[0].backend in ("nvml", "rapl")


def _fake_checkpoint(d: Path, vocab: int) -> Path:
    d.mkdir()
    (d / "config.json").write_text(f'{{"vocab_size": {vocab}}}')
    (d / "model.safetensors").write_bytes(b"")
    (d / "tokenizer.json").write_text("{}")
    return d


def test_draft_model_speculation_needs_a_draft_with_the_targets_vocabulary(tmp_path: Path) -> None:
    from serving.config import SpeculativeConfig
    from serving.vllm_engine import check_draft_model

    with pytest.raises(ValidationError, match="method draft_model needs draft_model: the checkpoint directory"):
        SpeculativeConfig(method="draft_model")
    with pytest.raises(ValidationError, match="draft_model is only used by method draft_model"):
        SpeculativeConfig(draft_model="/m")
    target = _fake_checkpoint(tmp_path / "target", 2048)
    cfg = VLLMEngineConfig(
        model=str(target), speculative={"method": "draft_model", "draft_model": str(tmp_path / "missing")}
    )
    with pytest.raises(ModelDirError, match=rf"{tmp_path / 'missing'} does not exist"):
        check_draft_model(cfg)
    other = _fake_checkpoint(tmp_path / "other-vocab", 32000)
    cfg = VLLMEngineConfig(model=str(target), speculative={"method": "draft_model", "draft_model": str(other)})
    with pytest.raises(ModelDirError, match=r"other-vocab has a vocabulary of 32000 tokens, the target .* 2048"):
        check_draft_model(cfg)
    same = _fake_checkpoint(tmp_path / "draft", 2048)
    spec = {"method": "draft_model", "draft_model": str(same)}
    check_draft_model(VLLMEngineConfig(model=str(target), speculative=spec))


def test_executor_picks_vllms_process_layout_and_leaves_a_set_thread_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.vllm_engine import _set_executor

    assert ServingConfig(engine={"kind": "vllm", "model": "/m"}).engine.executor == "uni"
    with pytest.raises(ValidationError, match="'uni' or 'mp'"):
        ServingConfig(engine={"kind": "vllm", "model": "/m", "executor": "ray"})
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "")  # recorded, so the test leaves the environment as it was
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    _set_executor("uni")
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    _set_executor("mp")
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")  # the user's own binding stays
    _set_executor("mp")
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"


@pytest.mark.parametrize(("gpu", "expected"), [
    (False, {"dtype": "float32", "enforce_eager": True, "kv_cache_memory_bytes": 256 << 20}),
    (True, {"dtype": "auto", "enforce_eager": False, "kv_cache_memory_bytes": None}),
])
def test_unset_vllm_arguments_take_the_platforms_defaults(
    gpu: bool, expected: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config says nothing of dtype, eager mode or KV cache: the replica, which knows its platform, picks float32,
    eager and a bounded cache on a CPU, the checkpoint's dtype, CUDA graphs and vLLM's share of memory on a GPU.
    What a config does say is kept on either."""
    pytest.importorskip("vllm", reason="vllm is not installed: scripts/install-vllm.sh")
    from serving import vllm_engine

    model = _fake_checkpoint(tmp_path / "m", vocab=32)
    monkeypatch.setattr(vllm_engine, "on_gpu", lambda: gpu)
    engine = vllm_engine.VLLMEngine(VLLMEngineConfig(model=str(model), power_sources=[]), "replica-0")
    args = engine._engine_args()
    assert {k: getattr(args, k) for k in expected} == expected
    assert {k: engine.describe()[k] for k in expected} == expected
    kept = vllm_engine.VLLMEngine(
        VLLMEngineConfig(model=str(model), power_sources=[], dtype="bfloat16", enforce_eager=True,
                         kv_cache_memory_bytes=1 << 30, enable_prefix_caching=False), "replica-0")._engine_args()
    assert (kept.dtype, kept.enforce_eager, kept.kv_cache_memory_bytes) == ("bfloat16", True, 1 << 30)
    assert kept.enable_prefix_caching is False and args.enable_prefix_caching is None  # None: vLLM's default
