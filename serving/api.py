"""OpenAI-compatible front door: completions and chat completions (streaming SSE or not), models,
health and Prometheus metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from profilers import trace
from profilers.exporter import DoorRefusals, ExportSnapshot, build_registry
from profilers.footprint import SiteProfile
from serving.config import DoorConfig
from serving.router import NoReplicaError, ReplicaFailedError, Router
from serving.tokenizer import render_chat
from serving.types import GenerationRequest, RequestRejectedError, TokenEvent

log = logging.getLogger(__name__)


class StreamOptions(BaseModel):
    """OpenAI ``stream_options``: ``include_usage`` adds a final chunk with token usage."""

    include_usage: bool = False


class _Common(BaseModel):
    # Clients send OpenAI fields that change nothing here (user, metadata, ...): accept them. Fields that would
    # change the output are refused with a 400 unless they hold their neutral value (UNSUPPORTED_FIELDS).
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    n: int = Field(default=1, ge=1, le=1)
    seed: int | None = None
    ignore_eos: bool = False

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    # field: the values that mean "not used" (what clients such as `vllm bench serve` send by default)
    "stop": (None, [], ""),
    "stop_token_ids": (None, []),
    "include_stop_str_in_output": (None, False),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "prompt_logprobs": (None,),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "use_beam_search": (None, False),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "top_p": (None, 1),
    "top_k": (None, 0, -1),
    "min_p": (None, 0),
    "min_tokens": (None, 0),
    "bad_words": (None, []),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
}
"""OpenAI (and vLLM) request fields the door does not implement. Ignoring them would answer something else than
was asked (a completion that runs past its stop string, no log-probabilities), so a request that uses one gets a
400 naming it; the neutral values are accepted."""


def unsupported_field(body: BaseModel) -> str | None:
    """The first field of ``body`` that asks for something the door does not implement, if any."""
    for name, value in (body.model_extra or {}).items():
        neutral = UNSUPPORTED_FIELDS.get(name)
        if neutral is not None and not any(_same(value, v) for v in neutral):
            return name
    return None


def _same(a: Any, b: Any) -> bool:
    """Equal JSON values, a number equal to a number (1 and 1.0) but not to a boolean (0 and false)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


class CompletionRequest(_Common):
    """Body of ``POST /v1/completions``: a text prompt, or token ids."""

    prompt: str | list[int] | list[str]


class ChatMessage(BaseModel):
    """One chat message (OpenAI fields beyond role and content are accepted and ignored)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_Common):
    """Body of ``POST /v1/chat/completions``: at least one message."""

    messages: list[ChatMessage] = Field(min_length=1)


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An OpenAI-shaped JSON error (``invalid_request_error`` below 500, ``server_error`` from it)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


UNSIZED_INFLIGHT_CAP = 2048
"""The in-flight cap of a door whose limits were not sized from a deployment's batch capacity."""


class Admission:
    """Generation requests in flight at one door, against ``DoorConfig.max_inflight_requests``; a request refused
    at the cap is counted in ``refusals`` (``llm_energy_door_refused_total{reason="in_flight"}``)."""

    __slots__ = ("_overloaded", "inflight", "limit", "refusals", "rejected", "retry_after_s")

    def __init__(self, limit: int, retry_after_s: int, refusals: DoorRefusals | None = None) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.refusals = refusals if refusals is not None else DoorRefusals()
        self.inflight = 0
        self.rejected = 0
        self._overloaded: tuple[int, JSONResponse] | None = None

    def full(self) -> bool:
        """At the cap: count the request as rejected (True; it gets :meth:`overloaded`), else False. Takes no
        place: the door asks when a request's headers arrive, to answer before its body."""
        if self.inflight < self.limit:
            return False
        self.rejected += 1
        self.refusals.count("in_flight")
        return True

    def enter(self) -> bool:
        """Take a place, or count a rejection (False) when there is none."""
        if self.full():
            return False
        self.inflight += 1
        return True

    def leave(self) -> None:
        """Give back the place of a request that finished."""
        self.inflight -= 1

    def overloaded(self) -> JSONResponse:
        """The 503 for a request over the in-flight limit, with ``retry-after`` (built once: under overload it is
        the door's most frequent answer)."""
        if self._overloaded is None or self._overloaded[0] != self.limit:
            self._overloaded = (self.limit, error_response(
                503, f"the server is at its limit of {self.limit} requests in flight; retry after "
                f"{self.retry_after_s} s", code="overloaded", headers={"retry-after": str(self.retry_after_s)},
            ))
        return self._overloaded[1]


