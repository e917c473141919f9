"""Virtual time: a discrete-event clock that runs the real engines and router without sleeping."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from deploy.cli import main
from deploy.config import CampaignFile
from deploy.virtual import VirtualClock, run_virtual_campaign
from workloads.results import POINT_COLUMNS, TIMESERIES_COLUMNS

ROOT = Path(__file__).resolve().parents[1]


def test_clock_jumps_to_the_next_timer_in_order() -> None:
    clock, seen = VirtualClock(), []

    async def sleeper(name: str, s: float) -> None:
        await clock.sleep(s)
        seen.append((name, clock.now()))

    async def main_task() -> None:
        await asyncio.gather(sleeper("b", 5.0), sleeper("a", 1.0), sleeper("c", 3600.0))

    t0 = time.perf_counter()
    clock.execute(main_task())
    assert seen == [("a", 1.0), ("b", 5.0), ("c", 3600.0)]
    assert time.perf_counter() - t0 < 5.0


def test_deadlock_is_reported() -> None:
    clock = VirtualClock(deadlock_after_s=0.2)

    async def wait_forever() -> None:
        await asyncio.Event().wait()

    with pytest.raises(RuntimeError, match="deadlock"):
        clock.execute(wait_forever())


def test_threads_still_wake_a_virtual_loop() -> None:
    """Work handed to a thread completes through the loop's real wakeup while virtual timers wait."""
    clock = VirtualClock(deadlock_after_s=2.0)

    async def main_task() -> tuple[str, float]:
        slept = asyncio.ensure_future(clock.sleep(3600.0))
        result = await asyncio.to_thread(lambda: (time.sleep(0.05), "from a thread")[1])
        await slept
        return result, clock.now()

    assert clock.execute(main_task()) == ("from a thread", 3600.0)


def _spec(**changes: object) -> CampaignFile:
    data = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    data["workload"]["duration_s"] = 10
    data.update(changes)
    return CampaignFile.model_validate(data)


def test_virtual_campaign_writes_the_real_schema(tmp_path: Path) -> None:
    spec = _spec()
    t0 = time.perf_counter()
    points = run_virtual_campaign(spec, spec.deployment, tmp_path)
    assert time.perf_counter() - t0 < 60  # 20 s of simulated serving
    assert list(points.columns) == POINT_COLUMNS
    assert (points["failed"] == 0).all() and (points["completed"] > 0).all()
    assert (points["provenance"] == "modeled").all()
    # Attribution closes: request energies + idle = metered energy (idle kept apart, so attributed < total).
    assert (points["attributed_energy_j"] < points["energy_j"]).all()
    requests = pd.read_parquet(tmp_path / "requests.parquet")
    assert len(requests) == points["requests"].sum() and set(requests["replica"]) == {
        "replica-0",
        "replica-1",
    }
    series = pd.read_parquet(tmp_path / "timeseries.parquet")
    assert list(series.columns) == TIMESERIES_COLUMNS and len(series) >= 2 * 10  # two replicas, 1 s period
    # More load, less idle energy per token.
    assert points["energy_per_token_j"].iloc[1] < points["energy_per_token_j"].iloc[0]


def test_points_report_speculative_acceptance_where_the_engines_speculate(tmp_path: Path) -> None:
    """Each point's draft acceptance comes from the engines' counters over its window: none without speculation
    (NaN, not 0), the emulated acceptance with it; the emulated engines have no prefix cache (NaN)."""
    spec = _spec(sweep={"rate_rps": [4], "knobs": [{"speculative_tokens": 0}, {"speculative_tokens": 3}]})
    points = run_virtual_campaign(spec, spec.deployment, tmp_path)
    off, on = points.iloc[0], points.iloc[1]
    assert pd.isna(off["spec_acceptance_ratio"]) and 0.2 < on["spec_acceptance_ratio"] < 0.9
    assert points["prefix_cache_hit_ratio"].isna().all()


