"""The FastAPI application: routes, OpenAI-shaped errors, limits, auth, access logs and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sapguard.detect import ScanItem, Verdict, conversation_from_messages
from sapguard.errors import SapError
from sapguard.features.views import polytope_views, tail_view
from sapguard.models.chat import encode_prompt
from sapguard.models.loading import LoadedModel
from sapguard.polytope.model import SafetyPolytope
from sapguard.serve.auth import KeyChecker
from sapguard.serve.batching import ModerationJob, QueueFull, Scheduler, ShuttingDown
from sapguard.serve.config import ServeConfig
from sapguard.serve.generation import ChatJob, Event, Failed, Finished, TextDelta
from sapguard.serve.metrics import ServerMetrics
from sapguard.serve.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChunkChoice,
    Delta,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
    ModerationDetail,
    ModerationRequest,
    ModerationResponse,
    ModerationResult,
    SapguardInfo,
    TextPart,
    Usage,
)

logger = logging.getLogger("sapguard.serve")
access_logger = logging.getLogger("sapguard.serve.access")

ROUTES = ("/v1/chat/completions", "/v1/moderations", "/v1/models", "/health", "/metrics")
_ERROR_TYPES = {
    400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
    405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
    500: "server_error", 503: "service_unavailable", 504: "timeout",
}


class APIError(Exception):
    """An error answered in the OpenAI shape ``{"error": {message, type, param, code}}``."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        type: str | None = None, headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers


def error_response(err: APIError, request: Request | None = None) -> JSONResponse:
    """The JSON response for ``err``; the message is kept for the access log line."""
    if request is not None:
        request.state.sap_error = err.message
    body = ErrorResponse(error=ErrorBody(message=err.message, type=err.type, param=err.param, code=err.code))
    return JSONResponse(body.model_dump(), status_code=err.status, headers=err.headers)


@dataclass
class ServerState:
    """What the routes share: model, polytope, scheduler, limits, metrics."""

    config: ServeConfig
    lm: LoadedModel
    poly: SafetyPolytope
    scheduler: Scheduler
    metrics: ServerMetrics
    keys: KeyChecker
    served_model_name: str
    context_window: int
    max_input_tokens: int
    template: str
    polytope_label: str = ""
    started: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False

    def encode_messages(self, messages: list[ChatMessage]) -> list[int]:
        """Token ids of a conversation, ready for the assistant's turn (the library's template policy)."""
        tok = self.lm.tokenizer
        turns = [(m.role, m.text()) for m in messages]
        if self.template == "chat":
            if len(turns) == 1 and turns[0][0] == "user":
                return encode_prompt(tok, turns[0][1], "chat")
            if len(turns) == 2 and [r for r, _ in turns] == ["system", "user"]:
                return encode_prompt(tok, turns[1][1], "chat", turns[0][1])
            text = tok.apply_chat_template(
                [{"role": r, "content": c} for r, c in turns], tokenize=False, add_generation_prompt=True
            )
            return list(tok(text, add_special_tokens=False)["input_ids"])
        return encode_prompt(tok, "\n".join(c for _, c in turns), "none")


