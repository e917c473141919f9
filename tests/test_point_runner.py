"""The one point runner: the same campaign in real and virtual time, the single atomic writer of points.csv, and
campaign logic (resume, warm-up/cool-down, traces, closed loop) exercised on the virtual target (no real sleeps)."""

import math
import os
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from deploy.virtual import run_virtual_campaign
from serving.config import EmulatedEngineConfig, ServingConfig
from workloads.campaign import prepare_out_dir, run_campaign
from workloads.http_target import HttpTarget
from workloads.results import POINT_COLUMNS, ResultStore
from workloads.spec import CampaignSpec

QUIET = Console(quiet=True)
# The `served` fixture's deployment, for the virtual twin of a real campaign.
SERVED = ServingConfig(replicas=2, port=0, engine=EmulatedEngineConfig(max_model_len=1024))


def spec(**over: object) -> CampaignSpec:
    cfg: dict[str, object] = {
        "name": "t", "seed": 3, "site": "aws",
        "workload": {"arrival": {"kind": "poisson"}, "prompt_tokens": {"kind": "uniform", "low": 8, "high": 64},
                     "output_tokens": {"kind": "uniform", "low": 4, "high": 24}, "duration_s": 2},
        "slo": {"ttft_s": 0.5, "tpot_s": 0.05},
        "sweep": {"rate_rps": [2, 5]},
    }
    cfg.update(over)
    return CampaignSpec.model_validate(cfg)


@pytest.mark.slow
def test_same_campaign_in_real_and_virtual_time_gives_the_same_columns_and_labels(served, tmp_path: Path) -> None:
    from conftest import CONTROL_TOKEN

    s = spec(sweep={"rate_rps": [4], "knobs": [{"clock_mhz": 1980}],
                    "policies": [{"policy": "slo_feedback", "options": {"setpoint": 0.5}}]})
    prepare_out_dir(tmp_path / "real", s, resume=False, overwrite=False)
    real = run_campaign(s, HttpTarget(served.url, control_token=CONTROL_TOKEN), tmp_path / "real", QUIET)
    virtual = run_virtual_campaign(s, SERVED, tmp_path / "virtual", QUIET)
    assert list(real.columns) == list(virtual.columns) == POINT_COLUMNS
    assert real["setting"].tolist() == virtual["setting"].tolist() == [
        "clock_mhz=1980", "policy=slo_feedback(setpoint=0.5)"]
    for frame in (real, virtual):
        assert (frame["status"] == "ok").all() and (frame["energy_j"] > 0).all()
    plain = spec(sweep={"rate_rps": [3]}, workload={"duration_s": 1})
    prepare_out_dir(tmp_path / "real2", plain, resume=False, overwrite=False)
    a = run_campaign(plain, HttpTarget(served.url), tmp_path / "real2", QUIET)
    b = run_virtual_campaign(plain, SERVED, tmp_path / "virtual2", QUIET)
    assert a["setting"].tolist() == b["setting"].tolist() == ["as deployed"]


