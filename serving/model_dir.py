"""Checking that a directory holds a checkpoint an engine can load, with errors that say what is missing."""

from __future__ import annotations

from pathlib import Path

from profilers.errors import ConfigError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class ModelDirError(ConfigError):
    """A model directory that cannot be served; the message names the path and what was expected."""


def check_model_dir(path: str | Path) -> Path:
    """The directory of a Hugging Face checkpoint, or :class:`ModelDirError` saying what is missing."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelDirError(
            f"model directory {p} does not exist: expected a Hugging Face checkpoint directory (config.json, "
            "weights, tokenizer); build one with `testbed model build-tiny DIR`"
        )
    if not p.is_dir():
        raise ModelDirError(
            f"model path {p} is not a directory: expected a Hugging Face checkpoint directory"
        )
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    if not any((p / f).is_file() for f in WEIGHT_FILES) and not list(p.glob("*.safetensors")):
        missing.append("weights (*.safetensors)")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        missing.append("tokenizer (tokenizer.json)")
    if missing:
        raise ModelDirError(
            f"{p} is not a model checkpoint: missing {', '.join(missing)}; expected a Hugging Face "
            "checkpoint directory such as the one `testbed model build-tiny DIR` writes"
        )
    return p
