"""Campaign specification: workload, SLO and sweep (validated; the same schema from YAML and Python)."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, model_validator

from workloads.arrivals import Arrival, LengthDistribution, LogNormalLength, PoissonArrivals, UniformLength


class WorkloadSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arrival: Arrival = Field(default_factory=PoissonArrivals)
    prompt_tokens: LengthDistribution = Field(
        default_factory=lambda: LogNormalLength(median=256, sigma=0.6, min=8, max=2048)
    )
    output_tokens: LengthDistribution = Field(default_factory=lambda: UniformLength(low=16, high=128))
    duration_s: float = Field(default=20.0, gt=0, le=86_400, description="Sending window of each point.")
    warmup_s: float = Field(
        default=0.0, ge=0, description="Requests sent before this are excluded from latency and energy figures."
    )
    cooldown_s: float = Field(
        default=0.0, ge=0, description="Requests sent in the last cooldown_s seconds are excluded likewise."
    )
    sample_interval_s: float = Field(default=1.0, gt=0, le=60, description="Power/clock time-series period.")
    max_concurrency: int | None = Field(default=None, gt=0, description="Cap on requests in flight.")
    request_timeout_s: float = Field(default=300.0, gt=0)


    @model_validator(mode="after")
    def _steady_window(self) -> WorkloadSpec:
        if self.warmup_s + self.cooldown_s >= self.duration_s:
            raise ValueError(
                f"warmup_s + cooldown_s ({self.warmup_s + self.cooldown_s:g}) must be shorter than "
                f"duration_s ({self.duration_s:g})"
            )
        return self


class SLO(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttft_s: float = Field(default=1.0, gt=0, description="Time-to-first-token target.")
    tpot_s: float = Field(default=0.1, gt=0, description="Time-per-output-token target.")


class Sweep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rate_rps: list[PositiveFloat] = Field(min_length=1, description="Offered request rates, one point each.")


class CampaignSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="campaign", min_length=1)
    seed: int = Field(default=0, ge=0)
    site: str = Field(default="azure", description="Site profile (azure, aws, deepseek or a YAML path).")
    model: str | None = Field(default=None, description="Model name to request; default: the server's first.")
    workload: WorkloadSpec = Field(default_factory=WorkloadSpec)
    slo: SLO = Field(default_factory=SLO)
    sweep: Sweep

    def config_hash(self) -> str:
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
