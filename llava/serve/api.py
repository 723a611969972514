"""The OpenAI-compatible HTTP API on one Engine: POST /v1/chat/completions (plain, or server-sent
events with `stream: true`), GET /v1/models, GET /health and Prometheus GET /metrics.

Safe by default: a Bearer key when one is set, no local files or remote URLs unless allowed,
limits on body size, image bytes and pixels, images per request and prompt + max_tokens. Every
bad request is a 4xx with OpenAI's error shape, {"error": {"message", "type", "param", "code"}},
and nothing a request sends can stop the server answering the next one.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.errors import ContextLengthError, ImageError, LlavaError
from ..generate.chat import chat_prompt
from ..generate.engine import Engine
from ..generate.sampling import SamplingParams
from .media import MediaPolicy, load_image_url


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    conv_mode: str | None = None  # default: the checkpoint's template
    media: MediaPolicy = field(default_factory=MediaPolicy)
    max_body_bytes: int = 50 * 1024 * 1024
    max_images_per_request: int = 8
    max_queue: int = 256  # waiting requests; more are refused with 429


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=_error_body(self.message, self.kind, self.param,
                                                                          self.code))


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class _ChatRequest:
    messages: list[dict]  # {"role", "content": str with image tokens}
    image_urls: list[tuple[str, str]]  # (url, where in the request)
    params: SamplingParams
    max_tokens: int | None
    stream: bool
    include_usage: bool


def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    app = FastAPI(title="llava", description="OpenAI-compatible LLaVA server", docs_url=None, redoc_url=None)
    processor = engine.processor
    conv_mode = config.conv_mode or processor.conv_mode
    metrics = _Metrics(engine)
    app.state.engine, app.state.config, app.state.metrics = engine, config, metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        metrics.http.labels(request.url.path, str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(status_code=exc.status_code, content=_error_body(str(exc.detail), kind))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        metrics.http.labels(request.url.path, "500").inc()
        return JSONResponse(status_code=500, content=_error_body(
            f"internal error: {exc.__class__.__name__}: {exc}", "server_error"))

    def authorize(request: Request) -> None:
        if not config.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": metrics.started,
                                            "owned_by": "llava", "max_model_len": engine.context_length}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        started = time.perf_counter()
        body = await _read_body(request, config.max_body_bytes)
        chat = _parse_chat(body, config, processor.image_token)
        images = []
        for url, where in chat.image_urls:
            try:
                images.append(await load_image_url(url, config.media, where))
            except ImageError as e:
                raise ApiError(400, str(e), param="messages", code="invalid_image") from None
        try:
            prompt, template_stop = chat_prompt(processor, chat.messages, conv_mode)
            prepared = await asyncio.to_thread(engine.prepare, prompt, images)
        except LlavaError as e:
            raise ApiError(400, str(e), param="messages") from None
        n, context = len(prepared.ids), engine.context_length
        wanted = chat.max_tokens if chat.max_tokens is not None else context - n
        if n >= context or n + wanted > context:
            raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{n + max(wanted, 1)} tokens ({n} in the messages, {max(wanted, 1)} in the "
                                "completion). Please reduce the length of the messages or completion.",
                           param="messages", code="context_length_exceeded")
        if engine.queue_depth >= config.max_queue:
            raise ApiError(429, f"the server is busy: {engine.queue_depth} requests are waiting; retry later",
                           code="server_busy", kind="rate_limit_error")
        params = chat.params
        params.max_new_tokens = wanted
        params.stop = params.stop + template_stop
        try:
            handle = engine.submit(prepared, params=params, loop=asyncio.get_running_loop())
        except ContextLengthError as e:
            raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
        response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        metrics.http.labels("/v1/chat/completions", "200").inc()
        if chat.stream:
            return StreamingResponse(_sse(handle, response_id, created, config.model_name, chat.include_usage,
                                          metrics, started), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        completion = await _wait(handle, request)
        if completion is None:  # the client went away; nobody to answer
            return Response(status_code=499)
        metrics.observe(completion, started)
        if completion.finish_reason == "error":
            raise ApiError(500, completion.error or "generation failed", kind="server_error")
        return {
            "id": response_id, "object": "chat.completion", "created": created, "model": config.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text.strip()},
                         "logprobs": None, "finish_reason": completion.finish_reason}],
            "usage": _usage(completion),
        }

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes, over the limit of {limit} bytes",
                       code="request_too_large")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_chat(body: bytes, config: ServeConfig, image_token: str) -> _ChatRequest:
    """Validate an OpenAI chat request; each problem is an ApiError naming the field."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object")
    get = payload.get
    for name in ("n",):
        if get(name) not in (None, 1):
            raise ApiError(400, f"{name} must be 1 (one choice per request)", param=name)
    for name in ("presence_penalty", "frequency_penalty"):
        if get(name) not in (None, 0, 0.0):
            raise ApiError(400, f"{name} is not supported; use repetition_penalty", param=name)
    if get("logprobs") or get("tools") or get("functions"):
        name = "logprobs" if get("logprobs") else "tools"
        raise ApiError(400, f"{name} is not supported by this server", param=name)
    response_format = get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise ApiError(400, "response_format: only {'type': 'text'} is supported", param="response_format")
    stream = _typed(payload, "stream", bool, False)
    options = get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    temperature = _number(payload, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(payload, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "top_p must be greater than 0", param="top_p")
    top_k = _typed(payload, "top_k", int, 0)
    if top_k < 0:
        raise ApiError(400, "top_k must be >= 0", param="top_k")
    repetition_penalty = _number(payload, "repetition_penalty", 1.0, 0.0, 10.0)
    if repetition_penalty == 0:
        raise ApiError(400, "repetition_penalty must be greater than 0", param="repetition_penalty")
    name = "max_completion_tokens" if get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _typed(payload, name, int, None)
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"{name} must be at least 1", param=name)
    seed = _typed(payload, "seed", int, None)
    ignore_eos = _typed(payload, "ignore_eos", bool, False)  # vLLM's extension: benchmarks, tests
    stop = get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)) or len(stop) > 4:
        raise ApiError(400, "stop must be a string or a list of at most 4 strings", param="stop")
    messages, image_urls = _parse_messages(get("messages"), image_token)
    if len(image_urls) > config.max_images_per_request:
        raise ApiError(400, f"{len(image_urls)} images is over the limit of {config.max_images_per_request} "
                            "images per request", param="messages", code="too_many_images")
    params = SamplingParams(max_new_tokens=max_tokens or 1, temperature=temperature, top_p=top_p, top_k=top_k,
                            repetition_penalty=repetition_penalty, seed=seed, stop=[s for s in stop if s],
                            ignore_eos=ignore_eos)
    return _ChatRequest(messages, image_urls, params, max_tokens, stream, bool(options.get("include_usage")))


