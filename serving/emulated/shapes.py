"""Model shapes (architecture numbers only, no weights) and the work one engine iteration does on them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from profilers.errors import ConfigError
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
    kv_dtype_bytes: float | None = Field(
        default=None, gt=0, description="Bytes per KV-cache element; default dtype_bytes (FP8 checkpoints keep bf16)."
    )
    head_dtype_bytes: float | None = Field(
        default=None, gt=0, description="Bytes per embedding / LM-head weight; default dtype_bytes (FP8 keeps bf16)."
    )
    n_experts: int = Field(default=0, ge=0, description="Routed experts per MoE layer (0: a dense model).")
    n_experts_per_token: int = Field(default=0, ge=0, description="Experts each token is routed to.")
    moe_intermediate_size: int = Field(default=0, ge=0, description="Width of one expert's gated MLP.")
    n_moe_layers: int = Field(default=0, ge=0, description="Layers whose MLP is a mixture of experts.")
    shared_expert_intermediate_size: int = Field(default=0, ge=0, description="Always-on shared experts' width.")

    @property
    def head_bytes(self) -> float:
        """Bytes per embedding or LM-head weight (``head_dtype_bytes``, else ``dtype_bytes``)."""
        return self.head_dtype_bytes or self.dtype_bytes

    @property
    def embedding_params(self) -> float:
        """Input embeddings plus an untied LM head (stored in ``head_bytes``)."""
        return self.vocab_size * self.hidden_size + self.lm_head_params if self.architecture == "decoder" else 0.0

    @property
    def weight_bytes(self) -> float:
        """Bytes of all the weights: the body at ``dtype_bytes``, embeddings and LM head at ``head_bytes``."""
        body = max(0.0, self.n_params - self.embedding_params)
        return body * self.dtype_bytes + min(self.n_params, self.embedding_params) * self.head_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        """KV cache bytes one token adds (keys and values of every layer)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * (self.kv_dtype_bytes or self.dtype_bytes)

    @property
    def is_moe(self) -> bool:
        """Whether the model has mixture-of-experts layers."""
        return self.n_experts > 0 and self.n_moe_layers > 0

    @property
    def expert_params(self) -> float:
        """Weights of one routed expert (a gated MLP)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def attention_params_per_layer(self) -> float:
        """Attention projection weights of one layer (Q and O, K and V)."""
        h, q, kv = self.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return 2 * h * q + 2 * h * kv

    @property
    def dense_mlp_params(self) -> float:
        """Weights of one dense MLP (three matrices if gated, else two)."""
        inter = self.intermediate_size or 4 * self.hidden_size
        return (3 if self.gated_mlp else 2) * self.hidden_size * inter

    @property
    def matmul_params_per_layer(self) -> float:
        """Weights a token multiplies in an average layer (for MoE layers: its routed and shared experts)."""
        return self.matmul_params / self.n_layers

    @property
    def shared_params(self) -> float:
        """Weights every token multiplies whatever its routing: attention, dense MLPs, shared experts, routers."""
        dense_layers = self.n_layers - (self.n_moe_layers if self.is_moe else 0)
        moe_fixed = (
            3 * self.hidden_size * self.shared_expert_intermediate_size + self.hidden_size * self.n_experts
        ) if self.is_moe else 0.0
        return (
            self.n_layers * self.attention_params_per_layer
            + dense_layers * self.dense_mlp_params
            + (self.n_moe_layers * moe_fixed if self.is_moe else 0.0)
        )

    @property
    def matmul_params(self) -> float:
        """Weights every token multiplies (embeddings are lookups, the LM head is per sequence); for MoE
        the experts a token is routed to, not all of them."""
        routed = self.n_moe_layers * self.n_experts_per_token * self.expert_params if self.is_moe else 0.0
        return self.shared_params + routed

    @property
    def lm_head_params(self) -> float:
        """Weights of the LM head (decoders only)."""
        return self.vocab_size * self.hidden_size if self.architecture == "decoder" else 0.0

    @property
    def matmul_weight_bytes(self) -> float:
        """Every matmul weight, all experts included: what one iteration reads at most."""
        experts = self.n_moe_layers * self.n_experts * self.expert_params if self.is_moe else 0.0
        return (self.shared_params + experts) * self.dtype_bytes + self.lm_head_params * self.head_bytes

    def weight_bytes_read(self, tokens: int) -> float:
        """Matmul weight bytes an iteration of ``tokens`` tokens reads.

        Dense: all of them. MoE: the shared part, plus the distinct experts the batch touches; with routing
        taken as uniform, a layer's E experts are each missed by all T tokens with probability
        (1 - k/E)^T, so E·(1 - (1 - k/E)^T) are read (few tokens touch few experts; a large batch all).
        """
        fixed, per_expert, miss = self._read_constants
        if not per_expert:
            return fixed
        return fixed + per_expert * (1.0 - miss ** max(0, tokens))

    @cached_property
    def _read_constants(self) -> tuple[float, float, float]:
        """(bytes every iteration reads, bytes of one expert in every MoE layer x E, 1 - k/E): the hot path."""
        if not self.is_moe:
            return self.matmul_weight_bytes, 0.0, 1.0
        fixed = self.shared_params * self.dtype_bytes + self.lm_head_params * self.head_bytes
        experts = self.n_moe_layers * self.n_experts * self.expert_params * self.dtype_bytes
        return fixed, experts, 1.0 - self.n_experts_per_token / self.n_experts

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
        if dtype == self.dtype:
            return self
        return self.model_copy(update={"dtype": dtype, "dtype_bytes": DTYPE_BYTES[dtype]})

    @classmethod
    def from_hf_config(
        cls, cfg: dict, name: str | None = None, dtype_bytes: float | None = None
    ) -> ModelShape:
        """Shape from a HF ``config.json``: Llama/Mistral/Qwen/Mixtral-style decoders (dense or MoE, bf16 or
        FP8 weights), BERT/DistilBERT encoders. Raises :class:`UnshapeableModelError` naming the field for
        architectures the model cannot count (state-space/hybrid layers, latent attention, 4-bit weights)."""
        cfg = dict(cfg.get("text_config") or {}, **{k: v for k, v in cfg.items() if k != "text_config"})
        _refuse_unshapeable(cfg)
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
        dtype = _TORCH_DTYPES.get(
            str(cfg.get("torch_dtype") or cfg.get("dtype") or ("float32" if encoder else "bfloat16")), "bf16"
        )
        moe = {} if encoder else _moe_fields(cfg, layers, inter)
        quantized = _weight_quantization(cfg)
        if encoder:
            # Q, K, V, O and a two-matrix MLP, with biases and two LayerNorms per layer.
            per_layer = 4 * h * h + 4 * h + 2 * h * inter + inter + h + 4 * h
            embed = (vocab + positions + int(cfg.get("type_vocab_size", 0))) * h + 2 * h
            n_params = layers * per_layer + embed
        else:
            attn = h * n_heads * hd + 2 * h * kv * hd + n_heads * hd * h
            dense_layers = layers - moe.get("n_moe_layers", 0)
            mlp = dense_layers * 3 * h * inter
            if moe:
                per_moe = moe["n_experts"] * 3 * h * moe["moe_intermediate_size"]
                per_moe += 3 * h * moe["shared_expert_intermediate_size"] + h * moe["n_experts"]
                mlp += moe["n_moe_layers"] * per_moe
            n_params = (
                layers * (attn + 2 * h) + mlp + vocab * h * (1 if cfg.get("tie_word_embeddings", False) else 2) + h
            )
        if quantized:
            dtype = quantized
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
            # FP8 checkpoints quantize the linear layers only: the KV cache and the embeddings stay bf16.
            kv_dtype_bytes=2.0 if quantized else None,
            head_dtype_bytes=2.0 if quantized else None,
            **moe,
        )


class UnshapeableModelError(ConfigError):
    """A config.json describes an architecture the emulator cannot count; names the field."""


# Fields whose presence means layers the transformer counts here do not describe.
_UNSHAPEABLE_FIELDS = {
    "layers_block_type": "hybrid attention/state-space layers (Mamba-style)",
    "hybrid_override_pattern": "hybrid attention/state-space layers (Mamba-style)",
    "attn_layer_indices": "hybrid attention/state-space layers (Mamba-style)",
    "ssm_cfg": "state-space (Mamba) layers",
    "mamba_d_state": "state-space (Mamba) layers",
    "mamba_expand": "state-space (Mamba) layers",
    "linear_attn_config": "linear-attention layers",
    "full_attention_interval": "hybrid linear/full attention layers",
    "kv_lora_rank": "multi-head latent attention (a compressed KV cache)",
    "rwkv_version": "RWKV recurrent layers",
}
_STANDARD_LAYER_TYPES = {"full_attention", "sliding_attention", "attention"}


def _refuse_unshapeable(cfg: dict) -> None:
    for field, what in _UNSHAPEABLE_FIELDS.items():
        if cfg.get(field) not in (None, [], {}, ""):
            raise UnshapeableModelError(
                f"field {field!r}: {what} cannot be shaped by the emulator, which counts transformer "
                "layers with full or sliding-window attention (dense or mixture-of-experts MLPs)"
            )
    odd = sorted({str(t) for t in cfg.get("layer_types") or []} - _STANDARD_LAYER_TYPES)
    if odd:
        raise UnshapeableModelError(
            f"field 'layer_types': layers of type {odd} cannot be shaped by the emulator "
            f"(it counts {sorted(_STANDARD_LAYER_TYPES)} layers)"
        )
    model_type = str(cfg.get("model_type", ""))
    if any(m in model_type for m in ("mamba", "jamba", "rwkv", "zamba", "falcon_h1")):
        raise UnshapeableModelError(
            f"field 'model_type': {model_type!r} has recurrent/state-space layers the emulator cannot shape"
        )


def _moe_fields(cfg: dict, layers: int, inter: int) -> dict[str, int]:
    """Mixture-of-experts numbers under their Qwen-MoE, Mixtral and DeepSeek names; {} for a dense model."""
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts") or 0)
    if experts <= 1:
        return {}
    per_token = cfg.get("num_experts_per_tok") or cfg.get("num_experts_per_token")
    if not per_token:
        raise UnshapeableModelError(f"field 'num_experts_per_tok': missing for a model with {experts} experts")
    sparse_step = int(cfg.get("decoder_sparse_step") or 1)
    dense = {int(i) for i in cfg.get("mlp_only_layers") or []}
    dense |= set(range(int(cfg.get("first_k_dense_replace") or 0)))
    moe_layers = sum(1 for i in range(layers) if i not in dense and (i + 1) % sparse_step == 0)
    moe_inter = int(cfg.get("moe_intermediate_size") or inter)
    shared = int(cfg.get("shared_expert_intermediate_size") or 0) or int(cfg.get("n_shared_experts") or 0) * moe_inter
    return {
        "n_experts": experts,
        "n_experts_per_token": int(per_token),
        "moe_intermediate_size": moe_inter,
        "n_moe_layers": moe_layers,
        "shared_expert_intermediate_size": shared,
    }


def _weight_quantization(cfg: dict) -> str | None:
    """``fp8`` for FP8 weight checkpoints; None when unquantized; raises for formats not modeled."""
    q = cfg.get("quantization_config")
    if not q:
        return None
    method = str(q.get("quant_method", "")).lower()
    if method in {"fp8", "fbgemm_fp8"}:
        return "fp8"
    if method == "compressed-tensors":
        weights = [g.get("weights") or {} for g in (q.get("config_groups") or {}).values()]
        if weights and all(w.get("type") == "float" and int(w.get("num_bits", 0)) == 8 for w in weights):
            return "fp8"
    raise UnshapeableModelError(
        f"field 'quantization_config.quant_method': {method or q!r} weights are not modeled "
        "(supported: unquantized and FP8: fp8, fbgemm_fp8, compressed-tensors float8)"
    )


class WorkConstants(NamedTuple):
    """A model's per-token coefficients, precomputed once for :func:`count_rows` on the hot path."""

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
        """All MACs of the share: weight and attention MACs."""
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
    """Operations and bytes of one request's share of an iteration."""
    return WorkCounts(w.new_tokens, *count_rows(model.work_constants, [(w.new_tokens, w.context_tokens)])[0])
