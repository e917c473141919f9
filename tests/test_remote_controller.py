"""`testbed controller run` as on Kubernetes: observes a real front door's /metrics, locks clocks through a real
node agent (NVML fake), serves its control API, and restores the default clocks when it stops."""

import time

import httpx
import pytest
import yaml
from test_node_agent import serve

from controllers import nvml_clocks
from controllers.node_agent import NodeAgent, create_agent_app
from controllers.remote import (
    MetricsObserver,
    RemoteController,
    RemoteControllerConfig,
    create_remote_app,
    histogram_quantile,
)
from profilers import nvml_fake

TOKEN = "agent-token"


def test_histogram_quantile_matches_prometheus() -> None:
    buckets = [(0.1, 10.0), (0.2, 30.0), (0.5, 40.0), (float("inf"), 40.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.15)  # rank 20 is half-way through (0.1, 0.2]
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.95, [(0.1, 0.0), (float("inf"), 0.0)]) is None


def test_config_is_what_the_chart_renders(tmp_path) -> None:
    text = """
policy: slo_feedback
interval_s: 10
slo: {ttft_s: 2.0, tpot_s: 0.1, percentile: 99}
metrics_url: http://testbed.ns.svc:8000/metrics
node_agent_service: testbed-node-agent.ns.svc
node_agent_port: 9400
"""
    cfg = RemoteControllerConfig.model_validate(yaml.safe_load(text))
    assert cfg.node_agent_service == "testbed-node-agent.ns.svc"


@pytest.mark.slow
async def test_locks_clocks_through_the_agent_and_restores_them(served, monkeypatch) -> None:
    monkeypatch.setattr(nvml_clocks.nvml_source, "pynvml", nvml_fake)
    nvml_fake.configure([nvml_fake.FakeGPU()], privileged=True)
    agents = serve(create_agent_app(NodeAgent(TOKEN)))
    agent_url = next(agents)
    try:
        for _ in range(3):  # traffic, so the histograms have something in them
            httpx.post(f"{served.url}/v1/completions", json={"model": "llama-3.1-8b", "prompt": "a b", "max_tokens": 4})
        config = RemoteControllerConfig(
            policy="static", options={"clock_mhz": 1410}, interval_s=0.2, node_agents=[agent_url],
            slo={"ttft_s": 2.0, "tpot_s": 0.1, "percentile": 99}, metrics_url=f"{served.url}/metrics",
        )
        obs = await MetricsObserver(config.metrics_url, httpx.AsyncClient())()
        assert obs.power_w > 0 and obs.clock_mhz == 1980
        controller = RemoteController(config, TOKEN, "control-token")
        app = serve(create_remote_app(controller))
        url = next(app)
        try:
            deadline = time.monotonic() + 10
            while nvml_fake._state.gpus[0].locked_clocks_mhz != (1410, 1410) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert nvml_fake._state.gpus[0].locked_clocks_mhz == (1410, 1410)
            state = httpx.get(f"{url}/control").json()
            assert state["clock_mhz"] == 1410 and state["node_agents"] == [agent_url]
            assert httpx.post(f"{url}/control/policy", json={"policy": "slo_feedback"}).status_code == 401
            r = httpx.post(f"{url}/control/policy", json={"policy": "slo_feedback"},
                           headers={"authorization": "Bearer control-token"})
            assert r.status_code == 200 and r.json()["policy"] == "slo_feedback"
        finally:
            next(app, None)
        # Stopping the controller asked the agent to restore the driver's default clocks.
        assert nvml_fake._state.gpus[0].locked_clocks_mhz is None
    finally:
        next(agents, None)
        nvml_fake.reset()


async def test_observer_reads_the_page_through_the_shared_parser() -> None:
    """Two scrapes of a /metrics page: the latency percentiles come from the histograms' differences."""
    pages = []
    for count, fast in ((0, 0), (10, 8)):
        pages.append(f"""# TYPE llm_energy_request_ttft_seconds histogram
llm_energy_request_ttft_seconds_bucket{{le="0.1"}} {fast}
llm_energy_request_ttft_seconds_bucket{{le="1.0"}} {count}
llm_energy_request_ttft_seconds_bucket{{le="+Inf"}} {count}
llm_energy_request_ttft_seconds_count {count}
llm_energy_request_ttft_seconds_sum 1.0
# TYPE llm_energy_request_e2e_seconds histogram
llm_energy_request_e2e_seconds_bucket{{le="+Inf"}} {count}
llm_energy_request_e2e_seconds_count {count}
llm_energy_request_e2e_seconds_sum 2.0
# TYPE llm_energy_energy_joules counter
llm_energy_energy_joules_total{{replica="r0",device="gpu0",backend="nvml",provenance="measured"}} {100 + 50 * count}
llm_energy_energy_joules_total{{replica="r1",device="gpu0",backend="nvml",provenance="measured"}} {100 + 50 * count}
# TYPE llm_energy_tokens counter
llm_energy_tokens_total{{replica="r0",kind="generated"}} {10 * count}
# TYPE llm_energy_power_watts gauge
llm_energy_power_watts{{replica="r0",device="gpu0"}} 300
llm_energy_power_watts{{replica="r1",device="gpu0"}} 200
# TYPE llm_energy_clock_mhz gauge
llm_energy_clock_mhz{{replica="r0",device="gpu0"}} 1410
llm_energy_clock_mhz{{replica="r1",device="gpu0"}} 1980
# TYPE llm_energy_requests_running gauge
llm_energy_requests_running{{replica="r0"}} 3
llm_energy_requests_running{{replica="r1"}} 2
""")
    served = iter(pages)
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=next(served)))
    observer = MetricsObserver("http://door/metrics", httpx.AsyncClient(transport=transport))
    first = await observer()
    assert first.completed == 0 and first.ttft_s is None and first.energy_per_token_j is None
    obs = await observer()
    assert obs.completed == 10 and obs.power_w == 500 and obs.clock_mhz == 1980 and obs.running == 5
    assert obs.energy_per_token_j == pytest.approx(2 * 500 / 100)
    assert obs.ttft_s == pytest.approx(0.1 + 0.9 * (9.5 - 8) / 2)  # rank 9.5 in (0.1, 1.0]
