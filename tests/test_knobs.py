"""One knob schema and one SLO: the same refusal from every path, bounds that hold, config hashes and labels
as they were before the schemas were merged."""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from controllers.remote import MetricsObserver
from controllers.service import add_control_routes
from deploy.config import CampaignFile, ConfigError, load_yaml_model
from serving.knobs import Knobs
from serving.slo import SLO
from workloads.spec import CampaignSpec, setting_label

ROOT = Path(__file__).resolve().parent.parent
INF_CLOCK = "knob clock_mhz: must be a finite number of MHz in (0, 10000], got inf"


def test_the_same_refusal_from_python_a_campaign_file_and_the_control_api(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as python:
        Knobs(clock_mhz=math.inf)
    assert INF_CLOCK in str(python.value)

    campaign = tmp_path / "campaign.yaml"
    campaign.write_text("sweep:\n  rate_rps: [1]\n  knobs:\n    - {clock_mhz: .inf}\n")
    with pytest.raises(ConfigError) as yaml_file:
        load_yaml_model(campaign, CampaignFile)
    assert f"sweep.knobs.0: {INF_CLOCK}" in str(yaml_file.value)

    app = FastAPI()
    add_control_routes(app, SimpleNamespace(token="t"))  # type: ignore[arg-type]  # refused before any use
    resp = TestClient(app).post("/control/knobs", content=b'{"clock_mhz": Infinity}',
                                headers={"authorization": "Bearer t", "content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["message"] == f"invalid knobs: {INF_CLOCK}"


@pytest.mark.parametrize(("knobs", "words"), [
    ({"clock_mhz": math.nan}, "knob clock_mhz: must be a finite number"),
    ({"clock_mhz": 1e999}, "knob clock_mhz: must be a finite number"),
    ({"clock_mhz": 0}, "knob clock_mhz: must be a finite number"),
    ({"max_num_seqs": 1.5}, "knob max_num_seqs: must be an integer in [1, 4096], got 1.5"),
    ({"max_num_seqs": 1e30}, "knob max_num_seqs: must be an integer in [1, 4096], got 1e+30"),
    ({"max_num_batched_tokens": 0}, "knob max_num_batched_tokens: must be an integer in [1, 1048576]"),
    ({"speculative_tokens": 17}, "knob speculative_tokens: must be an integer in [0, 16]"),
    ({"pack_per_replica": -1}, "knob pack_per_replica: must be an integer in [0, 4096]"),
    ({"prefix_caching": "maybe"}, "knob prefix_caching: must be true or false"),
    ({"clock": 1000}, "knob clock: unknown; the knobs are clock_mhz, max_num_seqs"),
])
def test_bounds_hold(knobs: dict[str, object], words: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(words)):
        Knobs.model_validate(knobs)


def test_whole_numbers_from_yaml_and_json_are_accepted() -> None:
    assert Knobs(max_num_seqs=64.0, clock_mhz=1410) == Knobs(max_num_seqs=64, clock_mhz=1410.0)  # type: ignore[arg-type]


# Before the schemas were merged (KnobSetting, workloads.spec.SLO and ControllerSLO with its 2.0 s default):
# config hashes of every shipped campaign and of a knob sweep, and the points.csv setting labels.
HASHES_BEFORE = {
    "azure_trace": "e5331c88dd719f8b", "controllers": "30f267a077e1cd1f", "diurnal": "060c6d001e7d885f",
    "hardware_compare": "403c4b8d65035c9c", "quickstart": "fcbf3989e597bbd0", "vllm_cpu": "bb73b085aa242b04",
    "vllm_prefix_cache": "3e0a18cbe5e7be65",
}
KNOBS = [{}, {"clock_mhz": 1200, "max_num_seqs": 64}, {"clock_mhz": 1410.5}, {"prefix_caching": True},
         {"prefix_caching": False, "speculative_tokens": 0}, {"pack_per_replica": 0, "max_num_batched_tokens": 2048},
         {"speculative_tokens": 4, "clock_mhz": 990}]
LABELS = ["knobs=defaults", "clock_mhz=1200 max_num_seqs=64", "clock_mhz=1410.5", "prefix_caching=on",
          "speculative_tokens=0 prefix_caching=off", "max_num_batched_tokens=2048 pack_per_replica=0",
          "clock_mhz=990 speculative_tokens=4"]


@pytest.mark.parametrize("name", sorted(HASHES_BEFORE))
def test_shipped_campaigns_keep_their_config_hash(name: str) -> None:
    assert load_yaml_model(ROOT / "examples" / f"{name}.yaml", CampaignFile).config_hash() == HASHES_BEFORE[name]


def test_knob_sweeps_keep_their_config_hash_and_labels() -> None:
    spec = CampaignSpec.model_validate({"sweep": {"rate_rps": [1, 2], "knobs": KNOBS}})
    assert spec.config_hash() == "64db04333647570c"
    assert CampaignSpec.model_validate({"sweep": {"rate_rps": [1, 2], "knobs": KNOBS},
                                        "slo": {"ttft_s": 2.0, "tpot_s": 0.1}}).config_hash() == "1ef0150ed426194c"
    assert [setting_label(s) for s in spec.sweep.settings()] == LABELS
    assert [Knobs.from_label(label) for label in LABELS[1:]] == spec.sweep.knobs[1:]
    file = {"sweep": {"rate_rps": [1, 2], "knobs": KNOBS}, "deployment": {"controller": {"slo": {"ttft_s": 2.0}}}}
    assert CampaignFile.model_validate(file).config_hash() == "bc7e6f446c3c7cc2"


def test_a_percentile_other_than_95_is_part_of_the_hash() -> None:
    base = {"sweep": {"rate_rps": [1]}}
    assert (CampaignSpec.model_validate({**base, "slo": {"percentile": 99}}).config_hash()
            != CampaignSpec.model_validate(base).config_hash())


async def test_the_remote_controller_measures_the_percentile_its_slo_names() -> None:
    # 100 requests: 90 with TTFT <= 0.1 s, 10 in (0.1, 1] s; p95 lies in the upper bucket and p99 higher up.
    text = "\n".join([
        "# TYPE llm_energy_request_ttft_seconds histogram",
        'llm_energy_request_ttft_seconds_bucket{le="0.1"} 90',
        'llm_energy_request_ttft_seconds_bucket{le="1.0"} 100',
        'llm_energy_request_ttft_seconds_bucket{le="+Inf"} 100',
        "llm_energy_request_ttft_seconds_count 100",
        "llm_energy_request_ttft_seconds_sum 20",
        "",
    ])
    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda _: httpx.Response(200, text=text)))
    seen = {}
    for q in (95, 99):
        observer = MetricsObserver("http://m/metrics", client, SLO(percentile=q).percentile)
        observer._last = {**await observer.scrape(), "ttft": {}}  # the first scrape's counts start from zero
        seen[q] = (await observer()).ttft_s
    assert seen[95] == pytest.approx(0.1 + 0.9 * 0.5) and seen[99] == pytest.approx(0.1 + 0.9 * 0.9)


def test_workloads_import_only_the_contract_types_of_serving() -> None:
    """docs/DESIGN.md: workloads/ may read serving.knobs and serving.slo, which import nothing of ours."""
    import ast

    def ours(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        return {n for n in names if n.split(".")[0] in ("serving", "controllers", "deploy", "workloads")}

    for path in (ROOT / "workloads").glob("*.py"):
        outside = {n for n in ours(path) if not n.startswith(("workloads", "profilers"))}
        assert outside <= {"serving.knobs", "serving.slo"}, path
    for contract in ("knobs", "slo"):
        assert ours(ROOT / "serving" / f"{contract}.py") == set()
