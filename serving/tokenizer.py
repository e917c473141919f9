"""The emulated engines' tokenizer: one token per whitespace-separated word.

Emulated devices model cost from token counts only, so a word tokenizer keeps counts exact and
predictable for load generators (``n`` words in, ``n`` prompt tokens counted).
"""

from __future__ import annotations

import zlib

VOCAB = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have "
    "an they you were her she there one all we their been has when who will more no if out so said what "
    "up its about into than them can only other new some time could these two may then do first any my "
    "now such like our over man me even most made after also did many before must through back years "
).split()


class WordTokenizer:
    """Toy tokenizer of the emulated engine: one token per whitespace-separated word."""

    vocab_size = len(VOCAB)

    def encode(self, text: str) -> list[int]:
        """Token ids of the text's words (a stable hash into the vocabulary)."""
        return [zlib.crc32(w.encode()) % self.vocab_size for w in text.split()]

    def decode_one(self, token_id: int) -> str:
        """The text of one token id: its word and a space."""
        return VOCAB[token_id % self.vocab_size] + " "


def render_chat(messages: list[dict[str, str]]) -> str:
    """A plain chat template: role markers as words, so they count as prompt tokens like real templates."""
    parts = [f"<|{m['role']}|> {m['content']}" for m in messages]
    parts.append("<|assistant|>")
    return " ".join(parts)
