"""Model shapes (architecture numbers only, no weights) and the work one engine iteration does on them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from serving.emulated.technology import DTYPE_BYTES

_TORCH_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int8": "int8"}
# DistilBERT's config.json uses its own key names for the same numbers.
_ALIASES = {
    "hidden_size": ("hidden_size", "dim", "d_model"),
    "num_hidden_layers": ("num_hidden_layers", "n_layers", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_heads"),
    "intermediate_size": ("intermediate_size", "hidden_dim", "ffn_dim"),
}


def _get(cfg: dict, key: str, default: object = None) -> object:
    for alias in _ALIASES.get(key, (key,)):
        if alias in cfg:
            return cfg[alias]
    if default is None:
        raise ValueError(f"config.json has no {key!r} (looked for {', '.join(_ALIASES.get(key, (key,)))})")
    return default


class ModelShape(BaseModel):
    """A transformer's shape: enough to count its operations, bytes and KV cache."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    n_params: float = Field(gt=0, description="All parameters, embeddings included.")
    n_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    n_heads: int = Field(gt=0)
    n_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    dtype_bytes: float = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)
    intermediate_size: int = Field(default=0, ge=0, description="MLP width; 0 means 4 x hidden_size.")
    gated_mlp: bool = Field(default=True, description="SwiGLU (3 matrices) or a plain MLP (2).")
    architecture: Literal["decoder", "encoder"] = "decoder"
    dtype: str = Field(default="bf16", description="Operand type of weights and activations.")

    @property
    def weight_bytes(self) -> float:
        return self.n_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def matmul_params_per_layer(self) -> float:
        h, q, kv = self.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        inter = self.intermediate_size or 4 * h
        return 2 * h * q + 2 * h * kv + (3 if self.gated_mlp else 2) * h * inter

    @property
    def matmul_params(self) -> float:
        """Weights every token multiplies (embeddings are lookups, the LM head is per sequence)."""
        return self.n_layers * self.matmul_params_per_layer

    @property
    def lm_head_params(self) -> float:
        return self.vocab_size * self.hidden_size if self.architecture == "decoder" else 0.0

    @property
    def matmul_weight_bytes(self) -> float:
        return (self.matmul_params + self.lm_head_params) * self.dtype_bytes

    @cached_property
    def work_constants(self) -> WorkConstants:
        """Per-token coefficients of :func:`count_work`, computed once per shape (hot path)."""
        inter = self.intermediate_size or 4 * self.hidden_size
        return WorkConstants(
            matmul_params=self.matmul_params,
            lm_head_params=self.lm_head_params,
            kv_bytes_per_token=self.kv_bytes_per_token,
            attn_coef=2.0 * self.n_layers * self.n_heads * self.head_dim,
            act_coef=self.dtype_bytes * self.n_layers * (6 * self.hidden_size + 2 * inter),
            encoder=self.architecture == "encoder",
        )

    def with_dtype(self, dtype: str) -> ModelShape:
        """The same model quantized or cast to ``dtype`` (e.g. INT8 for CIM devices)."""
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(DTYPE_BYTES)}")
        return self.model_copy(update={"dtype": dtype, "dtype_bytes": DTYPE_BYTES[dtype]})

    @classmethod
    def from_hf_config(
        cls, cfg: dict, name: str | None = None, dtype_bytes: float | None = None
    ) -> ModelShape:
        """Shape from a HF ``config.json``: Llama/Mistral/Qwen decoders, BERT/DistilBERT encoders."""
        h = int(_get(cfg, "hidden_size"))  # type: ignore[arg-type]
        n_heads = int(_get(cfg, "num_attention_heads"))  # type: ignore[arg-type]
        layers = int(_get(cfg, "num_hidden_layers"))  # type: ignore[arg-type]
        inter = int(_get(cfg, "intermediate_size", 4 * h))  # type: ignore[arg-type]
        model_type = str(cfg.get("model_type", ""))
        encoder = model_type in {"bert", "distilbert", "roberta", "albert", "electra"} or any(
            a.endswith(("ForMaskedLM", "ForSequenceClassification")) and "Causal" not in a
            for a in cfg.get("architectures", [])
        )
        kv = int(cfg.get("num_key_value_heads") or n_heads)
        hd = int(cfg.get("head_dim") or h // n_heads)
        vocab = int(cfg["vocab_size"])
        positions = int(cfg.get("max_position_embeddings", 4096))
        dtype = _TORCH_DTYPES.get(str(cfg.get("torch_dtype", "float32" if encoder else "bfloat16")), "bf16")
        if encoder:
            # Q, K, V, O and a two-matrix MLP, with biases and two LayerNorms per layer.
            per_layer = 4 * h * h + 4 * h + 2 * h * inter + inter + h + 4 * h
            embed = (vocab + positions + int(cfg.get("type_vocab_size", 0))) * h + 2 * h
            n_params = layers * per_layer + embed
        else:
            per_layer = h * n_heads * hd + 2 * h * kv * hd + n_heads * hd * h + 3 * h * inter + 2 * h
            n_params = (
                layers * per_layer + vocab * h * (1 if cfg.get("tie_word_embeddings", False) else 2) + h
            )
        return cls(
            name=name or str(cfg.get("_name_or_path") or model_type or "model"),
            n_params=float(n_params),
            n_layers=layers,
            hidden_size=h,
            n_heads=n_heads,
            n_kv_heads=kv,
            head_dim=hd,
            vocab_size=vocab,
            dtype_bytes=dtype_bytes or DTYPE_BYTES[dtype],
            max_position_embeddings=positions,
            intermediate_size=inter,
            gated_mlp=not encoder,
            architecture="encoder" if encoder else "decoder",
            dtype=dtype,
        )


class WorkConstants(NamedTuple):
    matmul_params: float
    lm_head_params: float
    kv_bytes_per_token: float
    attn_coef: float
    act_coef: float
    encoder: bool


@dataclass(frozen=True)
class SequenceWork:
    """What one request does in one iteration."""

    request_id: str
    new_tokens: int
    """Prompt tokens prefilled (a chunk), 1 for a decode step, or the whole sequence for an encoder."""
    context_tokens: int
    """Tokens already in the KV cache before this iteration."""
    is_prefill: bool


@dataclass(slots=True)  # not frozen: building a frozen one costs 2 us more, per iteration in virtual time
class WorkCounts:
    """Operations and bytes of one request's share of an iteration (weights streamed are counted apart)."""

    tokens: int
    weight_macs: float
    """Activation x weight MACs (the dense layers and, for decoders, the LM head of the last token)."""
    attn_macs: float
    """Activation x activation MACs (QK^T and attention x V)."""
    kv_bytes: float
    """KV cache read and written (decoders keep it in memory between iterations)."""
    act_bytes: float
    """Activations passed between layers through on-chip buffers."""

    @property
    def macs(self) -> float:
        return self.weight_macs + self.attn_macs

    def __add__(self, other: WorkCounts) -> WorkCounts:
        return WorkCounts(
            self.tokens + other.tokens,
            self.weight_macs + other.weight_macs,
            self.attn_macs + other.attn_macs,
            self.kv_bytes + other.kv_bytes,
            self.act_bytes + other.act_bytes,
        )


ZERO_WORK = WorkCounts(0, 0.0, 0.0, 0.0, 0.0)


Counts = tuple[float, float, float, float]
"""(weight MACs, attention MACs, KV bytes, activation bytes)."""


def count_rows(c: WorkConstants, items: list[tuple[int, int]]) -> list[Counts]:
    """The counts of each ``(new tokens, context tokens)`` item of an iteration (one pass: the hot path)."""
    mp, lm, kvt, ac, acc = c.matmul_params, c.lm_head_params, c.kv_bytes_per_token, c.attn_coef, c.act_coef
    if c.encoder:
        # Bidirectional attention over the whole sequence, no cache, no LM head.
        return [(mp * n, ac * n * n, 0.0, acc * n) for n, _ in items]
    # Causal: query i sees ctx + i keys. vLLM computes logits only for the last position of a sequence.
    return [(mp * n + lm, ac * n * (ctx + (n + 1) / 2), kvt * (ctx + n), acc * n) for n, ctx in items]


def count_work(model: ModelShape, w: SequenceWork) -> WorkCounts:
    return WorkCounts(w.new_tokens, *count_rows(model.work_constants, [(w.new_tokens, w.context_tokens)])[0])
