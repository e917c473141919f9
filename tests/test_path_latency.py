"""The serving path's latency: traced across processes in real time, added as measured in virtual time, and
the engine admits requests at iteration boundaries the same way on either clock."""

from __future__ import annotations

import asyncio
import itertools
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from deploy.cli import main
from deploy.config import CampaignFile, ConfigError, PathLatency, load_yaml_model
from deploy.virtual import VirtualClock, run_virtual_campaign
from profilers import trace
from serving.config import EmulatedEngineConfig
from serving.emulated.engine import EmulatedEngine
from serving.replica import StreamError
from serving.types import GenerationRequest, TokenEvent

ROOT = Path(__file__).resolve().parents[1]


def _spec(**changes: object) -> CampaignFile:
    data = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    data["workload"]["duration_s"] = 8
    data["sweep"] = {"rate_rps": [4]}
    data.update(changes)
    return CampaignFile.model_validate(data)


def _requests(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "requests.parquet").set_index("request_index")


def test_virtual_time_adds_the_path_latency_to_what_the_client_sees(tmp_path: Path) -> None:
    spec = _spec()
    none = PathLatency(request_latency_s=0, response_latency_s=0)
    fixed = PathLatency(request_latency_s=0.004, response_latency_s=0.003, request_sigma=0, response_sigma=0)
    a = _requests_of(spec, none, tmp_path / "none")
    b = _requests_of(spec, fixed, tmp_path / "fixed")
    # A constant delay on the way in shifts every arrival alike: the engines see the same schedule.
    assert (b["ttft_s"] - a["ttft_s"]).sub(0.007).abs().max() < 1e-9
    assert (b["e2e_s"] - a["e2e_s"]).sub(0.007).abs().max() < 1e-9
    assert (b["tpot_s"] - a["tpot_s"]).abs().max() < 1e-9
    assert (a["energy_j"] - b["energy_j"]).abs().max() < 1e-9


def _requests_of(spec: CampaignFile, latency: PathLatency, out: Path) -> pd.DataFrame:
    run_virtual_campaign(spec, spec.deployment, out, latency=latency)
    return _requests(out)


