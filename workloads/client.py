"""Load client: open-loop (or closed-loop) streaming requests recording per-request latency and energy.

The schedule runs in its own process (or several, fed one schedule), apart from the campaign's sampler, progress
display and result writing, so none of them delays a send. Within that process the scheduler writes each request at
its intended time whatever the server is doing (no coordinated omission): a slow response never delays a later send,
and the send time is taken right after the request is written to the socket.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import gc
import itertools
import json
import math
import multiprocessing.connection
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from profilers import trace
from profilers.errors import TestbedError
from workloads.arrivals import LengthSampler, LengthStream, RequestSpec
from workloads.http1 import ConnectionPool, Endpoint, Exchange, post_request
from workloads.prompts import PromptFn, synth_prompt


@dataclass
class RequestRecord:
    """One request's outcome as stored in ``requests.parquet``: timing (s), tokens, replica, energy (J), status."""

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
        """Whether the request succeeded (status ``ok``)."""
        return self.status == "ok"

    @property
    def send_lag_s(self) -> float:
        """How late the request was written against its schedule (the generator's own precision)."""
        return self.actual_send_s - self.intended_send_s


@dataclass(frozen=True)
class ClientSettings:
    """How the load client reaches the target: base URL, model, concurrency cap, timeout, API key, prompt maker."""

    base_url: str
    model: str
    max_concurrency: int | None = None
    request_timeout_s: float = 300.0
    api_key: str | None = None
    prompt_fn: PromptFn = synth_prompt


@dataclass(frozen=True)
class ClosedLoop:
    """``concurrency`` users, each sending its next request as soon as (plus ``think_time_s`` after) the last ends."""

    concurrency: int
    duration_s: float
    prompt_tokens: LengthSampler
    output_tokens: LengthSampler
    think_time_s: float = 0.0


@dataclass
class RawResponse:
    """What a generator process saw of one response: parsed into the record by the campaign process, so the
    process that keeps the schedule spends nothing on JSON."""

    sent_at: float
    status: int
    replica: str
    error: str
    pieces: list[tuple[float, bytes]]
    request_id: str = ""
    headers_at: float = 0.0

    @classmethod
    def of(cls, ex: Exchange) -> RawResponse:
        """The wire-format copy of an exchange to send back from a generator process."""
        return cls(ex.sent_at, ex.status, ex.headers.get("x-replica", ""), ex.error, ex.pieces,
                   ex.headers.get("x-request-id", ""), ex.headers_at)


_BUILD_AHEAD_S = 0.005
"""How far ahead of its due time a request's bytes are built."""
_SPIN_S = 0.001
"""How close to its due time a send stops sleeping and spins the loop (timers have 1 ms granularity)."""


class LoadGeneratorError(TestbedError, RuntimeError):
    """A load-generator process failed or died: the point's records are incomplete."""


