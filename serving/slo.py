"""The latency SLO of campaigns, the deployment's controller and the remote one. A request meets it when its TTFT
and TPOT are at or under the targets: campaigns report the share that do (attainment); controllers keep the
``percentile``-th percentile of recent TTFT and TPOT under them. Imports nothing of ours."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

SLO_FIELDS_ADDED = {"percentile": 95.0}  # added after campaigns were written: left out of their hash at this value


class SLO(BaseModel):
    """Latency targets (TTFT and TPOT, s) and the percentile of recent requests compared with them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttft_s: float = Field(default=1.0, gt=0, allow_inf_nan=False, description="Time-to-first-token target.")
    tpot_s: float = Field(default=0.1, gt=0, allow_inf_nan=False, description="Time-per-output-token target.")
    percentile: float = Field(
        default=95.0, gt=0, lt=100,
        description="Controllers compare this percentile of recent TTFT and TPOT with the targets.",
    )

    def pressure(self, ttft_s: float | None, tpot_s: float | None) -> float | None:
        """Worst latency (at ``percentile``) as a share of its target (1.0 = at the SLO); None without data."""
        ratios = [v / t for v, t in ((ttft_s, self.ttft_s), (tpot_s, self.tpot_s)) if v is not None]
        return max(ratios) if ratios else None

    def met(self, ttft_s: float, tpot_s: float | None) -> bool:
        """Whether one request met both targets (a one-token request has no TPOT)."""
        return ttft_s <= self.ttft_s and (tpot_s is None or tpot_s <= self.tpot_s)
