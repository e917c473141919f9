"""Open-loop async load client (httpx, streaming SSE) recording per-request latency and energy.

The scheduler sends each request at its intended time whatever the server is doing (no coordinated
omission): a slow response never delays a later send. Both intended and actual send times are kept.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from profilers import trace
from workloads.arrivals import RequestSpec
from workloads.prompts import synth_prompt


@dataclass
class RequestRecord:
    point: int
    request_index: int
    intended_send_s: float
    prompt_tokens: int
    max_output_tokens: int
    actual_send_s: float = math.nan
    replica: str = ""
    output_tokens: int = 0
    ttft_s: float = math.nan
    tpot_s: float = math.nan
    e2e_s: float = math.nan
    itl_s: list[float] = field(default_factory=list)
    energy_j: float = math.nan
    energy_provenance: str = ""
    phase: str = "measure"
    """warmup | measure | cooldown: only measured requests enter latency and SLO figures."""
    status: str = "pending"
    http_status: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class LoadClient:
    def __init__(
        self,
        base_url: str,
        model: str,
        max_concurrency: int | None = None,
        request_timeout_s: float = 300.0,
        api_key: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_concurrency = max_concurrency
        self.request_timeout_s = request_timeout_s
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}

    async def run(
        self,
        point: int,
        specs: list[RequestSpec],
        seed: int,
        on_done: Callable[[RequestRecord], None] | None = None,
    ) -> list[RequestRecord]:
        records = [RequestRecord(point, i, s.t_s, s.prompt_tokens, s.max_output_tokens) for i, s in enumerate(specs)]
        limits = httpx.Limits(
            max_connections=self.max_concurrency or 4096, max_keepalive_connections=self.max_concurrency or 4096
        )
        timeout = httpx.Timeout(self.request_timeout_s, connect=10.0)
        gate = asyncio.Semaphore(self.max_concurrency) if self.max_concurrency else None
        async with httpx.AsyncClient(base_url=self.base_url, limits=limits, timeout=timeout, headers=self.headers) as c:
            start = time.perf_counter()
            tasks = []
            for rec in records:
                delay = start + rec.intended_send_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(self._one(c, rec, start, seed, gate, on_done)))
            await asyncio.gather(*tasks)
        return records

    async def _one(
        self,
        client: httpx.AsyncClient,
        rec: RequestRecord,
        start: float,
        seed: int,
        gate: asyncio.Semaphore | None,
        on_done: Callable[[RequestRecord], None] | None,
    ) -> None:
        body = {
            "model": self.model,
            "prompt": synth_prompt(rec.prompt_tokens, seed * 1_000_003 + rec.request_index),
            "max_tokens": rec.max_output_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,  # exact output lengths (vLLM and the testbed honour it)
            "temperature": 0.0,
        }
        try:
            if gate is not None:
                async with gate:
                    await self._send(client, rec, start, body)
            else:
                await self._send(client, rec, start, body)
        except httpx.HTTPError as e:
            rec.status, rec.error = "failed", f"{type(e).__name__}: {e}".rstrip(": ")
        except Exception as e:  # a malformed stream must not lose the record
            rec.status, rec.error = "failed", f"client error {type(e).__name__}: {e}"
        if on_done is not None:
            on_done(rec)

    async def _send(self, client: httpx.AsyncClient, rec: RequestRecord, start: float, body: dict[str, Any]) -> None:
        t_send = time.perf_counter()
        rec.actual_send_s = t_send - start
        chunk_times: list[float] = []
        usage: dict[str, Any] | None = None
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            rec.http_status = resp.status_code
            rec.replica = resp.headers.get("x-replica", "")
            rid = resp.headers.get("x-request-id", "")
            if trace.enabled() and rid:
                trace.mark(rid, "client.send", t_send)
                trace.mark(rid, "client.headers")
            if resp.status_code != 200:
                raw = await resp.aread()
                rec.status, rec.error = "failed", f"HTTP {resp.status_code}: {_error_message(raw)}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    rec.status, rec.error = "failed", f"stream error: {obj['error'].get('message', obj['error'])}"
                    return
                choices = obj.get("choices") or []
                if choices and choices[0].get("text"):
                    chunk_times.append(time.perf_counter())
                    if len(chunk_times) == 1 and trace.enabled():
                        trace.mark(rid, "client.first_chunk", chunk_times[0])
                if obj.get("usage"):
                    usage = obj["usage"]
                if obj.get("energy"):
                    energy = obj["energy"]
                    rec.energy_j = float(energy["joules"]) if energy.get("joules") is not None else math.nan
                    rec.energy_provenance = energy.get("provenance") or ""
                    rec.replica = energy.get("replica") or rec.replica
        if not chunk_times:
            rec.status, rec.error = "failed", "the stream ended without a token"
            return
        t_end = chunk_times[-1]
        if trace.enabled():
            trace.mark(rid, "client.last_chunk", t_end)
        rec.output_tokens = int(usage["completion_tokens"]) if usage else len(chunk_times)
        rec.ttft_s = chunk_times[0] - t_send
        rec.e2e_s = t_end - t_send
        rec.itl_s = [b - a for a, b in itertools.pairwise(chunk_times)]
        rec.tpot_s = (rec.e2e_s - rec.ttft_s) / (rec.output_tokens - 1) if rec.output_tokens > 1 else math.nan
        rec.status = "ok"


def _error_message(raw: bytes) -> str:
    try:
        err = json.loads(raw)["error"]
        return str(err.get("message", err)) if isinstance(err, dict) else str(err)
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace")[:300]
