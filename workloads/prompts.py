"""Prompt text with an exact token count for the served tokenizer."""

from __future__ import annotations

import numpy as np

_WORDS = (
    "energy token power clock batch model joule water carbon latency replica device memory cache request "
    "queue decode prefill serving cluster "
).split()


def synth_prompt(n_tokens: int, seed: int) -> str:
    """``n_tokens`` words: exact for the emulated engines' word tokenizer.

    Real tokenizers (issue: exact token counts for the served model) need their own synthesiser.
    """
    rng = np.random.default_rng(seed)
    return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), size=n_tokens))