def test_virtual_is_deterministic(tmp_path: Path) -> None:
    spec = _spec(sweep={"rate_rps": [4]})
    a = run_virtual_campaign(spec, spec.deployment, tmp_path / "a")
    b = run_virtual_campaign(spec, spec.deployment, tmp_path / "b")
    cols = ["energy_j", "ttft_p99_s", "tpot_p50_s", "output_tokens"]
    pd.testing.assert_frame_equal(a[cols], b[cols])


def test_hardware_compare_example_in_virtual_time(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "examples" / "hardware_compare.yaml").read_text())
    data["clock"] = "virtual"
    data["workload"]["duration_s"] = 4
    campaign = tmp_path / "hw.yaml"
    campaign.write_text(yaml.safe_dump(data))
    assert main(["campaign", "run", str(campaign), "--out", str(tmp_path / "out")]) == 0
    table = pd.read_csv(tmp_path / "out" / "compare.csv")
    assert set(table["device"]) == {"h100_sxm", "a40", "hastily_cim", "kv260_fpga"}
    # Measured energy per token never beats the roofline floor of the same point.
    assert (table["floor_j_per_token"] > 0).all() and (table["x_floor"] > 1).all()
    per_device = table.groupby("device")["energy_per_token_j"].min()
    assert per_device["hastily_cim"] < per_device["h100_sxm"]
    for device in per_device.index:
        assert (tmp_path / "out" / device / "report.html").exists()


def test_compare_entry_that_does_not_fit_fails_with_the_reason(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = yaml.safe_load((ROOT / "examples" / "hardware_compare.yaml").read_text())
    data.update(clock="virtual", compare=[{"device": "kv260_fpga"}])
    data["deployment"]["engine"]["model"] = "llama-3.1-8b"
    campaign = tmp_path / "hw.yaml"
    campaign.write_text(yaml.safe_dump(data))
    assert main(["campaign", "run", str(campaign), "--out", str(tmp_path / "out")]) == 1
    assert "does not fit" in capsys.readouterr().err


def test_virtual_clock_refuses_a_url(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    data["clock"] = "virtual"
    campaign = tmp_path / "c.yaml"
    campaign.write_text(yaml.safe_dump(data))
    assert main(["campaign", "run", str(campaign), "--out", str(tmp_path / "o"), "--url", "http://x"]) == 2
    assert "drop --url" in capsys.readouterr().err


def test_compare_labels_must_be_unique(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = yaml.safe_load((ROOT / "examples" / "hardware_compare.yaml").read_text())
    data.update(clock="virtual", compare=[{"device": "a40"}, {"device": "a40", "clock_mhz": 1005}])
    campaign = tmp_path / "hw.yaml"
    campaign.write_text(yaml.safe_dump(data))
    assert main(["campaign", "run", str(campaign), "--out", str(tmp_path / "out")]) == 2
    assert "labels must be unique" in capsys.readouterr().err


def test_compare_entry_with_an_unknown_field_names_it(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = yaml.safe_load((ROOT / "examples" / "hardware_compare.yaml").read_text())
    data["compare"] = [{"device": "a40", "voltage": 2}]
    campaign = tmp_path / "hw.yaml"
    campaign.write_text(yaml.safe_dump(data))
    assert main(["campaign", "run", str(campaign), "--out", str(tmp_path / "out")]) == 2
    assert "compare.0.voltage: unknown key" in capsys.readouterr().err


def test_closed_loop_in_virtual_time(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    data["workload"].update(duration_s=10, arrival={"kind": "closed"})
    data["sweep"] = {"concurrency": [1, 8]}
    spec = CampaignFile.model_validate(data)
    points = run_virtual_campaign(spec, spec.deployment, tmp_path)
    assert points["concurrency"].tolist() == [1, 8] and (points["failed"] == 0).all()
    assert points["offered_rps"].iloc[1] > 3 * points["offered_rps"].iloc[0] > 0
    requests = pd.read_parquet(tmp_path / "requests.parquet")
    one = requests[requests["point"] == 0].sort_values("intended_send_s")
    ends = (one["intended_send_s"] + one["e2e_s"]).to_numpy()
    assert (one["intended_send_s"].to_numpy()[1:] >= ends[:-1] - 1e-9).all()
