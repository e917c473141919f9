"""The real front door (uvicorn) over real Ray replicas, driven by httpx and the official openai client."""

import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow
MODEL = "llama-3.1-8b"


def test_models_and_health(served) -> None:
    models = httpx.get(f"{served.url}/v1/models").json()
    assert models["data"][0]["id"] == MODEL
    health = httpx.get(f"{served.url}/health").json()
    assert health["status"] == "ok" and set(health["replicas"]) == {"replica-0", "replica-1"}


def test_replicas_run_at_the_front_doors_priority(served) -> None:
    """Ray would start them at niceness 15; the local cluster the testbed starts tells it not to."""
    assert [info["niceness"] for info in served.deployment.replica_info] == [0, 0]


def test_completion_non_streaming_httpx(served) -> None:
    r = httpx.post(f"{served.url}/v1/completions", json={"model": MODEL, "prompt": "a b c d", "max_tokens": 5})
    assert r.status_code == 200
    body = r.json()
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    assert len(body["choices"][0]["text"].split()) == 5
    assert body["energy"]["joules"] > 0 and body["energy"]["provenance"] == "modeled"


def test_completion_streaming_httpx_sse(served) -> None:
    body = {"model": MODEL, "prompt": "x y", "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}}
    chunks = []
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    objs = [json.loads(c) for c in chunks[:-1]]
    text = "".join(o["choices"][0]["text"] for o in objs if o["choices"])
    assert len(text.split()) == 6
    assert objs[-1]["usage"]["completion_tokens"] == 6
    assert any(o["choices"] and o["choices"][0]["finish_reason"] == "length" for o in objs)


def test_openai_client_completions(served) -> None:
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused")
    c = client.completions.create(model=MODEL, prompt="hello world", max_tokens=4)
    assert c.usage.completion_tokens == 4 and c.choices[0].finish_reason == "length"
    stream = client.completions.create(model=MODEL, prompt="hello world", max_tokens=4, stream=True)
    assert len("".join(ch.choices[0].text for ch in stream if ch.choices).split()) == 4


def test_openai_client_chat(served) -> None:
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    c = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3)
    assert c.choices[0].message.role == "assistant" and len(c.choices[0].message.content.split()) == 3
    stream = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=5, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices).split()) == 5
    assert chunks[-1].usage.completion_tokens == 5


def test_prompt_longer_than_context_is_an_openai_400(served) -> None:
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="w " * 2000, max_tokens=4, stream=True)
    assert err.value.status_code == 400
    body = err.value.body
    assert body["code"] == "context_length_exceeded" and "maximum context length is 1024" in body["message"]


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"model": MODEL, "prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "max_tokens": 3}, "prompt"),
        ({"model": MODEL, "prompt": "a", "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "prompt": "a", "n": 2}, "n"),
    ],
)
def test_bad_requests_get_openai_error_bodies(served, payload, param) -> None:
    r = httpx.post(f"{served.url}/v1/completions", json=payload)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_malformed_json_and_unknown_model(served) -> None:
    r = httpx.post(f"{served.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(f"{served.url}/v1/completions", json={"model": "gpt-9", "prompt": "a"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_request_body_sent_in_chunks_and_validation_messages(served) -> None:
    def parts():  # a chunked request body: the front door reads every ASGI message of it
        yield b'{"model": "' + MODEL.encode()
        yield b'", "prompt": "a b", "max_tokens": 2}'

    r = httpx.post(f"{served.url}/v1/completions", content=parts(), headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    r = httpx.post(f"{served.url}/v1/completions", content=b"{not json")
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] is None and "Invalid JSON" in err["message"]
    r = httpx.post(f"{served.url}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "bot"}]})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "messages.0.role" and "messages.0.content" in err["message"]


def test_generation_endpoints_take_post_only(served) -> None:
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = httpx.get(f"{served.url}{path}")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_client_that_goes_away_mid_stream_frees_the_engine(served) -> None:
    """Closing the connection after the first chunk cancels the request in the engine: it stops generating
    (1,000 tokens would take seconds) and the front door keeps serving."""
    import time

    import ray

    actors = [r.actor for r in served.deployment.router.replicas]

    def stats() -> list:
        return [t.stats for t in ray.get([a.telemetry.remote() for a in actors])]

    before = sum(s.generated_tokens_total for s in stats())
    body = {"model": MODEL, "prompt": "a b", "max_tokens": 1000, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body) as r:
        assert next(r.iter_lines()).startswith("data: ")
    deadline = time.monotonic() + 5
    while any(s.running for s in stats()) and time.monotonic() < deadline:
        time.sleep(0.05)
    after = stats()
    assert not any(s.running for s in after), "the engine still runs the abandoned request"
    assert sum(s.generated_tokens_total for s in after) - before < 1000
    r = httpx.post(f"{served.url}/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_metrics_expose_core_families_with_provenance(served) -> None:
    httpx.post(f"{served.url}/v1/completions", json={"model": MODEL, "prompt": "a b", "max_tokens": 3})
    text = httpx.get(f"{served.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("llm_energy_energy_joules", "llm_energy_power_watts", "llm_energy_water_liters",
                 "llm_energy_carbon_grams", "llm_energy_clock_mhz"):
        samples = families[name].samples
        assert samples and all(s.labels["provenance"] == "modeled" for s in samples), name
    assert {s.labels["kind"] for s in families["llm_energy_tokens"].samples} == {"prompt", "generated"}
    for phase in ("ttft", "tpot", "e2e"):
        name = f"llm_energy_request_{phase}_seconds"
        assert families[name].type == "histogram"
    water_scopes = {s.labels["scope"] for s in families["llm_energy_water_liters"].samples}
    assert water_scopes == {"site", "source"}
    energy = sum(s.value for s in families["llm_energy_energy_joules"].samples if s.name.endswith("_total"))
    assert energy > 0


def test_front_door_socket_turns_nagle_off() -> None:
    """With Nagle on, a response written as headers then body waits for the client's delayed ACK (~40 ms on
    Linux): every latency the testbed measured through its front door would carry it."""
    import socket

    from deploy.serve import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP  # what asyncio checks before setting TCP_NODELAY per connection
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        sock.close()


@pytest.mark.parametrize("chat", [False, True])
def test_precomputed_sse_chunk_is_byte_identical_to_the_generic_one(chat: bool, monkeypatch) -> None:
    import serving.api
    from profilers.footprint import load_site_profile
    from serving.api import FrontDoor, _json_str, _sse
    from serving.types import TokenEvent

    monkeypatch.setattr(serving.api.time, "time", lambda: 1700000000.5)  # both chunks in the same second

    door = FrontDoor(router=None, model_name="m", max_model_len=8, site=load_site_profile("azure"))  # type: ignore[arg-type]
    before, after = door._middle_chunk("cmpl-1", chat)
    for text in ["plain", 'quote " and \\ back', "é ü 漢\n\t", ""]:
        ev = TokenEvent("cmpl-1", "r", text, [1], 3)
        assert before + _json_str(text) + after == _sse(door._chunk("cmpl-1", ev, chat, first=False))
