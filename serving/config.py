"""Typed configs of the serving deployment (readable from YAML, validated with bounds)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EmulatedEngineConfig(BaseModel):
    """An emulated device in real time: iterations take the modeled time, energy is modeled exactly."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(default="emulated", pattern="^emulated$")
    device: str = Field(default="h100_sxm", description="Device preset name or path of a preset YAML.")
    model: str = Field(default="llama-3.1-8b", description="Model shape name or path of a HF config.json.")
    dtype: str | None = Field(
        default=None, pattern="^(bf16|fp16|fp32|int8)$",
        description="Operand type to emulate (e.g. int8 for CIM devices); default: the config's torch_dtype.",
    )
    max_model_len: int = Field(default=4096, gt=0, le=1_048_576, description="Context length in tokens.")
    max_num_seqs: int = Field(default=256, gt=0, le=4096, description="Batch cap (concurrent sequences).")
    max_num_batched_tokens: int = Field(default=8192, gt=0, description="Token budget of one iteration.")
    clock_mhz: float | None = Field(default=None, gt=0, description="Start clock; default is the maximum.")
    seed: int = 0


class ServingConfig(BaseModel):
    """A deployment: replicas of one engine behind an OpenAI-compatible front door."""

    model_config = ConfigDict(extra="forbid")

    served_model_name: str | None = Field(default=None, description="Name clients use; default: engine.model.")
    replicas: int = Field(default=2, ge=1, le=64)
    engine: EmulatedEngineConfig = Field(default_factory=EmulatedEngineConfig)
    router: str = Field(default="least_outstanding", pattern="^(round_robin|least_outstanding)$")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535, description="0 picks a free port.")
    site: str = Field(default="azure", description="Site profile for water and carbon metrics.")
    num_cpus_per_replica: float = Field(default=0.5, gt=0, description="Ray CPUs reserved per replica actor.")
    ray_address: str | None = Field(default=None, description="Attach to this Ray cluster instead of a local one.")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.engine.model
