"""A hardware comparison: the same campaign on several emulated devices, side by side."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from deploy.config import CampaignFile, ConfigError, EngineVariant
from profilers.reference import ReferenceEstimate
from serving.config import ServingConfig
from workloads.results import FloorFn, ReferenceFn

COMPARE_COLUMNS = {
    "device": "device",
    "offered_rps": "offered req/s",
    "output_tokens_per_s": "out tok/s",
    "energy_per_token_j": "J/token",
    "x_floor": "x floor",
    "mean_power_w": "mean W",
    "ttft_p99_s": "TTFT p99 s",
    "tpot_p99_s": "TPOT p99 s",
    "e2e_p99_s": "E2E p99 s",
    "slo_attainment": "SLO",
    "failed": "failed",
    "calibration": "calibration",
}


def variant_spec(spec: CampaignFile, variant: EngineVariant) -> CampaignFile:
    """The campaign with the deployment's engine (and replica count) changed as ``variant`` says (validated)."""
    updates = variant.model_dump(exclude={"label", "replicas"}, exclude_none=True)
    engine = {**spec.deployment.engine.model_dump(), **updates}
    data = spec.model_dump()
    data["deployment"]["engine"] = engine
    if variant.replicas is not None:
        data["deployment"]["replicas"] = variant.replicas
    data["compare"] = None
    try:
        return CampaignFile.model_validate(data)
    except ValueError as e:
        raise ConfigError(f"compare entry {variant.name!r}: {e}") from e


def run_comparison(
    spec: CampaignFile, out: Path, run_one: Callable[[CampaignFile, Path], pd.DataFrame], console: Console
) -> pd.DataFrame:
    """Run ``run_one`` per variant into ``out/<label>``; write and print ``out/compare.csv``."""
    assert spec.compare is not None
    names = [v.name for v in spec.compare]
    if len(set(names)) != len(names):
        raise ConfigError(f"compare: labels must be unique (got {names}); set `label:` on repeated devices")
    frames = []
    for variant in spec.compare:
        sub = variant_spec(spec, variant)
        console.rule(f"{variant.name}: {sub.deployment.engine.device} / {sub.deployment.engine.model}")
        points = run_one(sub, out / variant.name)
        frames.append(points.assign(device=variant.name))
    table = pd.concat(frames, ignore_index=True)
    table.to_csv(out / "compare.csv", index=False)
    print_comparison(console, table)
    return table


def model_reference(config: ServingConfig) -> ReferenceFn | None:
    """EcoLogits' estimate for the served model's shape (emulated engines: the shape the engine models), to show
    beside ours; None where the shape is not known here (real engines) or ecologits is not installed."""
    from profilers.reference import ecologits_estimate, ecologits_version
    from serving.emulated.physics import load_model_shape

    engine = config.engine
    if engine.kind != "emulated" or ecologits_version() is None:
        return None
    model = load_model_shape(engine.model, engine.dtype)
    inactive = (model.n_moe_layers * (model.n_experts - model.n_experts_per_token) * model.expert_params
                if model.is_moe else 0.0)

    def reference(output_tokens: int, e2e_s: float, pue: float) -> ReferenceEstimate | None:
        return ecologits_estimate(model.n_params - inactive, model.n_params, output_tokens, e2e_s, pue)

    return reference


def device_floor(config: ServingConfig) -> FloorFn | None:
    """The emulated device's floor of joules per output token for mean (prompt, output) lengths, over every
    setting of the device (any batch, clock, speculation): no point can beat it. None for real engines."""
    from serving.emulated.physics import energy_floor_per_token, load_device, load_model_shape

    engine = config.engine
    if engine.kind != "emulated":
        return None
    device, model = load_device(engine.device), load_model_shape(engine.model, engine.dtype)

    def floor(prompt_tokens: int, output_tokens: int) -> float:
        return energy_floor_per_token(device, model, prompt_tokens, output_tokens,
                                      tensor_parallel=engine.tensor_parallel).joules_per_token

    return floor


def print_comparison(console: Console, table: pd.DataFrame) -> None:
    """Print a hardware comparison table (one row per device or backend) to the console."""
    view = Table(title="Hardware comparison")
    for label in COMPARE_COLUMNS.values():
        view.add_column(label, justify="right")
    for _, row in table.iterrows():
        view.add_row(
            *[f"{v:.4g}" if isinstance(v := row.get(c, ""), float) else str(v) for c in COMPARE_COLUMNS]
        )
    console.print(view)
