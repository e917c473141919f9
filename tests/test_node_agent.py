"""The DVFS node agent over real HTTP, locking clocks through the NVML-compatible fake (never a real GPU)."""

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from controllers import nvml_clocks
from controllers.node_agent import NodeAgent, create_agent_app
from deploy.serve import bind_socket
from profilers import nvml_fake

TOKEN = "agent-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(nvml_clocks.nvml_source, "pynvml", nvml_fake)
    nvml_fake.configure([nvml_fake.FakeGPU(), nvml_fake.FakeGPU()], privileged=True)
    yield nvml_fake
    nvml_fake.reset()


def serve(app) -> Iterator[str]:  # type: ignore[no-untyped-def]
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def agent_url(fake_gpus) -> Iterator[tuple[str, NodeAgent]]:
    agent = NodeAgent(TOKEN)
    gen = serve(create_agent_app(agent))
    yield next(gen), agent
    next(gen, None)
    # Shutting the agent down restored the default clocks.
    assert all(g.locked_clocks_mhz is None for g in fake_gpus._state.gpus)


def test_locks_clamped_clocks_only_for_the_token_holder(agent_url) -> None:
    url, _ = agent_url
    assert httpx.get(f"{url}/clocks").json()["available"] is True
    for headers in ({}, {"authorization": "Bearer nope"}):
        assert httpx.post(f"{url}/clocks", json={"clock_mhz": 1000}, headers=headers).status_code == 401
    assert all(g.locked_clocks_mhz is None for g in nvml_fake._state.gpus)  # nothing changed
    r = httpx.post(f"{url}/clocks", json={"clock_mhz": 1001, "lease_s": 30}, headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert body["applied_mhz"] in body["supported_mhz"] and "clamped" in body["notes"][0]
    assert {g.locked_clocks_mhz for g in nvml_fake._state.gpus} == {(body["applied_mhz"], body["applied_mhz"])}
    assert httpx.post(f"{url}/clocks", json={"clock_mhz": -1}, headers=AUTH).status_code == 400


def test_lease_expiry_restores_defaults(agent_url) -> None:
    """What a SIGKILLed controller looks like to the agent: its lease is not renewed."""
    url, agent = agent_url
    httpx.post(f"{url}/clocks", json={"clock_mhz": 810, "lease_s": 0.5}, headers=AUTH)
    assert nvml_fake._state.gpus[0].locked_clocks_mhz == (810, 810)
    deadline = time.monotonic() + 5
    while nvml_fake._state.gpus[0].locked_clocks_mhz is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert nvml_fake._state.gpus[0].locked_clocks_mhz is None and agent.restores >= 1


def test_refused_set_clock_marks_the_knob_unavailable(fake_gpus) -> None:
    fake_gpus.configure([nvml_fake.FakeGPU()], privileged=False)  # not root: NVML_ERROR_NO_PERMISSION
    gen = serve(create_agent_app(NodeAgent(TOKEN)))
    url = next(gen)
    try:
        r = httpx.post(f"{url}/clocks", json={"clock_mhz": 1410}, headers=AUTH)
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "knob_unavailable" and "permission" in r.json()["error"]["message"]
    finally:
        next(gen, None)


def test_no_nvml_at_all_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nvml_clocks.nvml_source, "pynvml", nvml_fake)
    nvml_fake.configure([], library_found=False)
    try:
        agent = NodeAgent(TOKEN)
        assert agent.clocks is None and agent.unavailable
        assert agent.state()["available"] is False
    finally:
        nvml_fake.reset()
    with pytest.raises(ValueError, match="TESTBED_NODE_AGENT_TOKEN"):
        NodeAgent("")


async def test_controller_keeps_other_knobs_when_the_clock_is_refused(fake_gpus) -> None:
    from controllers.actuators import NodeAgentActuator
    from serving.types import AppliedKnobs, Knobs

    fake_gpus.configure([nvml_fake.FakeGPU()], privileged=False)

    class Inner:
        def __init__(self) -> None:
            self.last_applied: dict = {}
            self.applied: list = []

        async def apply(self, knobs: Knobs) -> list[AppliedKnobs]:
            self.applied.append(knobs)
            return [AppliedKnobs(None, knobs.max_num_seqs or 256, 0.0)]

        async def restore_defaults(self) -> None: ...

        async def heartbeat(self, lease_s: float) -> None: ...

    gen = serve(create_agent_app(NodeAgent(TOKEN)))
    url = next(gen)
    try:
        inner = Inner()
        act = NodeAgentActuator([url], TOKEN, inner)  # type: ignore[arg-type]
        applied = await act.apply(Knobs(clock_mhz=1410, max_num_seqs=32))
        assert url in act.unavailable and "permission" in act.unavailable[url]
        assert inner.applied[-1].max_num_seqs == 32 and inner.applied[-1].clock_mhz is None
        assert applied[0].clock_mhz is None
    finally:
        next(gen, None)


async def test_a_failed_clock_restore_or_heartbeat_is_logged_with_the_agent_and_the_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    from controllers.actuators import NodeAgentActuator

    class Inner:
        restored = heartbeats = 0

        async def restore_defaults(self) -> None:
            self.restored += 1

        async def heartbeat(self, lease_s: float) -> None:
            self.heartbeats += 1

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "down":
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(500, json={"error": {"message": "nvml failed"}})

    inner = Inner()
    act = NodeAgentActuator(["http://down:9400", "http://gpu-1:9400"], TOKEN, inner)  # type: ignore[arg-type]
    act.http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    with caplog.at_level(logging.WARNING, logger="controllers.actuators"):
        await act.restore_defaults()
        await act.heartbeat(30.0)
    restores = [r.getMessage() for r in caplog.records if "restore the default clocks" in r.getMessage()]
    assert len(restores) == 2 and "http://down:9400" in restores[0] and "ConnectError" in restores[0]
    assert "http://gpu-1:9400" in restores[1] and "500" in restores[1]
    assert sum("heartbeat to the node agent" in r.getMessage() for r in caplog.records) == 2
    assert inner.restored == 1 and inner.heartbeats == 1  # the other knobs are restored all the same
