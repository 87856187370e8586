"""The OpenAI-compatible HTTP API: /v1/chat/completions (streaming or not), /v1/completions, /v1/models,
/health and /metrics, over an :class:`Engine`.

FastAPI + uvicorn: FastAPI validates bodies with pydantic (every wrong type becomes a 400 in OpenAI's error
shape here) and publishes an OpenAPI schema; uvicorn is the usual ASGI server for it. Streaming is plain
server-sent events (``data: {json}`` lines, then ``data: [DONE]``), the format the official ``openai`` client
reads. Generation runs on the engine's worker thread; each request waits on its own asyncio queue, so a slow
generation never blocks the event loop, and a client that goes away cancels its row of the batch.

Two ASGI middlewares guard the door before FastAPI sees a request: with an API key set, every path but
``OPEN_PATHS`` needs ``Authorization: Bearer <key>`` (401 otherwise); and a body over ``max_body_bytes`` gets 413
before any of it is parsed. Both are plain ASGI (not Starlette's BaseHTTPMiddleware), so streaming responses and
disconnect detection pass through untouched.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.errors import ConfigError
from tunelab.generation import GenerationRequest, Sampling, encode, render_chat
from tunelab.serve.engine import Engine, Job, NoModels, ServedModel
from tunelab.serve.errors import APIError, error_body, error_response
from tunelab.serve.metrics import Metrics
from tunelab.serve import DEFAULT_MAX_BODY_BYTES
from tunelab.serve.schemas import ChatCompletionRequest, CompletionRequest
from tunelab.serve.ui import add_ui


@dataclass
class ServeSettings:
    max_concurrent: int = 64  # requests generating or waiting at once; more get 429
    max_tokens_limit: int = 1024  # the most tokens one request may ask for
    default_max_tokens: int = 256  # when a request does not say
    request_timeout_s: float = 120.0  # a request still generating after this is cancelled (408)
    max_batch_size: int = 16
    mix_adapters: bool = True  # requests for different adapters share a batch (False: one adapter per batch)
    continuous: bool = True  # requests join and leave at every step (False: whole batches, the benchmark's baseline)
    runs_root: Path | None = None  # the folder the web UI browses
    api_key: str | None = field(default=None, repr=False)  # None: no authentication (a loopback-only server)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # a larger request body gets 413 before it is parsed
    dtype: str = "auto"  # the weights' dtype (precision.generation_precision; auto: the run's; float32 on a CPU)

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key (or TUNELAB_API_KEY) is empty; give a non-empty key, or leave it unset "
                              "for a server without authentication")
        if self.max_body_bytes < 1:
            raise ConfigError(f"--max-body-bytes is {self.max_body_bytes}; it must be at least 1")


# What a server with an API key answers without it: liveness probes, and the page (static HTML that asks the
# user for the key and sends it on every call it makes).
OPEN_PATHS = frozenset({"/health", "/"})

Scope = dict[str, Any]


async def _send_error(send: Any, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


def _digest(secret: bytes) -> bytes:
    # Equal-length digests, so the constant-time comparison does not even reveal the key's length.
    return hashlib.sha256(secret).digest()


class RequireAPIKey:
    """Every path but OPEN_PATHS needs ``Authorization: Bearer <key>``; otherwise 401 in OpenAI's error shape,
    before the body is read. The key is compared in constant time (hmac.compare_digest)."""

    def __init__(self, app: Any, api_key: str, metrics: Metrics) -> None:
        self.app, self.expected, self.metrics = app, _digest(api_key.encode()), metrics

    def authorized(self, scope: Scope) -> bool:
        values = [v for k, v in scope.get("headers", []) if k == b"authorization"]
        if len(values) != 1:
            return False
        scheme, _, token = values[0].strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(_digest(token.strip()), self.expected)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        given = any(k == b"authorization" for k, _ in scope.get("headers", []))
        message = ("Incorrect API key provided" if given else "This server needs an API key: send the header "
                   "'Authorization: Bearer <key>' with the key the server was started with (--api-key or TUNELAB_API_KEY)")
        self.metrics.rejected.labels("auth").inc()
        self.metrics.request(scope["path"], "-", 401)
        await _send_error(send, 401, error_body(message, "invalid_request_error", code="invalid_api_key"),
                          {"www-authenticate": "Bearer"})


class LimitBody:
    """A request body over ``max_bytes`` gets 413 before the app sees any of it: a declared Content-Length is
    checked before a byte is read; a body sent in chunks is counted as it arrives and handed on only once
    complete (so the app never parses part of one)."""

    def __init__(self, app: Any, max_bytes: int, metrics: Metrics) -> None:
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def refuse(self, scope: Scope, send: Any, size: str) -> None:
        self.metrics.rejected.labels("body_size").inc()
        self.metrics.request(scope["path"], "-", 413)
        message = f"the request body is {size}, over this server's limit of {self.max_bytes} bytes (--max-body-bytes)"
        await _send_error(send, 413, error_body(message, "invalid_request_error", code="request_too_large"),
                          {"connection": "close"})

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = [v for k, v in scope.get("headers", []) if k == b"content-length"]
        if declared and declared[0].isdigit() and int(declared[0]) > self.max_bytes:
            await self.refuse(scope, send, f"{int(declared[0])} bytes (Content-Length)")
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before its body was complete
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self.refuse(scope, send, f"at least {size} bytes (sent in chunks)")
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: disconnect detection reads the real channel
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


_TYPE_TAGS = {"int", "float", "str", "bool", "none", "list", "dict"}  # pydantic's names for a union's branches


def _param(loc: tuple[Any, ...]) -> str | None:
    """The request field an error's ``loc`` names: "top_p", "messages.0.role"; without "body" and pydantic's union
    branch tags ("constrained-float", "function-after[...]"), which mean nothing to a client."""
    parts = [str(p) for p in loc if p != "body" and (isinstance(p, int) or (
        str(p).isidentifier() and str(p).lower() not in _TYPE_TAGS))]
    return ".".join(parts) or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON ({first.get('msg', '')})", None
    param = _param(first.get("loc", ()))
    # a value that fits no branch of an optional field fails each branch ("should be > 0", "should be None"): one problem
    others = len({_param(e.get("loc", ())) for e in errors} - {param})
    more = f" (and {others} more problem{'s' if others > 1 else ''})" if others else ""
    return f"{param or 'body'}: {first.get('msg', 'invalid')}{more}", param


def create_app(engine: Engine | NoModels, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    app = FastAPI(title="tunelab", description="OpenAI-compatible API over tunelab runs", version="1")
    app.state.engine, app.state.settings = engine, settings
    app.state.in_flight = 0
    metrics = app.state.metrics = Metrics(engine)
    app.add_middleware(LimitBody, max_bytes=settings.max_body_bytes, metrics=metrics)
    if settings.api_key is not None:  # added last, so it runs first: a request without the key is not even read
        app.add_middleware(RequireAPIKey, api_key=settings.api_key, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        metrics.request(request.url.path, "-", 400)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{exc.detail}: {request.method} {request.url.path}", kind), status_code=exc.status_code)

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        metrics.request(request.url.path, "-", exc.status)
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # a bug: still OpenAI's shape
        metrics.request(request.url.path, "-", 500)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = engine.alive()
        precision = engine.precision  # None: a page-only server, no model
        return JSONResponse({"status": "ok" if alive else "worker stopped", "models": list(engine.served),
                             "in_flight": app.state.in_flight, "dtype": precision and precision.dtype,
                             "dtype_reason": precision and precision.reason}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render(app.state.in_flight)
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(m) for m in engine.served.values()]}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict[str, Any]:
        return _model_card(_served(engine, name))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        served = _served(engine, body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = render_chat(served.tokenizer, messages)
        except ConfigError as exc:
            raise APIError(400, str(exc), param="messages") from None
        except Exception as exc:  # noqa: BLE001 - a template that refuses this conversation (jinja raise_exception)
            raise APIError(400, f"the model's chat template refused these messages: {exc}", param="messages") from None
        return await _generate(app, request, body, served, [prompt], chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        served = _served(engine, body.model)
        if body.stream and len(body.prompts()) > 1:
            raise APIError(400, "streaming takes one prompt per request", param="prompt")
        return await _generate(app, request, body, served, body.prompts(), chat=False)

    if settings.runs_root is not None:
        add_ui(app, settings.runs_root)
    return app


def _model_card(model: ServedModel) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": model.created, "owned_by": "tunelab",
            "root": str(model.run_dir) if model.run_dir else None}


def _served(engine: Engine | NoModels, name: str) -> ServedModel:
    # The name is only ever a key of this table: it never reaches the file system.
    if not engine.served:
        raise APIError(404, f"The model '{name[:200]}' does not exist: this server loads no model (it was started "
                       "without run folders); to chat, start it with them: tunelab ui RUN [RUN ...]",
                       param="model", code="model_not_found")
    if name not in engine.served:
        raise APIError(404, f"The model '{name[:200]}' does not exist; served models: {', '.join(engine.served)}",
                       param="model", code="model_not_found")
    return engine.served[name]


def _budget(engine: Engine, settings: ServeSettings, asked: int | None, prompt_len: int,
            field: str = "max_tokens") -> int:
    """``asked`` new tokens (from the request's ``field``), or the default where the context allows it."""
    if asked is not None and asked > settings.max_tokens_limit:
        raise APIError(400, f"{field} is {asked}, over this server's limit of {settings.max_tokens_limit}",
                       param=field, code="max_tokens_exceeded")
    room = engine.context_length - prompt_len
    budget = asked if asked is not None else min(settings.default_max_tokens, room)
    if budget < 1 or prompt_len + budget > engine.context_length:
        raise APIError(400, f"this model's context length is {engine.context_length} tokens; the prompt has "
                       f"{prompt_len} and {budget} more were asked for. Shorten the messages or lower max_tokens",
                       param="messages", code="context_length_exceeded")
    return budget


async def _generate(app: FastAPI, http: Request, body: ChatCompletionRequest | CompletionRequest, served: ServedModel,
                    prompts: list[str], chat: bool) -> Response:
    engine, settings, metrics = app.state.engine, app.state.settings, app.state.metrics
    ids = [encode(served.tokenizer, p, special=not chat) for p in prompts]
    if any(not i for i in ids):
        raise APIError(400, "the prompt is empty (it encodes to no tokens); give some text to continue",
                       param="prompt" if not chat else "messages")
    field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
    budgets = [_budget(engine, settings, body.budget(), len(i), field) for i in ids]
    if app.state.in_flight >= settings.max_concurrent:
        metrics.rejected.labels("concurrency").inc()
        raise APIError(429, f"this server is at its limit of {settings.max_concurrent} concurrent requests; retry "
                       "shortly", type_="rate_limit_error", code="rate_limit_exceeded")
    app.state.in_flight += 1
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            app.state.in_flight -= 1

    try:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue()
        deadline = time.monotonic() + settings.request_timeout_s
        sampling = Sampling(temperature=float(body.temperature or 0.0), top_p=float(body.top_p or 1.0),
                            top_k=body.top_k or 0, stop=tuple(body.stop_list()), seed=body.seed,
                            repetition_penalty=float(body.repetition_penalty) if body.repetition_penalty else None)
        requests = []
        for index, (prompt_ids, budget) in enumerate(zip(ids, budgets)):
            on_text = (lambda delta, i=index: loop.call_soon_threadsafe(events.put_nowait, (i, "text", delta))) if body.stream else None
            requests.append(GenerationRequest(prompt_ids, replace(sampling, max_new_tokens=budget), adapter=served.name,
                                              deadline=deadline, on_text=on_text))
        for index, request in enumerate(requests):
            engine.submit(Job(request, lambda job, error, i=index: loop.call_soon_threadsafe(
                events.put_nowait, (i, "done", error))))
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": served.name}
        if body.stream:
            stream = _stream(events, requests[0], meta, chat, bool(body.stream_options and body.stream_options.include_usage),
                             release, metrics, http.url.path)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        errors = await _wait_all(events, requests, http)
        release()
        return _complete(requests, errors, meta, chat, metrics, http.url.path)
    except BaseException:
        for request in locals().get("requests", []):
            request.cancelled.set()
        release()
        raise


async def _wait_all(events: asyncio.Queue, requests: list[GenerationRequest], http: Request) -> list[str | None]:
    """Wait for every row; a client that disconnects meanwhile cancels them."""
    errors: list[str | None] = [None] * len(requests)
    pending = len(requests)
    while pending:
        try:
            index, kind, value = await asyncio.wait_for(events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await http.is_disconnected():
                for request in requests:
                    request.cancelled.set()
            continue
        if kind == "done":
            errors[index] = value
            pending -= 1
    return errors


def _complete(requests: list[GenerationRequest], errors: list[str | None], meta: dict[str, Any], chat: bool,
              metrics: Any, path: str) -> Response:
    model = meta["model"]
    for request in requests:
        metrics.finished(model, request)
    failed = next((e for e in errors if e), None)
    if failed:
        metrics.request(path, model, 500)
        return JSONResponse(error_body(failed, "server_error"), status_code=500)
    if any(r.finish_reason == "timeout" for r in requests):
        metrics.request(path, model, 408)
        return error_response(APIError(408, "the request ran past this server's time limit and was cancelled",
                                       type_="timeout_error", code="request_timeout"))
    if any(r.finish_reason == "cancelled" for r in requests):
        metrics.request(path, model, 499)
        return JSONResponse(error_body("the client disconnected", "cancelled"), status_code=499)
    prompt_tokens = sum(len(r.prompt_ids) for r in requests)
    completion_tokens = sum(len(r.token_ids) for r in requests)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if chat:
        choices = [{"index": 0, "message": {"role": "assistant", "content": requests[0].text},
                    "finish_reason": requests[0].finish_reason, "logprobs": None}]
        body = {**meta, "object": "chat.completion", "choices": choices, "usage": usage}
    else:
        choices = [{"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                   for i, r in enumerate(requests)]
        body = {**meta, "object": "text_completion", "choices": choices, "usage": usage}
    metrics.request(path, model, 200)
    return JSONResponse(body)


def _sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _stream(events: asyncio.Queue, request: GenerationRequest, meta: dict[str, Any], chat: bool,
                  include_usage: bool, release: Any, metrics: Any, path: str) -> AsyncIterator[bytes]:
    """Server-sent events as OpenAI sends them. If the client goes away, the next write fails, this generator is
    closed, and ``finally`` cancels the row (the worker drops it at its next step)."""
    kind_name = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if chat:
            content = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
            choice = {"index": 0, "delta": content, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return {**meta, "object": kind_name, "choices": [choice]}

    try:
        if chat:
            yield _sse(chunk(None, None, first=True))
        while True:
            _, kind, value = await events.get()
            if kind == "text":
                yield _sse(chunk(value, None))
                continue
            metrics.finished(meta["model"], request)
            if value or request.finish_reason in ("timeout", "cancelled"):
                status = 500 if value else 408
                message = value or "the request ran past this server's time limit and was cancelled"
                metrics.request(path, meta["model"], status)
                yield _sse(error_body(message, "server_error" if value else "timeout_error",
                                      code=None if value else "request_timeout"))
                return
            yield _sse(chunk(None, request.finish_reason))
            if include_usage:
                usage = {"prompt_tokens": len(request.prompt_ids), "completion_tokens": len(request.token_ids),
                         "total_tokens": len(request.prompt_ids) + len(request.token_ids)}
                yield _sse({**meta, "object": kind_name, "choices": [], "usage": usage})
            yield _sse("[DONE]")
            metrics.request(path, meta["model"], 200)
            return
    finally:
        if not request.done:
            request.cancelled.set()
            metrics.cancelled.labels("disconnect").inc()
        release()
