"""The control API and controller metrics on the real front door, and the replicas' heartbeat watchdog."""

import asyncio
import time

import httpx
import pytest
from conftest import CONTROL_TOKEN
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow
AUTH = {"authorization": f"Bearer {CONTROL_TOKEN}"}


def knob_values(url: str) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{url}/metrics").text
    fam = {f.name: f for f in text_string_to_metric_families(text)}
    return {(s.labels["replica"], s.labels["knob"]): s.value for s in fam["llm_energy_knob_value"].samples}


def test_reading_needs_no_token_changing_does(served) -> None:
    state = httpx.get(f"{served.url}/control").json()
    assert state["policy"] == "static" and "slo_feedback" in state["policies"]
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": CONTROL_TOKEN}):
        r = httpx.post(f"{served.url}/control/knobs", json={"clock_mhz": 810}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = httpx.post(f"{served.url}/control/policy", json={"policy": "slo_feedback"}, headers=headers)
        assert r.status_code == 401
    assert httpx.get(f"{served.url}/control").json()["policy"] == "static"  # nothing changed


def test_a_policy_with_bad_options_is_refused_before_anything_changes(served) -> None:
    before = httpx.get(f"{served.url}/control").json()
    for options in ({"clock_mhz": "fast"}, {"max_num_seqs": "many"}, {"setpoint": "high"}):
        policy = "slo_feedback" if "setpoint" in options else "static"
        r = httpx.post(f"{served.url}/control/policy", json={"policy": policy, "options": options}, headers=AUTH)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_request" and next(iter(options)) in error["message"]
    after = httpx.get(f"{served.url}/control").json()
    assert (after["policy"], after["knobs"], after["running"]) == (before["policy"], before["knobs"], True)
    assert after["errors"] == {}  # the loop never ran the bad policy
    text = httpx.get(f"{served.url}/metrics").text
    assert "# TYPE llm_energy_controller_errors_total counter" in text or \
        "# TYPE llm_energy_controller_errors counter" in text


def test_pinning_knobs_applies_clamped_values_and_exports_them(served) -> None:
    try:
        r = httpx.post(f"{served.url}/control/knobs", json={"clock_mhz": 1000, "max_num_seqs": 16,
                                                             "pack_per_replica": 8, "prefix_caching": False},
                       headers=AUTH)
        assert r.status_code == 200 and r.json()["pack_per_replica"] == 8  # the router packs up to 8 a replica
        applied = r.json()["applied"]
        assert {a["clock_mhz"] for a in applied.values()} == {960.0}  # nearest supported clock
        assert any("clamped" in n for a in applied.values() for n in a["notes"])
        # The emulated engines have no prefix cache: the knob is accepted and said to be ignored, not refused.
        assert all(any("prefix_caching ignored" in n for n in a["notes"]) for a in applied.values())
        values = knob_values(served.url)
        assert values[("replica-0", "clock_mhz")] == 960.0 and values[("replica-1", "max_num_seqs")] == 16
        assert values[("router", "pack_per_replica")] == 8
        text = httpx.get(f"{served.url}/metrics").text
        assert 'llm_energy_controller_decisions_total{policy="static"' in text
        clock = 'llm_energy_clock_mhz{backend="emulated",device="emu0",provenance="modeled",replica="replica-0"}'
        assert f"{clock} 960.0" in text
        for bad_knobs in ({"clock_mhz": -5}, {"pack_per_replica": -1}):
            bad = httpx.post(f"{served.url}/control/knobs", json=bad_knobs, headers=AUTH)
            assert bad.status_code == 400
        unknown = httpx.post(f"{served.url}/control/policy", json={"policy": "magic"}, headers=AUTH)
        assert unknown.status_code == 400 and "known" in unknown.json()["error"]["message"]
        ok = httpx.post(f"{served.url}/control/policy", json={"policy": "slo_feedback", "options": {"setpoint": 0.6}},
                        headers=AUTH)
        assert ok.status_code == 200 and ok.json()["policy"] == "slo_feedback"
    finally:
        httpx.post(f"{served.url}/control/knobs", json={"clock_mhz": 1980, "max_num_seqs": 256, "pack_per_replica": 0},
                   headers=AUTH)


async def test_watchdog_restores_defaults_when_the_controller_goes_silent(ray_local) -> None:
    """What a SIGKILLed controller looks like to a replica: heartbeats stop. The replica restores defaults itself."""
    from deploy.serve import start_deployment
    from serving.config import EmulatedEngineConfig, ServingConfig
    from serving.types import Knobs

    dep = await start_deployment(ServingConfig(replicas=1, engine=EmulatedEngineConfig(model="qwen2.5-0.5b")))
    try:
        actor = dep.router.replicas[0].actor
        await actor.heartbeat.remote(0.5)
        applied = await actor.apply.remote(Knobs(clock_mhz=510, max_num_seqs=4))
        assert (applied.clock_mhz, applied.max_num_seqs) == (510, 4)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            tel = await actor.telemetry.remote()
            if tel.readings[0].clock_mhz == 1980 and tel.stats.max_num_seqs == 256:
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail("the watchdog did not restore the default knobs")
    finally:
        await dep.stop()
