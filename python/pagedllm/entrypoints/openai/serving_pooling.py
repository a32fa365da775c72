"""The HTTP API of a pooling model: /v1/embeddings, /pooling, /classify, /score and /v1/score, /rerank,
/v1/rerank and /v2/rerank (plus /health, /version, /v1/models); /v1/chat/completions and /v1/completions
answer vLLM's 400. A generative server answers the pooling routes with the same kind of 400.

AsyncPoolingEngine runs the PoolingEngine on one daemon thread: requests queue their validated items, the
thread takes everything queued (so concurrent HTTP requests share forwards), runs it, and hands each
request its results on its event loop. A request's invalid input is a 400 for that request alone.
"""
from __future__ import annotations

import base64
import threading
import time
import uuid
from typing import Optional

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedllm.entrypoints.openai.pooling_protocol import (ClassificationRequest, EmbeddingRequest, PoolingRequest,
                                                          RerankRequest, ScoreRequest)
from pagedllm.entrypoints.openai.serving_common import OpenAIError
from pagedllm.pooling.engine import PoolingEngine, PromptTooLongError
from pagedllm.pooling_params import PoolingParams

POOLING_ROUTES = {"/v1/embeddings": "Embeddings", "/pooling": "Pooling", "/classify": "Classification",
                  "/score": "Score", "/v1/score": "Score", "/rerank": "Rerank", "/v1/rerank": "Rerank",
                  "/v2/rerank": "Rerank"}
GENERATE_ROUTES = {"/v1/chat/completions": "Chat Completions", "/v1/completions": "Completions"}


class AsyncPoolingEngine:
    is_pooling = True

    def __init__(self, engine: PoolingEngine):
        self.engine = engine
        self.max_model_len = engine.max_model_len
        self._cond = threading.Condition()
        self._pending: list = []
        self._running = 0   # requests taken by the thread and not yet settled
        self._stopped = False
        self._stop_reason = "The engine is shut down."
        self._thread = threading.Thread(target=self._serve, name="pagedllm-pooling", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args) -> "AsyncPoolingEngine":
        return cls(PoolingEngine(args))

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def get_tokenizer(self):
        return self.engine.get_tokenizer()

    async def run(self, items: list) -> list[torch.Tensor]:
        import asyncio
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            if self._stopped:
                raise OpenAIError("The engine is shut down.", 503, "server_error")
            self._pending.append((items, future, loop))
            self._cond.notify()
        return await future

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    batch, self._pending = self._pending, []
                    for _, future, loop in batch:
                        loop.call_soon_threadsafe(_settle, future, None, OpenAIError(self._stop_reason, 503))
                    return
                batch, self._pending = self._pending, []
                self._running = len(batch)
            all_items = [it for items, _, _ in batch for it in items]
            try:
                results, error = self.engine.run(all_items), None
            except Exception as e:  # fails the requests of this forward only
                results, error = None, e
            start = 0
            for items, future, loop in batch:
                part = results[start:start + len(items)] if results is not None else None
                start += len(items)
                loop.call_soon_threadsafe(_settle, future, part, error)
            with self._cond:
                self._running = 0

    def num_unfinished_requests(self) -> int:
        with self._cond:
            return len(self._pending) + self._running

    def shutdown(self, timeout: float = 30.0, reason: str = "The engine is shut down.") -> None:
        """Stop the thread; queued requests end with a 503 naming reason (the forward in progress finishes).
        Waits up to timeout seconds for the thread (0: returns at once)."""
        with self._cond:
            self._stop_reason = reason
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


def _settle(future, result, error) -> None:
    if future.done():  # the request was cancelled (client gone)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _encode(vec: torch.Tensor, encoding_format: str):
    if encoding_format == "base64":
        return base64.b64encode(vec.numpy().astype("<f4").tobytes()).decode()
    return vec.tolist()