class RecentRequests:
    """Arrivals and completed requests' latencies over a sliding window (what a controller observes)."""

    def __init__(self, window_s: float = 20.0) -> None:
        self.window_s = window_s
        self.arrivals: deque[float] = deque()
        self.completions: deque[tuple[float, float, float | None]] = deque()

    def _trim(self, now: float) -> None:
        while self.arrivals and now - self.arrivals[0] > self.window_s:
            self.arrivals.popleft()
        while self.completions and now - self.completions[0][0] > self.window_s:
            self.completions.popleft()

    def arrive(self, now: float) -> None:
        """Record a request's arrival at ``now`` (s, the door's perf-counter clock)."""
        self.arrivals.append(now)
        self._trim(now)

    def complete(self, now: float, ttft_s: float, tpot_s: float | None) -> None:
        """Record a finished request's TTFT and TPOT (s; TPOT None for a single token) at ``now``."""
        self.completions.append((now, ttft_s, tpot_s))
        self._trim(now)

    def view(self, now: float) -> tuple[float, list[float], list[float]]:
        """(arrival rate, TTFTs, TPOTs) of the window ending now."""
        self._trim(now)
        span = min(self.window_s, max(1e-9, now - self.arrivals[0])) if self.arrivals else self.window_s
        return (
            len(self.arrivals) / span if self.arrivals else 0.0,
            [c[1] for c in self.completions],
            [c[2] for c in self.completions if c[2] is not None],
        )


