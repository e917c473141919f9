"""The controller's config (part of a deployment file under ``controller:``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from controllers.policies import policy_names


class ControllerSLO(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttft_s: float = Field(default=2.0, gt=0)
    tpot_s: float = Field(default=0.1, gt=0)


class ControllerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="Run the control loop and its API with the deployment.")
    policy: str = Field(default="static", description="Policy at start-up (switchable through the control API).")
    options: dict[str, float] = Field(default_factory=dict, description="Policy parameters, e.g. setpoint.")
    period_s: float = Field(default=1.0, gt=0, le=600, description="Control period.")
    max_changes_per_min: int = Field(default=12, ge=1, le=600, description="Rate limit on knob changes.")
    heartbeat_lease_s: float = Field(
        default=5.0, gt=0, description="Replicas restore default knobs if the controller is silent this long."
    )
    slo: ControllerSLO = Field(default_factory=ControllerSLO)
    token: str | None = Field(
        default=None, description="Bearer token of the control API; generated and printed once when not given."
    )

    @field_validator("policy")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in policy_names():
            raise ValueError(f"unknown policy {v!r}; known: {', '.join(policy_names())}")
        return v
