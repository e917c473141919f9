"""The exported metric names, types and labels are an interface: this test freezes them.

Changing a name breaks every dashboard and alert built on it; if a change is intended, update FROZEN
in the same commit and say so in the changelog.
"""

from __future__ import annotations

import re

from profilers.carbon import EmbodiedCarbon
from profilers.exporter import DOOR_REFUSAL_REASONS, DeviceSample, ExportSnapshot, ReplicaSample, build_registry
from profilers.footprint import load_site_profile

DEV = ("backend", "device", "provenance", "replica")
REP = ("backend", "replica")
FROZEN: dict[str, tuple[str, tuple[str, ...]]] = {
    # sample name: (TYPE, labels)
    "llm_energy_energy_joules_total": ("counter", DEV),
    "llm_energy_power_watts": ("gauge", DEV),
    "llm_energy_clock_mhz": ("gauge", DEV),
    "llm_energy_water_liters_total": ("counter", (*DEV, "scope")),
    "llm_energy_carbon_grams_total": ("counter", (*DEV, "scope")),
    "llm_energy_sampler_errors_total": ("counter", DEV),
    "llm_energy_device_info": ("gauge", ("backend", "calibration", "device", "preset", "provenance", "replica")),
    "llm_energy_tokens_total": ("counter", ("backend", "kind", "replica")),
    "llm_energy_attributed_energy_joules_total": ("counter", ("backend", "phase", "provenance", "replica")),
    "llm_energy_idle_energy_joules_total": ("counter", ("backend", "provenance", "replica")),
    "llm_energy_energy_per_token_joules": ("gauge", ("backend", "provenance", "replica")),
    "llm_energy_requests_running": ("gauge", REP),
    "llm_energy_requests_waiting": ("gauge", REP),
    "llm_energy_replica_up": ("gauge", REP),
    "llm_energy_attribution_error_ratio": ("gauge", ("backend", "provenance", "replica")),
    "llm_energy_kv_cache_usage_ratio": ("gauge", REP),
    "llm_energy_kv_cache_capacity_tokens": ("gauge", REP),
    "llm_energy_spec_decode_tokens_total": ("counter", ("backend", "kind", "replica")),
    "llm_energy_prefix_cache_tokens_total": ("counter", ("backend", "kind", "replica")),
    # Issue #20: the two boundaries and the SCI (added on purpose).
    "llm_energy_boundary_energy_joules_total": ("counter", ("backend", "boundary", "provenance", "replica")),
    "llm_energy_sci_per_token_grams": ("gauge", ("backend", "replica", "status")),
    "llm_energy_request_ttft_seconds_bucket": ("histogram", ("le", "replica")),
    "llm_energy_request_ttft_seconds_count": ("histogram", ("replica",)),
    "llm_energy_request_ttft_seconds_sum": ("histogram", ("replica",)),
    "llm_energy_request_tpot_seconds_bucket": ("histogram", ("le", "replica")),
    "llm_energy_request_tpot_seconds_count": ("histogram", ("replica",)),
    "llm_energy_request_tpot_seconds_sum": ("histogram", ("replica",)),
    "llm_energy_request_e2e_seconds_bucket": ("histogram", ("le", "replica")),
    "llm_energy_request_e2e_seconds_count": ("histogram", ("replica",)),
    "llm_energy_request_e2e_seconds_sum": ("histogram", ("replica",)),
    # Issue #18: what the front door refused at its limits (added on purpose).
    "llm_energy_door_refused_total": ("counter", ("reason",)),
}
# KV cache, speculation and a prefix cache (a vLLM engine has all three).
ENGINE_STATE = {"kv_used_tokens": 64, "kv_capacity_tokens": 4096, "spec_proposed_tokens": 30,
                "spec_accepted_tokens": 12, "prefix_cache_queried_tokens": 90, "prefix_cache_hit_tokens": 32}
KINDS = {"llm_energy_tokens_total": {"prompt", "generated"},
         "llm_energy_spec_decode_tokens_total": {"proposed", "accepted"},
         "llm_energy_prefix_cache_tokens_total": {"queried", "hit"}}
SCOPES = {"llm_energy_water_liters_total": {"site", "source"},
          "llm_energy_carbon_grams_total": {"operational", "embodied"}}
PRESET = {"preset": "a40", "calibration": "modeled: a40, uncalibrated"}  # emulated devices export their preset
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")


