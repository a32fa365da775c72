"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over one AsyncLLMEngine.

Routes: /v1/chat/completions, /v1/completions, /v1/models, /health, /version, /tokenize, /detokenize, /metrics.
Every error answers OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for invalid input (bad
params, a prompt over the context, malformed JSON), 401 without the API key, 404 for an unknown model, 413 for a
body over the limit, 503 when the request queue is full. A client that goes away (streaming or not) aborts its
request, which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
from functools import partial
from typing import Optional

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedllm import __version__
from pagedllm.chat.render_pool import RenderWorkerError, set_default_limits
from pagedllm.engine.async_engine import EngineDeadError, QueueFullError
from pagedllm.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from pagedllm.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                  DetokenizeResponse, ModelCard, ModelList, TokenizeRequest,
                                                  TokenizeResponse)
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedllm.entrypoints.openai.limits import ServerLimits, check_text
from pagedllm.entrypoints.openai.serving_common import OpenAIError, bad_request, off_loop
from pagedllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedllm.entrypoints.openai.shutdown import SHUTDOWN_MESSAGE, ServerState

logger = logging.getLogger("pagedllm.server")

DEFAULT_MAX_REQUEST_BODY_BYTES = 16 << 20   # 16 MiB
_OPEN_PATHS = ("/health",)                   # served without the API key


def _error_response(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status_code)


class GuardMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware: it would break streaming and disconnect detection): checks the bearer
    token and reads the request body up to the size limit before the app sees it."""

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int, state: Optional[ServerState] = None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.state = state or ServerState()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.state.draining:   # shutting down: what is running finishes, nothing new starts
            return await _error_response(OpenAIError(SHUTDOWN_MESSAGE, 503, "server_error", None,
                                                     "server_shutdown"))(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.expected is not None and scope["path"] not in _OPEN_PATHS and scope["method"] != "OPTIONS":
            if not secrets.compare_digest(headers.get(b"authorization", b""), self.expected):
                return await _error_response(OpenAIError(
                    "Invalid or missing API key: send 'Authorization: Bearer <key>'.", 401,
                    "authentication_error", None, "invalid_api_key"))(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_large = OpenAIError(f"The request body is larger than the server's limit of {self.max_body_bytes} "
                                "bytes.", 413, "invalid_request_error", None, "request_too_large")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _error_response(too_large)(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return await _error_response(too_large)(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class SSEResponse(StreamingResponse):
    """Server-sent events; the stream stops (and so aborts its requests) as soon as the client disconnects,
    whatever ASGI spec version the server speaks."""
    media_type = "text/event-stream"

    def __init__(self, content, **kwargs):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, **kwargs)

    async def __call__(self, scope, receive, send):
        async with anyio.create_task_group() as tg:
            async def run_then_cancel(func):
                await func()
                tg.cancel_scope.cancel()
            tg.start_soon(run_then_cancel, partial(self.stream_response, send))
            await run_then_cancel(partial(self.listen_for_disconnect, receive))


async def _wait_disconnect(raw_request: Request) -> None:
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(coro, raw_request: Request):
    """The coroutine's result, or None when the client disconnected first (then the coroutine is cancelled,
    which aborts its engine requests)."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_disconnect(raw_request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return None
    return task.result()


def _json(model: BaseModel) -> Response:
    return Response(content=model.model_dump_json(), media_type="application/json")


