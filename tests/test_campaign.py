"""Campaigns end to end through the CLI: real front door, real Ray replicas, real httpx load."""

from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml

from deploy.cli import main
from profilers import trace
from profilers.footprint import J_PER_KWH, load_site_profile
from workloads.results import POINT_COLUMNS

REQUIRED = [
    "point", "backend", "offered_rps", "requests", "completed", "failed", "output_tokens", "energy_j",
    "energy_per_token_j", "water_per_token_ml", "carbon_per_token_g", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s",
    "tpot_p99_s", "slo_attainment", "provenance",
]


def write_campaign(tmp_path: Path, **over) -> Path:
    cfg = {
        "name": "t", "seed": 3, "site": "aws",
        "workload": {
            "arrival": {"kind": "poisson"},
            "prompt_tokens": {"kind": "uniform", "low": 8, "high": 64},
            "output_tokens": {"kind": "uniform", "low": 4, "high": 24},
            "duration_s": 3,
        },
        "slo": {"ttft_s": 0.5, "tpot_s": 0.05},
        "sweep": {"rate_rps": [2, 5]},
    }
    for k, v in over.items():
        cfg[k] = v
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_campaign_against_running_deployment(served, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    assert main(["campaign", "run", str(write_campaign(tmp_path)), "--out", str(out), "--url", served.url]) == 0
    # The progress line of each point: point k/n, requests due and done, live energy per token.
    printed = capsys.readouterr().out
    for k in (1, 2):
        assert f"point {k}/2" in printed
    assert "due " in printed and "done" in printed and "J/token" in printed
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert {d.split("/")[0] for d in manifest["target_devices"]} == {"replica-0", "replica-1"}
    assert manifest["target_backends"] == ["emulated"] and manifest["tokenizer"] == "word"
    points = pd.read_csv(out / "points.csv")
    assert list(points.columns) == POINT_COLUMNS
    assert set(REQUIRED) <= set(points.columns)
    assert len(points) == 2
    site = load_site_profile("aws")
    for _, p in points.iterrows():
        assert p["completed"] + p["failed"] == p["requests"] > 0
        assert p["energy_j"] > 0 and p["output_tokens"] > 0
        assert p["energy_per_token_j"] * p["output_tokens"] == pytest.approx(p["energy_j"], rel=1e-9)
        kwh = p["energy_j"] / J_PER_KWH
        water_ml = (kwh * site.wue_site_l_per_kwh + kwh * site.pue * site.wue_source_l_per_kwh) * 1000
        carbon_g = kwh * site.pue * site.cif_kg_per_kwh * 1000
        assert p["water_per_token_ml"] * p["output_tokens"] == pytest.approx(water_ml, rel=1e-9)
        assert p["carbon_per_token_g"] * p["output_tokens"] == pytest.approx(carbon_g, rel=1e-9)
        assert p["provenance"] == "modeled" and p["backend"] == "emulated"
        # Attributed request energy is part of the metered energy (the rest is idle and other traffic).
        assert 0 < p["attributed_energy_j"] <= p["energy_j"] * 1.001
    requests = pd.read_parquet(out / "requests.parquet")
    assert len(requests) == points["requests"].sum()
    ok = requests[requests["status"] == "ok"]
    assert (ok["energy_j"] > 0).all() and ok["replica"].str.startswith("replica-").all()
    assert (ok["output_tokens"] == ok["max_output_tokens"]).all()
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Energy per token" in html


@pytest.mark.slow
def test_too_long_prompts_are_recorded_failed_and_campaign_goes_on(served, tmp_path: Path) -> None:
    path = write_campaign(
        tmp_path,
        workload={"prompt_tokens": {"kind": "uniform", "low": 600, "high": 1500},
                  "output_tokens": {"kind": "fixed", "value": 4}, "duration_s": 2, "arrival": {"kind": "constant"}},
        sweep={"rate_rps": [4]},
    )
    out = tmp_path / "out"
    assert main(["campaign", "run", str(path), "--out", str(out), "--url", served.url]) == 0
    req = pd.read_parquet(out / "requests.parquet")
    too_long = req[req["prompt_tokens"] + 4 > 1024]
    assert len(too_long) > 0 and (too_long["status"] == "failed").all()
    assert too_long["error"].str.contains("HTTP 400: This model's maximum context length is 1024").all()
    assert (req[req["prompt_tokens"] + 4 <= 1024]["status"] == "ok").all()
    p = pd.read_csv(out / "points.csv").iloc[0]
    assert p["failed"] == len(too_long) and p["completed"] + p["failed"] == p["requests"]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"sweep": {"rate_rps": [2, -1]}}, "sweep.rate_rps.1: Input should be greater than 0"),
        ({"sweep": {"rate_rps": [1]}, "wrkload": {}}, "wrkload: unknown key; allowed keys here:"),
        ({"sweep": {"rate_rps": "fast"}}, "sweep.rate_rps: Input should be a valid list"),
        ({"sweep": {"rate_rps": [1]}, "workload": {"duration_s": "long"}}, "workload.duration_s"),
        ({"sweep": {"rate_rps": [1]}, "deployment": {"replicas": 0}}, "deployment.replicas"),
        ({"sweep": {"rate_rps": [1]}, "deployment": {"engine": {"gpu": 1}}}, "allowed keys here: clock_mhz, device"),
        # Unbounded loads are refused before anything starts (they grew memory without bound, or hung).
        ({"sweep": {"rate_rps": [float("inf")]}}, "sweep.rate_rps.0: Input should be a finite number"),
        ({"sweep": {"rate_rps": [1e9]}}, "sweep.rate_rps.0: Input should be less than or equal to 100000"),
        ({"sweep": {"rate_rps": [50_000]}, "workload": {"duration_s": 3600}}, "requests in one point, more than"),
        ({"sweep": {"concurrency": [10**9]}, "workload": {"arrival": {"kind": "closed"}}},
         "sweep.concurrency.0: Input should be less than or equal to 100000"),
        ({"sweep": {"rate_rps": [1]}, "workload": {"request_timeout_s": float("inf")}},
         "workload.request_timeout_s: Input should be a finite number"),
        ({"sweep": {"rate_rps": [1]}, "workload": {"arrival": {"kind": "gamma", "cv": float("nan")}}},
         "workload.arrival.gamma.cv: Input should be a finite number"),
    ],
)
def test_invalid_campaign_exits_2_naming_file_and_field(tmp_path, capsys, override, expected) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(override))
    out = tmp_path / "out"
    assert main(["campaign", "run", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and expected in err
    assert not out.exists()  # nothing half-written


def test_not_yaml_and_missing_file(tmp_path, capsys) -> None:
    bad = tmp_path / "x.yaml"
    bad.write_text("sweep: [unclosed\n")
    assert main(["campaign", "run", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["campaign", "run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_finished_campaign_is_not_overwritten(tmp_path, capsys) -> None:
    from deploy.config import CampaignFile, load_yaml_model
    from workloads.campaign import write_manifest

    path = write_campaign(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    write_manifest(out, load_yaml_model(path, CampaignFile), "http://127.0.0.1:9", "finished")
    (out / "points.csv").write_text("point\n0\n")
    assert main(["campaign", "run", str(path), "--out", str(out), "--url", "http://127.0.0.1:9"]) == 2
    assert "already holds a finished campaign; pass --resume" in capsys.readouterr().err
    assert (out / "points.csv").read_text() == "point\n0\n"
    # A different configuration cannot be resumed into it.
    other = write_campaign(tmp_path, seed=4)
    assert main(["campaign", "run", str(other), "--out", str(out), "--resume", "--url", "http://127.0.0.1:9"]) == 2
    assert "configuration differs" in capsys.readouterr().err


def test_non_campaign_directory_is_refused(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert main(["campaign", "run", str(write_campaign(tmp_path)), "--out", str(out)]) == 2
    assert "holds no campaign" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "precious"


@pytest.mark.slow
def test_cli_starts_and_stops_its_own_deployment(tmp_path: Path, capsys, monkeypatch) -> None:
    """The quickstart path: `testbed campaign run` without --url brings up Ray + front door in a child process.
    With the latency trace on, every process of the path marks each request's stages on one time line."""
    monkeypatch.setenv(trace.TRACE_ENV, str(tmp_path))
    path = write_campaign(
        tmp_path, deployment={"replicas": 2, "engine": {"model": "qwen2.5-0.5b", "max_model_len": 2048}},
        workload={"duration_s": 2, "output_tokens": {"kind": "fixed", "value": 8}}, sweep={"rate_rps": [3]},
    )
    out = tmp_path / "out"
    rc = main(["campaign", "run", str(path), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    p = pd.read_csv(out / "points.csv").iloc[0]
    assert p["completed"] == p["requests"] > 0 and p["energy_j"] > 0
    log = (out / "deployment.log").read_text()
    assert "serving qwen2.5-0.5b" in log and "stopped cleanly" in log
    assert p["floor_j_per_token"] > 0 and p["x_floor"] > 1
    stages = trace.read_trace(tmp_path)
    path = ["client.send", "door.receive", "router.dispatch", "actor.receive", "engine.admit",
            "engine.iteration_start", "engine.first_token_modeled", "engine.first_token", "actor.first_event",
            "router.first_event", "door.first_chunk", "client.first_chunk"]
    assert len(stages) == p["requests"]
    for marks in stages.values():
        times = [marks[s] for s in path]
        assert times == sorted(times), marks  # one monotonic clock across client, front door, actor, engine
    assert trace.path_latency(stages)["request_latency_s"] > 0


def test_unwritable_out_fails_before_the_campaign_starts(tmp_path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["campaign", "run", str(write_campaign(tmp_path)), "--out", str(blocker / "out")]) == 2
    assert "cannot write to" in capsys.readouterr().err


@pytest.mark.slow
def test_a_dead_target_fails_the_point_stops_the_campaign_and_resume_measures_it_again(tmp_path: Path, capsys) -> None:
    import json
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write_campaign(tmp_path, model="m", workload={"duration_s": 1}, sweep={"rate_rps": [3, 4]})
    out = tmp_path / "out"
    url = f"http://127.0.0.1:{port}"
    assert main(["campaign", "run", str(path), "--out", str(out), "--url", url]) == 1
    err = capsys.readouterr().err
    assert "every request failed on the target's side" in err and "continue with --resume" in err
    points = pd.read_csv(out / "points.csv")
    assert points["point"].tolist() == [0] and points.iloc[0]["status"] == "failed"  # not a finished point
    assert "no request succeeded" in points.iloc[0]["notes"] and "energy unavailable" in points.iloc[0]["notes"]
    assert points.iloc[0]["failed"] == points.iloc[0]["requests"] > 0
    req = pd.read_parquet(out / "requests.parquet")
    assert len(req) == points["requests"].sum() and req["error"].str.contains("ConnectError").all()
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"  # never "finished"
    assert main(["campaign", "run", str(path), "--out", str(out), "--url", url, "--resume"]) == 1
    assert "point 0 (as deployed) already measured" not in capsys.readouterr().out  # measured again


@pytest.mark.slow
def test_kill_9_mid_campaign_then_resume_loses_nothing(served, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    path = write_campaign(tmp_path, workload={"duration_s": 2, "output_tokens": {"kind": "fixed", "value": 4}},
                          sweep={"rate_rps": [3, 4, 5]})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "deploy.cli", "campaign", "run", str(path), "--out", str(out), "--url", served.url]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (out / "points.csv").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # points.csv is the commit mark of a point; the derived files are rebuilt from per-point parts on the next
    # run, `testbed report` or `--resume` (the kill may land between two writes).
    assert main(["report", str(out)]) == 0
    before_points = pd.read_csv(out / "points.csv")
    before_requests = pd.read_parquet(out / "requests.parquet")
    assert list(before_points["point"]) == [0]
    assert len(before_requests) == before_points.iloc[0]["requests"]
    assert main(["campaign", "run", str(path), "--out", str(out), "--url", served.url]) == 2  # refuses to clobber
    assert main(["campaign", "run", str(path), "--out", str(out), "--url", served.url, "--resume"]) == 0
    after_points = pd.read_csv(out / "points.csv")
    after_requests = pd.read_parquet(out / "requests.parquet")
    assert list(after_points["point"]) == [0, 1, 2]
    pd.testing.assert_frame_equal(after_points.iloc[[0]], before_points)  # finished row intact
    pd.testing.assert_frame_equal(
        after_requests[after_requests["point"] == 0].reset_index(drop=True), before_requests
    )
    assert len(after_requests) == after_points["requests"].sum()


def test_pareto_front_and_comparison(tmp_path: Path, capsys) -> None:
    from workloads.report import compare_frame, pareto_front

    pts = pd.DataFrame({"offered_rps": [1, 2, 3, 4], "tpot_p99_s": [0.01, 0.02, 0.03, 0.025],
                        "energy_per_token_j": [2.0, 1.0, 0.5, 1.5]})
    assert pareto_front(pts).tolist() == [True, True, True, False]
    b = pts.assign(energy_per_token_j=pts["energy_per_token_j"] / 2)
    for col in ("water_per_token_ml", "carbon_per_token_g", "ttft_p99_s", "slo_attainment"):
        pts[col] = b[col] = 1.0
    merged = compare_frame(pts, b)
    assert merged["energy_per_token_j_b/a"].tolist() == [0.5] * 4
    da, db = tmp_path / "a", tmp_path / "b"
    for d, frame in ((da, pts), (db, b)):
        d.mkdir()
        frame.to_csv(d / "points.csv", index=False)
    assert main(["compare", str(da), str(db)]) == 0
    assert (db / "compare.html").exists() and "0.5" in capsys.readouterr().out
    assert main(["compare", str(da), str(tmp_path / "missing")]) == 2


@pytest.mark.slow
def test_knob_and_policy_sweep_through_the_control_api(served, tmp_path: Path, capsys) -> None:
    from conftest import CONTROL_TOKEN

    path = write_campaign(
        tmp_path,
        workload={"duration_s": 2, "output_tokens": {"kind": "fixed", "value": 16},
                  "prompt_tokens": {"kind": "fixed", "value": 64}, "sample_interval_s": 0.25},
        sweep={"rate_rps": [4], "knobs": [{"clock_mhz": 1980}, {"clock_mhz": 810}],
               "policies": [{"policy": "slo_feedback", "options": {"setpoint": 0.5}}]},
    )
    out = tmp_path / "out"
    # Without the token the control API refuses, the campaign stops with the reason and keeps nothing half-done.
    assert main(["campaign", "run", str(path), "--out", str(out), "--url", served.url]) == 1
    assert "refused the control token" in capsys.readouterr().err
    assert main(["campaign", "run", str(path), "--out", str(out), "--url", served.url, "--overwrite",
                 "--control-token", CONTROL_TOKEN]) == 0
    p = pd.read_csv(out / "points.csv")
    assert p["setting"].tolist() == ["clock_mhz=1980", "clock_mhz=810", "policy=slo_feedback(setpoint=0.5)"]
    assert p["clock_mhz_mean"].iloc[0] == 1980 and p["clock_mhz_mean"].iloc[1] == 810
    assert p["energy_per_token_j"].iloc[1] != pytest.approx(p["energy_per_token_j"].iloc[0], rel=1e-3)
    state = httpx.get(f"{served.url}/control").json()
    assert state["policy"] == "static"  # the sweep put the deployment's policy back


def test_sampler_errors_mark_the_point_degraded() -> None:
    from profilers.meter import CounterSample
    from profilers.scrape import CounterSnapshot
    from workloads.campaign import _sampler_failures

    def snap(errors: dict[str, float]) -> CounterSnapshot:
        return CounterSnapshot({"r/gpu0": CounterSample(1.0, "measured")}, {}, sampler_errors=errors)

    assert _sampler_failures(snap({"r/gpu0": 2}), snap({"r/gpu0": 2})) == ""
    assert _sampler_failures(snap({"r/gpu0": 2}), snap({"r/gpu0": 5, "r/gpu1": 0})) == "r/gpu0"
    assert _sampler_failures(snap({}), snap({"r/gpu1": 1})) == "r/gpu1"


@pytest.mark.parametrize(("sweep", "arrival", "expected"), [
    ({"rate_rps": [2]}, {"kind": "closed"}, "closed-loop arrivals (workload.arrival.kind: closed) are swept by"),
    ({"concurrency": [2]}, {"kind": "poisson"}, "sweep.rate_rps (offered request rates) is required"),
])
def test_load_must_match_the_arrival_kind(tmp_path, capsys, sweep, arrival, expected) -> None:
    path = write_campaign(tmp_path, sweep=sweep)
    cfg = yaml.safe_load(path.read_text())
    cfg["workload"]["arrival"] = arrival
    path.write_text(yaml.safe_dump(cfg))
    assert main(["campaign", "run", str(path), "--out", str(tmp_path / "o")]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