def _parse_messages(messages, image_token: str) -> tuple[list[dict], list[tuple[str, str]]]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out, urls = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object", param="messages")
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"{where}.role must be 'system', 'user' or 'assistant', got {role!r}",
                           param="messages")
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            if image_token in content:
                raise ApiError(400, f"{where}.content contains {image_token!r}; send images as image_url parts",
                               param="messages")
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise ApiError(400, f"{where}.content must be a string or a list of parts", param="messages")
        texts, images = [], 0
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                if image_token in part["text"]:
                    raise ApiError(400, f"{at}.text contains {image_token!r}; send images as image_url parts",
                                   param="messages")
                texts.append(part["text"])
            elif kind == "image_url":
                if role != "user":
                    raise ApiError(400, f"{at}: only user messages may carry images", param="messages")
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                if not isinstance(url, str):
                    raise ApiError(400, f"{at}.image_url must be {{'url': '...'}}", param="messages")
                urls.append((url, f"{at}.image_url"))
                images += 1
            else:
                raise ApiError(400, f"{at} must be a text or image_url part", param="messages")
        # LLaVA's layout, as `llava chat` and the llava-hf chat templates write it: images first
        out.append({"role": role, "content": f"{image_token}\n" * images + "\n".join(texts)})
    return out, urls


