"""A reference beside our figure: EcoLogits (GenAI Impact), an estimator of a request's energy from the model's
parameter count and its output tokens, fitted on ML.ENERGY-style measurements, run offline as a library.

Their estimate, not ours: it knows nothing of our devices, batch or clocks. ``request_energy`` (kWh) is theirs
with the site's PUE: the GPUs' energy (``gpu_required_count x gpu_energy``) plus their server's share
(1.2 kW per 8-GPU server over the generation latency, divided by their batch of 64), times PUE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from profilers.footprint import J_PER_KWH


@dataclass(frozen=True)
class ReferenceEstimate:
    """EcoLogits' estimate of one request's energy, kept apart from ours and labelled as theirs."""

    request_j: float
    """Their energy of one request, PUE included (their comprehensive-like boundary)."""
    gpu_j: float
    """Their GPUs' share of it, before PUE (their accelerator boundary)."""
    output_tokens: int
    label: str

    @property
    def j_per_token(self) -> float:
        """Their energy per output token, PUE included (J)."""
        return self.request_j / self.output_tokens if self.output_tokens > 0 else math.nan

    @property
    def gpu_j_per_token(self) -> float:
        """Their GPUs' energy per output token, before PUE (J)."""
        return self.gpu_j / self.output_tokens if self.output_tokens > 0 else math.nan


def ecologits_version() -> str | None:
    """The installed EcoLogits version, or None where it is not installed."""
    try:
        import ecologits
    except ImportError:
        return None
    return str(ecologits.__version__)


def ecologits_estimate(
    active_params: float, total_params: float, output_tokens: int, request_latency_s: float, pue: float
) -> ReferenceEstimate | None:
    """EcoLogits' energy of a request of ``output_tokens`` from a model of ``active_params`` / ``total_params``
    parameters (counts, not billions) that took ``request_latency_s``; None where ecologits is not installed.

    Their figures are ranges where the parameter count is; a single count gives a single value."""
    version = ecologits_version()
    if version is None or output_tokens <= 0:
        return None
    from ecologits.impacts.llm import compute_llm_impacts_dag

    res = compute_llm_impacts_dag(
        model_active_parameter_count=active_params / 1e9, model_total_parameter_count=total_params / 1e9,
        output_token_count=float(output_tokens),
        request_latency=request_latency_s if math.isfinite(request_latency_s) else math.inf,
        if_electricity_mix_adpe=0.0, if_electricity_mix_pe=0.0, if_electricity_mix_gwp=0.0,
        if_electricity_mix_wue=0.0, datacenter_pue=pue, datacenter_wue=0.0,
    )
    gpu = float(res["gpu_energy"]) * float(res["gpu_required_count"])
    return ReferenceEstimate(
        request_j=float(res["request_energy"]) * J_PER_KWH, gpu_j=gpu * J_PER_KWH, output_tokens=output_tokens,
        label=f"EcoLogits {version} estimate (GenAI Impact; their model, not ours)",
    )
