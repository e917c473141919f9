"""Campaign inputs checked before anything starts: malformed traces (--skip-bad-rows) and the prompt tokenizer."""

import json
from pathlib import Path

import pytest
import yaml

from deploy.cli import main
from deploy.config import CampaignFile
from workloads.spec import CampaignSpec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def _trace(tmp_path: Path) -> Path:
    rows = [f"2023-11-16 18:00:{i:02d}.5,{20 + i},{4 + i % 5}" for i in range(40)]
    rows[5] = "2023-11-16 17:00:00,30,5"  # earlier than the row before it
    rows[20] = "2023-11-16 18:00:20,12,-4"  # negative token count
    path = tmp_path / "trace.csv"
    path.write_text(AZURE_HEADER + "\n".join(rows) + "\n")
    return path


def _campaign(tmp_path: Path, workload: dict, clock: str = "virtual") -> Path:  # type: ignore[type-arg]
    cfg = {"name": "inputs", "seed": 1, "clock": clock, "workload": {"duration_s": 4, **workload},
           "sweep": {"rate_rps": [3]}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_malformed_trace_stops_before_the_campaign_and_the_flag_skips_rows(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    trace = _trace(tmp_path)
    campaign = _campaign(tmp_path, {"arrival": {"kind": "trace", "path": str(trace)}})
    out = tmp_path / "out"
    assert main(["campaign", "run", str(campaign), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{trace}: line 7, column TIMESTAMP" in err and "--skip-bad-rows" in err
    assert not out.exists()  # nothing started, nothing written

    assert main(["campaign", "run", str(campaign), "--out", str(out), "--skip-bad-rows"]) == 0
    printed = capsys.readouterr().out
    assert "38 requests, 2 malformed row(s) skipped" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["traces"] == [{"path": str(trace), "requests": 38, "skipped_rows": 2, "skip_bad_rows": True}]
    assert manifest["status"] == "finished"


def test_the_flag_also_covers_trace_lengths(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    trace = _trace(tmp_path)
    campaign = _campaign(tmp_path, {"prompt_tokens": {"kind": "trace", "path": str(trace)},
                                    "output_tokens": {"kind": "trace", "path": str(trace)}})
    assert main(["campaign", "run", str(campaign), "--out", str(tmp_path / "a")]) == 2
    assert "line 7, column TIMESTAMP" in capsys.readouterr().err
    assert main(["campaign", "run", str(campaign), "--out", str(tmp_path / "b"), "--skip-bad-rows"]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert [t["skipped_rows"] for t in manifest["traces"]] == [2]  # one trace, listed once
    import pandas as pd

    req = pd.read_parquet(tmp_path / "b" / "requests.parquet")
    assert set(req["prompt_tokens"]) <= {20 + i for i in range(40)} - {25, 40}


def test_a_mooncake_jsonl_trace_replays_with_its_own_lengths(tmp_path: Path) -> None:
    """JSON lines, millisecond timestamps, one bad line skipped: every request keeps its row's lengths."""
    lines = [json.dumps({"timestamp": 250 * i, "input_length": 30 + i, "output_length": 3 + i % 4, "hash_ids": [i]})
             for i in range(16)]
    lines[7] = '{"timestamp": 1750, "input_length": 37'  # cut short
    trace = tmp_path / "mooncake.jsonl"
    trace.write_text("\n".join(lines) + "\n")
    campaign = _campaign(tmp_path, {"arrival": {"kind": "trace", "path": str(trace)}})
    out = tmp_path / "out"
    assert main(["campaign", "run", str(campaign), "--out", str(out)]) == 2  # the cut line stops it before it starts
    assert main(["campaign", "run", str(campaign), "--out", str(out), "--skip-bad-rows"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["traces"][0]["skipped_rows"] == 1 and manifest["status"] == "finished"
    import pandas as pd

    req = pd.read_parquet(out / "requests.parquet")
    assert set(req["prompt_tokens"]) <= {30 + i for i in range(16)} - {37}
    assert 0 < len(req) <= manifest["traces"][0]["requests"] == 15  # the window (4 s at 3 req/s) may end first


def test_unknown_tokenizer_path_fails_before_the_campaign(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    campaign = _campaign(tmp_path, {"tokenizer": str(tmp_path / "nope")}, clock="real")
    out = tmp_path / "out"
    assert main(["campaign", "run", str(campaign), "--out", str(out), "--url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "workload.tokenizer: tokenizer" in err and "nope not found" in err
    assert not out.exists()


def test_campaign_prompts_resolve_auto() -> None:
    from workloads.inputs import campaign_prompts
    from workloads.prompts import synth_prompt
    from workloads.spec import CampaignSpec

    spec = CampaignSpec.model_validate({"sweep": {"rate_rps": [1]}})
    assert spec.workload.tokenizer == "auto"
    assert campaign_prompts(spec, None).tokenizer == "word"
    assert campaign_prompts(spec, "word").fn is synth_prompt


def test_manifest_and_report_sections(tmp_path: Path) -> None:
    """A campaign's manifest (versions, config hash, hardware, site profile, seed) and report (every section,
    self-contained) from a quick virtual-time run."""
    from deploy.config import CampaignFile
    from profilers.footprint import load_site_profile

    campaign = _campaign(tmp_path, {"arrival": {"kind": "diurnal", "period_s": 4},
                                    "prompt_tokens": {"kind": "fixed", "value": 32},
                                    "output_tokens": {"kind": "fixed", "value": 8}})
    data = yaml.safe_load(campaign.read_text())
    data.update(site="aws", seed=9, sweep={"rate_rps": [2, 6]})
    campaign.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert main(["campaign", "run", str(campaign), "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    spec = CampaignFile.model_validate(data)
    assert m["config_hash"] == spec.config_hash() and m["seed"] == 9 and m["status"] == "finished"
    assert m["site"] == "aws" and m["site_profile"] == load_site_profile("aws").model_dump(mode="json")
    assert {"python", "llm-energy-testbed", "ray", "httpx"} <= set(m["versions"])
    hw = m["machine"]
    assert hw["logical_cpus"] >= 1 and hw["cpu"] and hw["memory_gib"] > 0 and isinstance(hw["gpus"], list)
    html = (out / "report.html").read_text()
    for section in ("Summary", "Energy per token", "Latency", "Pareto front", "Water and carbon",
                    "Power and clock over time", "Per replica"):
        assert f"<h2>{section}</h2>" in html
    assert html.count("src='data:image/png;base64,") == 5
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained


def test_auto_tokenizer_of_a_started_deployment(tmp_path: Path) -> None:
    from deploy.cli import served_tokenizer
    from serving.config import EmulatedEngineConfig, ServingConfig, VLLMEngineConfig

    assert served_tokenizer(ServingConfig(engine=EmulatedEngineConfig())) == "word"
    (tmp_path / "m").mkdir()
    assert served_tokenizer(ServingConfig(engine=VLLMEngineConfig(model=str(tmp_path / "m")))) == str(tmp_path / "m")
    # A model only the remote nodes hold: the campaign cannot read its tokenizer here (auto falls back to word).
    assert served_tokenizer(ServingConfig(engine=VLLMEngineConfig(model=str(tmp_path / "elsewhere")))) is None


def test_a_workload_field_added_later_leaves_older_campaigns_resumable() -> None:
    """The hash of a campaign written before ``shared_prefix_tokens`` existed (this value is what that code
    computed): resuming its run directory must not be refused as a changed config."""
    spec = CampaignSpec.model_validate({"sweep": {"rate_rps": [1, 2]}, "seed": 3})
    assert spec.config_hash() == "bd459e1c9b19ac3c"
    shared = spec.model_copy(update={"workload": spec.workload.model_copy(update={"shared_prefix_tokens": 64})})
    assert shared.config_hash() != spec.config_hash()
    knobs = CampaignSpec.model_validate(
        {"sweep": {"rate_rps": [1], "knobs": [{"max_num_seqs": 8}, {"speculative_tokens": 3}]}, "seed": 4}
    )
    assert knobs.config_hash() == "e16301c321b3932f"  # from before Knobs.prefix_caching
    off = [k.model_copy(update={"prefix_caching": False}) for k in knobs.sweep.knobs]
    assert knobs.model_copy(update={"sweep": knobs.sweep.model_copy(update={"knobs": off})}).config_hash() != (
        "e16301c321b3932f"
    )
    # A deployment field added later (the front door's host) likewise: the quickstart's hash from before it.
    quickstart = CampaignFile.model_validate(yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text()))
    assert quickstart.config_hash() == "fcbf3989e597bbd0"
    in_replica = quickstart.deployment.model_copy(update={"front_door": "in_replica"})
    assert quickstart.model_copy(update={"deployment": in_replica}).config_hash() != "fcbf3989e597bbd0"
    # An engine field added later (tensor parallelism) too: unset it hashes as before, set it does not.
    split = quickstart.deployment.engine.model_copy(update={"tensor_parallel": 2})
    tp2 = quickstart.model_copy(update={"deployment": quickstart.deployment.model_copy(update={"engine": split})})
    assert tp2.config_hash() != "fcbf3989e597bbd0"
    # The front door's limits (door: null unless given) likewise.
    from serving.config import DoorConfig

    limited = quickstart.deployment.model_copy(update={"door": DoorConfig(max_inflight_requests=64)})
    assert quickstart.model_copy(update={"deployment": limited}).config_hash() != "fcbf3989e597bbd0"


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_example_campaign_file_is_valid(path: Path) -> None:
    """The files the README points at load as they are (a renamed field would otherwise surface only when a user
    runs one)."""
    from deploy.config import CampaignFile, load_yaml_model

    example = load_yaml_model(path, CampaignFile)
    assert example.sweep.loads


def test_setting_labels_spell_switches_as_on_and_off() -> None:
    from serving.knobs import Knobs
    from workloads.spec import PolicySetting, setting_label

    assert setting_label(Knobs(max_num_seqs=8, prefix_caching=False)) == "max_num_seqs=8 prefix_caching=off"
    assert setting_label(Knobs(prefix_caching=True)) == "prefix_caching=on"
    assert setting_label(Knobs(clock_mhz=1410.0)) == "clock_mhz=1410"
    assert setting_label(PolicySetting(policy="static")) == "policy=static"
