"""The one reader of a ``/metrics`` page: the testbed's energy counters, token counters, engine state and
request-latency histograms from any Prometheus text endpoint (ours, or a compatible one). Campaigns difference
its energy counters over a point; the controller in its own process (``controllers.remote``) observes through it.

Other exporters' energy and token counters are recognised by metric name (:data:`ENERGY_FAMILIES`,
:data:`TOKEN_FAMILIES`) into :attr:`CounterSnapshot.energy_families` / ``token_families``, with the same
``replica/device`` keys; :func:`select_sources` makes the snapshot a campaign differences from the chosen ones.
Names and units, with the versions they are documented for:

* ``dcgm``: NVIDIA dcgm-exporter (3.x/4.x default counters): ``DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`` (counter, mJ
  since the driver loaded) keyed ``Hostname/gpu<gpu>``; where a GPU has none, ``DCGM_FI_DEV_POWER_USAGE`` (gauge,
  W) is sampled through the window and integrated (``dcgm_power`` in :attr:`CounterSnapshot.power_families`).
* ``kepler_node``: Kepler <= 0.7 ``kepler_node_{package,dram,other,gpu}_joules_total`` (summed over ``mode``;
  ``core``/``uncore`` are parts of ``package`` and ``platform`` the whole node, so neither is added) and Kepler
  >= 0.10 ``kepler_node_cpu_joules_total`` (zones ``package`` and ``dram``), keyed ``<node>/kepler-<part>``.
* ``kepler_container``: Kepler <= 0.7 ``kepler_container_joules_total`` (summed over ``mode``) and Kepler >= 0.10
  ``kepler_container_cpu_joules_total`` (zones ``package``, ``dram``), keyed ``<pod or ''>/<container>``: a split
  of the node's energy among containers, never chosen unless asked for.
* tokens: ours ``llm_energy_tokens_total{kind="generated"}``, vLLM ``vllm:generation_tokens_total``, SGLang
  ``sglang:generation_tokens_total``, TGI ``tgi_request_generated_tokens_sum`` (histogram sum, counted as requests
  end); prompt tokens likewise (``vllm:prompt_tokens_total``, ``sglang:prompt_tokens_total``,
  ``tgi_request_input_length_sum``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from profilers.errors import TestbedError
from profilers.exporter import ExportSnapshot
from profilers.meter import CounterSample

ENERGY_METRIC = "llm_energy_energy_joules"

ENERGY_FAMILIES = {
    "ours": "llm_energy_energy_joules_total (testbed serve, testbed meter)",
    "dcgm": "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION (mJ) or DCGM_FI_DEV_POWER_USAGE (W, integrated) (dcgm-exporter)",
    "kepler_node": "kepler_node_{package,dram,other,gpu}_joules_total or kepler_node_cpu_joules_total (Kepler)",
    "kepler_container": "kepler_container_joules_total or kepler_container_cpu_joules_total (Kepler; by choice only)",
}
"""Energy families a campaign reads, by the name it is chosen by (``--energy-family``)."""
AUTO_ENERGY_FAMILIES = ("ours", "dcgm", "kepler_node")
"""Families used without being named; ``kepler_container`` splits ``kepler_node`` and must be asked for."""
TOKEN_FAMILIES = {
    "ours": "llm_energy_tokens_total{kind=generated}",
    "vllm": "vllm:generation_tokens_total",
    "sglang": "sglang:generation_tokens_total",
    "tgi": "tgi_request_generated_tokens_sum",
}
_GENERATED = {"vllm:generation_tokens_total": "vllm", "sglang:generation_tokens_total": "sglang",
              "tgi_request_generated_tokens_sum": "tgi"}
_PROMPT = {"vllm:prompt_tokens_total": "vllm", "sglang:prompt_tokens_total": "sglang",
           "tgi_request_input_length_sum": "tgi"}
_KEPLER_NODE_07 = {f"kepler_node_{part}_joules_total": part for part in ("package", "dram", "other", "gpu")}
_KEPLER_ZONES = ("package", "dram")


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
    meter_up: dict[str, float] = field(default_factory=dict)
    """``testbed meter`` nodes by replica label: 1 if their last read of the power source worked."""
    meter_errors: dict[str, str] = field(default_factory=dict)
    """Their last failed read, while down (``llm_energy_meter_error_info``)."""
    energy_families: dict[str, dict[str, CounterSample]] = field(default_factory=dict)
    """Every energy family found (:data:`ENERGY_FAMILIES`), ours included, keyed ``replica/device``."""
    power_families: dict[str, dict[str, float]] = field(default_factory=dict)
    """Power gauges of exporters whose devices may lack an energy counter (``dcgm``), in W."""
    token_families: dict[str, dict[str, float]] = field(default_factory=dict)
    """Generated-token counters by family (:data:`TOKEN_FAMILIES`), keyed by replica (or the series' labels)."""
    prompt_token_families: dict[str, dict[str, float]] = field(default_factory=dict)
    energy_source: str = ""
    """Where :attr:`energy` came from (``family: URL``); empty: the target's own /metrics, ours."""
    token_source: str = ""
    """Where :attr:`generated_tokens` came from; empty: the target's own /metrics, ours."""
    scrape_errors: dict[str, str] = field(default_factory=dict)
    """Endpoints that could not be scraped for this snapshot, with why (their series are missing from it)."""
    wall_time_s: float = float("nan")
    """Wall-clock time of the snapshot, where a reader needs it (a window read through Prometheus)."""

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


def parse_counters(text: str, origin: str = "") -> CounterSnapshot:
    """Parse a ``/metrics`` text into energy, token, power, clock, load and latency counters: the testbed's, and
    the other exporters' families we know; ``origin`` (the endpoint's host:port) names the replica of another
    exporter's series that carry no host label of their own."""
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
    meter_up: dict[str, float] = {}
    meter_errors: dict[str, str] = {}
    foreign: dict[str, dict[str, CounterSample]] = {}
    foreign_power: dict[str, dict[str, float]] = {}
    gen_tokens: dict[str, dict[str, float]] = {}
    prompt_tokens: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = f"{s.labels.get('replica', '')}/{s.labels.get('device', '')}"
            if _foreign(s.name, s.labels, s.value, origin, foreign, foreign_power, gen_tokens, prompt_tokens):
                continue
            if s.name == f"{ENERGY_METRIC}_total":
                energy[key] = CounterSample(s.value, s.labels.get("provenance", "unknown"))
                backends.add(s.labels.get("backend", "unknown"))
            elif s.name == "llm_energy_power_watts":
                power[key] = s.value
            elif s.name == "llm_energy_clock_mhz":
                clock[key] = s.value
            elif s.name == "llm_energy_tokens_total" and s.labels.get("kind") == "generated":
                tokens[s.labels.get("replica", "")] = s.value
            elif s.name == "llm_energy_tokens_total" and s.labels.get("kind") == "prompt":
                prompt_tokens.setdefault("ours", {})[s.labels.get("replica", "")] = s.value
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
            elif s.name == "llm_energy_meter_up":
                meter_up[s.labels.get("replica", "")] = s.value
            elif s.name == "llm_energy_meter_error_info":
                meter_errors[s.labels.get("replica", "")] = s.labels.get("error", "")
    if energy:
        foreign["ours"] = dict(energy)
    if tokens:
        gen_tokens["ours"] = dict(tokens)
    return CounterSnapshot(
        energy, tokens, frozenset(backends), power, clock, sampler_errors, engine_tokens, device_info, buckets,
        completed, running, waiting, meter_up, meter_errors, foreign, foreign_power, gen_tokens, prompt_tokens,
    )


def _series(labels: dict[str, str], *names: str) -> str:
    """The label values that tell a foreign token series apart (model, engine, pod...), joined; '' for none."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k in names)


def _foreign(
    name: str, labels: dict[str, str], value: float, origin: str, energy: dict[str, dict[str, CounterSample]],
    power: dict[str, dict[str, float]], generated: dict[str, dict[str, float]], prompt: dict[str, dict[str, float]],
) -> bool:
    """Record a sample of another exporter's energy or token family; False if it is none of them."""
    # prometheus_client's parser names a counter's samples ``<family>_total`` where the page does not
    if name in ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION_total"):
        key = f"{labels.get('Hostname') or origin}/gpu{labels.get('gpu', '')}"
        energy.setdefault("dcgm", {})[key] = CounterSample(value / 1000.0, "measured")
    elif name == "DCGM_FI_DEV_POWER_USAGE":
        power.setdefault("dcgm", {})[f"{labels.get('Hostname') or origin}/gpu{labels.get('gpu', '')}"] = value
    elif (part := _KEPLER_NODE_07.get(name)) is not None or (
        name == "kepler_node_cpu_joules_total" and labels.get("zone") in _KEPLER_ZONES
    ):
        node = labels.get("node_name") or labels.get("instance") or origin
        sensor = labels.get("path", "").rstrip("/").rsplit("/", 1)[-1]  # one package zone per socket
        where = part or (f"{labels['zone']}-{sensor}" if sensor else labels["zone"])
        _add(energy.setdefault("kepler_node", {}), f"{node}/kepler-{where}", value)
    elif name == "kepler_container_joules_total" or (
        name == "kepler_container_cpu_joules_total" and labels.get("zone") in _KEPLER_ZONES
    ):
        container = labels.get("container_name") or labels.get("container_id", "")
        pod = labels.get("pod_name") or labels.get("pod_id", "")
        _add(energy.setdefault("kepler_container", {}), f"{pod}/{container}", value)
    elif (fam := _GENERATED.get(name)) is not None:
        key = _series(labels, "model_name", "engine", "model_id", "pod", "instance") or origin
        generated.setdefault(fam, {})[key] = generated.get(fam, {}).get(key, 0.0) + value
    elif (fam := _PROMPT.get(name)) is not None:
        key = _series(labels, "model_name", "engine", "model_id", "pod", "instance") or origin
        prompt.setdefault(fam, {})[key] = prompt.get(fam, {}).get(key, 0.0) + value
    else:
        return False
    return True


def _add(into: dict[str, CounterSample], key: str, joules: float) -> None:
    """Sum series that share a key (Kepler's ``mode`` dynamic/idle halves, containers' zones)."""
    before = into.get(key)
    into[key] = CounterSample((before.energy_j if before else 0.0) + joules, "measured")


def metric_names(text: str) -> list[str]:
    """The metric families an endpoint exposes (for the message that refuses it)."""
    return sorted({f.name for f in text_string_to_metric_families(text)})


def found_energy_families(snap: CounterSnapshot) -> list[str]:
    """The energy families (:data:`ENERGY_FAMILIES`) ``snap`` has series of, in that order."""
    return [f for f in ENERGY_FAMILIES if snap.energy_families.get(f) or (f == "dcgm" and snap.power_families.get(f))]


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


def select_sources(
    energy: list[tuple[str, CounterSnapshot]], tokens: list[tuple[str, CounterSnapshot]],
    energy_family: str, token_family: str | None, power_integrated: dict[str, CounterSample] | None = None,
    energy_series: str | None = None,
) -> CounterSnapshot:
    """The snapshot a campaign differences: ``energy_family``'s counters from every ``(url, snapshot)`` of
    ``energy`` (DCGM GPUs without a counter from ``power_integrated``), ``token_family``'s generated tokens from
    ``tokens`` (None: no server count, the clients' usage is used). Keys stay ``replica/device``; a key two
    endpoints share is taken once (the same device scraped twice is never counted twice)."""
    merged: dict[str, CounterSample] = {}
    power: dict[str, float] = {}
    clock: dict[str, float] = {}
    errors: dict[str, float] = {}
    meter_up: dict[str, float] = {}
    meter_errors: dict[str, str] = {}
    backends: set[str] = set()
    for _, snap in energy:
        merged.update(snap.energy_families.get(energy_family, {}))
        if energy_family == "dcgm":
            power.update(snap.power_families.get("dcgm", {}))
            for key, sample in (power_integrated or {}).items():
                merged.setdefault(key, sample)
        if energy_family == "ours":
            power.update(snap.power_w)
            clock.update(snap.clock_mhz)
            errors.update(snap.sampler_errors)
            backends |= snap.backends
        meter_up.update(snap.meter_up)
        meter_errors.update(snap.meter_errors)
    if energy_series is not None:
        merged = {k: v for k, v in merged.items() if re.fullmatch(energy_series, k)}
    if energy_family != "ours":
        backends = {energy_family} if merged else set()
    generated: dict[str, float] = {}
    for url, snap in tokens:
        for key, n in snap.token_families.get(token_family or "", {}).items():
            generated[f"{url}|{key}"] = n
    integrated = sorted(k for k in (power_integrated or {}) if k in merged and energy_family == "dcgm")
    e_src = f"{energy_family}: {', '.join(u for u, _ in energy)}"
    if energy_series is not None:
        e_src += f" (series {energy_series})"
    if integrated:
        e_src += f" (power integrated between scrapes for {', '.join(integrated)})"
    return CounterSnapshot(
        merged, generated, frozenset(backends), power, clock, errors, meter_up=meter_up, meter_errors=meter_errors,
        energy_source=e_src,
        token_source=f"{token_family}: {', '.join(u for u, _ in tokens)}" if token_family else "",
        scrape_errors={k: v for _, s in [*energy, *tokens] for k, v in s.scrape_errors.items()},
    )
