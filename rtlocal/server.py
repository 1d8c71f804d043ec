"""`rtlocal serve`: an OpenAI-compatible chat-completions server with per-request refusal control.

How requests share the model: the server holds `parallel` engines ("slots") on the same GGUF. llama.cpp
maps the file read-only, so the weights sit in memory once; each slot has its own context (KV cache),
sampler and thread, and keeps its cache between requests, so a follow-up turn reuses its prefix (a free
slot is chosen by the longest cached prefix). A request holds one slot from its prompt evaluation to its
last token; llama.cpp releases the GIL while it computes, so slots run side by side. Requests beyond the
slots wait in a bounded FIFO queue (full: 503 with Retry-After). Tokens go from the slot's thread to the
request's own buffer, so a client that reads slowly never holds a slot; a client that disconnects sets a
flag that the slot's thread checks before every token, which stops the generation and frees the slot.

Needs the `serve` extra (starlette, uvicorn); `rtlocal` itself imports without it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from rtlocal.errors import RtlocalError
from rtlocal.runtime.engine import Engine, SamplingParams, Stats
from rtlocal.runtime.generation import decision_fields
from rtlocal.runtime.policy import Decision, Mode, Policy, build_policy
from rtlocal.runtime.prompts import Message

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_QUEUE = 64  # waiting requests beyond the slots
DEFAULT_MAX_TOKENS = 512  # answer length when a request sets none (always capped by the context)
MAX_BODY_BYTES = 1 << 20
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20
RETRY_AFTER_S = 1
FINISH = {"eos": "stop", "length": "length", "context": "length", "cancelled": "stop"}


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------- the request


@dataclass
class ChatRequest:
    """A validated chat-completions body."""

    messages: list[Message]
    max_tokens: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    strictness: str | None = None
    thresholds: str | None = None
    bias: str | None = None
    mode: Mode | None = None
    decision_temperature: float = 1.0
    logprobs: bool = False
    top_logprobs: int = 0


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _content(value: Any, where: str, role: str) -> str:
    """A message's text: a string, a list of text parts, or null for an assistant turn."""
    if isinstance(value, str):
        return value
    if value is None and role == "assistant":
        return ""
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}.content[{j}]: only text parts are supported", param=f"{where}.content")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"{where}.content: expected a string or a list of text parts", param=f"{where}.content")