def test_path_latency_draws_are_log_normal_and_reproducible() -> None:
    lat = PathLatency(request_latency_s=0.01, response_latency_s=0.005, request_sigma=0.5, response_sigma=0.5)
    draws = [lat.draw(f"0:0:{i}") for i in range(4000)]
    assert draws[:10] == [lat.draw(f"0:0:{i}") for i in range(10)]  # keyed by request, not by call order
    there = sorted(d[0] for d in draws)
    assert there[len(there) // 2] == pytest.approx(0.01, rel=0.06)
    assert there[int(0.9 * len(there))] == pytest.approx(0.01 * math.exp(0.5 * 1.2816), rel=0.08)
    median, sigma = trace.lognormal_fit(there)  # the fit recovers the distribution
    assert median == pytest.approx(0.01, rel=0.06) and sigma == pytest.approx(0.5, rel=0.15)
    assert PathLatency(request_sigma=0, response_sigma=0).draw("x") == (0.0013, 0.0014)


def test_campaign_file_rejects_a_negative_path_latency(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    data["virtual"] = {"request_latency_s": -0.001}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"virtual\.request_latency_s"):
        load_yaml_model(path, CampaignFile)


def test_every_campaign_point_shows_the_physical_floor(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    data.update(clock="virtual", sweep={"rate_rps": [2, 8]})
    data["workload"]["duration_s"] = 6
    campaign = tmp_path / "q.yaml"
    campaign.write_text(yaml.safe_dump(data))
    assert main(["campaign", "run", str(campaign), "--out", str(tmp_path / "out")]) == 0
    points = pd.read_csv(tmp_path / "out" / "points.csv")
    assert (points["floor_j_per_token"] > 0).all() and (points["x_floor"] > 1).all()
    assert "floor J/token" in (tmp_path / "out" / "report.html").read_text()


def test_trace_is_off_unless_its_directory_is_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(trace.TRACE_ENV, raising=False)
    trace.mark("r", "client.send")
    assert not trace.enabled() and not list(tmp_path.iterdir())
    monkeypatch.setenv(trace.TRACE_ENV, str(tmp_path))
    trace.mark("r", "client.send", 1.0)
    trace.mark("r", "engine.admit", 1.5)
    assert trace.read_trace(tmp_path) == {"r": {"client.send": 1.0, "engine.admit": 1.5}}


def test_channel_frames_mark_only_first_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def event(rid: str, index: int) -> TokenEvent:
        return TokenEvent(rid, "replica-0", " the", [279], index)

    batch = [event("a", 0), event("b", 5), StreamError("c", RuntimeError("engine failed"))]
    monkeypatch.delenv(trace.TRACE_ENV, raising=False)
    trace.mark_first_tokens(batch, "router.frame")
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv(trace.TRACE_ENV, str(tmp_path))
    trace.mark_first_tokens(batch, "router.frame")
    marks = trace.read_trace(tmp_path)
    assert list(marks) == ["a"] and list(marks["a"]) == ["router.frame"]


def test_path_latency_fit_from_a_trace() -> None:
    traces = {
        f"r{i}": {
            "client.send": 10.0 * i, "engine.admit": 10.0 * i + 0.008,
            "engine.first_token_modeled": 10.0 * i + 0.02, "client.first_chunk": 10.0 * i + 0.025,
            "engine.last_token_modeled": 10.0 * i + 0.5, "client.last_chunk": 10.0 * i + 0.505,
        }
        for i in range(20)
    }
    fit = trace.path_latency(traces)
    assert fit["request_latency_s"] == pytest.approx(0.008, abs=1e-5)
    assert fit["response_latency_s"] == pytest.approx(0.005, abs=1e-5)
    assert fit["request_sigma"] == pytest.approx(0.0, abs=0.01)
    PathLatency(**fit)  # the fit is a valid `virtual:` section
    with pytest.raises(ValueError, match="no complete request"):
        trace.path_latency({"r": {"door.receive": 1.0}})


class _OvershootingClock(VirtualClock):
    """Sleeps wake 1 ms late, like asyncio.sleep on a loaded host."""

    async def sleep(self, seconds: float) -> None:
        await super().sleep(max(0.0, seconds) + 0.001)


def test_no_iteration_starts_before_a_request_in_it_arrived(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Back-to-back iterations are back-dated to the previous modeled end; a request that arrives during the
    clock's overshoot must wait for the next boundary, as it would where the clock does not overshoot."""
    monkeypatch.setenv(trace.TRACE_ENV, str(tmp_path))
    clock = _OvershootingClock()
    engine = EmulatedEngine(EmulatedEngineConfig(max_model_len=1024), "r", clock=clock)

    async def one(i: int) -> None:
        await clock.sleep(0.0013 * i)
        req = GenerationRequest(f"q{i}", prompt_token_ids=[1] * 64, max_tokens=8)
        async for _ in engine.generate(req):
            pass

    async def go() -> None:
        await engine.start()
        await asyncio.gather(*(one(i) for i in range(60)))
        await engine.stop()

    clock.execute(go())
    stages = trace.read_trace(tmp_path)
    assert len(stages) == 60
    assert all(s["engine.iteration_start"] >= s["engine.admit"] for s in stages.values())


def test_tokens_between_the_first_and_last_travel_together() -> None:
    """The stream interval cuts messages, not latency: the first token and the last leave when generated."""
    clock = VirtualClock()
    engine = EmulatedEngine(EmulatedEngineConfig(max_model_len=1024, stream_interval_s=0.02), "r", clock=clock)
    token_times: list[float] = []
    engine.on_token = lambda rid, t: token_times.append(t)
    seen: list[tuple[float, int, bool]] = []

    async def go() -> None:
        await engine.start()
        req = GenerationRequest("a", prompt_token_ids=[1] * 64, max_tokens=40)
        async for ev in engine.generate(req):
            seen.append((clock.now(), len(ev.token_ids), ev.finished))
        await engine.stop()

    clock.execute(go())
    assert sum(n for _, n, _ in seen) == 40 and seen[-1][2]
    assert seen[0] == (token_times[0], 1, False) and seen[-1][0] == token_times[-1]
    assert len(seen) < 40 / 2  # ~6.7 ms per decode step: about three tokens per message
    assert all(b - a >= 0.02 - 1e-9 for (a, _, _), (b, _, _) in itertools.pairwise(seen[1:-1]))