# -- the ASGI gate: body limit, access log, request metrics ------------------------------------
class Gate:
    """Outermost ASGI middleware: body-size limit, one log line per request, request metrics."""

    def __init__(self, app: Callable[..., Awaitable[None]], state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 0}
        path, method = scope["path"], scope["method"]
        route = path if path in ROUTES else "other"
        scope.setdefault("state", {})

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            replay = await self._read_body(scope, receive, send_wrapper)
            if replay is not None:
                await self.app(scope, replay, send_wrapper)
        finally:
            self._record(scope, route, method, path, status["code"] or 499, time.perf_counter() - started)

    async def _read_body(
        self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
    ) -> Callable[..., Any] | None:
        """The whole body (bounded), replayed to the app; ``None`` when already answered (413)."""
        limit = self.state.config.max_body_bytes
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._answer(scope, send, too_big)
            return None
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._answer(scope, send, too_big)
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            message: dict[str, Any] = await receive()  # after the body: only http.disconnect
            return message

        return replay

    async def _answer(self, scope: dict[str, Any], send: Callable[..., Any], err: APIError) -> None:
        scope["state"]["sap_error"] = err.message
        payload = json.dumps({"error": {"message": err.message, "type": err.type, "param": err.param,
                                        "code": err.code}}).encode()
        await send({"type": "http.response.start", "status": err.status,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    def _record(self, scope: dict[str, Any], route: str, method: str, path: str, code: int, seconds: float) -> None:
        m = self.state.metrics
        m.requests.labels(route, method, str(code)).inc()
        m.latency.labels(route).observe(seconds)
        error = scope["state"].get("sap_error")
        if code >= 400:
            m.errors.labels(route, str(code), _ERROR_TYPES.get(code, "client_closed")).inc()
        client = scope.get("client")
        if self.state.config.access_log:
            line = {
                "ts": round(time.time(), 3), "client": f"{client[0]}:{client[1]}" if client else None,
                "method": method, "path": path, "status": code, "ms": round(seconds * 1000, 2),
            }
            if error:
                line["error"] = error
            access_logger.info(json.dumps(line))
        elif code >= 400 and code != 499:
            logger.warning("%d %s %s: %s", code, method, path, error or "error")


# -- the application ----------------------------------------------------------------------------
def create_app(state: ServerState) -> Gate:
    """The ASGI application for ``state`` (the scheduler starts and stops with the app's lifespan)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not state.scheduler.alive:
            state.scheduler.start()
        yield
        state.draining = True
        await asyncio.to_thread(state.scheduler.close, state.config.graceful_timeout)

    app = FastAPI(title="sapguard", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors())
        return error_response(APIError(400, message, param=param), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"Unknown route {request.method} {request.url.path}",
                   405: f"Method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None),
                              request)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(APIError(500, f"internal error ({type(exc).__name__})"), request)

    async def authorise(request: Request) -> None:
        if not state.keys.allows(request.headers.get("authorization")):
            raise APIError(401, "Incorrect or missing API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if state.draining:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": "1"})

    guarded = [Depends(authorise)]

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = state.scheduler.alive and not state.draining
        body = {
            "status": "ok" if ok else ("draining" if state.draining else "unavailable"),
            "ready": ok, "model": state.served_model_name, "polytope": state.polytope_label,
            "mode": state.config.mode, "queue_depth": state.scheduler.queued, "running": state.scheduler.running,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        state.metrics.queue_depth.set(state.scheduler.queued)
        state.metrics.running.set(state.scheduler.running)
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> JSONResponse:
        card = ModelCard(id=state.served_model_name, created=state.started, max_model_len=state.context_window)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        job, prompt_tokens = prepare_chat(state, body)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        job.emit = threadsafe(loop, events.put_nowait)
        submit(state, job)
        state.metrics.prompt_tokens.inc(prompt_tokens)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = stream_chunks(state, job, events, rid, created, prompt_tokens, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        final = await wait_final(state, job, events, request)
        if isinstance(final, Failed):
            raise APIError(final.status, final.message, type=final.type)
        record_finish(state, job, final)
        completion = ChatCompletion(
            id=rid, created=created, model=state.served_model_name,
            choices=[Choice(message=AssistantMessage(content=final.content), finish_reason=final.reason)],
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=final.completion_tokens,
                        total_tokens=prompt_tokens + final.completion_tokens),
            sapguard=SapguardInfo(**final.info),
        )
        return Response(completion.model_dump_json(), media_type="application/json")

    @app.post("/v1/moderations", dependencies=guarded)
    async def moderations(body: ModerationRequest, request: Request) -> Response:
        if body.model is not None and body.model != state.served_model_name:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves "
                                f"'{state.served_model_name}'", param="model", code="model_not_found")
        prompts, responses = moderation_inputs(body.input)
        texts = [p if isinstance(p, str) else "\n\n".join(m["content"] for m in p) for p in prompts]
        for i, text in enumerate([*texts, *(r for r in responses or [] if r)]):
            if len(text.encode("utf-8")) + 64 > state.max_input_tokens:
                n = len(state.lm.tokenizer(text, add_special_tokens=False)["input_ids"])
                if n > state.max_input_tokens:
                    raise APIError(400, f"input {i} is {n} tokens; this server reads at most {state.max_input_tokens}",
                                   param="input", code="context_length_exceeded")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Verdict] | Failed] = loop.create_future()

        def settle(result: list[Verdict] | Failed) -> None:
            if not future.done():
                future.set_result(result)

        job = ModerationJob(prompts, responses, threadsafe(loop, settle),
                            deadline=time.monotonic() + state.config.request_timeout)
        submit(state, job)
        try:
            result = await asyncio.wait_for(future, state.config.request_timeout)
        except TimeoutError:
            job.cancel()
            raise APIError(504, "the request timed out", type="timeout") from None
        except asyncio.CancelledError:
            job.cancel()
            raise
        if isinstance(result, Failed):
            raise APIError(result.status, result.message, type=result.type)
        state.metrics.moderated_texts.inc(len(result))
        out = ModerationResponse(id=f"modr-{uuid.uuid4().hex}", model=state.served_model_name,
                                 results=[moderation_result(state, v) for v in result])
        return Response(out.model_dump_json(), media_type="application/json")

    if state.config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=state.config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return Gate(app, state)


# -- helpers --------------------------------------------------------------------------------------
def threadsafe(loop: asyncio.AbstractEventLoop, callback: Callable[[Any], None]) -> Callable[[Any], None]:
    """A callable the worker thread can use to hand a value to the event loop."""

    def call(value: Any) -> None:
        # RuntimeError: the loop is gone: the server stopped and nobody waits for this
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(callback, value)

    return call


def submit(state: ServerState, job: ChatJob | ModerationJob) -> None:
    try:
        state.scheduler.submit(job)
    except QueueFull as full:
        state.metrics.rejected.inc()
        raise APIError(429, f"the server is busy ({state.scheduler.queued} requests waiting); retry later",
                       code="queue_full", headers={"Retry-After": str(full.retry_after)}) from None
    except ShuttingDown:
        raise APIError(503, "the server is shutting down", headers={"Retry-After": "1"}) from None
    state.metrics.queue_depth.set(state.scheduler.queued)


def validation_message(errors: Any) -> tuple[str, str | None]:
    """One readable line (and the offending parameter) from pydantic's errors."""
    err = next(iter(errors))
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    kind = err.get("type", "")
    if kind == "json_invalid":
        return "We could not parse the JSON body of your request (it is not valid JSON).", None
    if not loc:
        return "The request body must be a JSON object.", None
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if kind == "missing":
        return f"Missing required parameter: '{param}'.", param
    return f"Invalid value for '{param}': {err.get('msg', 'invalid')}.", param


def prepare_chat(state: ServerState, body: ChatCompletionRequest) -> tuple[ChatJob, int]:
    """Check a chat request against the server's limits and build its job (raises :class:`APIError`)."""
    cfg = state.config
    if body.model != state.served_model_name:
        raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{state.served_model_name}'",
                       param="model", code="model_not_found")
    if not body.messages:
        raise APIError(400, "'messages' must contain at least one message.", param="messages")
    if not any(m.text().strip() for m in body.messages):
        raise APIError(400, "every message in 'messages' is empty.", param="messages")
    if body.n not in (None, 1):
        raise APIError(400, "only n=1 is supported.", param="n")
    option = body.unsupported()
    if option is not None:
        raise APIError(400, f"'{option}' is not supported by this server.", param=option)
    mode = (body.sapguard.mode if body.sapguard and body.sapguard.mode else None) or cfg.mode
    if mode not in cfg.allowed_modes:
        raise APIError(400, f"mode {mode!r} is not allowed here; allowed: {', '.join(cfg.allowed_modes)}",
                       param="sapguard.mode")
    given = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if given is not None and given < 1:
        raise APIError(400, f"{param} must be at least 1.", param=param)
    if given is not None and given > cfg.max_tokens_cap:
        raise APIError(400, f"{param} is {given}; this server allows at most {cfg.max_tokens_cap}.", param=param)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "'stop' takes up to 4 non-empty strings.", param="stop")
    ids = state.encode_messages(body.messages)
    window = state.context_window
    if len(ids) > state.max_input_tokens:
        raise APIError(400, f"This model's maximum input length is {state.max_input_tokens} tokens; your messages "
                            f"resulted in {len(ids)} tokens.", param="messages", code="context_length_exceeded")
    room = window - len(ids)
    if given is not None and given > room:
        raise APIError(400, f"This model's maximum context length is {window} tokens; you requested {len(ids)} "
                            f"prompt + {given} completion tokens.", param="messages", code="context_length_exceeded")
    max_tokens = given if given is not None else min(cfg.default_max_tokens, room)
    if max_tokens < 1:
        raise APIError(400, f"This model's maximum context length is {window} tokens; your messages resulted in "
                            f"{len(ids)} tokens, leaving no room for an answer.", param="messages",
                       code="context_length_exceeded")
    job = ChatJob(
        ids=ids, max_tokens=max_tokens, mode=mode, emit=lambda event: None,
        deadline=time.monotonic() + cfg.request_timeout,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=stops,
        tail=message_tail(state, body.messages),
    )
    return job, len(ids)