class FrontDoor:
    """The OpenAI-compatible front door: admits, routes and streams requests, records latency, serves ``/metrics``."""

    def __init__(
        self, router: Router, model_name: str, max_model_len: int, site: SiteProfile, limits: DoorConfig | None = None,
    ) -> None:
        self.router = router
        self.limits = limits or DoorConfig()
        # Not sized from a deployment (DoorConfig.resolved): the cap the door had before it was sized.
        cap = self.limits.max_inflight_requests or UNSIZED_INFLIGHT_CAP
        self.refusals = DoorRefusals()  # what the door refused at its limits, exported on /metrics
        self.admission = Admission(cap, self.limits.retry_after_s, self.refusals)
        self.recent = RecentRequests()
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.created = int(time.time())
        self._snapshot = ExportSnapshot()
        self.registry, self.latency = build_registry(lambda: self._snapshot, site, refusals=self.refusals)

    async def metrics_text(self) -> bytes:
        """The ``/metrics`` exposition, from a fresh snapshot of every replica's telemetry."""
        self._snapshot = await self.router.snapshot()
        return self.registry.render()

    def check_model(self, name: str) -> JSONResponse | None:
        """A 404 when ``name`` is not the served model, else None."""
        if name != self.model_name:
            return error_response(
                404, f"The model `{name}` does not exist. This server serves `{self.model_name}`.",
                param="model", code="model_not_found",
            )
        return None

    async def handle(
        self, body: _Common, prompt: str | None, prompt_ids: list[int] | None, chat: bool,
        messages: list[dict[str, str]] | None = None,
    ) -> Response:
        """Serve one generation request: validate, route, then stream (SSE) or answer in one JSON body."""
        if (bad := self.check_model(body.model)) is not None:
            return bad
        if (name := unsupported_field(body)) is not None:
            return error_response(400, f"`{name}` is not supported by this server: leave it out (or at its "
                                       "default) to be served", param=name, code="unsupported_parameter")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        request = GenerationRequest(
            request_id=rid, prompt=prompt, prompt_token_ids=prompt_ids, max_tokens=body.token_limit,
            ignore_eos=body.ignore_eos, temperature=body.temperature, seed=body.seed, messages=messages,
            default_max_tokens=self.limits.default_max_tokens,
        )
        t_arrival = time.perf_counter()
        trace.mark(rid, "door.receive", t_arrival)
        self.recent.arrive(t_arrival)
        stream = self.router.stream(request)
        # Take the first event before answering, so a rejected request gets a 400, not a broken stream.
        try:
            first = await anext(stream)
        except RequestRejectedError as e:
            return error_response(400, e.message, param=e.param, code=e.code)
        except NoReplicaError as e:
            return error_response(503, str(e), code="no_replica")
        except StopAsyncIteration:
            return error_response(500, "the engine finished without producing a token", code="empty_stream")
        timing = _Timing(t_arrival, time.perf_counter())
        trace.mark(rid, "door.first_event", timing.first)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return SSEResponse(
                self._sse(rid, first, stream, chat, include_usage, timing),
                headers={"x-replica": first.replica, "x-request-id": rid, "cache-control": "no-cache"},
            )
        text, last = [first.text], first
        try:
            async for ev in stream:
                text.append(ev.text)
                last = ev
        except (ReplicaFailedError, NoReplicaError) as e:
            return error_response(502, str(e), code="replica_failed")
        self._observe(last, timing)
        return JSONResponse(self._final_body(rid, "".join(text), last, chat), headers={"x-replica": last.replica})

    async def completion(self, body: CompletionRequest) -> Response:
        """Serve ``/v1/completions``: one text prompt or a list of token ids (batched prompts refused)."""
        if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str):
            if len(body.prompt) != 1:
                return error_response(400, "batched prompts are not supported: send one prompt per request",
                                      param="prompt", code="unsupported")
            return await self.handle(body, body.prompt[0], None, chat=False)
        if isinstance(body.prompt, list):
            return await self.handle(body, None, list(body.prompt), chat=False)  # token ids
        return await self.handle(body, body.prompt, None, chat=False)

    async def chat_completion(self, body: ChatRequest) -> Response:
        """Serve ``/v1/chat/completions``: messages rendered through the chat template."""
        messages = [m.model_dump(include={"role", "content"}) for m in body.messages]
        return await self.handle(body, render_chat(messages), None, chat=True, messages=messages)

    def _observe(self, last: TokenEvent, timing: _Timing) -> None:
        e2e = time.perf_counter() - timing.arrival
        ttft = timing.first - timing.arrival
        tpot = (e2e - ttft) / (last.output_tokens - 1) if last.output_tokens > 1 else None
        self.latency.observe(last.replica, ttft, tpot, e2e)
        self.recent.complete(time.perf_counter(), ttft, tpot)

    def _usage(self, ev: TokenEvent) -> dict[str, int]:
        return {
            "prompt_tokens": ev.prompt_tokens,
            "completion_tokens": ev.output_tokens,
            "total_tokens": ev.prompt_tokens + ev.output_tokens,
        }

    @staticmethod
    def _energy(ev: TokenEvent) -> dict[str, Any]:
        # Extension field: the request's attributed energy (clients ignore unknown fields).
        return {"joules": ev.energy_j, "provenance": ev.provenance, "replica": ev.replica}

    def _final_body(self, rid: str, text: str, last: TokenEvent, chat: bool) -> dict[str, Any]:
        if chat:
            choice: dict[str, Any] = {
                "index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": last.finish_reason,
                "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}
        return {
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": self.model_name, "choices": [choice], "usage": self._usage(last), "energy": self._energy(last),
        }

    def _chunk(self, rid: str, ev: TokenEvent, chat: bool, first: bool) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"content": ev.text}
            if first:
                delta["role"] = "assistant"
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": ev.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": ev.text, "logprobs": None, "finish_reason": ev.finish_reason}
        chunk: dict[str, Any] = {
            "id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": self.model_name, "choices": [choice],
        }
        if ev.finished:
            chunk["energy"] = self._energy(ev)
        return chunk

    def _middle_chunk(self, rid: str, chat: bool) -> tuple[str, str]:
        """The text before and after a chunk's JSON-encoded text, for the chunks between the first and the last
        (the same as :meth:`_chunk` writes, built once per request instead of once per token)."""
        created = int(time.time())
        head = json.dumps({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                           "created": created, "model": self.model_name}, separators=(",", ":"))[:-1]
        if chat:
            return f'data: {head},"choices":[{{"index":0,"delta":{{"content":', (
                '},"finish_reason":null,"logprobs":null}]}\n\n')
        return f'data: {head},"choices":[{{"index":0,"text":', ',"logprobs":null,"finish_reason":null}]}\n\n'

    async def _sse(
        self, rid: str, first: TokenEvent, rest: AsyncIterator[TokenEvent], chat: bool, include_usage: bool,
        timing: _Timing,
    ) -> AsyncIterator[str]:
        trace.mark(rid, "door.first_chunk")
        yield _sse(self._chunk(rid, first, chat, first=True))
        last = first
        before, after = self._middle_chunk(rid, chat)
        tail = ""  # the last token's chunk leaves with the usage and [DONE]: one write, one wake-up of the client
        try:
            async for ev in rest:
                last = ev
                if ev.finished:
                    tail = _sse(self._chunk(rid, ev, chat, first=False))
                else:
                    yield before + _json_str(ev.text) + after
        except (ReplicaFailedError, NoReplicaError) as e:
            error = {"message": str(e), "type": "server_error", "param": None, "code": "replica_failed"}
            yield _sse({"error": error}) + SSE_DONE
            return
        self._observe(last, timing)
        if include_usage:
            tail += _sse({
                "id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": [],
                "usage": self._usage(last), "energy": self._energy(last),
            })
        yield tail + SSE_DONE


