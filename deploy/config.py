"""Reading YAML configs with errors that name the file, the field and what is allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError

from controllers.config import ControllerConfig
from serving.config import ServingConfig
from workloads.spec import CampaignSpec

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file that cannot be used; the message is meant for the user as it is."""


class DeploymentConfig(ServingConfig):
    """A serving deployment with its controller."""

    controller: ControllerConfig = Field(default_factory=ControllerConfig)


class CampaignFile(CampaignSpec):
    """A campaign plus the deployment to start for it (ignored with ``--url``)."""

    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)


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
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from e
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
    except (OSError, yaml.YAMLError):
        data = {}
    if isinstance(data, dict) and "deployment" in data:
        return load_yaml_model(path, CampaignFile).deployment
    return load_yaml_model(path, DeploymentConfig)
