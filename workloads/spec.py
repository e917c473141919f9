"""Campaign specification: workload, SLO and sweep (validated; the same schema from YAML and Python)."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.knobs import Knobs
from serving.slo import SLO, SLO_FIELDS_ADDED
from workloads.arrivals import (
    Arrival,
    ClosedLoopArrivals,
    LengthDistribution,
    LogNormalLength,
    PoissonArrivals,
    RateProfile,
    TraceLength,
    UniformLength,
)

# Fields added after campaigns were first written (workload, and each pinned knob setting), with the value that
# means "as before": left out of the config hash at that value, so a run directory started before them resumes.
ADDED_FIELDS = {"shared_prefix_tokens": 0}
ADDED_KNOB_FIELDS = {"prefix_caching": None}
ADDED_DEPLOYMENT_FIELDS = {
    "front_door": "separate", "door": None, "channel_host": None, "heartbeat_s": 1.0, "replica_deadline_s": 10.0,
}
ADDED_ENGINE_FIELDS = {"tensor_parallel": 1}
"""Engine fields added after campaigns were written, with the value they had implicitly (see config_hash)."""
ADDED_CAMPAIGN_FIELDS = {"metering": None}
ADDED_COMPARE_FIELDS = {"replicas": None}
"""Fields of a ``compare:`` entry (``deploy.config.EngineVariant``) added later, at their "as before" value."""
"""Top-level campaign fields added later, with the value that means "as before" (see config_hash)."""


def _http_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{url!r} is not an http(s) URL (e.g. http://node:9400/metrics)")
    return url


class MeteringSpec(BaseModel):
    """Where a ``--url`` campaign reads energy and tokens, when not from the target's own ``/metrics``
    (the same as ``campaign run``'s ``--energy-metrics``, ``--token-metrics``, ``--energy-family``,
    ``--token-family``; flags given on the command line replace the file's)."""

    model_config = ConfigDict(extra="forbid")

    energy_metrics: list[str] = Field(
        default_factory=list, description="Prometheus text endpoints with energy counters (testbed meter, "
        "dcgm-exporter, Kepler), scraped at the window's edges.",
    )
    token_metrics: list[str] = Field(
        default_factory=list, description="Endpoints with generated-token counters (vLLM, SGLang, TGI, ours); "
        "none: the clients' usage counts.",
    )
    energy_family: Literal["ours", "dcgm", "kepler_node", "kepler_container"] | None = Field(
        default=None, description="Which energy family to use where the endpoints expose more than one.",
    )
    token_family: Literal["ours", "vllm", "sglang", "tgi"] | None = Field(
        default=None, description="Which token family to use where the endpoints expose more than one.",
    )

    energy_series: str | None = Field(
        default=None, min_length=1, description="Regular expression the energy series' keys (replica/device: "
        "Hostname/gpu0 for DCGM, pod/container for Kepler containers, node/gpu1 for the meter) must match in full: "
        "the devices or containers of the served model, out of all a node exporter reports.",
    )
    prometheus: str | None = Field(
        default=None, description="Read the window's energy and tokens through this Prometheus (its base URL) "
        "instead of scraping: the counters' increase between the window's own start and end times.",
    )
    energy_query: str | None = Field(
        default=None, min_length=1, description="PromQL instant vector of energy counters in joules (default: "
        "llm_energy_energy_joules_total); with prometheus only.",
    )
    token_query: str | None = Field(
        default=None, min_length=1, description="PromQL instant vector of generated-token counters (default: "
        'llm_energy_tokens_total{kind="generated"}); with prometheus only.',
    )

    @field_validator("energy_metrics", "token_metrics")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        return [_http_url(u) for u in urls]

    @field_validator("energy_series")
    @classmethod
    def _regex(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{pattern!r} is not a regular expression: {e}") from e
        return pattern

    @field_validator("prometheus")
    @classmethod
    def _prom_url(cls, url: str | None) -> str | None:
        return None if url is None else _http_url(url)

    @model_validator(mode="after")
    def _one_way(self) -> MeteringSpec:
        if (self.energy_query or self.token_query) and not self.prometheus:
            raise ValueError("energy_query and token_query are PromQL: they need prometheus (its URL)")
        if self.energy_series and not self.energy_metrics:
            raise ValueError("energy_series selects among energy_metrics endpoints' series: give them")
        if self.energy_family and not self.energy_metrics:
            raise ValueError("energy_family chooses among energy_metrics endpoints: give them (--energy-metrics)")
        if self.token_family and not self.token_metrics:
            raise ValueError("token_family chooses among token_metrics endpoints: give them (--token-metrics)")
        if self.prometheus and (self.energy_metrics or self.token_metrics or self.energy_family or self.token_family):
            raise ValueError("prometheus reads energy and tokens itself: drop energy_metrics/token_metrics and the "
                             "families (or drop prometheus and scrape the endpoints directly)")
        return self


# Bounds on the load a point may ask for: beyond them a typo (1e9 req/s, .inf) would grow the schedule's memory
# without bound before the first request is sent. A point's requests are built up front, ~1 KB each.
MAX_RATE_RPS = 100_000.0
MAX_USERS = 100_000
MAX_REQUESTS_PER_POINT = 10_000_000
RateRps = Annotated[float, Field(gt=0, le=MAX_RATE_RPS, allow_inf_nan=False)]
Users = Annotated[int, Field(ge=1, le=MAX_USERS)]


class WorkloadSpec(BaseModel):
    """How requests are generated: arrivals, prompt and output lengths, sending window, warm-up, cool-down, prompts."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

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
    client_processes: int = Field(
        default=1, ge=0, le=64,
        description="Load-generator processes fed one schedule (0: in the campaign process; more for > 1,000 req/s).",
    )
    request_timeout_s: float = Field(default=300.0, gt=0, le=86_400)
    shared_prefix_tokens: int = Field(
        default=0, ge=0, le=1_048_576,
        description="The first this-many tokens of every prompt are the same text (a system prompt, a few-shot "
        "template), within the drawn prompt length: what a prefix cache saves. 0: every prompt is its own.",
    )
    tokenizer: str = Field(
        default="auto", min_length=1,
        description="Whose tokens prompt lengths count: word (the emulated engines' one token per word), a "
        "local tokenizer directory or tokenizer.json (a vLLM model's), or auto: the model directory of the "
        "vLLM deployment the campaign starts, word otherwise.",
    )

    @model_validator(mode="after")
    def _steady_window(self) -> WorkloadSpec:
        if self.warmup_s + self.cooldown_s >= self.duration_s:
            raise ValueError(
                f"warmup_s + cooldown_s ({self.warmup_s + self.cooldown_s:g}) must be shorter than "
                f"duration_s ({self.duration_s:g})"
            )
        if isinstance(self.arrival, RateProfile):
            self.arrival.shape_mean(self.duration_s)  # raises if the profile is 0 over the whole point
        for dist, column in ((self.prompt_tokens, "prompt"), (self.output_tokens, "output")):
            if isinstance(dist, TraceLength) and dist.column is None:
                dist.column = column
        return self


class PolicySetting(BaseModel):
    """A controller policy to compare in a sweep, with its options."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    policy: str = Field(min_length=1, description="A policy the target's controller knows, e.g. slo_feedback.")
    options: dict[str, float | str] = Field(default_factory=dict)


class Sweep(BaseModel):
    """Points are every setting (knobs, then policies; none: the deployment as it is) at every load: the offered
    request rates of an open-loop workload, or the numbers of users of a closed-loop one."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    rate_rps: list[RateRps] = Field(
        default_factory=list, description=f"Offered request rates, one point each (at most {MAX_RATE_RPS:g} req/s)."
    )
    concurrency: list[Users] = Field(
        default_factory=list, description="Closed-loop users (arrival kind: closed), one point each."
    )
    knobs: list[Knobs] = Field(
        default_factory=list,
        description="Pinned knob settings to compare (through the target's control API: the static policy).",
    )
    policies: list[PolicySetting] = Field(default_factory=list, description="Controller policies to compare.")

    def settings(self) -> list[Knobs | PolicySetting | None]:
        """The settings compared: pinned knobs, then policies; ``[None]`` (as deployed) when there are neither."""
        return [*self.knobs, *self.policies] or [None]

    @property
    def loads(self) -> list[float]:
        """The swept load values: request rates, or closed-loop user counts."""
        return [float(c) for c in self.concurrency] if self.concurrency else list(self.rate_rps)

    def points(self) -> list[tuple[Knobs | PolicySetting | None, float]]:
        """Every (setting, load) point of the sweep, settings outermost."""
        return [(s, r) for s in self.settings() for r in self.loads]


def setting_label(setting: Knobs | PolicySetting | None) -> str:
    """A short human-readable label of a sweep setting (``as deployed``, ``policy=...`` or the knobs)."""
    if setting is None:
        return "as deployed"
    if isinstance(setting, PolicySetting):
        opts = ",".join(f"{k}={v:g}" if isinstance(v, float | int) else f"{k}={v}"
                        for k, v in sorted(setting.options.items()))
        return f"policy={setting.policy}" + (f"({opts})" if opts else "")
    return setting.label()


class CampaignSpec(BaseModel):
    """A campaign file: name, seed, site, model, workload, SLO and the sweep of settings and loads."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(default="campaign", min_length=1)
    seed: int = Field(default=0, ge=0)
    site: str = Field(default="azure", description="Site profile (azure, aws, deepseek or a YAML path).")
    model: str | None = Field(default=None, description="Model name to request; default: the server's first.")
    workload: WorkloadSpec = Field(default_factory=WorkloadSpec)
    slo: SLO = Field(default_factory=SLO)
    sweep: Sweep
    metering: MeteringSpec | None = Field(
        default=None, description="Energy and token endpoints of a --url target (default: its own /metrics).",
    )

    @model_validator(mode="after")
    def _load_matches_arrivals(self) -> CampaignSpec:
        closed = isinstance(self.workload.arrival, ClosedLoopArrivals)
        if closed and (self.sweep.rate_rps or not self.sweep.concurrency):
            raise ValueError(
                "closed-loop arrivals (workload.arrival.kind: closed) are swept by sweep.concurrency (numbers of "
                "users), not sweep.rate_rps: the request rate is whatever the server sustains"
            )
        if not closed and (self.sweep.concurrency or not self.sweep.rate_rps):
            raise ValueError(
                "sweep.rate_rps (offered request rates) is required for open-loop arrivals; sweep.concurrency "
                "needs workload.arrival.kind: closed"
            )
        if self.sweep.rate_rps and (n := max(self.sweep.rate_rps) * self.workload.duration_s) > MAX_REQUESTS_PER_POINT:
            raise ValueError(
                f"sweep.rate_rps x workload.duration_s asks for {n:.3g} requests in one point, more than "
                f"{MAX_REQUESTS_PER_POINT:.0e}: shorten duration_s or split the rate over replicas' campaigns"
            )
        return self

    @property
    def closed_loop(self) -> bool:
        """Whether the workload is closed-loop (a fixed number of users, swept by ``sweep.concurrency``)."""
        return isinstance(self.workload.arrival, ClosedLoopArrivals)

    def config_hash(self) -> str:
        """Short hash of the settings, checked by ``--resume`` (fields added later left out while at their default)."""
        data = self.model_dump(mode="json")
        for where in ("workers", "ray_address"):  # where virtual points run does not change what they give
            data.pop(where, None)
        sections = [(data, ADDED_CAMPAIGN_FIELDS), (data["workload"], ADDED_FIELDS), (data["slo"], SLO_FIELDS_ADDED)]
        sections += [(k, ADDED_KNOB_FIELDS) for k in data["sweep"]["knobs"]]
        sections += [(v, ADDED_COMPARE_FIELDS) for v in data.get("compare") or [] if isinstance(v, dict)]
        if isinstance(data.get("deployment"), dict):  # campaign files (deploy/config.py) carry one
            sections.append((data["deployment"], ADDED_DEPLOYMENT_FIELDS))
            if isinstance(slo := data["deployment"].get("controller", {}).get("slo"), dict):
                sections.append((slo, SLO_FIELDS_ADDED))
            if isinstance(data["deployment"].get("engine"), dict):
                sections.append((data["deployment"]["engine"], ADDED_ENGINE_FIELDS))
        for section, added in sections:  # a campaign from before the field still resumes
            for name, unset in added.items():
                if name in section and section[name] == unset:
                    del section[name]
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