def parse_messages(value: Any) -> list[Message]:
    """OpenAI messages -> rtlocal messages. Content stays text: prompts.py never lets it become a control token."""
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages: expected a non-empty list", param="messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where}: expected an object with role and content", param=where)
        role = _ROLES.get(m.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise ApiError(400, f"{where}.role: expected system, developer, user or assistant, got {m.get('role')!r}",
                           param=f"{where}.role")
        out.append(Message(role, _content(m.get("content"), where, role)))
    if out[-1].role != "user":
        raise ApiError(400, "messages: the last message must be from the user", param="messages")
    return out


def _number(body: Mapping[str, Any], name: str, lo: float, hi: float, *, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (not integer and not math.isfinite(value)) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"{name}: expected {kind} in [{lo:g}, {hi:g}], got {value!r}", param=name)
    return value


def _spec(body: Mapping[str, Any], name: str) -> str | None:
    """A policy field as the CLI's grammar: 'safety=0.3,all=off' as a string, or {"safety": 0.3, "all": "off"}."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and value:
        parts = []
        for k, v in value.items():
            if not isinstance(k, str) or not k.strip() or "," in k or "=" in k:
                raise ApiError(400, f"{name}: bad category name {k!r}", param=name)
            if v is None:
                v = "off"
            if isinstance(v, bool) or not isinstance(v, (int, float, str)) or (isinstance(v, str) and ("," in v or "=" in v)):
                raise ApiError(400, f"{name}.{k}: expected a number or a name, got {v!r}", param=name)
            parts.append(f"{k}={v}")
        return ",".join(parts)
    raise ApiError(400, f"{name}: expected a string like 'safety=0.3' or an object like {{\"safety\": 0.3}}", param=name)


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a chat-completions body (unknown fields are ignored, as OpenAI does)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = parse_messages(body.get("messages"))
    n = _number(body, "n", 1, 1, integer=True)
    if body.get("n") is not None and n != 1:
        raise ApiError(400, "n: only n = 1 is supported", param="n")
    max_tokens = _number(body, "max_completion_tokens", 1, 1 << 31, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, 1 << 31, integer=True)
    defaults = SamplingParams()
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    if top_p == 0:
        raise ApiError(400, "top_p: must be > 0", param="top_p")
    sampling = SamplingParams(
        temperature=defaults.temperature if temperature is None else float(temperature),
        top_k=_or(_number(body, "top_k", 0, 1 << 20, integer=True), defaults.top_k),
        top_p=defaults.top_p if top_p is None else float(top_p),
        min_p=_or(_number(body, "min_p", 0, 1), defaults.min_p),
        repeat_penalty=_or(_number(body, "repeat_penalty", 0, 10), defaults.repeat_penalty),
        seed=_number(body, "seed", -(1 << 63), (1 << 64) - 1, integer=True),
        logit_bias=_logit_bias(body.get("logit_bias")),
    )
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"stop: expected a non-empty string or a list of at most {MAX_STOP}", param="stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "stream: expected true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options: expected an object", param="stream_options")
    mode = body.get("mode")
    if mode is not None:
        try:
            mode = Mode(mode)
        except ValueError:
            raise ApiError(400, f"mode: expected threshold, bias or free, got {mode!r}", param="mode") from None
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise ApiError(400, "logprobs: expected true or false", param="logprobs")
    top_logprobs = _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
    if top_logprobs is not None and not logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
    return ChatRequest(
        messages=messages,
        max_tokens=max_tokens,
        sampling=sampling,
        stop=stops,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        strictness=_spec(body, "strictness"),
        thresholds=_spec(body, "thresholds"),
        bias=_spec(body, "bias"),
        mode=mode,
        decision_temperature=_or(_number(body, "decision_temperature", 1e-3, 100), 1.0),
        logprobs=bool(logprobs),
        top_logprobs=top_logprobs or 0,
    )


def _logit_bias(value: Any) -> dict[int, float]:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]}; -100 bans the token."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, "logit_bias: expected an object mapping token ids to numbers", param="logit_bias")
    out = {}
    for k, v in value.items():
        if not str(k).isdigit() or isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise ApiError(400, f"logit_bias: expected token id -> number in [-100, 100], got {k!r}: {v!r}", param="logit_bias")
        out[int(k)] = -math.inf if v <= -100 else float(v)
    return out


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def request_policy(engine: Engine, base: Policy, req: ChatRequest) -> Policy:
    """The server's policy with the request's strictness, thresholds, bias and mode on top."""
    from rtlocal.runtime.calibration import strictness_mapper

    given = {"strictness": req.strictness, "thresholds": req.thresholds, "bias": req.bias}
    if not any(given.values()) and req.mode in (None, base.mode):
        return base
    info = engine.refusal
    if not info.present and any(given.values()):
        raise ApiError(400, f"{engine.path.name} has no refusal tokens: strictness/thresholds/bias do not apply",
                       param=next(k for k, v in given.items() if v))
    bias = req.bias or (",".join(f"{c}={b}" for c, b in base.biases.items()) or None)
    mapper = strictness_mapper(info.calibration)
    try:
        return build_policy(info.categories, strictness=req.strictness, thresholds=req.thresholds, biases=bias,
                            mode=req.mode or base.mode, defaults=base.thresholds, calibrated=mapper)
    except RtlocalError as e:
        param = next((k for k, v in given.items() if v and _fails(info.categories, k, v, mapper)), None)
        message = str(e).replace("--threshold", "thresholds").replace("--strictness", "strictness").replace("--bias", "bias")
        raise ApiError(400, message, param=param) from None


def _fails(categories: list[str], name: str, spec: str, mapper: Any) -> bool:
    key = {"strictness": "strictness", "thresholds": "thresholds", "bias": "biases"}[name]
    try:
        build_policy(categories, calibrated=mapper, **{key: spec})
    except RtlocalError:
        return True
    return False


# ---------------------------------------------------------------- slots and the queue


class QueueFull(Exception):
    pass


class Slots:
    """Engines lent to one request at a time; requests beyond them wait in a bounded FIFO queue.

    Used from the event loop's thread only (slot threads hand engines back through the loop).
    """

    def __init__(self, engines: list[Engine], queue_size: int):
        self.engines = list(engines)
        self.free = list(engines)
        self.waiting: deque[asyncio.Future] = deque()
        self.queue_size = queue_size

    def reserve(self, ids: list[int]) -> "Ticket":
        """A place: a free slot now (the one whose KV cache shares the longest prefix), or in the queue."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        if self.free:
            engine = max(self.free, key=lambda e: _common_prefix(e, ids))
            self.free.remove(engine)
            fut.set_result(engine)
        else:
            self.waiting = deque(f for f in self.waiting if not f.done())
            if len(self.waiting) >= self.queue_size:
                raise QueueFull
            self.waiting.append(fut)
        return Ticket(self, fut)

    def release(self, engine: Engine) -> None:
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_result(engine)
                return
        self.free.append(engine)

    @property
    def queued(self) -> int:
        return sum(1 for f in self.waiting if not f.done())


def _common_prefix(engine: Engine, ids: list[int]) -> int:
    n = 0
    for a, b in zip(engine.llm.input_ids[: engine.llm.n_tokens], ids):
        if a != b:
            break
        n += 1
    return n


class Ticket:
    """A request's place for a slot: awaited for the engine, or abandoned (idempotent)."""

    def __init__(self, slots: Slots, fut: asyncio.Future):
        self.slots, self.fut, self.closed = slots, fut, False

    async def engine(self) -> Engine:
        try:
            engine = await self.fut
        except asyncio.CancelledError:
            self.abandon()
            raise
        self.closed = True  # from here the slot's thread hands the engine back
        return engine

    def abandon(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.fut.done() and not self.fut.cancelled():
            self.slots.release(self.fut.result())
        else:
            self.fut.cancel()


# ---------------------------------------------------------------- one generation


class _StopScanner:
    """Cuts the text at the first stop string, holding back just enough characters to see one arrive."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.keep = max((len(s) for s in stops), default=1) - 1
        self.buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        cut = len(self.buf) - self.keep
        if cut <= 0:
            return "", False
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


@dataclass(eq=False)
class Generation:
    """One request's events from its slot's thread: ("decision", Decision), ("text", str), ("done",), ("error", e)."""

    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    stats: Stats | None = None
    finish_reason: str = "stop"
    outcome: str = "failed"  # "served", "cancelled" or "failed", for /health


def _generate(engine: Engine, req: ChatRequest, policy: Policy, max_tokens: int, gen: Generation,
              loop: asyncio.AbstractEventLoop) -> None:
    """Runs in a slot's thread: decide, then stream the answer into the request's queue until done or cancelled."""

    def put(*event: Any) -> None:
        _call_soon(loop, gen.events.put_nowait, event)

    pending: list[dict[str, Any]] = []  # logprobs of tokens whose text has not gone out yet
    on_token = (lambda tok: pending.append(_logprob_entry(engine, tok, req.top_logprobs))) if req.logprobs else None

    def put_text(text: str) -> None:
        if text or pending:
            put("text", text, pending[:] if req.logprobs else None)
            pending.clear()

    try:
        if gen.cancel.is_set():  # the client left while the slot was being handed over
            gen.outcome = "cancelled"
            put("done")
            return
        response = engine.respond(req.messages, policy, sampling=req.sampling, max_tokens=max_tokens,
                                  decision_temperature=req.decision_temperature, on_token=on_token)
        gen.stats = response.stats
        put("decision", response.decision)
        stops = _StopScanner(req.stop)
        stopped = False
        for chunk in response:
            if gen.cancel.is_set():
                response.close()
                gen.outcome = "cancelled"
                break
            text, stopped = stops.feed(chunk)
            if text:
                put_text(text)
            if stopped:
                response.close()
                break
        else:
            put_text(stops.flush())
        gen.finish_reason = "stop" if stopped else FINISH.get(response.stats.stop_reason, "stop")
        if gen.outcome != "cancelled":
            gen.outcome = "served"
        put("done")
    except RtlocalError as e:
        put("error", ApiError(400, str(e)))
    except Exception:  # never a traceback to the client: log it here, answer a one-line error
        log.exception("generation failed")
        put("error", ApiError(500, "the server failed to generate an answer (see the server log)"))


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable, *args: Any) -> None:
    """Hand work to the event loop from a slot's thread; after shutdown there is nobody left to tell."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed
        pass


def _logprob_entry(engine: Engine, token: int, top: int) -> dict[str, Any]:
    """OpenAI's logprobs entry for one answer token, from the model's logits at its position (before sampling)."""
    import numpy as np

    logits = engine.last_logits().astype(np.float64)
    peak = logits.max()
    logp = logits - (peak + math.log(float(np.exp(logits - peak).sum())))

    def item(t: int) -> dict[str, Any]:
        piece = engine.piece_bytes(int(t))
        return {"token": piece.decode("utf-8", "replace"), "logprob": float(logp[t]), "bytes": list(piece)}

    entry = item(token)
    if top:
        best = np.argpartition(-logp, top)[:top]
        entry["top_logprobs"] = [item(t) for t in best[np.argsort(-logp[best])]]
    else:
        entry["top_logprobs"] = []
    return entry


# ---------------------------------------------------------------- the server


class _EventStream(StreamingResponse):
    """An SSE response that always runs `on_close`, even when the client leaves before the body starts."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[override]
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class Server:
    """The app: slots over one GGUF, the server-wide policy, and the OpenAI-compatible routes."""

    def __init__(self, engines: list[Engine], policy: Policy, *, api_key: str | None = None,
                 queue_size: int = DEFAULT_QUEUE, max_tokens: int = DEFAULT_MAX_TOKENS,
                 max_body: int = MAX_BODY_BYTES, model_id: str | None = None):
        if not engines:
            raise RtlocalError("the server needs at least one engine")
        self.engines = engines
        self.engine = engines[0]  # tokenizes and reads the contract for all: the slots hold the same GGUF
        self.policy = policy
        self.api_key = api_key or None
        self.max_tokens = max_tokens
        self.max_body = max_body
        self.model_id = model_id or self.engine.path.stem
        self.created = int(self.engine.path.stat().st_mtime)
        self.slots = Slots(engines, queue_size)
        self.executor = ThreadPoolExecutor(max_workers=len(engines), thread_name_prefix="rtlocal-slot")
        self.live: set[Generation] = set()
        self.counts = {"served": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._api(self.chat_completions), methods=["POST"]),
                Route("/v1/models", self._api(self.models), methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_error, Exception: self._crash},
        )

    # -------------------------------------------------------- plumbing

    def _api(self, handler: Callable) -> Callable:
        async def wrapped(request: Request) -> Response:
            try:
                self._check_key(request)
                return await handler(request)
            except ApiError as e:
                return e.response()
            except Exception:
                log.exception("request failed")
                return ApiError(500, "internal server error (see the server log)").response()

        return wrapped

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return ApiError(status, message.get(status, str(getattr(exc, "detail", "error")))).response()

    async def _crash(self, request: Request, exc: Exception) -> Response:
        return ApiError(500, "internal server error (see the server log)").response()

    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    async def _read_json(self, request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise ApiError(413, f"the request body is over {self.max_body} bytes", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise ApiError(413, f"the request body is over {self.max_body} bytes", code="request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None

    # -------------------------------------------------------- routes

    async def health(self, request: Request) -> Response:
        busy = len(self.engines) - len(self.slots.free)
        return JSONResponse({"status": "ok", "model": self.model_id, "slots": len(self.engines), "busy": busy,
                             "queued": self.slots.queued, **self.counts})

    async def models(self, request: Request) -> Response:
        entry = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "rtlocal",
                 "rtlocal": {"categories": self.engine.refusal.categories, "context": self.engine.n_ctx,
                             "mode": self.policy.mode.value, "thresholds": dict(self.policy.thresholds)}}
        return JSONResponse({"object": "list", "data": [entry]})

    async def chat_completions(self, request: Request) -> Response:
        req = parse_chat_request(await self._read_json(request))
        policy = request_policy(self.engine, self.policy, req)
        if any(t >= self.engine.n_vocab for t in req.sampling.logit_bias):
            raise ApiError(400, f"logit_bias: token ids must be below {self.engine.n_vocab}", param="logit_bias")
        try:
            ids = self.engine.prompt_ids(req.messages)
        except RtlocalError as e:
            raise ApiError(400, str(e), param="messages") from None
        max_tokens = self._max_tokens(req, len(ids))
        try:
            ticket = self.slots.reserve(ids)
        except QueueFull:
            self.counts["rejected"] += 1
            raise ApiError(503, "the server is busy: every slot is taken and the queue is full; retry shortly",
                           code="server_busy", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_id}
        gen = Generation()
        if req.stream:
            def on_close() -> None:  # runs even when the client left before the body started
                gen.cancel.set()
                ticket.abandon()

            return _EventStream(self._stream(ticket, req, policy, max_tokens, meta, gen), on_close)
        return await self._complete(request, ticket, req, policy, max_tokens, meta, gen)

    def _max_tokens(self, req: ChatRequest, n_prompt: int) -> int:
        room = self.engine.n_ctx - n_prompt
        if room <= 0:
            raise ApiError(400, f"the messages take {n_prompt} tokens: over the model's context of {self.engine.n_ctx}",
                           param="messages", code="context_length_exceeded")
        if req.max_tokens is None:
            return min(self.max_tokens, room)
        if req.max_tokens > room:
            raise ApiError(400, f"max_tokens {req.max_tokens} is beyond the context: the model's context is "
                           f"{self.engine.n_ctx} tokens and the messages take {n_prompt}, so at most {room}",
                           param="max_tokens", code="context_length_exceeded")
        return req.max_tokens

    async def _events(self, ticket: Ticket, req: ChatRequest, policy: Policy, max_tokens: int, gen: Generation):
        """Wait for a slot, run the generation there, and yield its events; leaving early cancels it."""
        engine = await ticket.engine()
        loop = asyncio.get_running_loop()
        self.live.add(gen)
        future = self.executor.submit(_generate, engine, req, policy, max_tokens, gen, loop)
        future.add_done_callback(lambda _: _call_soon(loop, self._finished, engine, gen))
        try:
            while True:
                event = await gen.events.get()
                yield event
                if event[0] in ("done", "error"):
                    return
        finally:
            gen.cancel.set()  # a no-op after "done"; otherwise the slot's thread stops at the next token

    def _finished(self, engine: Engine, gen: Generation) -> None:
        self.live.discard(gen)
        self.slots.release(engine)
        self.counts[gen.outcome] += 1

    async def _complete(self, request: Request, ticket: Ticket, req: ChatRequest, policy: Policy, max_tokens: int,
                        meta: dict[str, Any], gen: Generation) -> Response:

        async def collect() -> dict[str, Any]:
            decision, parts, logprobs = None, [], []
            async for event in self._events(ticket, req, policy, max_tokens, gen):
                if event[0] == "decision":
                    decision = event[1]
                elif event[0] == "text":
                    parts.append(event[1])
                    logprobs += event[2] or []
                elif event[0] == "error":
                    raise event[1]
            done = self._completion(meta, decision, "".join(parts), gen, policy)
            if req.logprobs:
                done["choices"][0]["logprobs"] = {"content": logprobs, "refusal": None}
            return done

        job = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not job.done():  # the client left: stop the generation (or leave the queue)
                gen.cancel.set()
                job.cancel()
                ticket.abandon()
            gone.cancel()
        if job.cancelled():
            return Response(status_code=499)  # nobody reads it
        return JSONResponse(job.result())

    def _completion(self, meta: dict[str, Any], decision: Decision | None, text: str, gen: Generation,
                    policy: Policy) -> dict[str, Any]:
        refused = decision is not None and decision.refused
        stats = gen.stats or Stats()
        return {
            **meta,
            "object": "chat.completion",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": text if refused else None},
                "logprobs": None,
                "finish_reason": gen.finish_reason,
            }],
            "usage": _usage(stats),
            "rtlocal": decision_fields(decision, policy) if decision is not None else None,
        }

    async def _stream(self, ticket: Ticket, req: ChatRequest, policy: Policy, max_tokens: int,
                      meta: dict[str, Any], gen: Generation) -> AsyncIterator[str]:
        head = {**meta, "object": "chat.completion.chunk"}
        refused = False
        try:
            async for event in self._events(ticket, req, policy, max_tokens, gen):
                kind = event[0]
                if kind == "decision":
                    refused = event[1].refused
                    yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}],
                                "rtlocal": decision_fields(event[1], policy)})
                elif kind == "text":
                    delta = {"content": event[1], "refusal": event[1]} if refused else {"content": event[1]}
                    lp = {"content": event[2], "refusal": None} if req.logprobs else None
                    yield _sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": lp,
                                                     "finish_reason": None}]})
                elif kind == "done":
                    yield _sse({**head, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                     "finish_reason": gen.finish_reason}]})
                    if req.include_usage:
                        yield _sse({**head, "choices": [], "usage": _usage(gen.stats or Stats())})
                else:
                    yield _sse(event[1].body())
        except ApiError as e:
            yield _sse(e.body())
        yield "data: [DONE]\n\n"

    def close(self) -> None:
        """Stop every generation, wait for the slot threads, free the models."""
        for gen in list(self.live):
            gen.cancel.set()
        self.executor.shutdown(wait=True, cancel_futures=True)
        for engine in self.engines:
            engine.close()


def _usage(stats: Stats) -> dict[str, Any]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body was read already, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ---------------------------------------------------------------- starting it


def open_server(model: str | None, *, parallel: int = 1, threads: int | None = None, ctx: int | None = None,
                gpu: int | None = None, strictness: str | None = None, threshold: str | None = None,
                bias: str | None = None, mode: str = "threshold", calibration: Any = None,
                api_key: str | None = None, queue_size: int = DEFAULT_QUEUE, max_tokens: int = DEFAULT_MAX_TOKENS,
                max_body: int = MAX_BODY_BYTES) -> Server:
    """Load `parallel` slots of one model (threads split between them) and the server-wide policy."""
    from rtlocal.runtime.engine import _default_threads
    from rtlocal.runtime.models import load_settings
    from rtlocal.runtime.options import open_engine, policy_from_flags

    if parallel < 1:
        raise RtlocalError(f"--parallel must be >= 1, got {parallel}")
    total = threads or load_settings().threads or _default_threads()
    per_slot = max(1, total // parallel)
    engines: list[Engine] = []
    try:
        first = open_engine(model, per_slot, ctx, gpu)
        engines.append(first)
        policy = policy_from_flags(first, strictness, threshold, bias, mode, calibration)
        for _ in range(parallel - 1):
            engines.append(open_engine(str(first.path), per_slot, ctx, gpu))
        return Server(engines, policy, api_key=api_key, queue_size=queue_size, max_tokens=max_tokens,
                      max_body=max_body)
    except BaseException:
        for engine in engines:
            engine.close()
        raise


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), so that a taken port is one clear error before serving."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise RtlocalError(f"cannot resolve host {host!r}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise RtlocalError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_uvicorn(server: Server, *, log_level: str = "warning"):
    """A uvicorn server for the app (run it with `.run(sockets=[bind(...)])`)."""
    import uvicorn

    config = uvicorn.Config(server.app, log_level=log_level, access_log=log_level == "debug", lifespan="off",
                            timeout_graceful_shutdown=3)
    return uvicorn.Server(config)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def serve_forever(server: Server, sock: socket.socket, *, log_level: str = "warning") -> None:
    try:
        make_uvicorn(server, log_level=log_level).run(sockets=[sock])
    finally:
        server.close()
        sock.close()


__all__ = ["ApiError", "ChatRequest", "Server", "bind", "open_server", "parse_chat_request", "request_policy",
           "serve_forever"]
