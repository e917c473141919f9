"""Prompt text with an exact token count for the served tokenizer.

A prompt synthesiser is a callable ``(n_tokens, seed) -> str`` (the load client's ``prompt_fn``):

- :func:`synth_prompt`: ``n_tokens`` words, exact for the emulated engines' word tokenizer;
- :class:`TokenizerPrompts`: exact for a real model's tokenizer, loaded from a local directory or
  ``tokenizer.json`` (never from a model hub).

"n prompt tokens" means what the server counts and reports as ``usage.prompt_tokens`` for a
``/v1/completions`` prompt: the tokenizer's encoding of the text *with* its special tokens (vLLM encodes
completion prompts with ``add_special_tokens=True``, so a Llama tokenizer's BOS counts as one of the n).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from profilers.errors import ConfigError

PromptFn = Callable[[int, int], str]

_WORDS = (
    "energy token power clock batch model joule water carbon latency replica device memory cache request "
    "queue decode prefill serving cluster "
).split()
# Common English words tried first as single-token words of a real tokenizer (its vocabulary adds more).
_ENGLISH = (
    "the of and to in is that for it as was with be by on not this are or from at which but have an they you "
    "were her she there one all we their been has when who will more no if out so said what up its about into "
    "than them can only other new some time could these two may then do first any my now such like our over "
    "even most made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great old year off "
    "come since against go came right used take three"
).split()
_WORD_RE = re.compile(r"^[a-z]{2,12}$")
_MAX_POOL = 4096


def synth_prompt(n_tokens: int, seed: int) -> str:
    """``n_tokens`` words: exact for the emulated engines' word tokenizer (one token per word)."""
    rng = np.random.default_rng(seed)
    return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), size=n_tokens))


class TokenizerError(ConfigError):
    """A tokenizer that cannot be loaded or cannot produce a prompt of the requested length."""


