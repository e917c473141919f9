"""The controller's config (part of a deployment file under ``controller:``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from controllers.policies import build_policy, policy_names
from serving.slo import SLO


class ControllerConfig(BaseModel):
    """The ``controller:`` section of a deployment: policy, its options, control period, rate limit, SLO, API token."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="Run the control loop and its API with the deployment.")
    policy: str = Field(default="static", description="Policy at start-up (switchable through the control API).")
    options: dict[str, float | str] = Field(
        default_factory=dict, description="Policy parameters, e.g. setpoint, or profile (a knob sweep's points.csv)."
    )
    period_s: float = Field(default=1.0, gt=0, le=600, description="Control period.")
    max_changes_per_min: int = Field(default=12, ge=1, le=600, description="Rate limit on knob changes.")
    heartbeat_lease_s: float = Field(
        default=5.0, gt=0, description="Replicas restore default knobs if the controller is silent this long."
    )
    slo: SLO = Field(default_factory=SLO)
    token: str | None = Field(
        default=None, description="Bearer token of the control API; generated and printed once when not given."
    )
    node_agents: list[str] = Field(
        default_factory=list,
        description="URLs of DVFS node agents that lock GPU clocks (token: TESTBED_NODE_AGENT_TOKEN).",
    )

    @field_validator("policy")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in policy_names():
            raise ValueError(f"unknown policy {v!r}; known: {', '.join(policy_names())}")
        return v

    @model_validator(mode="after")
    def _buildable(self) -> ControllerConfig:
        # Bad options (a missing profile file, an unknown parameter) fail when the file is read, not later.
        build_policy(self.policy, self.slo, **self.options)
        return self
