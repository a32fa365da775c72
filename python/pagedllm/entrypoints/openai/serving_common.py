"""What both endpoints share: the OpenAI error type, model-name checks, prompt-length checks, stream helpers
(merging several requests' outputs, holding back text a stop string may still cut), logprob conversions."""
from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Optional, Sequence

from pagedllm.engine.async_engine import EngineDeadError
from pagedllm.outputs import CompletionOutput, Logprob


class OpenAIError(Exception):
    """An error the API answers as {"error": {"message", "type", "param", "code"}} with status_code."""

    def __init__(self, message: str, status_code: int = 400, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[object] = None):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code if code is not None else status_code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# SamplingParams' messages start with the field name ("temperature must be ..."): name it as the param.
_PARAM_NAMES = ("n", "best_of", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature",
                "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs", "stop",
                "seed", "logit_bias", "allowed_token_ids", "truncate_prompt_tokens", "messages", "prompt",
                "tools", "tool_choice")


def bad_request(e: Exception) -> OpenAIError:
    message = str(e)
    first = message.split(" ", 1)[0]
    param = first if first in _PARAM_NAMES else None
    if message.startswith("The decoder prompt") or message.startswith("This model's maximum context length"):
        param = "messages" if "messages" in message else "prompt"
    return OpenAIError(message, 400, "invalid_request_error", param)


_executor: Optional[ThreadPoolExecutor] = None
_executor_lock = threading.Lock()


async def off_loop(fn, *args):
    """fn(*args) in a thread, so that rendering a chat template or tokenizing a long prompt never stalls the event
    loop (/health, other requests, signals). A dedicated pool: starlette's own threads stay free."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pagedllm-prepare")
    return await asyncio.get_running_loop().run_in_executor(_executor, fn, *args)


def not_supported(what: str, param: Optional[str] = None) -> OpenAIError:
    return OpenAIError(f"{what} is not supported yet.", 400, "invalid_request_error", param)


def check_lengths(num_prompt_tokens: int, max_tokens: Optional[int], max_model_len: int,
                  kind: str = "prompt") -> Optional[int]:
    """The max_tokens to use: None (the rest of the context) when not given. A prompt longer than the context is
    left to the engine (its message); prompt + max_tokens over the context is a ValueError (vLLM's wording)."""
    if num_prompt_tokens > max_model_len:
        return max_tokens
    if max_tokens is None:
        return max(1, max_model_len - num_prompt_tokens)
    if max_tokens >= 1 and num_prompt_tokens + max_tokens > max_model_len:
        raise ValueError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {kind}, {max_tokens} in the "
            "completion). Please reduce the length of the "
            f"{kind} or completion.")
    return max_tokens


async def merge_async_iterators(iterators: Sequence[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Yields (i, item) from several async iterators as items arrive. The first exception propagates; leaving
    early (or an exception) cancels and closes every iterator (which aborts their requests)."""
    if len(iterators) == 1:
        try:
            async for item in iterators[0]:
                yield 0, item
        finally:
            await _aclose(iterators[0])
        return
    tasks = {asyncio.ensure_future(it.__anext__()): i for i, it in enumerate(iterators)}
    try:
        while tasks:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = tasks.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                tasks[asyncio.ensure_future(iterators[i].__anext__())] = i
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for it in iterators:
            await _aclose(it)


async def _aclose(it) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        try:
            await close()
        except (RuntimeError, StopAsyncIteration):  # already running / closed
            pass


@dataclass
class DeltaTracker:
    """Per-choice streaming state: how much text and how many tokens were sent, and how much text to hold back
    while a stop string could still cut it (the engine truncates the text at a stop string it finds later)."""
    holdback: int = 0
    sent_chars: int = 0
    sent_tokens: int = 0
    finished: bool = False

    @classmethod
    def for_stops(cls, stops: Optional[list[str]], include_stop_str: bool) -> "DeltaTracker":
        longest = max((len(s) for s in stops or []), default=0)
        return cls(holdback=0 if include_stop_str or longest == 0 else longest - 1)

    @classmethod
    def for_params(cls, params) -> "DeltaTracker":
        """For a SamplingParams or a BeamSearchParams (no stop strings: a beam search's one output is final)."""
        return cls.for_stops(getattr(params, "stop", None), params.include_stop_str_in_output)

    def advance(self, output: CompletionOutput) -> tuple[str, int, int]:
        """(new text, first new token index, end token index) for this cumulative output."""
        text = output.text
        end = len(text) if output.finish_reason is not None else max(len(text) - self.holdback, self.sent_chars)
        new_text = text[self.sent_chars:end]
        self.sent_chars = max(end, self.sent_chars)
        start_tok, self.sent_tokens = self.sent_tokens, len(output.token_ids)
        if output.finish_reason is not None:
            self.finished = True
        return new_text, start_tok, self.sent_tokens


def sse(payload) -> str:
    if isinstance(payload, str):
        return f"data: {payload}\n\n"
    if hasattr(payload, "model_dump_json"):
        return f"data: {payload.model_dump_json(exclude_unset=True)}\n\n"
    return f"data: {json.dumps(payload)}\n\n"


def sse_error(e: OpenAIError) -> str:
    return f"data: {json.dumps(e.body())}\n\n"


async def sse_stream(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """What every SSE response shares: the events, then `data: [DONE]`. The 200 is sent already, so an
    error after it is reported in the stream (400 for a request error, 500 otherwise)."""
    try:
        async for event in events:
            yield event
    except ValueError as e:
        yield sse_error(bad_request(e))
    except EngineDeadError as e:   # shutdown: the stream's last event says why it ends
        yield sse_error(OpenAIError(str(e), 503, "server_error", None, "engine_dead"))
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as e:  # noqa: BLE001 - see above
        yield sse_error(OpenAIError(f"{type(e).__name__}: {e}", 500, "server_error"))
    yield "data: [DONE]\n\n"


async def prime(gens: list) -> list:
    """The first output of every request, so errors (bad request, queue full) come back before the HTTP status is
    sent. On any error every request is closed (aborted) and the first error raised."""
    results = await asyncio.gather(*[g.__anext__() for g in gens], return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for g in gens:
            try:
                await g.aclose()
            except RuntimeError:
                pass
        err = errors[0]
        if isinstance(err, StopAsyncIteration):
            raise OpenAIError("The request was aborted.", 500, "server_error")
        if isinstance(err, ValueError):
            raise bad_request(err) from None
        raise err
    return results


def chained(gens: list, firsts: list) -> list:
    async def one(gen, first):
        try:
            yield first
            if first.finished:
                return
            async for item in gen:
                yield item
        finally:
            await gen.aclose()
    return [one(g, f) for g, f in zip(gens, firsts)]


# --- logprobs ----------------------------------------------------------------------------------------------

def token_text(tokenizer, token_id: int, entry: Optional[Logprob] = None) -> str:
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return tokenizer.decode([token_id])


def sampled_and_top(position: dict[int, Logprob], token_id: int, k: int):
    """(the sampled token's Logprob, the k most likely (token id, Logprob) of this position)."""
    sampled = position.get(token_id)
    top = sorted(position.items(), key=lambda kv: -kv[1].logprob)[:k] if k > 0 else []
    return sampled, top
