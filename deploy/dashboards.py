"""Grafana dashboards as code: plain JSON builders for the ``llm_energy_*`` metrics.

``testbed dashboards export DIR`` writes them; the chart ships copies in
helm/llm-energy-testbed/dashboards/ (a test keeps them equal to what this module builds). Queries use
the variables ``$datasource``, ``$replica`` (regex) and ``$ttft_slo`` (a TTFT bucket bound in seconds),
plus Grafana's ``$__rate_interval``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TTFT_SLO_CHOICES = ("0.5", "1.0", "2.0", "5.0")
DEFAULT_TTFT_SLO = "2.0"
TAG = "llm-energy"
R = "$__rate_interval"
SEL = 'replica=~"$replica"'
GEN = f'llm_energy_tokens_total{{kind="generated",{SEL}}}'
ENERGY = f"llm_energy_energy_joules_total{{{SEL}}}"


@dataclass(frozen=True)
class Query:
    """One PromQL query of a panel and its legend template."""

    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    """One Grafana panel: title, queries, unit, kind and grid size."""

    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""
    width: int = 12
    height: int = 8


@dataclass(frozen=True)
class Dashboard:
    """One Grafana dashboard: uid, title, panels, template variables and tags."""

    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...]
    variables: tuple[str, ...] = ("datasource", "replica", "ttft_slo")
    tags: tuple[str, ...] = field(default=(TAG,))


def q(expr: str, legend: str = "") -> Query:
    """Shorthand for a :class:`Query`."""
    return Query(expr, legend)


def per_token(numerator: str, scale: str = "", by: str = "") -> str:
    """Rate of a counter over the rate of generated tokens (optionally grouped)."""
    group = f" by ({by})" if by else ""
    return f"sum{group}(rate({numerator}[{R}])){scale} / sum{group}(rate({GEN}[{R}]))"


def ratio_of_rates(counter: str, part: str, whole: str) -> str:
    """Per replica, the rate of ``counter``'s ``kind=part`` samples over its ``kind=whole`` samples; no series
    while ``whole`` stands still (no speculation, no prompts), rather than 0/0."""
    part_rate, whole_rate = (
        f'sum by (replica) (rate({counter}{{kind="{kind}",{SEL}}}[{R}]))' for kind in (part, whole)
    )
    return f"{part_rate} / ({whole_rate} > 0)"


def ttft_attainment(by: str = "") -> str:
    """PromQL share of requests whose TTFT met ``$ttft_slo`` (optionally grouped by ``by``)."""
    group = f" by ({by})" if by else ""
    return (
        f'sum{group}(rate(llm_energy_request_ttft_seconds_bucket{{le="$ttft_slo",{SEL}}}[{R}])) '
        f"/ sum{group}(rate(llm_energy_request_ttft_seconds_count{{{SEL}}}[{R}]))"
    )


def quantile(metric: str, phi: float, by: str = "") -> str:
    """PromQL ``phi`` quantile of a request latency histogram (``ttft``, ``tpot``, ``e2e``), optionally grouped."""
    return (
        f"histogram_quantile({phi}, sum by (le{', ' + by if by else ''}) "
        f"(rate(llm_energy_request_{metric}_seconds_bucket{{{SEL}}}[{R}])))"
    )


def overview() -> Dashboard:
    """The overview dashboard: energy, water and carbon per token against throughput, latency and SLO."""
    return Dashboard(
        uid="llm-energy-overview",
        title="LLM energy: overview",
        description="Energy, water and carbon per token against throughput, latency and SLO attainment.",
        panels=(
            Panel(
                "Energy per generated token",
                (q(per_token(ENERGY), "all replicas"),),
                "J",
                description="Device (IT) energy over generated tokens; facility energy is x PUE.",
            ),
            Panel(
                "Power",
                (q(f"sum by (replica) (llm_energy_power_watts{{{SEL}}})", "{{replica}}"),),
                "watt",
                description="Device power now, by replica.",
            ),
            Panel(
                "Clock", (q(f"avg by (replica) (llm_energy_clock_mhz{{{SEL}}})", "{{replica}}"),), "rotmhz"
            ),
            Panel(
                "Tokens per second",
                (q(f"sum by (kind) (rate(llm_energy_tokens_total{{{SEL}}}[{R}]))", "{{kind}}"),),
                "short",
            ),
            Panel(
                "Water per generated token",
                (q(per_token(f"llm_energy_water_liters_total{{{SEL}}}", " * 1000"), "site + source"),),
                "mlitre",
                description="Site cooling water (WUE_site) plus electricity-generation water (WUE_source).",
            ),
            Panel(
                "Carbon per generated token",
                (q(per_token(f'llm_energy_carbon_grams_total{{scope="operational",{SEL}}}'), "operational"),),
                "massg",
                description="CIF x facility energy (operational carbon).",
            ),
            Panel(
                "SLO attainment",
                (
                    q(ttft_attainment(), "TTFT <= $ttft_slo s"),
                    q(f"min(llm_energy_slo_attainment_ratio{{{SEL}}})", "every SLO (controller)"),
                ),
                "percentunit",
                description="Share of requests meeting the SLO; the every-SLO series is the controller's.",
            ),
            Panel(
                "Goodput",
                (
                    q(
                        f'sum(rate(llm_energy_request_ttft_seconds_bucket{{le="$ttft_slo",{SEL}}}[{R}]))',
                        "requests/s with TTFT <= $ttft_slo s",
                    ),
                    q(f"sum(rate(llm_energy_request_e2e_seconds_count{{{SEL}}}[{R}]))", "all requests/s"),
                ),
                "reqps",
            ),
            Panel("Latency p99", (q(quantile("ttft", 0.99), "TTFT"), q(quantile("tpot", 0.99), "TPOT")), "s"),
            Panel(
                "Front door refusals",
                (q(f"sum by (reason) (rate(llm_energy_door_refused_total[{R}]))", "{{reason}}"),),
                "reqps",
                description="Requests the front door refused at a limit: in_flight and connections are 503s with "
                "Retry-After (overload shed), body_too_large 413, headers_too_large 431, timeout 408.",
            ),
            Panel(
                "Energy split",
                (
                    q(
                        f"sum by (phase) (rate(llm_energy_attributed_energy_joules_total{{{SEL}}}[{R}]))",
                        "{{phase}}",
                    ),
                    q(f"sum(rate(llm_energy_idle_energy_joules_total{{{SEL}}}[{R}]))", "idle"),
                ),
                "watt",
                description="Average power attributed to prefill, decode and idle.",
            ),
        ),
    )


def per_replica() -> Dashboard:
    """The per-replica dashboard: the same figures split by serving replica."""
    by = "replica"
    return Dashboard(
        uid="llm-energy-replica",
        title="LLM energy: per replica",
        description="One row of figures per serving replica (pick replicas with the variable).",
        panels=(
            Panel(
                "Energy per token (30 s window, exporter)",
                (q(f"llm_energy_energy_per_token_joules{{{SEL}}}", "{{replica}}"),),
                "J",
            ),
            Panel("Energy per token (rate)", (q(per_token(ENERGY, by=by), "{{replica}}"),), "J"),
            Panel("Power", (q(f"llm_energy_power_watts{{{SEL}}}", "{{replica}} {{device}}"),), "watt"),
            Panel("Clock", (q(f"llm_energy_clock_mhz{{{SEL}}}", "{{replica}} {{device}}"),), "rotmhz"),
            Panel(
                "Batch: running and waiting",
                (
                    q(f"sum by (replica) (llm_energy_requests_running{{{SEL}}})", "{{replica}} running"),
                    q(f"sum by (replica) (llm_energy_requests_waiting{{{SEL}}})", "{{replica}} waiting"),
                ),
                "short",
            ),
            Panel(
                "Generated tokens per second",
                (q(f"sum by (replica) (rate({GEN}[{R}]))", "{{replica}}"),),
                "short",
            ),
            Panel(
                "KV cache in use",
                (q(f"max by (replica) (llm_energy_kv_cache_usage_ratio{{{SEL}}})", "{{replica}}"),),
                "percentunit",
                description="Share of the KV cache's token slots in use, as the engine reports it; near 1 new "
                "requests wait for space.",
            ),
            Panel(
                "Prefix-cache hits and accepted draft tokens",
                (
                    q(ratio_of_rates("llm_energy_prefix_cache_tokens_total", "hit", "queried"),
                      "{{replica}} prefix hits"),
                    q(ratio_of_rates("llm_energy_spec_decode_tokens_total", "accepted", "proposed"),
                      "{{replica}} drafts accepted"),
                ),
                "percentunit",
                description="Prompt tokens found in the prefix cache (their prefill, and its energy, is skipped) "
                "and speculative draft tokens the target model accepted, as shares.",
            ),
            Panel("TTFT p99", (q(quantile("ttft", 0.99, by), "{{replica}}"),), "s"),
            Panel("TPOT p99", (q(quantile("tpot", 0.99, by), "{{replica}}"),), "s"),
            Panel("TTFT SLO attainment", (q(ttft_attainment(by), "{{replica}}"),), "percentunit"),
            Panel(
                "Idle share of energy",
                (
                    q(
                        f"sum by (replica) (rate(llm_energy_idle_energy_joules_total{{{SEL}}}[{R}])) "
                        f"/ sum by (replica) (rate({ENERGY}[{R}]))",
                        "{{replica}}",
                    ),
                ),
                "percentunit",
            ),
        ),
    )


def controller() -> Dashboard:
    """The controller dashboard: knobs set, decisions by policy and reason, and their effect."""
    return Dashboard(
        uid="llm-energy-controller",
        title="LLM energy: controller",
        description="What the controller set (knobs), why (decisions by policy and reason), and the effect.",
        panels=(
            Panel(
                "Knob values",
                (q(f"llm_energy_knob_value{{{SEL}}}", "{{replica}} {{knob}}"),),
                "short",
                description="Clock (MHz), batch cap, speculative depth as set by the controller.",
            ),
            Panel(
                "Decisions per minute by reason",
                (
                    q(
                        f"sum by (policy, reason) (rate(llm_energy_controller_decisions_total[{R}])) * 60",
                        "{{policy}}: {{reason}}",
                    ),
                ),
                "short",
            ),
            Panel(
                "Decisions (total in range)",
                (
                    q(
                        "sum by (policy, reason) (increase(llm_energy_controller_decisions_total[$__range]))",
                        "{{policy}}: {{reason}}",
                    ),
                ),
                "short",
                kind="table",
            ),
            Panel(
                "SLO attainment (every SLO)",
                (q(f"min(llm_energy_slo_attainment_ratio{{{SEL}}})", "attainment"),),
                "percentunit",
            ),
            Panel(
                "Device clock",
                (q(f"llm_energy_clock_mhz{{{SEL}}}", "{{replica}} {{device}}"),),
                "rotmhz",
                description="Measured clock, to compare with the clock knob.",
            ),
            Panel("Energy per generated token", (q(per_token(ENERGY), "all replicas"),), "J"),
            Panel("TTFT SLO attainment", (q(ttft_attainment(), "TTFT <= $ttft_slo s"),), "percentunit"),
            Panel(
                "Attribution error",
                (q(f"max(llm_energy_attribution_error_ratio{{{SEL}}})", "error"),),
                "percentunit",
                description="|sum of request energy + idle - metered| / metered.",
            ),
        ),
    )


def hardware() -> Dashboard:
    """The hardware dashboard: backends and devices side by side (J/token, tokens/J, power, latency)."""
    by = "backend"
    return Dashboard(
        uid="llm-energy-hardware",
        title="LLM energy: hardware comparison",
        description="Backends and devices side by side: energy per token, tokens per joule, power, latency.",
        panels=(
            Panel(
                "Energy per generated token by backend", (q(per_token(ENERGY, by=by), "{{backend}}"),), "J"
            ),
            Panel(
                "Generated tokens per joule by backend",
                (
                    q(
                        f"sum by (backend) (rate({GEN}[{R}])) / sum by (backend) (rate({ENERGY}[{R}]))",
                        "{{backend}}",
                    ),
                ),
                "short",
            ),
            Panel(
                "Mean device power by backend",
                (q(f"avg by (backend) (llm_energy_power_watts{{{SEL}}})", "{{backend}}"),),
                "watt",
            ),
            Panel(
                "Mean device clock by backend",
                (q(f"avg by (backend) (llm_energy_clock_mhz{{{SEL}}})", "{{backend}}"),),
                "rotmhz",
            ),
            Panel(
                "Energy per token now",
                (
                    q(
                        f"avg by (backend, provenance) (llm_energy_energy_per_token_joules{{{SEL}}})",
                        "{{backend}} ({{provenance}})",
                    ),
                ),
                "J",
                kind="table",
                description="Provenance says whether the energy was measured or modeled.",
            ),
            Panel(
                "Carbon per generated token by backend",
                (
                    q(
                        per_token(f'llm_energy_carbon_grams_total{{scope="operational",{SEL}}}', by=by),
                        "{{backend}}",
                    ),
                ),
                "massg",
            ),
            Panel(
                "Water per generated token by backend",
                (q(per_token(f"llm_energy_water_liters_total{{{SEL}}}", " * 1000", by=by), "{{backend}}"),),
                "mlitre",
            ),
            Panel("TTFT p99 by replica", (q(quantile("ttft", 0.99, "replica"), "{{replica}}"),), "s"),
        ),
    )


DASHBOARDS = (overview, per_replica, controller, hardware)


def all_dashboards() -> list[Dashboard]:
    """Every dashboard the testbed ships, freshly built."""
    return [build() for build in DASHBOARDS]


def _variables(names: tuple[str, ...]) -> list[dict[str, Any]]:
    ds = {"type": "prometheus", "uid": "${datasource}"}
    catalog = {
        "datasource": {
            "name": "datasource",
            "label": "Prometheus",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
            "refresh": 1,
        },
        "replica": {
            "name": "replica",
            "label": "Replica",
            "type": "query",
            "datasource": ds,
            "query": {"query": "label_values(llm_energy_power_watts, replica)", "refId": "replica"},
            "definition": "label_values(llm_energy_power_watts, replica)",
            "includeAll": True,
            "allValue": ".*",
            "multi": True,
            "refresh": 2,
            "current": {"text": "All", "value": "$__all"},
            "sort": 1,
        },
        "ttft_slo": {
            "name": "ttft_slo",
            "label": "TTFT SLO (s)",
            "type": "custom",
            "query": ",".join(TTFT_SLO_CHOICES),
            "current": {"text": DEFAULT_TTFT_SLO, "value": DEFAULT_TTFT_SLO},
            "options": [{"text": c, "value": c, "selected": c == DEFAULT_TTFT_SLO} for c in TTFT_SLO_CHOICES],
        },
    }
    return [catalog[n] for n in names]


def _panel_json(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    ds = {"type": "prometheus", "uid": "${datasource}"}
    description = panel.description
    body: dict[str, Any] = {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "description": description,
        "datasource": ds,
        "gridPos": {"x": x, "y": y, "w": panel.width, "h": panel.height},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": ds,
                "expr": t.expr,
                "legendFormat": t.legend,
                "range": panel.kind != "table",
                "instant": panel.kind == "table",
            }
            for i, t in enumerate(panel.queries)
        ],
    }
    if panel.kind == "timeseries":
        body["options"] = {
            "legend": {"displayMode": "list", "placement": "bottom"},
            "tooltip": {"mode": "multi"},
        }
    return body


def to_json(d: Dashboard) -> dict[str, Any]:
    """The dashboard as Grafana JSON (panels laid out on the 24-column grid)."""
    panels, x, y = [], 0, 0
    for i, p in enumerate(d.panels, start=1):
        if x + p.width > 24:
            x, y = 0, y + 8
        panels.append(_panel_json(p, i, x, y))
        x += p.width
    return {
        "uid": d.uid,
        "title": d.title,
        "description": d.description,
        "tags": list(d.tags),
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "timezone": "browser",
        "templating": {"list": _variables(d.variables)},
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def render(d: Dashboard) -> str:
    """The dashboard as stable Grafana JSON text (sorted keys), as exported to files."""
    return json.dumps(to_json(d), indent=2, sort_keys=True) + "\n"


def export(out_dir: Path) -> list[Path]:
    """Write one ``<uid>.json`` per dashboard; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for d in all_dashboards():
        path = out_dir / f"{d.uid}.json"
        path.write_text(render(d))
        written.append(path)
    return written


def iter_queries() -> Iterator[tuple[Dashboard, Panel, Query]]:
    """Every (dashboard, panel, query) shipped, e.g. to check each query against Prometheus."""
    for d in all_dashboards():
        for p in d.panels:
            for query in p.queries:
                yield d, p, query


def substitute(
    expr: str,
    rate_interval: str = "1m",
    range_: str = "5m",
    replica: str = ".*",
    ttft_slo: str = DEFAULT_TTFT_SLO,
) -> str:
    """The query Grafana would send with these variable values (for running panels outside Grafana)."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$__range", range_)
        .replace("$replica", replica)
        .replace("$ttft_slo", ttft_slo)
    )