def _inputs(value) -> list:
    """A str, a list of str, one list of token ids or a list of them -> a list of prompts."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(t, int) for t in value):
        return [list(value)]
    return list(value)


def _usage(items) -> dict:
    n = sum(len(it.token_ids) for it in items)
    return {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0, "prompt_tokens_details": None}


def _error(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status_code)


def _not_supported(api: str) -> OpenAIError:
    return OpenAIError(f"The model does not support {api} API", 400, "BadRequestError")


def add_unsupported_pooling_routes(app: FastAPI) -> None:
    """On a generative server: the pooling routes answer vLLM's 400."""
    for path, api in POOLING_ROUTES.items():
        async def handler(_: Request, api=api):
            return _error(_not_supported(api))
        app.add_api_route(path, handler, methods=["POST"])


def build_pooling_app(engine: AsyncPoolingEngine, *, served_model_names: Optional[list[str]] = None,
                      model_path: Optional[str] = None, api_key: Optional[str] = None,
                      max_request_body_bytes: int = 16 << 20, state=None) -> FastAPI:
    from pagedllm import __version__
    from pagedllm.entrypoints.openai.api_server import GuardMiddleware, run_until_disconnect

    names = list(served_model_names or [model_path or "default"])
    core = engine.engine
    app = FastAPI(title="pagedllm OpenAI-compatible server (pooling)", version=__version__)
    app.state.engine = engine
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_request_body_bytes, state=state)

    @app.exception_handler(OpenAIError)
    async def _openai_error(_, e: OpenAIError):
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        parts, param = [], None
        for err in e.errors():
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            param = param or (loc[0] if loc else None)
            parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
        return _error(OpenAIError("Invalid request: " + "; ".join(parts), 400, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        return _error(OpenAIError(str(e.detail), e.status_code))

    def check_model(name: Optional[str]) -> None:
        if name is not None and name not in names:
            raise OpenAIError(f"The model `{name}` does not exist.", 404, "invalid_request_error", "model",
                              "model_not_found")

    def items_of(prompts: list, params: PoolingParams, task: str, pairs: Optional[list] = None,
                 what: str = "embedding generation") -> list:
        """Validated items; any invalid input is this request's 400 (vLLM's words for a long prompt)."""
        if not prompts:
            raise OpenAIError("Input cannot be empty", 400, param="input")
        items = []
        encoded = core.encode_text_prompts(prompts, pairs)  # one tokenizer call for the request's texts
        for i, prompt in enumerate(prompts):
            try:
                items.append(core.make_item(prompt, params, task, pairs[i] if pairs is not None else None,
                                            encoded.get(i)))
            except PromptTooLongError as e:
                raise OpenAIError(f"This model's maximum context length is {e.max_model_len} tokens. However, you "
                                  f"requested {e.length} tokens in the input for {what}. Please reduce the length "
                                  f"of the input.", 400, param="input") from None
            except ValueError as e:
                raise OpenAIError(str(e), 400, param="input") from None
        return items

    async def run(items, raw_request: Request):
        result = await run_until_disconnect(engine.run(items), raw_request)
        if result is None:
            raise _ClientGone()
        return result

    @app.exception_handler(_ClientGone)
    async def _client_gone(_, e: Exception):
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        return _error(OpenAIError(f"Internal server error: {type(e).__name__}: {e}", 500, "server_error"))

    def envelope(prefix: str, data: list, items) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": names[0], "data": data, "usage": _usage(items)}

    @app.get("/health")
    async def health():
        return Response(status_code=200 if engine.is_running else 503)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_card(n, model_path or names[0], engine.max_model_len) for n in names]}

    @app.post("/v1/embeddings")
    async def embeddings(request: EmbeddingRequest, raw_request: Request):
        check_model(request.model)
        params = PoolingParams(truncate_prompt_tokens=request.truncate_prompt_tokens,
                               dimensions=request.dimensions, normalize=request.normalize)
        items = items_of(_inputs(request.input), params, "embed")
        results = await run(items, raw_request)
        data = [{"index": i, "object": "embedding", "embedding": _encode(r, request.encoding_format)}
                for i, r in enumerate(results)]
        return envelope("embd", data, items)

    @app.post("/pooling")
    async def pooling(request: PoolingRequest, raw_request: Request):
        check_model(request.model)
        params = PoolingParams(truncate_prompt_tokens=request.truncate_prompt_tokens, dimensions=request.dimensions,
                               normalize=request.normalize, use_activation=request.use_activation)
        items = items_of(_inputs(request.input), params, request.task or "encode", what="pooling")
        results = await run(items, raw_request)
        data = [{"index": i, "object": "pooling",
                 "data": _encode(r.reshape(-1), "base64") if request.encoding_format == "base64" else r.tolist()}
                for i, r in enumerate(results)]
        return envelope("pool", data, items)

    @app.post("/classify")
    async def classify(request: ClassificationRequest, raw_request: Request):
        check_model(request.model)
        params = PoolingParams(truncate_prompt_tokens=request.truncate_prompt_tokens,
                               use_activation=request.use_activation)
        items = items_of(_inputs(request.input), params, "classify", what="classification")
        results = await run(items, raw_request)
        labels = getattr(core.hf_config, "id2label", None) or {}
        data = []
        for i, r in enumerate(results):
            best = int(r.argmax())
            data.append({"index": i, "label": labels.get(best, str(best)), "probs": r.tolist(),
                         "num_classes": r.numel()})
        return envelope("classify", data, items)

    async def scores(texts_1: list[str], texts_2: list[str], truncate, use_activation, raw_request):
        """(scores, items): cross-encoder pairs, or cosine of embeddings on an embedding model."""
        if not texts_1 or not texts_2:
            raise OpenAIError("At least one text element must be given" if not texts_1
                              else "At least one text_pair element must be given", 400)
        if len(texts_1) > 1 and len(texts_1) != len(texts_2):
            raise OpenAIError("Input lengths must be either 1:1, 1:N or N:N", 400)
        if len(texts_1) == 1:
            texts_1 = texts_1 * len(texts_2)
        if "score" in core.supported_tasks:
            params = PoolingParams(truncate_prompt_tokens=truncate, use_activation=use_activation)
            items = items_of(texts_1, params, "score", pairs=texts_2, what="score")
            return [float(r.reshape(-1)[0]) for r in await run(items, raw_request)], items
        if use_activation is not None:
            raise OpenAIError("use_activation is not supported by the cosine score of embedding models", 400)
        items = items_of(texts_1 + texts_2, PoolingParams(truncate_prompt_tokens=truncate), "embed", what="score")
        embs = await run(items, raw_request)
        n = len(texts_1)
        return [torch.nn.functional.cosine_similarity(a[None], b[None]).item()
                for a, b in zip(embs[:n], embs[n:])], items

    async def score_route(request: ScoreRequest, raw_request: Request):
        check_model(request.model)
        t1 = [request.text_1] if isinstance(request.text_1, str) else list(request.text_1)
        t2 = [request.text_2] if isinstance(request.text_2, str) else list(request.text_2)
        values, items = await scores(t1, t2, request.truncate_prompt_tokens, request.use_activation, raw_request)
        return envelope("score", [{"index": i, "object": "score", "score": s} for i, s in enumerate(values)], items)

    async def rerank_route(request: RerankRequest, raw_request: Request):
        check_model(request.model)
        if not request.documents:
            raise OpenAIError("At least one document must be given", 400, param="documents")
        values, items = await scores([request.query], list(request.documents), request.truncate_prompt_tokens,
                                     request.use_activation, raw_request)
        order = sorted(range(len(values)), key=lambda i: -values[i])
        top_n = request.top_n if request.top_n and request.top_n > 0 else len(order)
        results = [{"index": i, "document": {"text": request.documents[i]}, "relevance_score": values[i]}
                   for i in order[:top_n]]
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": names[0], "usage": {"total_tokens": _usage(items)
                ["total_tokens"]}, "results": results}

    for path in ("/score", "/v1/score"):
        app.add_api_route(path, score_route, methods=["POST"])
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.add_api_route(path, rerank_route, methods=["POST"])
    for path, api in GENERATE_ROUTES.items():
        async def unsupported(_: Request, api=api):
            return _error(_not_supported(api))
        app.add_api_route(path, unsupported, methods=["POST"])
    return app


class _ClientGone(Exception):
    pass


def _card(name: str, root: str, max_model_len: int) -> dict:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "pagedllm", "root": root,
            "max_model_len": max_model_len}
