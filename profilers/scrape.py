"""The one reader of a ``/metrics`` page: the testbed's energy counters, token counters, engine state and
request-latency histograms from any Prometheus text endpoint (ours, or a compatible one). Campaigns difference
its energy counters over a point; the controller in its own process (``controllers.remote``) observes through it."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from profilers.errors import TestbedError
from profilers.exporter import ExportSnapshot
from profilers.meter import CounterSample

ENERGY_METRIC = "llm_energy_energy_joules"


# (metric, kind label) -> the name an engine token counter goes by in CounterSnapshot.engine_tokens.
ENGINE_TOKEN_COUNTERS = {
    ("llm_energy_prefix_cache_tokens_total", "queried"): "prefix_cache_queried",
    ("llm_energy_prefix_cache_tokens_total", "hit"): "prefix_cache_hit",
    ("llm_energy_spec_decode_tokens_total", "proposed"): "spec_proposed",
    ("llm_energy_spec_decode_tokens_total", "accepted"): "spec_accepted",
}


class MetricsUnavailableError(TestbedError, RuntimeError):
    """A testbed's ``/metrics`` could not be fetched or parsed."""


@dataclass(frozen=True)
class CounterSnapshot:
    """Device energy counters keyed ``replica/device``, and generated tokens by replica."""

    energy: dict[str, CounterSample]
    generated_tokens: dict[str, float]
    backends: frozenset[str] = frozenset()
    power_w: dict[str, float] = field(default_factory=dict)
    clock_mhz: dict[str, float] = field(default_factory=dict)
    sampler_errors: dict[str, float] = field(default_factory=dict)
    """Failed power-sampler reads keyed ``replica/device`` (only devices that have a sampler)."""
    engine_tokens: dict[str, float] = field(default_factory=dict)
    """Engine token counters keyed ``replica/name`` (names: :data:`ENGINE_TOKEN_COUNTERS`), where exported."""
    device_info: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Emulated devices keyed ``replica/device``: (preset, calibration label), from ``llm_energy_device_info``."""
    latency_buckets: dict[str, dict[float, float]] = field(default_factory=dict)
    """The front door's cumulative latency histograms by phase (``ttft``, ``tpot``): ``{le: count}``, summed over
    every series."""
    requests_completed: float = 0.0
    """Requests the front door finished (``llm_energy_request_e2e_seconds_count``, summed)."""
    running: float = 0.0
    waiting: float = 0.0
    """Requests running and waiting in the engines, summed over replicas."""

    def device_labels(self) -> list[tuple[str | None, str | None, str]]:
        """(preset, calibration, provenance) of every metered device (``workloads.results.calibration_columns``)."""
        return [(*self.device_info.get(k, (None, None)), str(s.provenance)) for k, s in self.energy.items()]

    @property
    def generated_total(self) -> float:
        """Generated tokens summed over every replica."""
        return sum(self.generated_tokens.values())


LATENCY_HISTOGRAMS = {
    "llm_energy_request_ttft_seconds_bucket": "ttft", "llm_energy_request_tpot_seconds_bucket": "tpot",
}


def parse_counters(text: str) -> CounterSnapshot:
    """Parse a testbed's ``/metrics`` text into energy, token, power, clock, load and latency counters."""
    energy: dict[str, CounterSample] = {}
    tokens: dict[str, float] = {}
    backends: set[str] = set()
    power: dict[str, float] = {}
    clock: dict[str, float] = {}
    sampler_errors: dict[str, float] = {}
    engine_tokens: dict[str, float] = {}
    device_info: dict[str, tuple[str, str]] = {}
    buckets: dict[str, dict[float, float]] = {"ttft": {}, "tpot": {}}
    completed = running = waiting = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = f"{s.labels.get('replica', '')}/{s.labels.get('device', '')}"
            if s.name == f"{ENERGY_METRIC}_total":
                energy[key] = CounterSample(s.value, s.labels.get("provenance", "unknown"))
                backends.add(s.labels.get("backend", "unknown"))
            elif s.name == "llm_energy_power_watts":
                power[key] = s.value
            elif s.name == "llm_energy_clock_mhz":
                clock[key] = s.value
            elif s.name == "llm_energy_tokens_total" and s.labels.get("kind") == "generated":
                tokens[s.labels.get("replica", "")] = s.value
            elif s.name == "llm_energy_sampler_errors_total":
                sampler_errors[key] = s.value
            elif s.name == "llm_energy_device_info":
                device_info[key] = (s.labels.get("preset", ""), s.labels.get("calibration", ""))
            elif (name := ENGINE_TOKEN_COUNTERS.get((s.name, s.labels.get("kind", "")))) is not None:
                engine_tokens[f"{s.labels.get('replica', '')}/{name}"] = s.value
            elif (phase := LATENCY_HISTOGRAMS.get(s.name)) is not None:
                le = float(s.labels["le"])
                buckets[phase][le] = buckets[phase].get(le, 0.0) + s.value
            elif s.name == "llm_energy_request_e2e_seconds_count":
                completed += s.value
            elif s.name == "llm_energy_requests_running":
                running += s.value
            elif s.name == "llm_energy_requests_waiting":
                waiting += s.value
    return CounterSnapshot(
        energy, tokens, frozenset(backends), power, clock, sampler_errors, engine_tokens, device_info, buckets,
        completed, running, waiting,
    )


def counters_from_export(snap: ExportSnapshot) -> CounterSnapshot:
    """The counters a scrape of ``snap``'s exporter would give, read in-process (a virtual-time target has no
    HTTP): the same keys and the same rules as :func:`parse_counters` over :class:`EnergyCollector`'s output."""
    energy, power, clock, errors, info = {}, {}, {}, {}, {}
    for d in snap.devices:
        key = f"{d.replica}/{d.device}"
        energy[key] = CounterSample(d.energy_j, d.provenance)
        power[key] = d.power_w
        if d.clock_mhz is not None:
            clock[key] = d.clock_mhz
        if d.sampler_errors is not None:
            errors[key] = float(d.sampler_errors)
        if d.preset is not None:
            info[key] = (d.preset, d.calibration or "")
    engine_tokens: dict[str, float] = {}
    for r in snap.replicas:
        engine_tokens[f"{r.replica}/spec_proposed"] = r.spec_proposed_tokens
        engine_tokens[f"{r.replica}/spec_accepted"] = r.spec_accepted_tokens
        if r.prefix_cache_queried_tokens is not None:
            engine_tokens[f"{r.replica}/prefix_cache_queried"] = r.prefix_cache_queried_tokens
            engine_tokens[f"{r.replica}/prefix_cache_hit"] = r.prefix_cache_hit_tokens or 0
    return CounterSnapshot(
        energy, {r.replica: float(r.generated_tokens) for r in snap.replicas},
        frozenset(d.backend for d in snap.devices), power, clock, errors, engine_tokens, info,
        running=float(sum(r.running for r in snap.replicas)), waiting=float(sum(r.waiting for r in snap.replicas)),
    )


async def ascrape_counters(
    metrics_url: str, client: httpx.AsyncClient, timeout_s: float = 5.0
) -> CounterSnapshot:
    """Fetch and parse ``metrics_url``; raise :class:`MetricsUnavailableError` with the reason."""
    try:
        resp = await client.get(metrics_url, timeout=timeout_s)
    except httpx.HTTPError as e:
        raise MetricsUnavailableError(f"cannot scrape {metrics_url}: {e!r}") from e
    if resp.status_code != 200:
        raise MetricsUnavailableError(f"cannot scrape {metrics_url}: HTTP {resp.status_code}")
    return parse_counters(resp.text)
