"""Dashboards as code: the committed JSON is what the generator builds, and every query names real metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest

from deploy.cli import main
from deploy.dashboards import all_dashboards, iter_queries, render, substitute, to_json
from profilers.exporter import DeviceSample, ExportSnapshot, ReplicaSample, build_registry
from profilers.footprint import load_site_profile

CHART_DASHBOARDS = Path(__file__).resolve().parents[1] / "helm" / "llm-energy-testbed" / "dashboards"
METRIC = re.compile(r"\bllm_energy_[a-z_]+")


def exported_names() -> set[str]:
    """Sample names the real exporter writes for a deployment with one replica and one device."""

    def snap(energy_j: float, tokens: int) -> ExportSnapshot:
        return ExportSnapshot(
            devices=[DeviceSample("replica-0", "0", "emulated", "modeled", energy_j, 300.0, 1980.0)],
            replicas=[ReplicaSample("replica-0", "vllm", 10, tokens, 1.0, 2.0, 3.0, 1, 0, kv_used_tokens=16,
                                    kv_capacity_tokens=4096, prefix_cache_queried_tokens=10,
                                    prefix_cache_hit_tokens=4)],
        )

    current = [snap(100.0, 20)]
    registry, latency = build_registry(lambda: current[0], load_site_profile("azure"))
    latency.observe("replica-0", 0.1, 0.01, 0.5)
    generate_latest(registry)  # the windowed energy per token needs two scrapes
    current[0] = snap(110.0, 30)
    text = generate_latest(registry).decode() + controller_metrics_text()
    return {m.group(0) for m in re.finditer(r"^(llm_energy_[a-z_]+)", text, re.M)}


def controller_metrics_text() -> str:
    """What the real controller exports once it has applied knobs and seen a request."""
    from controllers.config import ControllerConfig
    from controllers.service import Controller
    from serving.api import FrontDoor
    from serving.router import ReplicaHandle, Router
    from serving.types import AppliedKnobs

    door = FrontDoor(Router([ReplicaHandle("replica-0", None)]), "m", 1024, load_site_profile("azure"))
    controller = Controller(ControllerConfig(), door)
    controller.actuator.last_applied["replica-0"] = AppliedKnobs(1980.0, 256, 0.0)
    controller.loop.stats.count("static", "static")
    door.recent.complete(0.0, 0.1, 0.01)
    return generate_latest(door.registry).decode()


def test_committed_json_equals_the_generator() -> None:
    committed = sorted(p.name for p in CHART_DASHBOARDS.glob("*.json"))
    assert committed == sorted(f"{d.uid}.json" for d in all_dashboards()), (
        "run: testbed dashboards export " + str(CHART_DASHBOARDS)
    )
    for d in all_dashboards():
        assert (CHART_DASHBOARDS / f"{d.uid}.json").read_text() == render(d), (
            f"{d.uid}.json is stale: run `testbed dashboards export helm/llm-energy-testbed/dashboards`"
        )


def test_the_four_dashboards_and_their_subjects() -> None:
    titles = {d.uid: [p.title for p in d.panels] for d in all_dashboards()}
    assert set(titles) == {
        "llm-energy-overview",
        "llm-energy-replica",
        "llm-energy-controller",
        "llm-energy-hardware",
    }
    overview = " | ".join(titles["llm-energy-overview"]).lower()
    for subject in (
        "energy per generated token",
        "power",
        "clock",
        "tokens per second",
        "water",
        "carbon",
        "slo attainment",
        "goodput",
    ):
        assert subject in overview
    assert "Knob values" in titles["llm-energy-controller"]
    assert any("reason" in t for t in titles["llm-energy-controller"])


def test_every_query_uses_exported_metrics() -> None:
    exported = exported_names()
    assert (
        "llm_energy_energy_joules_total" in exported and "llm_energy_request_ttft_seconds_bucket" in exported
    )
    for d, panel, query in iter_queries():
        for name in METRIC.findall(query.expr):
            assert name in exported, f"{d.uid}/{panel.title}: unknown metric {name}"


def test_dashboard_json_structure() -> None:
    for d in all_dashboards():
        body = to_json(d)
        ids = [p["id"] for p in body["panels"]]
        assert len(ids) == len(set(ids))
        for p in body["panels"]:
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24 and g["w"] > 0 and g["h"] > 0
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert p["targets"] and all(t["expr"] for t in p["targets"])
        names = [v["name"] for v in body["templating"]["list"]]
        assert names[0] == "datasource"
        json.dumps(body)


def test_substitute_fills_every_variable() -> None:
    for _, _, query in iter_queries():
        assert "$" not in substitute(query.expr)


def test_export_cli_writes_the_files(tmp_path: Path) -> None:
    assert main(["dashboards", "export", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in CHART_DASHBOARDS.iterdir()
    )