def _typed(payload: dict, name: str, kind: type, default):
    value = payload.get(name)
    if value is None:
        return default
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(400, f"{name} must be {'an integer' if kind is int else 'a ' + kind.__name__}, "
                            f"got {value!r}", param=name)
    return value


def _number(payload: dict, name: str, default: float, low: float, high: float) -> float:
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"{name} must be a number from {low} to {high}, got {value!r}", param=name)
    return float(value)


def _usage(completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": completion.cached_tokens}}


async def _wait(handle, request: Request):
    """The Completion, or None (and the request cancelled) if the client disconnects first."""
    async def consume():
        async for _ in handle:
            pass
        return handle.completion

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.create_task(consume()), asyncio.create_task(disconnected())
    done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    if work in done:
        watch.cancel()
        try:
            return work.result()
        except LlavaError:
            return handle.completion
    handle.cancel()
    work.cancel()
    return None


class _Strip:
    """Streams text as `str.strip()` would leave it: no leading, and no trailing, whitespace."""

    def __init__(self):
        self.started, self.pending = False, ""

    def push(self, delta: str) -> str:
        if not self.started:
            delta = delta.lstrip()
            if not delta:
                return ""
            self.started = True
        text = self.pending + delta
        kept = text.rstrip()
        self.pending = text[len(kept):]
        return kept


async def _sse(handle, response_id: str, created: int, model: str, include_usage: bool, metrics, started: float):
    def event(choices: list, usage=None) -> str:
        chunk = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": choices}
        if include_usage:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    def choice(delta: dict, finish_reason=None) -> list:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]

    strip = _Strip()
    try:
        yield event(choice({"role": "assistant", "content": ""}))
        try:
            async for delta in handle:
                text = strip.push(delta)
                if text:
                    yield event(choice({"content": text}))
        except LlavaError as e:
            yield f"data: {json.dumps(_error_body(str(e), 'server_error'))}\n\n"
            yield "data: [DONE]\n\n"
            return
        completion = handle.completion
        metrics.observe(completion, started)
        yield event(choice({}, completion.finish_reason))
        if include_usage:
            yield event([], _usage(completion))
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()  # a no-op once finished; stops generation when the client has gone away


class _Metrics:
    """Prometheus metrics: HTTP requests by path and status, latency, and the engine's counters and load."""

    def __init__(self, engine: Engine):
        self.started = int(time.time())
        self.registry = CollectorRegistry()
        self.http = Counter("llava_http_requests", "HTTP requests by path and status", ["path", "status"],
                            registry=self.registry)
        buckets = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))
        self.latency = Histogram("llava_request_latency_seconds", "time from request to the last token",
                                 buckets=buckets, registry=self.registry)
        self.ttft = Histogram("llava_time_to_first_token_seconds", "time from submission to the first token",
                              buckets=buckets, registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def observe(self, completion, started: float) -> None:
        self.latency.observe(time.perf_counter() - started)
        if completion.time_to_first_token is not None:
            self.ttft.observe(completion.time_to_first_token)


class _EngineCollector:
    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats
        requests = CounterMetricFamily("llava_requests", "finished requests by finish reason",
                                       labels=["finish_reason"])
        for reason, count in stats.requests.items():
            requests.add_metric([reason], count)
        yield requests
        for name, value, text in [
            ("llava_prompt_tokens", stats.prompt_tokens, "prompt tokens processed"),
            ("llava_cached_prompt_tokens", stats.cached_prompt_tokens, "prompt tokens taken from the prefix cache"),
            ("llava_completion_tokens", stats.completion_tokens, "tokens generated"),
            ("llava_feature_cache_hits", stats.feature_cache_hits, "images whose features were cached"),
            ("llava_feature_cache_misses", stats.feature_cache_misses, "images run through the vision tower"),
            ("llava_decode_steps", stats.decode_steps, "batched decode steps"),
        ]:
            yield CounterMetricFamily(name, text, value=value)
        yield GaugeMetricFamily("llava_queue_depth", "requests waiting to join the batch", value=stats.waiting)
        yield GaugeMetricFamily("llava_running_requests", "requests in the running batch", value=stats.running)