def test_a_crash_between_the_temporary_file_and_the_rename_keeps_the_previous_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = spec()
    first = run_virtual_campaign(s.model_copy(update={"sweep": s.sweep.model_copy(update={"rate_rps": [2]})}),
                                 SERVED, tmp_path, QUIET)
    before = (tmp_path / "points.csv").read_bytes()
    real_replace = os.replace

    def crash(src: str | Path, dst: str | Path) -> None:
        if Path(dst).name == "points.csv":
            raise KeyboardInterrupt("killed between the temporary file and the rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        run_virtual_campaign(s, SERVED, tmp_path, QUIET)  # point 0 is done: point 1 is measured, then the crash
    assert (tmp_path / "points.csv").read_bytes() == before
    monkeypatch.setattr(os, "replace", real_replace)
    after = run_virtual_campaign(s, SERVED, tmp_path, QUIET)  # as --resume: point 0 kept, point 1 measured again
    assert after["point"].tolist() == [0, 1]
    assert after.iloc[0]["energy_j"] == first.iloc[0]["energy_j"]
    requests = ResultStore(tmp_path).requests()
    assert sorted(requests["point"].unique()) == [0, 1]


def test_resume_measures_only_what_is_missing(tmp_path: Path) -> None:
    s = spec()
    before = run_virtual_campaign(s, SERVED, tmp_path, QUIET)
    before[before["point"] == 0].to_csv(tmp_path / "points.csv", index=False)  # as if killed after point 0
    (tmp_path / "parts" / "point-0001.parquet").unlink()
    after = run_virtual_campaign(s, SERVED, tmp_path, QUIET)
    assert after["point"].tolist() == [0, 1]
    # virtual time is exact: the re-measured point is the same (but for how fast it simulated)
    pd.testing.assert_frame_equal(after.drop(columns="sim_speed_x"), before.drop(columns="sim_speed_x"))
    assert (after["sim_speed_x"] > 1).all()


def test_warmup_and_cooldown_are_left_out_of_the_window(tmp_path: Path) -> None:
    s = spec(workload={"arrival": {"kind": "constant"}, "duration_s": 4, "warmup_s": 1, "cooldown_s": 1,
                       "output_tokens": {"kind": "fixed", "value": 5}, "prompt_tokens": {"kind": "fixed", "value": 9},
                       "sample_interval_s": 0.5},
             sweep={"rate_rps": [5]})
    p = run_virtual_campaign(s, SERVED, tmp_path, QUIET).iloc[0]
    req = ResultStore(tmp_path).requests()
    assert req["phase"].value_counts().to_dict() == {"measure": 10, "warmup": 5, "cooldown": 5}
    assert p["requests"] == 20 and p["duration_s"] == pytest.approx(2.0)
    assert 30 <= p["output_tokens"] <= 70, p.to_dict()  # generated inside the 2 s window
    assert p["energy_per_token_j"] * p["output_tokens"] == pytest.approx(p["energy_j"])
    ts = ResultStore(tmp_path).timeseries()
    assert len(ts) >= 2 * 8 and set(ts["replica"]) == {"replica-0", "replica-1"}
    assert (ts["power_w"] > 0).all() and ts["t_s"].is_monotonic_increasing


def test_trace_replay_sends_the_traces_own_lengths_in_order(tmp_path: Path) -> None:
    from workloads.traces import load_trace

    s = spec(workload={"arrival": {"kind": "trace", "path": "azure_conv_2023", "start_s": 600}, "duration_s": 3},
             sweep={"rate_rps": [4]})
    run_virtual_campaign(s, SERVED, tmp_path, QUIET)
    req = ResultStore(tmp_path).requests()
    tr = load_trace("azure_conv_2023")
    first = tr.t_s >= 600
    assert req["prompt_tokens"].tolist() == tr.prompt_tokens[first][: len(req)].tolist()
    assert req["max_output_tokens"].tolist() == tr.output_tokens[first][: len(req)].tolist()
    fits = req["prompt_tokens"] + req["max_output_tokens"] <= 1024
    assert (req[fits]["status"] == "ok").all() and fits.any()
    assert (req[~fits]["http_status"] == 400).all()  # over the context length: refused, recorded, not lost


def test_closed_loop_users_keep_one_request_each_in_flight(tmp_path: Path) -> None:
    s = spec(workload={"arrival": {"kind": "closed"}, "duration_s": 2,
                       "prompt_tokens": {"kind": "uniform", "low": 8, "high": 64},
                       "output_tokens": {"kind": "uniform", "low": 4, "high": 24}},
             sweep={"concurrency": [1, 4]})
    points = run_virtual_campaign(s, SERVED, tmp_path, QUIET)
    assert points["concurrency"].tolist() == [1, 4] and (points["failed"] == 0).all()
    assert points["offered_rps"].iloc[1] > 1.5 * points["offered_rps"].iloc[0] > 0
    one = ResultStore(tmp_path).requests().query("point == 0").sort_values("intended_send_s")
    ends = (one["intended_send_s"] + one["e2e_s"]).to_numpy()
    assert (one["intended_send_s"].to_numpy()[1:] >= ends[:-1] - 1e-9).all()


def test_the_floor_is_written_with_each_emulated_point(tmp_path: Path) -> None:
    points = run_virtual_campaign(spec(), SERVED, tmp_path, QUIET)
    assert (points["floor_j_per_token"] > 0).all() and (points["x_floor"] > 1).all()
    assert not math.isnan(points["x_floor"].iloc[0])


def test_a_point_where_every_request_fails_is_failed_and_the_campaign_goes_on(tmp_path: Path) -> None:
    s = spec(workload={"prompt_tokens": {"kind": "fixed", "value": 2000},
                       "output_tokens": {"kind": "fixed", "value": 4},
                       "duration_s": 1, "arrival": {"kind": "constant"}})
    points = run_virtual_campaign(s, SERVED, tmp_path, QUIET)  # every prompt is over the 1024-token context
    assert points["status"].tolist() == ["failed", "failed"]  # refused requests: the target is up, both points ran
    assert points["notes"].str.contains("no request succeeded").all()
    assert ResultStore(tmp_path).finished_points() == set()  # --resume measures them again
    import json

    assert json.loads((tmp_path / "manifest.json").read_text())["failed_points"] == [0, 1]
