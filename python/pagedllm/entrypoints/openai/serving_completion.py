"""/v1/completions: one engine request per prompt (string, list of strings, token ids or lists of token ids),
streamed as SSE or answered whole; echo and logprobs in OpenAI's completion format."""
from __future__ import annotations

from typing import AsyncIterator, Optional

from pagedllm.entrypoints.openai.protocol import (CompletionLogProbs, CompletionRequest, CompletionResponse,
                                                  CompletionResponseChoice, CompletionStreamResponse, UsageInfo,
                                                  random_id)
from pagedllm.entrypoints.openai.structured import apply_request_constraint
from pagedllm.entrypoints.openai.serving_common import (DeltaTracker, OpenAIError, bad_request, check_lengths,
                                                        chained, merge_async_iterators, not_supported, off_loop,
                                                        prime, sampled_and_top, sse, sse_stream, token_text)
from pagedllm.entrypoints.openai.limits import ServerLimits, check_kv_capacity, check_text
from pagedllm.outputs import RequestOutput

_MIN_LOGPROB = -9999.0   # JSON has no -inf (vLLM clamps the same way)


def _lp(value: float) -> float:
    return max(value, _MIN_LOGPROB)


class OpenAIServingCompletion:
    def __init__(self, engine, served_model_names: list[str], limits: Optional[ServerLimits] = None):
        self.engine = engine
        self.limits = limits or ServerLimits()
        self.model_name = served_model_names[0]
        self.tokenizer = engine.get_tokenizer()
        self.max_model_len = engine.max_model_len
        self.defaults = engine.get_default_sampling_params()

    # -- request -> engine requests ------------------------------------------------------------------------
    def _prompts(self, req: CompletionRequest) -> list[tuple[str, list[int]]]:
        p = req.prompt
        if isinstance(p, str):
            items = [p]
        elif isinstance(p, list) and p and all(isinstance(x, int) for x in p):
            items = [p]
        else:
            items = list(p)
        if not items:
            raise ValueError("prompt cannot be an empty list.")
        prompts = []
        for item in items:
            if isinstance(item, str):
                self.limits.check_prompt_chars(item)
                ids = self.tokenizer.encode(item, add_special_tokens=req.add_special_tokens)
                text = item
            else:
                ids = list(item)
                text = None
            if req.truncate_prompt_tokens is not None and req.truncate_prompt_tokens >= 1:
                ids = ids[-req.truncate_prompt_tokens:]
                text = None
            if text is None:
                text = self.tokenizer.decode(ids) if ids and all(0 <= t < len(self.tokenizer) for t in ids) else ""
            prompts.append((text, ids))
        return prompts

    def _requests(self, req: CompletionRequest):
        check_text(req)
        self.limits.check_samples(req.n, req.best_of)
        if req.suffix is not None:
            raise not_supported("suffix", "suffix")
        if req.stream and req.best_of is not None and req.best_of > req.n:
            raise ValueError("best_of must equal n when streaming (best_of > n picks the best sequences at the end).")
        prompts = self._prompts(req)
        prompt_logprobs = req.prompt_logprobs
        if req.echo and req.logprobs is not None:
            prompt_logprobs = max(req.logprobs, prompt_logprobs or 0)
        out = []
        for text, ids in prompts:
            max_tokens = check_lengths(len(ids), req.max_tokens, self.max_model_len, "prompt")
            bm = self.engine.engine.block_manager
            check_kv_capacity(len(ids), max_tokens, req.n, req.best_of, bm.block_size, bm.num_blocks)
            if req.use_beam_search:  # the engine runs the beams (engine/beam_search.py)
                out.append(({"prompt_token_ids": ids, "prompt": text}, req.beam_search_params(max_tokens)))
                continue
            params = req.sampling_params(self.defaults, max_tokens, req.logprobs)
            params.prompt_logprobs = prompt_logprobs
            apply_request_constraint(req, params)  # response_format, structured_outputs, guided_*
            out.append(({"prompt_token_ids": ids, "prompt": text}, params))
        return out

    async def create(self, req: CompletionRequest):
        """A CompletionResponse, or (stream) an async iterator of SSE strings. Raises OpenAIError."""
        try:
            requests = await off_loop(self._requests, req)
        except (ValueError, TypeError) as e:
            raise bad_request(e) from None
        request_id = random_id("cmpl")
        gens = [self.engine.generate(prompt, params, f"{request_id}-{i}") for i, (prompt, params) in
                enumerate(requests)]
        if req.stream:
            first = await prime(gens)
            return sse_stream(self._stream(req, request_id, requests, gens, first))
        final: list[Optional[RequestOutput]] = [None] * len(gens)
        try:
            async for i, out in merge_async_iterators(gens):
                final[i] = out
        except ValueError as e:
            raise bad_request(e) from None
        if any(f is None for f in final):
            raise OpenAIError("The request was aborted.", 500, "server_error")
        return self._response(req, request_id, final)

    # -- whole response ------------------------------------------------------------------------------------
    def _response(self, req: CompletionRequest, request_id: str, final: list[RequestOutput]) -> CompletionResponse:
        choices = []
        prompt_tokens = completion_tokens = 0
        n = req.n
        for i, out in enumerate(final):
            prompt_tokens += len(out.prompt_token_ids)
            for o in out.outputs:
                completion_tokens += len(o.token_ids)
                text = o.text
                logprobs = None
                if req.echo:
                    text = (out.prompt or "") + text
                if req.logprobs is not None:
                    logprobs = CompletionLogProbs()
                    if req.echo:
                        self._add_logprobs(logprobs, out.prompt_token_ids, out.prompt_logprobs, req.logprobs, 0)
                    self._add_logprobs(logprobs, o.token_ids, o.logprobs, req.logprobs,
                                       _next_offset(logprobs, 0))
                choices.append(CompletionResponseChoice(index=i * n + o.index, text=text, logprobs=logprobs,
                                                        finish_reason=o.finish_reason, stop_reason=o.stop_reason))
        choices.sort(key=lambda c: c.index)
        return CompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                  usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                                  total_tokens=prompt_tokens + completion_tokens))

    def _add_logprobs(self, lp: CompletionLogProbs, token_ids, positions, k: int, offset: int) -> int:
        """Appends tokens [0, len(token_ids)) to lp; returns the text offset after them."""
        for j, tid in enumerate(token_ids):
            pos = positions[j] if positions is not None and j < len(positions) else None
            if pos is None:
                tok = self.tokenizer.decode([tid])
                lp.tokens.append(tok)
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
            else:
                sampled, top = sampled_and_top(pos, tid, k)
                tok = token_text(self.tokenizer, tid, sampled)
                lp.tokens.append(tok)
                lp.token_logprobs.append(_lp(sampled.logprob) if sampled is not None else None)
                entries: dict[str, float] = {}
                for t, e in top:   # most likely first: where two tokens share a text ("\ufffd"), the likelier wins
                    entries.setdefault(token_text(self.tokenizer, t, e), _lp(e.logprob))
                if sampled is not None:
                    entries.setdefault(tok, _lp(sampled.logprob))
                lp.top_logprobs.append(entries)
            lp.text_offset.append(offset)
            offset += len(tok)
        return offset

    # -- streaming -----------------------------------------------------------------------------------------
    async def _stream(self, req: CompletionRequest, request_id: str, requests, gens, first) -> AsyncIterator[str]:
        n = req.n
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        trackers: dict[tuple[int, int], DeltaTracker] = {}
        offsets: dict[tuple[int, int], int] = {}
        prompt_tokens = [len(p["prompt_token_ids"]) for p, _ in requests]
        completion_tokens: dict[tuple[int, int], int] = {}
        async for i, out in merge_async_iterators(chained(gens, first)):
            params = requests[i][1]
            for o in out.outputs:
                key = (i, o.index)
                tracker = trackers.get(key)
                first_chunk = tracker is None
                if first_chunk:
                    tracker = trackers[key] = DeltaTracker.for_params(params)
                if tracker.finished:
                    continue
                new_text, a, b = tracker.advance(o)
                completion_tokens[key] = len(o.token_ids)
                logprobs = None
                if req.logprobs is not None:
                    logprobs = CompletionLogProbs()
                    offset = offsets.get(key, 0)
                    if first_chunk and req.echo:
                        offset = self._add_logprobs(logprobs, out.prompt_token_ids, out.prompt_logprobs,
                                                    req.logprobs, offset)
                    offsets[key] = self._add_logprobs(logprobs, o.token_ids[a:b],
                                                      (o.logprobs or [])[a:b] if o.logprobs else None,
                                                      req.logprobs, offset)
                if first_chunk and req.echo:
                    new_text = (out.prompt or "") + new_text
                if not new_text and a == b and o.finish_reason is None:
                    continue
                chunk = CompletionStreamResponse(
                    id=request_id, model=self.model_name,
                    choices=[CompletionResponseChoice(index=i * n + o.index, text=new_text, logprobs=logprobs,
                                                      finish_reason=o.finish_reason,
                                                      stop_reason=o.stop_reason)])
                if continuous:
                    chunk.usage = _usage(prompt_tokens, completion_tokens)
                yield sse(chunk)
        if include_usage:
            yield sse(CompletionStreamResponse(id=request_id, model=self.model_name, choices=[],
                                               usage=_usage(prompt_tokens, completion_tokens)))


def _next_offset(lp: CompletionLogProbs, default: int) -> int:
    if not lp.tokens:
        return default
    return lp.text_offset[-1] + len(lp.tokens[-1])


def _usage(prompt_tokens: list[int], completion_tokens: dict) -> UsageInfo:
    p, c = sum(prompt_tokens), sum(completion_tokens.values())
    return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)