def message_tail(state: ServerState, messages: list[ChatMessage]) -> str | None:
    """The tail view of the conversation's last user message (its last line, read alone), for a
    polytope whose config lists the ``tail`` view; ``None`` otherwise."""
    views, words = polytope_views(state.poly.meta)
    users = [m for m in messages if m.role == "user"]
    if "tail" not in views or not users or messages[-1].role != "user":
        return None
    return tail_view(users[-1].text(), words, has_history=len(messages) > len([m for m in messages if m.role == "system"]) + 1)


async def next_event(job: ChatJob, events: asyncio.Queue[Event]) -> Event:
    left = job.deadline - time.monotonic() + 1.0  # the worker reports its own timeouts first
    try:
        return await asyncio.wait_for(events.get(), max(0.0, left))
    except TimeoutError:
        job.cancel()
        return Failed(504, "the request timed out", "timeout")


async def wait_final(
    state: ServerState, job: ChatJob, events: asyncio.Queue[Event], request: Request
) -> Finished | Failed:
    """Wait for a non-streaming job's last event; a client that disconnects cancels its job."""
    waiter = asyncio.ensure_future(_final(job, events))
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=0.5)
            if done:
                return waiter.result()
            if await request.is_disconnected():
                job.cancel()
                return Failed(499, "client disconnected", "client_closed")
    finally:
        if not waiter.done():
            waiter.cancel()
        job.cancel()  # no-op once done; frees the slot otherwise