def _load(path: Path) -> tuple[Callable[[list[str]], list[int]], dict[str, int], str]:
    """An encoder of texts to token counts (special tokens included, as the server encodes completion
    prompts), the vocabulary, and a description. transformers' AutoTokenizer (what vLLM loads) when it is
    installed; the ``tokenizers`` library on ``tokenizer.json`` otherwise."""
    if not path.exists():
        raise TokenizerError(
            f"tokenizer {path} not found: give a model directory holding tokenizer.json (or the file itself), "
            "or `word` for the emulated engines"
        )
    directory = path if path.is_dir() else path.parent
    if path.is_dir() and importlib.util.find_spec("transformers") is not None:
        from transformers import AutoTokenizer

        try:
            tok: Any = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise TokenizerError(f"cannot load a tokenizer from {path}: {e}") from e
        # Counting only: a prompt past the model's context is the server's to refuse, not a tokenizer warning.
        tok.model_max_length = 1 << 30

        def count_hf(texts: list[str]) -> list[int]:
            return [len(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"]]

        return count_hf, dict(tok.get_vocab()), f"{type(tok).__name__} from {path}"
    if importlib.util.find_spec("tokenizers") is None:
        raise TokenizerError(
            "exact prompt lengths for a model's tokenizer need the `tokenizers` (or `transformers`) package: "
            "pip install tokenizers"
        )
    from tokenizers import Tokenizer

    file = path if path.is_file() else directory / "tokenizer.json"
    if not file.is_file():
        raise TokenizerError(f"{directory} holds no tokenizer.json: give a model directory with one")
    try:
        raw = Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust library raises plain Exceptions on a bad file
        raise TokenizerError(f"cannot load {file}: {e}") from e

    def count_raw(texts: list[str]) -> list[int]:
        return [len(enc.ids) for enc in raw.encode_batch(texts, add_special_tokens=True)]

    return count_raw, dict(raw.get_vocab()), f"tokenizers.Tokenizer from {file}"


class TokenizerPrompts:
    """Prompts that a real tokenizer encodes to exactly ``n_tokens`` (special tokens included).

    Text is built from words that the tokenizer maps to one token each after a space (taken from common
    English and the tokenizer's own vocabulary, checked in context), so a prompt is a word sequence of the
    right length; every prompt is re-encoded and adjusted until the count is exact.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._count, vocab, self.description = _load(self.path)
        self.special_tokens = self._count([""])[0]
        self._first, self._next = self._word_pools(vocab)
        if not self._next:
            raise TokenizerError(
                f"{self.description}: no word encodes to a single token after a space; cannot build prompts "
                "of an exact length with it"
            )

    def __getstate__(self) -> dict[str, str]:
        # A load-generator process gets the path and loads the tokenizer itself (the encoder is a closure).
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def count(self, text: str) -> int:
        """Prompt tokens of ``text`` as the server counts them."""
        return self._count([text])[0]

    def _word_pools(self, vocab: dict[str, int]) -> tuple[list[str], list[str]]:
        candidates = list(_ENGLISH)
        seen = set(candidates)
        # Byte-level BPE marks a leading space with "Ġ", SentencePiece with "▁": such entries are whole words.
        for piece, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
            word = piece[1:] if piece[:1] in ("Ġ", "▁") else ""
            if _WORD_RE.match(word) and word not in seen:
                seen.add(word)
                candidates.append(word)
            if len(candidates) >= _MAX_POOL:
                break
        anchor = "the" if "the" in candidates else candidates[0]
        base = self._count([anchor])[0]
        after = self._count([f"{anchor} {w}" for w in candidates])
        alone = self._count(candidates)
        nxt = [w for w, c in zip(candidates, after, strict=True) if c == base + 1]
        first = [w for w, c in zip(candidates, alone, strict=True) if c == self.special_tokens + 1 and w in nxt]
        return first, nxt

    def __call__(self, n_tokens: int, seed: int) -> str:
        """A prompt the tokenizer encodes to exactly ``n_tokens`` tokens, reproducible from ``seed``."""
        if n_tokens < self.special_tokens + 1:
            raise TokenizerError(
                f"a prompt of {n_tokens} token(s) is impossible with {self.description}: it adds "
                f"{self.special_tokens} special token(s), so the shortest prompt has {self.special_tokens + 1}"
            )
        rng = np.random.default_rng(seed)
        for _ in range(8):
            text = self._attempt(n_tokens, rng)
            if text is not None:
                return text
        raise TokenizerError(f"could not build a prompt of exactly {n_tokens} tokens with {self.description}")

    def _attempt(self, n: int, rng: np.random.Generator) -> str | None:
        first = self._first or self._next
        words = [first[rng.integers(len(first))]]
        words += [self._next[i] for i in rng.integers(0, len(self._next), size=n - self.special_tokens - 1)]
        for _ in range(16):
            text = " ".join(words)
            c = self.count(text)
            if c == n:
                return text
            if c < n:
                words += [self._next[i] for i in rng.integers(0, len(self._next), size=n - c)]
            elif len(words) > c - n:
                del words[len(words) - (c - n):]
            else:
                return None
        return None


def count_words(text: str) -> int:
    """Prompt tokens of ``text`` for the emulated engines' word tokenizer."""
    return len(text.split())


# The shared prefix is the same text in every campaign (not drawn from the campaign's seed): two campaigns that
# differ only in a knob serve the same prefix.
PREFIX_SEED = 0x5EED


class SharedPrefixPrompts:
    """Prompts whose first ``prefix_tokens`` tokens are the same text in every request (a system prompt or a
    few-shot template), the rest drawn per request by ``prompts``. A prompt of n tokens stays n tokens (the
    length the workload drew, as the server counts it): one no longer than the prefix shares all but its last
    token. With a prefix cache (vLLM's automatic prefix caching) the shared part's full KV blocks are computed
    once, not per request."""

    def __init__(self, prompts: PromptFn, prefix_tokens: int) -> None:
        if prefix_tokens < 1:
            raise ValueError(f"prefix_tokens must be at least 1, got {prefix_tokens}")
        self.prompts, self.prefix_tokens = prompts, prefix_tokens
        self.special_tokens: int = getattr(prompts, "special_tokens", 0)
        self._words = prompts(prefix_tokens, PREFIX_SEED).split()
        self.description = f"{getattr(prompts, 'description', 'word tokenizer')}, {prefix_tokens}-token shared prefix"

    def count(self, text: str) -> int:
        """Tokens in ``text`` as the wrapped prompt maker counts them (words when it has no tokenizer)."""
        counter = getattr(self.prompts, "count", None)
        return counter(text) if counter is not None else count_words(text)

    def __call__(self, n_tokens: int, seed: int) -> str:
        """A prompt of exactly ``n_tokens`` tokens that starts with the shared prefix, the rest drawn from ``seed``."""
        shared = min(self.prefix_tokens, n_tokens - 1) - self.special_tokens  # words of the prefix, >= 1 own token
        if shared < 1:
            return self.prompts(n_tokens, seed)
        lead = " ".join(self._words[:shared])
        for attempt in range(8):
            own = n_tokens - self.count(lead) + self.special_tokens  # the own part's special tokens are not repeated
            text = f"{lead} {self.prompts(own, seed + attempt * 7919)}"
            if self.count(text) == n_tokens:
                return text
        raise TokenizerError(
            f"could not build a prompt of exactly {n_tokens} tokens after the shared prefix with {self.description}"
        )


def prompt_synthesiser(tokenizer: str, shared_prefix_tokens: int = 0) -> PromptFn:
    """``word`` (the emulated engines) or a tokenizer directory / ``tokenizer.json`` path; with
    ``shared_prefix_tokens``, every prompt begins with the same text of that many tokens."""
    if tokenizer == "auto":
        raise TokenizerError("tokenizer `auto` must be resolved to `word` or a path before prompts are built")
    prompts: PromptFn = synth_prompt if tokenizer == "word" else TokenizerPrompts(tokenizer)
    return SharedPrefixPrompts(prompts, shared_prefix_tokens) if shared_prefix_tokens else prompts
