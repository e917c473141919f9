"""The real control loop on the virtual clock: policies compared on the same requests."""

from pathlib import Path

from rich.console import Console

from deploy.config import CampaignFile
from deploy.virtual import run_virtual_campaign


def test_policies_and_pinned_knobs_in_virtual_time(tmp_path: Path) -> None:
    spec = CampaignFile.model_validate({
        "name": "v", "clock": "virtual",
        "deployment": {"replicas": 2, "engine": {"model": "llama-2-7b", "max_model_len": 4096},
                       "controller": {"slo": {"ttft_s": 2.0, "tpot_s": 0.1}}},
        "workload": {"prompt_tokens": {"kind": "fixed", "value": 512}, "output_tokens": {"kind": "fixed", "value": 128},
                     "duration_s": 120, "warmup_s": 20},
        "slo": {"ttft_s": 2.0, "tpot_s": 0.1},
        "sweep": {"rate_rps": [4], "knobs": [{"clock_mhz": 810}],
                  "policies": [{"policy": "static"}, {"policy": "slo_feedback"}]},
    })
    points = run_virtual_campaign(spec, spec.deployment, tmp_path, Console(quiet=True)).set_index("setting")
    assert list(points.index) == ["clock_mhz=810", "policy=static", "policy=slo_feedback"]
    assert points.loc["clock_mhz=810", "clock_mhz_mean"] == 810
    assert points.loc["policy=static", "clock_mhz_mean"] == 1980
    feedback, static = points.loc["policy=slo_feedback"], points.loc["policy=static"]
    # With latency far under the SLO the feedback policy walks the clock down and spends less per token...
    assert feedback["clock_mhz_mean"] < 1200
    assert feedback["energy_per_token_j"] < static["energy_per_token_j"]
    # ...without giving up the SLO.
    assert feedback["slo_attainment"] >= 0.99 * static["slo_attainment"]
    assert feedback["requests"] == static["requests"]  # the same requests were replayed


def test_packing_the_load_lets_a_replica_idle_and_saves_energy(tmp_path: Path) -> None:
    """The batch cap in the router, on the real router and engines in virtual time: at light load one replica
    takes (almost) everything and the other draws idle power, so a token costs less at the same clock."""
    import pandas as pd

    spec = CampaignFile.model_validate({
        "name": "v", "clock": "virtual",
        "deployment": {"replicas": 2, "engine": {"model": "llama-2-7b", "max_model_len": 4096}},
        "workload": {"prompt_tokens": {"kind": "fixed", "value": 512}, "output_tokens": {"kind": "fixed", "value": 128},
                     "duration_s": 90, "warmup_s": 10},
        "slo": {"ttft_s": 2.0, "tpot_s": 0.1},
        "sweep": {"rate_rps": [2], "knobs": [{"clock_mhz": 810, "pack_per_replica": 0},
                                             {"clock_mhz": 810, "pack_per_replica": 16}]},
    })
    points = run_virtual_campaign(spec, spec.deployment, tmp_path, Console(quiet=True)).set_index("setting")
    spread = points.loc["clock_mhz=810 pack_per_replica=0"]
    packed = points.loc["clock_mhz=810 pack_per_replica=16"]
    assert packed["energy_per_token_j"] < 0.85 * spread["energy_per_token_j"]
    assert packed["slo_attainment"] >= 0.99 * spread["slo_attainment"]
    requests = pd.read_parquet(tmp_path / "requests.parquet")
    share = requests[requests["point"] == 1]["replica"].value_counts(normalize=True)
    assert share.max() > 0.9  # packed: one replica served nearly all
    share = requests[requests["point"] == 0]["replica"].value_counts(normalize=True)
    assert share.max() < 0.6  # spread: both did