def build_app(engine, *, served_model_names: Optional[list[str]] = None, model_path: Optional[str] = None,
              api_key: Optional[str] = None, chat_template: Optional[str] = None,
              tool_parser: Optional[str] = None, reasoning_parser: Optional[str] = None,
              chat_template_content_format: str = "auto",
              max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES, limits: Optional[ServerLimits] = None,
              state: Optional[ServerState] = None) -> FastAPI:
    """The FastAPI app serving engine (an AsyncLLMEngine) under served_model_names (the first is the one
    responses name). limits: the per-request limits (ServerLimits' defaults when None); state: the server's
    life (shutdown.DrainingServer sets it draining)."""
    if getattr(engine, "is_pooling", False):  # embeddings / score / rerank models: serving_pooling.py
        from pagedllm.entrypoints.openai.serving_pooling import build_pooling_app
        return build_pooling_app(engine, served_model_names=served_model_names, model_path=model_path,
                                 api_key=api_key, max_request_body_bytes=max_request_body_bytes, state=state)
    names = list(served_model_names or [model_path or "default"])
    limits = limits or ServerLimits()
    state = state or ServerState()
    completion = OpenAIServingCompletion(engine, names, limits=limits)
    chat = OpenAIServingChat(engine, names, chat_template=chat_template, tool_parser=tool_parser,
                             reasoning_parser=reasoning_parser, content_format=chat_template_content_format,
                             limits=limits)
    metrics = ServerMetrics(engine, names[0])
    tokenizer = engine.get_tokenizer()

    app = FastAPI(title="pagedllm OpenAI-compatible server", version=__version__)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.server_state = state
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_request_body_bytes, state=state)
    from pagedllm.entrypoints.openai.serving_pooling import add_unsupported_pooling_routes
    add_unsupported_pooling_routes(app)  # /v1/embeddings, /score ... answer a generative model's 400

    def check_model(name: Optional[str]) -> None:
        if name is not None and name not in names:
            raise OpenAIError(f"The model `{name}` does not exist.", 404, "invalid_request_error", "model",
                              "model_not_found")

    # -- errors ---------------------------------------------------------------------------------------------
    @app.exception_handler(OpenAIError)
    async def _openai_error(_, e: OpenAIError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            detail = next(err for err in errors if err.get("type") == "json_invalid")
            msg = f"Malformed JSON body: {detail.get('ctx', {}).get('error', detail.get('msg'))}"
            return _error_response(OpenAIError(msg, 400))
        parts = []
        param = None
        for err in errors:
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            if param is None and loc:
                param = loc[0]
            parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
        return _error_response(OpenAIError("Invalid request: " + "; ".join(parts), 400, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        return _error_response(OpenAIError(str(e.detail), e.status_code,
                                           "invalid_request_error" if e.status_code < 500 else "server_error"))

    @app.exception_handler(QueueFullError)
    async def _queue_full(_, e: QueueFullError):
        return _error_response(OpenAIError(str(e), 503, "server_error", None, "queue_full"))

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_, e: EngineDeadError):
        return _error_response(OpenAIError(str(e), 503, "server_error", None, "engine_dead"))

    @app.exception_handler(RenderWorkerError)
    async def _renderer_gone(_, e: RenderWorkerError):
        if state.draining:
            return _error_response(OpenAIError(SHUTDOWN_MESSAGE, 503, "server_error", None, "server_shutdown"))
        logger.error("chat template renderer: %s", e)
        return _error_response(OpenAIError(f"The chat template renderer failed: {e}", 500, "server_error"))

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        logger.exception("internal error")
        return _error_response(OpenAIError(f"Internal server error: {type(e).__name__}: {e}", 500, "server_error"))

    # -- routes ---------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if state.draining:
            return _error_response(OpenAIError(SHUTDOWN_MESSAGE, 503, "server_error", None, "server_shutdown"))
        if not engine.is_running:
            return _error_response(OpenAIError("The engine is not running.", 503, "server_error"))
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/v1/models")
    async def models():
        return _json(ModelList(data=[ModelCard(id=n, root=model_path or names[0], max_model_len=engine.max_model_len)
                                     for n in names]))

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(model_id)
        return _json(ModelCard(id=model_id, root=model_path or names[0], max_model_len=engine.max_model_len))

    async def _serve(serving, request, raw_request: Request):
        check_model(request.model)
        result = await run_until_disconnect(serving.create(request), raw_request)
        if result is None:   # the client is gone
            return Response(status_code=499)
        if isinstance(result, BaseModel):
            return _json(result)
        return SSEResponse(result)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw_request: Request):
        return await _serve(completion, request, raw_request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw_request: Request):
        return await _serve(chat, request, raw_request)

    def _tokenize(request: TokenizeRequest) -> TokenizeResponse:
        try:
            check_text(request)
            if request.messages is not None:
                tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
                _, text = chat.render(request.messages, tools=tools,
                                      add_generation_prompt=request.add_generation_prompt,
                                      continue_final_message=request.continue_final_message,
                                      chat_template=request.chat_template,
                                      chat_template_kwargs=request.chat_template_kwargs)
                add_special = bool(request.add_special_tokens)
            elif request.prompt is not None:
                text = request.prompt
                limits.check_prompt_chars(text)
                add_special = request.add_special_tokens is not False
            else:
                raise ValueError("prompt or messages is required.")
        except (ValueError, TypeError) as e:
            raise bad_request(e) from None
        ids = tokenizer.encode(text, add_special_tokens=add_special)
        strs = tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strs)

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest):
        check_model(request.model)
        return _json(await off_loop(_tokenize, request))

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest):
        check_model(request.model)
        vocab = len(tokenizer)
        bad = next((t for t in request.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise OpenAIError(f"Token id {bad} is out of vocabulary", 400, param="tokens")
        return _json(DetokenizeResponse(prompt=tokenizer.decode(request.tokens)))

    @app.get("/metrics")
    async def prometheus():
        return Response(content=metrics.render(), media_type=CONTENT_TYPE)

    return app


def build_server(args, state: Optional[ServerState] = None):
    """The engine and its app from parsed `pagedllm serve` options: (engine, app, names). Used by run_server
    and by each Ray Serve replica (entrypoints/ray_serve.py), so both serve the same routes the same way."""
    from pagedllm.engine.async_engine import AsyncLLMEngine
    from pagedllm.entrypoints.cli import engine_args_from
    from pagedllm.entrypoints.openai.serving_pooling import AsyncPoolingEngine
    from pagedllm.pooling.engine import wants_pooling

    api_key = args.api_key or os.environ.get("PAGEDLLM_API_KEY") or None
    limits = ServerLimits.build(max_prompt_chars=args.max_prompt_chars, max_best_of=args.max_best_of,
                                chat_template_timeout_s=args.chat_template_timeout,
                                chat_template_max_memory_mb=args.chat_template_max_memory_mb)
    set_default_limits(limits.render)
    engine_args = engine_args_from(args)
    engine = (AsyncPoolingEngine.from_engine_args(engine_args) if wants_pooling(engine_args)
              else AsyncLLMEngine.from_engine_args(engine_args, max_queue_size=args.max_queue_size))
    names = args.served_model_name or [args.model or "pagedllm-default"]
    try:
        app = build_app(engine, served_model_names=names, model_path=args.model, api_key=api_key,
                        chat_template=args.chat_template, tool_parser=args.tool_call_parser,
                        reasoning_parser=args.reasoning_parser,
                        chat_template_content_format=args.chat_template_content_format,
                        max_request_body_bytes=args.max_request_body_bytes, limits=limits, state=state)
    except BaseException:
        engine.shutdown()
        raise
    return engine, app, names


def run_server(args) -> None:
    """`pagedllm serve`: build the engine, then serve until SIGTERM / SIGINT (shutdown.DrainingServer: a bounded
    drain, then what still runs is aborted; a second signal exits at once)."""
    import uvicorn

    from pagedllm.entrypoints.openai.shutdown import DrainingServer

    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    state = ServerState()
    engine, app, names = build_server(args, state)
    try:
        logger.info("serving %s as %s on http://%s:%d", args.model or "the default model", ", ".join(names),
                    args.host, args.port)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=str(args.log_level).lower(),
                                timeout_keep_alive=5)
        DrainingServer(config, engine, state, drain_seconds=args.shutdown_drain_seconds).run()
    finally:
        engine.shutdown()
