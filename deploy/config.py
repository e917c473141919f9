"""Reading YAML configs with errors that name the file, the field and what is allowed."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from controllers.config import ControllerConfig
from profilers.errors import ConfigError, TestbedError
from serving.config import ServingConfig
from serving.knobs import ClockMHz, NumSeqs
from workloads.spec import CampaignSpec

M = TypeVar("M", bound=BaseModel)


class DeploymentError(TestbedError, RuntimeError):
    """The deployment cannot start as configured (the message says what to change)."""


class DeploymentConfig(ServingConfig):
    """A serving deployment with its controller."""

    controller: ControllerConfig = Field(default_factory=ControllerConfig)


class EngineVariant(BaseModel):
    """One device (or engine setting) of a hardware comparison: fields replace the deployment's engine's."""

    model_config = ConfigDict(extra="forbid")

    label: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$", description="Default: the device.")
    device: str = Field(description="Device preset name or path of a preset YAML.")
    dtype: str | None = Field(default=None, description="Operand type on this device, e.g. int8 for CIM.")
    model: str | None = None
    clock_mhz: ClockMHz | None = None
    max_num_seqs: NumSeqs | None = None
    replicas: int | None = Field(default=None, ge=1, description="Replicas of this entry (default: the deployment's).")

    @property
    def name(self) -> str:
        """The variant's label in results: its ``label``, else the device preset's name."""
        return self.label or Path(self.device).stem


class PathLatency(BaseModel):
    """What the real serving path adds to a request that the engine model does not; a virtual-time run adds
    it so its latencies are those a client of a real-time run measures. Each request draws its two delays
    from log-normal distributions (median, shape ``sigma``; 0 makes them constant), seeded by the request.
    Defaults: the testbed's own path (its raw HTTP client, uvicorn front door, router, replica channel) on a
    shared 2-core host with nothing else running (the quickstart's 2 and 8 req/s, host load < 1;
    ``python bench/real_path_latency.py`` prints these four values); re-measure for another host, a loaded one or
    another deployment, or set the medians to 0 to simulate the engines alone."""

    model_config = ConfigDict(extra="forbid")

    request_latency_s: float = Field(
        default=0.0013, ge=0, le=10,
        description="Median, client send to engine admission: HTTP request, front door, router, Ray actor call.",
    )
    response_latency_s: float = Field(
        default=0.0014, ge=0, le=10,
        description="Median, a token's modeled emission to the client reading it: the engine's timer overshoot, "
        "Ray streaming, front door SSE, client parsing. Shifts every token of the request (TPOT unchanged).",
    )
    request_sigma: float = Field(default=0.23, ge=0, le=3, description="Log-normal shape of the request latency.")
    response_sigma: float = Field(default=0.29, ge=0, le=3, description="Log-normal shape of the response latency.")

    def draw(self, key: str) -> tuple[float, float]:
        """(request, response) latency of the request ``key``: reproducible, independent of arrival order."""
        rng = random.Random(key)
        return (
            self.request_latency_s * math.exp(self.request_sigma * rng.gauss()),
            self.response_latency_s * math.exp(self.response_sigma * rng.gauss()),
        )


class CampaignFile(CampaignSpec):
    """A campaign plus the deployment to start for it (ignored with ``--url``)."""

    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)
    clock: Literal["real", "virtual"] = Field(
        default="real",
        description="real: serve over Ray and HTTP and sleep the modeled time; virtual: simulate the same "
        "engines and router in-process on a discrete-event clock (emulated engines only).",
    )
    virtual: PathLatency = Field(
        default_factory=PathLatency,
        description="clock: virtual only: the latency of the real serving path, added to each request.",
    )
    workers: int = Field(
        default=1, ge=0,
        description="clock: virtual only: points simulated at once, each a Ray task building its own replicas "
        "(1: one after the other in this process; 0: one per CPU the Ray cluster has as each point ends). Same rows "
        "either way.",
    )
    ray_address: str | None = Field(
        default=None,
        description="clock: virtual only: the Ray cluster (host:port) whose workers simulate the points (default: "
        "a local Ray when workers is not 1). Checked before anything runs.",
    )
    compare: list[EngineVariant] | None = Field(
        default=None, min_length=1,
        description="Run the campaign once per entry (results in OUT/<label>/), compared side by side.",
    )


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in get_args(annotation) for m in _models_in(a)]


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names of the model that holds the key at ``loc`` (its parent path)."""
    candidates = [model]
    for part in loc[:-1]:
        if not isinstance(part, str):
            continue
        nxt = []
        for m in candidates:
            if part in m.model_fields:
                nxt.extend(_models_in(m.model_fields[part].annotation))
            else:
                nxt.extend(c for c in candidates if c.__name__.lower().startswith(part.lower()))
        candidates = nxt or candidates
    keys = sorted({k for m in candidates for k in m.model_fields})
    return keys or None


def format_validation_error(path: Path, model: type[BaseModel], err: ValidationError) -> str:
    """A readable message for a config that failed validation: one line per problem, allowed keys for unknown ones."""
    lines = [f"{path}: invalid {model.__name__} ({err.error_count()} problem(s))"]
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc)
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"  {where}: unknown key{hint}")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
            lines.append(f"  {where}: {e['msg']}{shown}")
    return "\n".join(lines)


def load_yaml_model(path: Path, model: type[M]) -> M:
    """Load a YAML file into ``model``; ConfigError with a readable message when unreadable or invalid."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text (YAML) file: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(path, model, e)) from e


def load_serving_config(path: Path) -> DeploymentConfig:
    """A deployment config, or the ``deployment:`` section of a campaign file."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError):  # load_yaml_model below says what is wrong
        data = {}
    if isinstance(data, dict) and "deployment" in data:
        return load_yaml_model(path, CampaignFile).deployment
    return load_yaml_model(path, DeploymentConfig)