class _Timing:
    __slots__ = ("arrival", "first")

    def __init__(self, arrival: float, first: float) -> None:
        self.arrival = arrival
        self.first = first


SSE_DONE = "data: [DONE]\n\n"
"""The stream's last event; the door's SSE chunks end with it and nothing follows."""
_json_str = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]  # what json.dumps does to a str


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class SSEResponse:
    """A server-sent event stream as a raw ASGI response. Starlette's ``StreamingResponse`` opens an anyio task
    group per stream to notice a client that goes away; one watcher task does that here, at a fraction of the
    cost on the first token's path. A client that disconnects cancels the stream, which cancels its request in
    the engine."""

    media_type = b"text/event-stream; charset=utf-8"

    def __init__(self, chunks: AsyncIterator[str], headers: dict[str, str]) -> None:
        self.chunks = chunks
        self.raw_headers = [(b"content-type", self.media_type),
                            *((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items())]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Send the headers and the chunks, cancelling the stream when the client disconnects."""
        stream_task = asyncio.current_task()
        assert stream_task is not None
        state = {"finished": False, "disconnected": False}

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if not state["finished"]:
                state["disconnected"] = True
                stream_task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            state["finished"] = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not state["disconnected"]:
                raise
            stream_task.uncancel()  # the client went away: nothing left to answer
        finally:
            state["finished"] = True
            watcher.cancel()
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                await aclose()  # closes the router's stream: cancels the request in the engine if unfinished


def invalid_request(errors: list[Any]) -> JSONResponse:
    """A 400 in OpenAI's error shape from pydantic's (or FastAPI's) validation errors."""

    def where(e: Any) -> str:
        return ".".join(str(p) for p in e.get("loc", ()) if p != "body")

    first = where(errors[0]) if errors else ""
    msg = "; ".join(f"{where(e)}: {e['msg']}" if where(e) else e["msg"] for e in errors)
    return error_response(400, f"invalid request: {msg}", param=first or None, code="invalid_request")


Route = tuple[type[_Common], Callable[[Any], Awaitable[Response]]]
"""A generation endpoint: the model its JSON body is validated into, and the door's handler for it."""


def generation_routes(door: FrontDoor) -> dict[str, Route]:
    """The endpoints answered without FastAPI: by :class:`GenerationFastPath` under any ASGI server, and on the
    connection itself under the front door's own protocol (``serving/http_door.py``)."""
    return {
        "/v1/completions": (CompletionRequest, door.completion),
        "/v1/chat/completions": (ChatRequest, door.chat_completion),
    }


async def answer(route: Route, raw: bytes) -> Response:
    """The door's response to a generation request's body: a 400 if it does not validate."""
    model, handler = route
    try:
        body = model.model_validate_json(raw)
    except ValidationError as e:
        return invalid_request(e.errors(include_url=False))
    try:
        return await handler(body)
    except Exception:  # a bug, not the client's fault: an OpenAI-shaped 500, and the trace in the log
        log.exception("front door: a %s request failed", model.__name__)
        return error_response(500, "the front door failed to answer this request", code="internal_error")


class GenerationFastPath:
    """ASGI middleware that answers ``POST /v1/completions`` and ``POST /v1/chat/completions`` itself: the body
    read from ASGI, validated by pydantic from its JSON bytes, the request streamed by :class:`SSEResponse`.
    Through FastAPI's own path (dependency solving, validation of the decoded JSON, Starlette's task group per
    stream) the door's share of a request's time to first token was 1.2 ms on a small host, against 0.8 ms here
    (``bench/front_door_latency.py``). Every other request goes on to the FastAPI app. The front door's own server
    answers these endpoints before ASGI (``serving/http_door.py``); this serves other ASGI servers, and requests
    pipelined behind another on one connection."""

    def __init__(self, app: Any, door: FrontDoor) -> None:
        self.app = app
        self.routes = generation_routes(door)
        self.admission = door.admission

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Answer the two generation endpoints directly; pass everything else on to the wrapped app."""
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            response: Any = error_response(405, f"{scope['path']} takes POST, not {scope['method']}",
                                           code="method_not_allowed")
        elif (raw := await _read_body(receive)) is None:
            return  # the client went away before its request was complete
        elif not self.admission.enter():
            response = self.admission.overloaded()
        else:
            try:
                response = await answer(route, raw)
                await response(scope, receive, send)
            finally:
                self.admission.leave()
            return
        await response(scope, receive, send)


async def _read_body(receive: Any) -> bytes | None:
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


class _ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, as every error of the door's is answered."""

    error: _ErrorBody


_GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "A completion, or with `stream: true` its server-sent events (`text/event-stream`).",
          "content": {"application/json": {}, "text/event-stream": {}}},
    **{code: {"model": ErrorResponse, "description": why} for code, why in (
        (400, "The body does not validate, asks for a field the door does not implement, or exceeds the context."),
        (404, "Not the served model."), (408, "The body did not arrive in time."), (413, "The body is too large."),
        (431, "The headers are too large."), (503, "Every in-flight slot is taken (see Retry-After)."),
        (500, "The door failed (a bug): OpenAI's server_error shape."),
    )},
}