async def _final(job: ChatJob, events: asyncio.Queue[Event]) -> Finished | Failed:
    while True:
        event = await next_event(job, events)
        if isinstance(event, (Finished, Failed)):
            return event


def record_finish(state: ServerState, job: ChatJob, final: Finished) -> None:
    state.metrics.generated_tokens.inc(final.completion_tokens)
    state.metrics.finish.labels(final.reason).inc()


async def stream_chunks(
    state: ServerState, job: ChatJob, events: asyncio.Queue[Event], rid: str, created: int,
    prompt_tokens: int, include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events in the OpenAI chunk format, ending with ``data: [DONE]``."""
    model = state.served_model_name
    started = time.perf_counter()

    def chunk(delta: Delta, finish: str | None = None, **extra: Any) -> str:
        c = ChatCompletionChunk(id=rid, created=created, model=model,
                                choices=[ChunkChoice(delta=delta, finish_reason=finish)], **extra)
        return f"data: {c.model_dump_json(exclude_none=False)}\n\n"

    try:
        yield chunk(Delta(role="assistant", content=""))
        first = True
        while True:
            event = await next_event(job, events)
            if isinstance(event, TextDelta):
                if first:
                    state.metrics.first_token.observe(time.perf_counter() - started)
                    first = False
                yield chunk(Delta(content=event.text))
            elif isinstance(event, Finished):
                record_finish(state, job, event)
                yield chunk(Delta(), event.reason, sapguard=SapguardInfo(**event.info))
                if include_usage:
                    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=event.completion_tokens,
                                  total_tokens=prompt_tokens + event.completion_tokens)
                    c = ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage)
                    yield f"data: {c.model_dump_json()}\n\n"
                break
            else:
                logger.warning("stream %s ended early: %d %s", rid, event.status, event.message)
                err = ErrorResponse(error=ErrorBody(message=event.message, type=event.type, code=str(event.status)))
                yield f"data: {err.model_dump_json()}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # the client went away (or we are done): free the slot


def moderation_inputs(value: str | list[Any]) -> tuple[list[ScanItem], list[str | None] | None]:
    """Items to scan from a moderation ``input``: texts, or one conversation (chat messages).

    A conversation is scanned as training reads it (:func:`sapguard.detect.scan`): earlier
    exchanges as chat history, the last user message as the prompt and a final assistant message
    as its reply; system messages are left out.
    """
    if isinstance(value, str):
        items: list[Any] = [value]
    else:
        items = list(value)
    if not items:
        raise APIError(400, "'input' must not be empty.", param="input")
    messages = [m for m in items if isinstance(m, ChatMessage)]
    if messages:
        if len(messages) != len(items):
            raise APIError(400, "'input' mixes chat messages with texts; send one or the other.", param="input")
        conversation = [{"role": m.role, "content": m.text()} for m in messages]
        try:
            conversation_from_messages(conversation, where="input")
        except SapError as err:
            raise APIError(400, str(err), param="input") from None
        return [conversation], None
    texts = [t.text if isinstance(t, TextPart) else t for t in items]
    for i, t in enumerate(texts):
        if not t.strip():
            raise APIError(400, f"input {i} is empty.", param="input")
    return texts, None


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, x))))


def moderation_result(state: ServerState, verdict: Verdict) -> ModerationResult:
    """One OpenAI moderation result keyed by facet name, from a :class:`~sapguard.detect.Verdict`."""
    risk = (state.poly.meta.get("calibration") or {}).get("risk", {"a": 1.0, "b": 0.0})
    names = list(verdict.margins)
    for name in verdict.violated:
        state.metrics.facet_firings.labels(name, "moderation").inc()
    return ModerationResult(
        flagged=not verdict.is_safe,
        categories={n: verdict.margins[n] > 0 for n in names},
        category_scores={n: _sigmoid(risk["a"] * verdict.margins[n] + risk["b"]) for n in names},
        category_applied_input_types={n: ["text"] for n in names},
        risk_score=verdict.risk_score,
        sapguard=ModerationDetail(score=verdict.score, margins=verdict.margins, violated=verdict.violated),
    )