# ----------------------------------------------------------------------------------------------- one point's run
class _PointRun:
    """Sends one point's requests from one process and turns each finished exchange into a record."""

    def __init__(self, settings: ClientSettings, point: int, seed: int,
                 emit: Callable[[RequestRecord, RawResponse], None]) -> None:
        self.s = settings
        self.point = point
        self.seed = seed
        self.emit = emit
        self.endpoint = Endpoint.parse(settings.base_url)
        self.pool = ConnectionPool(self.endpoint)
        self.headers = {"authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self.pending = 0
        self.all_sent = False
        self.idle = asyncio.Event()
        self.slot = asyncio.Event()
        self.t0 = 0.0

    def payload(self, rec: RequestRecord) -> bytes:
        body = {
            "model": self.s.model,
            "prompt": self.s.prompt_fn(rec.prompt_tokens, self.seed * 1_000_003 + rec.request_index),
            "max_tokens": rec.max_output_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,  # exact output lengths (vLLM and the testbed honour it)
            "temperature": 0.0,
        }
        return post_request(self.endpoint, "/v1/completions", json.dumps(body).encode(), self.headers)

    def send(self, rec: RequestRecord, payload: bytes, on_end: Callable[[Exchange], None] | None = None) -> None:
        def done(ex: Exchange) -> None:
            self.pending -= 1
            rec.actual_send_s = ex.sent_at - self.t0 if ex.sent_at else math.nan
            self.emit(rec, RawResponse.of(ex))
            self.slot.set()
            if on_end is not None:
                on_end(ex)
            if self.pending == 0 and self.all_sent:
                self.idle.set()

        ex = Exchange(payload, done, deadline=time.perf_counter() + self.s.request_timeout_s)
        self.pending += 1
        self.pool.send(ex)

    async def _gate(self) -> None:
        cap = self.s.max_concurrency
        while cap and self.pending >= cap:
            self.slot.clear()
            await self.slot.wait()

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            self.pool.expire(time.perf_counter())

    async def open_loop(self, records: list[RequestRecord], ready: Callable[[], float]) -> None:
        await self._prepare(len(records), ready)
        ahead: collections.deque[tuple[RequestRecord, bytes | None]] = collections.deque()
        upcoming = iter(records)
        nxt = next(upcoming, None)
        while ahead or nxt is not None:
            # Build the bytes of every request due within the horizon while there is slack, so a clump of
            # Poisson arrivals is a run of writes, not of prompt synthesis and JSON encoding.
            horizon = time.perf_counter() - self.t0 + _BUILD_AHEAD_S
            while nxt is not None and (not ahead or nxt.intended_send_s <= horizon):
                ahead.append((nxt, self._payload_or_fail(nxt)))
                nxt = next(upcoming, None)
            rec, payload = ahead.popleft()
            due = self.t0 + rec.intended_send_s
            # Never early. The loop's timers have millisecond granularity (the epoll timeout), so sleep to within
            # _SPIN_S of the due time, then spin through loop iterations: responses are still read while spinning.
            while (delay := due - time.perf_counter()) > 0:
                await asyncio.sleep(0 if delay < _SPIN_S else delay - _SPIN_S)
            if self.s.max_concurrency:
                await self._gate()
            if payload is not None:
                self.send(rec, payload)
        await self._drain()

    def _payload_or_fail(self, rec: RequestRecord) -> bytes | None:
        """The request's bytes, or None after recording it failed (a prompt the tokenizer cannot make)."""
        try:
            return self.payload(rec)
        except Exception as e:
            self.emit(rec, RawResponse(0.0, 0, "", f"prompt synthesis failed: {type(e).__name__}: {e}", []))
            return None

    async def work(self, work: list[RequestRecord] | tuple[ClosedLoop, int, int], ready: Callable[[], float]) -> None:
        """Open-loop records, or (closed-loop users, first request index, index stride)."""
        if isinstance(work, tuple):
            await self.closed_loop(*work, ready=ready)
        else:
            await self.open_loop(work, ready)

    async def closed_loop(self, spec: ClosedLoop, first_index: int, stride: int, ready: Callable[[], float]) -> None:
        lengths = LengthStream(spec.prompt_tokens, spec.output_tokens, self.seed)
        counter = itertools.count()

        def next_record() -> RequestRecord:
            p, o = lengths.next()
            index = first_index + stride * next(counter)
            return RequestRecord(self.point, index, time.perf_counter() - self.t0, p, o)

        loop = asyncio.get_running_loop()
        end_at = 0.0

        def user(_: Exchange | None = None) -> None:
            if time.perf_counter() >= end_at:
                if self.pending == 0:
                    self.idle.set()
                return
            rec = next_record()
            self.send(rec, self.payload(rec), on_end=after)

        def after(_: Exchange) -> None:
            if spec.think_time_s > 0:
                loop.call_later(spec.think_time_s, user)
            else:
                loop.call_soon(user)

        await self._prepare(spec.concurrency, ready)
        end_at = self.t0 + spec.duration_s
        await asyncio.sleep(max(0.0, self.t0 - time.perf_counter()))
        for _ in range(spec.concurrency):
            user()
        await asyncio.sleep(max(0.0, end_at - time.perf_counter()))
        self.all_sent = True
        await self._drain()

    async def _prepare(self, expected: int, ready: Callable[[], float]) -> None:
        with contextlib.suppress(OSError, TimeoutError):  # a server that is down fails each request instead
            await self.pool.warm(min(expected, self.s.max_concurrency or 32, 32))
        self.t0 = ready()
        self.expirer = asyncio.get_running_loop().create_task(self._expire())

    async def _drain(self) -> None:
        self.all_sent = True
        if self.pending:
            await self.idle.wait()
        self.expirer.cancel()
        await self.pool.aclose()


def finish_record(rec: RequestRecord, ex: RawResponse) -> RequestRecord:
    """Fill a record from a finished response: timing from the arrival time of each SSE event."""
    rec.http_status = ex.status
    rec.replica = ex.replica
    if ex.error:
        rec.status, rec.error = "failed", ex.error
        return rec
    if ex.status != 200:
        rec.status, rec.error = "failed", f"HTTP {ex.status}: {_error_message(b''.join(p for _, p in ex.pieces))}"
        return rec
    try:
        _read_stream(rec, ex)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # a malformed stream must not lose the record
        rec.status, rec.error = "failed", f"client error {type(e).__name__}: {e}"
    return rec


def _events(pieces: list[tuple[float, bytes]]) -> list[tuple[float, bytes]]:
    """SSE events with the arrival time of the read that completed each."""
    out: list[tuple[float, bytes]] = []
    buf = b""
    for t, piece in pieces:
        buf += piece.replace(b"\r\n", b"\n") if b"\r" in piece else piece
        while (i := buf.find(b"\n\n")) >= 0:
            out.append((t, buf[:i]))
            buf = buf[i + 2:]
    if buf.strip():
        out.append((pieces[-1][0], buf))
    return out


def _read_stream(rec: RequestRecord, ex: RawResponse) -> None:
    chunk_times: list[float] = []
    usage: dict[str, Any] | None = None
    for t, event in _events(ex.pieces):
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            if _plain_token(data):
                chunk_times.append(t)
                continue
            obj = json.loads(data)
            if "error" in obj:
                err = obj["error"]
                message = err.get("message", err) if isinstance(err, dict) else err
                rec.status, rec.error = "failed", f"stream error: {message}"
                return
            choices = obj.get("choices") or []
            if choices and (choices[0].get("text") or (choices[0].get("delta") or {}).get("content")):
                chunk_times.append(t)
            elif choices and choices[0].get("text") == "" and choices[0].get("finish_reason") is None:
                chunk_times.append(t)  # a token whose text is not printable yet (part of a multi-byte character)
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
    t_send = ex.sent_at
    if trace.enabled() and ex.request_id:  # the latency trace across the serving path (profilers/trace.py)
        for stage, t in (("client.send", t_send), ("client.headers", ex.headers_at),
                         ("client.first_chunk", chunk_times[0]), ("client.last_chunk", chunk_times[-1])):
            trace.mark(ex.request_id, stage, t)
    rec.output_tokens = int(usage["completion_tokens"]) if usage else len(chunk_times)
    rec.ttft_s = chunk_times[0] - t_send
    rec.e2e_s = chunk_times[-1] - t_send
    rec.itl_s = [b - a for a, b in itertools.pairwise(chunk_times)]
    rec.tpot_s = (rec.e2e_s - rec.ttft_s) / (rec.output_tokens - 1) if rec.output_tokens > 1 else math.nan
    rec.status = "ok"


_FULL_PARSE = (b'"usage":{', b'"usage": {', b'"energy"', b'"error"')


def _plain_token(data: bytes) -> bool:
    """A chunk carrying one non-empty piece of text and nothing else we read (most events): no JSON parse."""
    if any(k in data for k in _FULL_PARSE) or not data.startswith(b"{"):
        return False
    for key in (b'"text":"', b'"content":"', b'"text": "', b'"content": "'):
        i = data.find(key)
        if i >= 0:
            return data[i + len(key): i + len(key) + 1] != b'"'
    return False


def _error_message(raw: bytes) -> str:
    try:
        err = json.loads(raw)["error"]
        return str(err.get("message", err)) if isinstance(err, dict) else str(err)
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace")[:300]


# ------------------------------------------------------------------------------------------- generator processes
def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the process that started this one dies (kill -9 included), so a load
    generator or a deployment never outlives its campaign; exits at once if that parent is already gone. Called
    by the child itself (not a preexec_fn, unsafe in a threaded parent). Linux only: elsewhere a no-op."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def worker_main(conn: multiprocessing.connection.Connection) -> None:
    """A generator process (``python -m workloads.loadworker FD``): runs the points it is sent, streaming finished
    records back in batches."""
    gc.freeze()
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg[0] == "stop":
            return
        _run_point_here(conn, *msg[1:])


def _pack(rec: RequestRecord, raw: RawResponse) -> tuple[Any, ...]:
    return (rec.request_index, rec.intended_send_s, rec.prompt_tokens, rec.max_output_tokens, rec.actual_send_s,
            raw.sent_at, raw.status, raw.replica, raw.error, raw.pieces, raw.request_id, raw.headers_at)


def _unpack(point: int, t: tuple[Any, ...]) -> tuple[RequestRecord, RawResponse]:
    rec = RequestRecord(point, t[0], t[1], t[2], t[3], actual_send_s=t[4])
    return rec, RawResponse(*t[5:])


def _run_point_here(conn: multiprocessing.connection.Connection, settings: ClientSettings, point: int, seed: int,
                    work: list[RequestRecord] | tuple[ClosedLoop, int, int]) -> None:
    batch: list[tuple[Any, ...]] = []
    last_flush = time.perf_counter()

    def emit(rec: RequestRecord, raw: RawResponse) -> None:
        # Small, frequent batches of plain tuples: pickling 100 dataclasses at once held the loop ~2 ms (send lag).
        nonlocal last_flush
        batch.append(_pack(rec, raw))
        now = time.perf_counter()
        if len(batch) >= 32 or now - last_flush > 0.02:
            conn.send_bytes(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
            batch.clear()
            last_flush = now

    def ready() -> float:
        conn.send(("ready",))
        return float(conn.recv())  # the common start time, perf_counter() being system-wide

    loop = _new_loop()
    # Cyclic GC pauses of tens of ms would show up as send lag; the records hold no cycles.
    gc.disable()
    try:
        run = _PointRun(settings, point, seed, emit)
        loop.run_until_complete(run.work(work, ready))
        if batch:
            conn.send_bytes(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
        conn.send(("end",))
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        loop.close()
        gc.enable()
        gc.collect()


class LoadClient:
    """Drives a target from ``processes`` generator processes (0: in this process, for small loads and tests)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        max_concurrency: int | None = None,
        request_timeout_s: float = 300.0,
        api_key: str | None = None,
        processes: int = 1,
        prompt_fn: PromptFn = synth_prompt,
    ) -> None:
        Endpoint.parse(base_url)  # a bad URL fails here, not in a worker
        self.settings = ClientSettings(base_url, model, max_concurrency, request_timeout_s, api_key, prompt_fn)
        self.processes = processes
        self._workers: list[tuple[subprocess.Popen[bytes], multiprocessing.connection.Connection]] = []

    async def run(
        self,
        point: int,
        specs: list[RequestSpec],
        seed: int,
        on_done: Callable[[RequestRecord], None] | None = None,
        on_start: Callable[[float], None] | None = None,
    ) -> list[RequestRecord]:
        """Send ``specs`` open loop; ``on_start`` gets the perf_counter() time the schedule starts from."""
        records = [RequestRecord(point, i, s.t_s, s.prompt_tokens, s.max_output_tokens) for i, s in enumerate(specs)]
        n = max(1, min(self.processes, len(records)))
        out = await self._dispatch(point, [(records[i::n], seed) for i in range(n)], on_done, on_start)
        out.sort(key=lambda r: r.request_index)
        return out

    async def run_closed(
        self,
        point: int,
        spec: ClosedLoop,
        seed: int,
        on_done: Callable[[RequestRecord], None] | None = None,
        on_start: Callable[[float], None] | None = None,
    ) -> list[RequestRecord]:
        """``spec.concurrency`` users for ``spec.duration_s``; records are sorted by send time."""
        n = max(1, min(self.processes, spec.concurrency))
        seeds = np.random.SeedSequence(seed).spawn(n)
        works: list[tuple[Any, int]] = []
        for i in range(n):
            users = spec.concurrency // n + (i < spec.concurrency % n)
            part = ClosedLoop(users, spec.duration_s, spec.prompt_tokens, spec.output_tokens, spec.think_time_s)
            works.append(((part, i, n), int(seeds[i].generate_state(1)[0])))
        out = await self._dispatch(point, works, on_done, on_start)
        out.sort(key=lambda r: r.intended_send_s)
        return out

    async def _dispatch(
        self, point: int, works: list[tuple[Any, int]],
        on_done: Callable[[RequestRecord], None] | None, on_start: Callable[[float], None] | None,
    ) -> list[RequestRecord]:
        """Each (work, seed) to a generator process, or the one of them here when ``processes`` is 0."""
        if self.processes > 0:
            return await self._run_workers(point, works, on_done, on_start)
        (work, seed), = works
        out: list[RequestRecord] = []

        def finish(rec: RequestRecord, raw: RawResponse) -> None:
            out.append(finish_record(rec, raw))
            if on_done is not None:
                on_done(rec)

        run = _PointRun(self.settings, point, seed, finish)
        ready = _start_now(on_start)
        await run.work(work, ready)
        return out

    def _start(self, n: int) -> None:
        # A fresh interpreter (not multiprocessing's spawn) so the caller's __main__ is never re-imported.
        while len(self._workers) < n:
            ours, theirs = socket.socketpair()
            proc = subprocess.Popen(
                [sys.executable, "-m", "workloads.loadworker", str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),), cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": _import_root()},
            )
            theirs.close()
            self._workers.append((proc, multiprocessing.connection.Connection(ours.detach())))

    async def _run_workers(
        self, point: int, works: list[tuple[Any, int]],
        on_done: Callable[[RequestRecord], None] | None, on_start: Callable[[float], None] | None,
    ) -> list[RequestRecord]:
        self._start(len(works))
        loop = asyncio.get_running_loop()
        workers = self._workers[: len(works)]
        out: list[RequestRecord] = []
        for (work, seed), (_, conn) in zip(works, workers, strict=True):
            conn.send(("run", self.settings, point, seed, work))
        states = ["starting"] * len(workers)
        waiter: asyncio.Future[None] = loop.create_future()

        def check(i: int) -> None:
            if waiter.done():
                return
            if all(s == "ready" for s in states):
                t0 = time.perf_counter() + 0.05
                for _, c in workers:
                    c.send(t0)
                for j in range(len(states)):
                    states[j] = "running"
                if on_start is not None:
                    on_start(t0)
            elif all(s == "ended" for s in states):
                waiter.set_result(None)

        def readable(i: int) -> None:
            proc, conn = workers[i]
            try:
                while conn.poll():
                    msg = pickle.loads(conn.recv_bytes())
                    if isinstance(msg, list):  # finished requests
                        for packed in msg:
                            rec = finish_record(*_unpack(point, packed))
                            out.append(rec)
                            if on_done is not None:
                                on_done(rec)
                    elif msg[0] in ("ready", "end"):
                        states[i] = "ready" if msg[0] == "ready" else "ended"
                        check(i)
                    elif msg[0] == "error" and not waiter.done():
                        waiter.set_exception(LoadGeneratorError(f"load generator process failed:\n{msg[1]}"))
            except Exception as e:  # undecodable message: the worker and this process disagree on the code
                if not isinstance(e, EOFError | OSError):
                    loop.remove_reader(conn.fileno())
                    if not waiter.done():
                        waiter.set_exception(LoadGeneratorError(f"bad message from load generator: {e!r}"))
                    return
                loop.remove_reader(conn.fileno())
                if not waiter.done():
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(1.0)
                    waiter.set_exception(LoadGeneratorError(
                        f"load generator process {proc.pid} died (exit code {proc.returncode}) during point {point}: "
                        "its unfinished requests have no records; run the campaign again with --resume"))

        for i, (_, conn) in enumerate(workers):
            loop.add_reader(conn.fileno(), readable, i)
        try:
            await waiter
        except BaseException:
            self.close()
            raise
        finally:
            for _, conn in workers:
                with contextlib.suppress(OSError, ValueError):
                    loop.remove_reader(conn.fileno())
        return out

    def close(self) -> None:
        """Stop the generator processes (killed if they do not exit within 2 s) and close their pipes."""
        for proc, conn in self._workers:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(("stop",))
            conn.close()
            try:
                proc.wait(2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._workers.clear()

    async def __aenter__(self) -> LoadClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def _start_now(on_start: Callable[[float], None] | None) -> Callable[[], float]:
    def ready() -> float:
        t0 = time.perf_counter()
        if on_start is not None:
            on_start(t0)
        return t0

    return ready


def _import_root() -> str:
    """PYTHONPATH for a generator process: where this package is imported from, then the caller's own path."""
    root = str(Path(__file__).resolve().parent.parent)
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)