class Ticks:
    """Two scrapes 10 s apart, so the windowed per-token gauge has a value."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 10.0
        return self.t


def exposition() -> str:
    snaps = iter([
        ExportSnapshot([DeviceSample("r0", "emu0", "emulated", "modeled", 100.0, 300.0, 1980.0, 0, **PRESET)],
                       [ReplicaSample("r0", "emulated", 50, 10, 40.0, 50.0, 10.0, 2, 1, **ENGINE_STATE)]),
        ExportSnapshot([DeviceSample("r0", "emu0", "emulated", "modeled", 400.0, 300.0, 1980.0, 0, **PRESET)],
                       [ReplicaSample("r0", "emulated", 90, 30, 140.0, 200.0, 60.0, 2, 1, **ENGINE_STATE)]),
    ])
    state = {"snap": next(snaps)}
    registry, latency = build_registry(
        lambda: state["snap"], load_site_profile("azure"),
        embodied=EmbodiedCarbon(kg_per_device=150.0, service_life_years=5.0),
    )
    latency.observe("r0", 0.2, 0.02, 1.5)
    registry.render()
    state["snap"] = next(snaps)
    return registry.render().decode()  # what /metrics serves (same bytes as generate_latest)


def parse(text: str) -> tuple[dict[str, str], dict[str, set[str]], dict[str, set[frozenset]]]:
    types: dict[str, str] = {}
    labels: dict[str, set[str]] = {}
    values: dict[str, set[frozenset]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ")
            types[family] = kind
        elif line and not line.startswith("#"):
            m = SAMPLE.match(line)
            assert m, line
            pairs = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            labels.setdefault(m.group(1), set()).update(k for k, _ in pairs)
            values.setdefault(m.group(1), set()).add(pairs)
    return types, labels, values


def family_type(types: dict[str, str], sample: str) -> str:
    for suffix in ("", "_total", "_bucket", "_count", "_sum"):
        base = sample.removesuffix(suffix) if suffix else sample
        if base in types:
            return types[base]
    raise AssertionError(f"no TYPE line for {sample}")


def test_exported_names_types_and_labels_are_frozen() -> None:
    types, labels, _ = parse(exposition())
    ours = {n for n in labels if n.startswith("llm_energy_") and not n.endswith("_created")}
    assert ours == set(FROZEN), f"added: {ours - set(FROZEN)}, removed: {set(FROZEN) - ours}"
    for name, (kind, names) in FROZEN.items():
        assert family_type(types, name) == kind, name
        assert tuple(sorted(labels[name])) == names, name


def test_counters_end_in_total_and_units_are_base_units() -> None:
    types, _, _ = parse(exposition())
    for name in (n for n in FROZEN if FROZEN[n][0] == "counter"):
        assert name.endswith("_total")
    unit = re.compile(r"_(joules|watts|mhz|liters|grams|seconds|ratio|tokens)$")
    counts = {"llm_energy_tokens", "llm_energy_sampler_errors", "llm_energy_requests_running",
              "llm_energy_requests_waiting", "llm_energy_door_refused"}  # dimensionless counts
    for family in (f for f in types if f.startswith("llm_energy_") and not f.endswith("_created")):
        base = family.removesuffix("_total")  # newer clients print counters' TYPE with the suffix
        # _info: labels, value 1; _up: 1 or 0, as Prometheus's own `up`
        assert unit.search(base) or base in counts or base.endswith(("_info", "_up")), family


def test_scope_values_are_fixed() -> None:
    _, _, values = parse(exposition())
    for name, scopes in SCOPES.items():
        seen = {dict(v)["scope"] for v in values[name]}
        assert seen == scopes, name


def test_door_refusal_reasons_are_fixed_and_exported_from_zero() -> None:
    _, _, values = parse(exposition())
    assert {dict(v)["reason"] for v in values["llm_energy_door_refused_total"]} == set(DOOR_REFUSAL_REASONS)
    assert set(DOOR_REFUSAL_REASONS) == {"in_flight", "connections", "body_too_large", "headers_too_large", "timeout"}


def test_kind_values_are_fixed() -> None:
    _, _, values = parse(exposition())
    for name, kinds in KINDS.items():
        assert {dict(v)["kind"] for v in values[name]} == kinds, name


def test_engine_state_families_follow_what_the_engine_has() -> None:
    """No KV cache reported: no usage ratio (not a ratio of 0/0); no prefix cache: no prefix samples (not 0 hits,
    which would read as a cache that never hits)."""
    snap = ExportSnapshot([], [ReplicaSample("r0", "emulated", 5, 5, 1.0, 1.0, 1.0, 0, 0)])
    registry, _ = build_registry(lambda: snap, load_site_profile("azure"))
    _, labels, values = parse(registry.render().decode())
    assert "llm_energy_kv_cache_usage_ratio" not in labels and "llm_energy_prefix_cache_tokens_total" not in labels
    assert {dict(v)["kind"] for v in values["llm_energy_spec_decode_tokens_total"]} == {"proposed", "accepted"}
    full = ExportSnapshot([], [ReplicaSample("r0", "vllm", 5, 5, 1.0, 1.0, 1.0, 0, 0, **ENGINE_STATE)])
    registry, _ = build_registry(lambda: full, load_site_profile("azure"))
    text = registry.render().decode()
    assert 'llm_energy_kv_cache_usage_ratio{backend="vllm",replica="r0"} 0.015625' in text
    assert 'llm_energy_prefix_cache_tokens_total{backend="vllm",kind="hit",replica="r0"} 32.0' in text