def _documented(route: Route) -> Callable[..., Awaitable[Response]]:
    async def documented(body: Any) -> Response:
        return await answer(route, body.model_dump_json().encode())

    documented.__annotations__["body"] = route[0]  # the model FastAPI documents (annotations are strings here)
    return documented


def _document_generation_endpoints(app: FastAPI, door: FrontDoor) -> None:
    """Declare the generation endpoints in the OpenAPI document (clients and fuzzers read it); they are answered
    before these routes by :class:`GenerationFastPath` and the door's own protocol, with the same handlers."""
    for path, route in generation_routes(door).items():
        app.add_api_route(path, _documented(route), methods=["POST"], responses=_GENERATION_RESPONSES,
                          response_class=Response, summary=f"OpenAI {path}")


def create_app(door: FrontDoor) -> FastAPI:
    """The front door's FastAPI app: generation endpoints, ``/v1/models``, ``/health``, ``/metrics``."""
    app = FastAPI(title="llm-energy-testbed front door", docs_url=None, redoc_url=None)
    app.state.door = door  # the server's own protocol answers the generation endpoints from it (front_door_server)
    app.add_middleware(GenerationFastPath, door=door)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid_request(list(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), code=None)

    _document_generation_endpoints(app, door)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": door.model_name, "object": "model", "created": door.created, "owned_by": "llm-energy-testbed",
            "max_model_len": door.max_model_len,
        }]}

    @app.get("/health")
    async def health() -> JSONResponse:
        replicas = {r.name: ("dead" if not r.alive else "up" if r.responsive else "not answering")
                    for r in door.router.replicas}
        ok = bool(door.router.routable())
        status = "unavailable" if not ok else "ok" if len(door.router.routable()) == len(replicas) else "degraded"
        return JSONResponse({"status": status, "replicas": replicas}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await door.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    return app
