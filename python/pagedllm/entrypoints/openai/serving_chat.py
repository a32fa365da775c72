"""/v1/chat/completions: the conversation rendered with the chat template (pagedllm.chat.template), one engine
request with n outputs, the answer read back with the tool-call parser (pagedllm.chat.tool_parsers) and, when
the server runs with --reasoning-parser, the <think> split (pagedllm.chat.reasoning), whole or streamed."""
from __future__ import annotations

from typing import AsyncIterator, Optional

from pagedllm.chat.reasoning import ReasoningStreamer, split_reasoning
from pagedllm.chat.renderer import ChatRenderer
from pagedllm.chat.tool_choice import ForcedToolCallParser, constrains
from pagedllm.entrypoints.openai.protocol import (ChatCompletionLogProbs, ChatCompletionRequest,
                                                  ChatCompletionResponse, ChatCompletionResponseChoice,
                                                  ChatCompletionResponseStreamChoice, ChatCompletionStreamResponse,
                                                  ChatLogProb, ChatLogProbsContent, ChatMessageModel,
                                                  DeltaFunctionCall, DeltaMessageModel, DeltaToolCallModel,
                                                  FunctionCallModel, ToolCallModel, UsageInfo, random_id)
from pagedllm.entrypoints.openai.structured import apply_request_constraint
from pagedllm.entrypoints.openai.serving_common import (DeltaTracker, OpenAIError, bad_request, chained,
                                                        check_lengths, merge_async_iterators, not_supported, off_loop,
                                                        prime, sampled_and_top, sse, sse_stream, token_text)
from pagedllm.entrypoints.openai.limits import ServerLimits, check_kv_capacity, check_text
from pagedllm.outputs import RequestOutput

_MIN_LOGPROB = -9999.0


class OpenAIServingChat:
    def __init__(self, engine, served_model_names: list[str], chat_template: Optional[str] = None,
                 tool_parser: Optional[str] = None, reasoning_parser: Optional[str] = None,
                 content_format: str = "auto", limits: Optional[ServerLimits] = None):
        self.engine = engine
        self.limits = limits or ServerLimits()
        self.model_name = served_model_names[0]
        self.tokenizer = engine.get_tokenizer()
        self.max_model_len = engine.max_model_len
        self.defaults = engine.get_default_sampling_params()
        self.chat_template = chat_template
        self.content_format = content_format
        self.model_type = getattr(getattr(engine.engine, "hf_config", None), "model_type", None)
        # The one chooser of template and tool parser, shared with offline LLM.chat (an unknown parser fails here).
        self.renderer = ChatRenderer(self.tokenizer, chat_template=chat_template, tool_parser=tool_parser,
                                     content_format=content_format, model_type=self.model_type)
        self.tool_parser = tool_parser
        self.reasoning = reasoning_parser is not None

    # -- prompt ---------------------------------------------------------------------------------------------
    def _tools(self, req: ChatCompletionRequest) -> Optional[list[dict]]:
        if not req.tools or req.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in req.tools]

    def template_for(self, chat_template: Optional[str], tools) -> str:
        # A request's template is used as the template text itself, never as a file path or a name
        # (a request must not make the server read its files).
        return self.renderer.template_for(chat_template, tools, template_text_only=True)

    def render(self, messages, *, tools=None, documents=None, add_generation_prompt=True,
               continue_final_message=False, chat_template=None, chat_template_kwargs=None) -> tuple[str, str]:
        """(template, prompt text) of one conversation."""
        if not messages:
            raise ValueError("messages must hold at least one message.")
        template = self.template_for(chat_template, tools)
        text = self.renderer.render(messages, template=template, tools=tools, documents=documents,
                                    add_generation_prompt=add_generation_prompt,
                                    continue_final_message=continue_final_message,
                                    chat_template_kwargs=chat_template_kwargs, limits=self.limits.render)
        self.limits.check_prompt_chars(text, "rendered chat prompt")
        return template, text

    def _parser(self, template: str, tools):
        return self.renderer.tool_parser_for(template, tools)

    def _prepare(self, req: ChatCompletionRequest):
        check_text(req)
        self.limits.check_samples(req.n, req.best_of)
        if req.stream and req.best_of is not None and req.best_of > req.n:
            raise ValueError("best_of must equal n when streaming (best_of > n picks the best sequences at the end).")
        if req.top_logprobs is not None and not req.logprobs and req.top_logprobs > 0:
            raise ValueError("top_logprobs requires logprobs to be true.")
        tools = self._tools(req)
        template, text = self.render(req.messages, tools=tools, documents=req.documents,
                                     add_generation_prompt=req.add_generation_prompt,
                                     continue_final_message=req.continue_final_message,
                                     chat_template=req.chat_template, chat_template_kwargs=req.chat_template_kwargs)
        ids = self.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
        if req.truncate_prompt_tokens is not None and req.truncate_prompt_tokens >= 1:
            ids = ids[-req.truncate_prompt_tokens:]
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = check_lengths(len(ids), max_tokens, self.max_model_len, "messages")
        bm = self.engine.engine.block_manager
        check_kv_capacity(len(ids), max_tokens, req.n, req.best_of, bm.block_size, bm.num_blocks)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.use_beam_search:  # the engine runs the beams (engine/beam_search.py)
            params = req.beam_search_params(max_tokens)
            parser = self._parser(template, tools)
        else:
            params = req.sampling_params(self.defaults, max_tokens, logprobs)
            apply_request_constraint(req, params, tools)  # response_format, structured_outputs, guided_*, tool_choice
            parser = (ForcedToolCallParser(req.tool_choice) if constrains(req.tool_choice)
                      else self._parser(template, tools))
        think_in_prompt = text.rstrip().endswith("<think>")
        return {"prompt_token_ids": ids, "prompt": text}, params, parser, think_in_prompt

    async def create(self, req: ChatCompletionRequest):
        """A ChatCompletionResponse, or (stream) an async iterator of SSE strings. Raises OpenAIError."""
        try:
            prompt, params, parser, think_in_prompt = await off_loop(self._prepare, req)
        except (ValueError, TypeError) as e:   # TypeError: message parts / template variables of the wrong kind
            raise bad_request(e) from None
        request_id = random_id("chatcmpl")
        gen = self.engine.generate(prompt, params, request_id)
        echo = _echoed_text(req)
        if req.stream:
            first = await prime([gen])
            return sse_stream(self._stream(req, request_id, params, chained([gen], first)[0],
                                           self._parser_factory(parser), think_in_prompt, echo))
        final: Optional[RequestOutput] = None
        try:
            async for _, out in merge_async_iterators([gen]):
                final = out
        except ValueError as e:
            raise bad_request(e) from None
        if final is None or not final.finished:
            raise OpenAIError("The request was aborted.", 500, "server_error")
        return self._response(req, request_id, final, parser, think_in_prompt, echo)

    @staticmethod
    def _parser_factory(parser):
        if parser is None:
            return None
        if isinstance(parser, ForcedToolCallParser):
            return parser.fresh
        cls, tokenizer = type(parser), parser.tokenizer
        return lambda: cls(tokenizer)

    # -- whole response -------------------------------------------------------------------------------------
    def _response(self, req, request_id: str, final: RequestOutput, parser, think_in_prompt: bool, echo: str):
        choices = []
        for o in final.outputs:
            reasoning, content = None, o.text
            if self.reasoning:
                reasoning, content = split_reasoning(o.text, think_in_prompt)
            finish_reason = o.finish_reason
            tool_calls = []
            if parser is not None and content:
                result = parser.extract_tool_calls(content)
                if result.tools_called and result.tool_calls:
                    tool_calls = [ToolCallModel(id=c.id, function=FunctionCallModel(
                        name=c.function.name, arguments=c.function.arguments)) for c in result.tool_calls]
                    content = result.content if result.content and result.content.strip() else None
                    finish_reason = "tool_calls"
            logprobs = self._logprobs(o.token_ids, o.logprobs, req.top_logprobs or 0) if req.logprobs else None
            if echo:
                content = echo + (content or "")
            choices.append(ChatCompletionResponseChoice(
                index=o.index, message=ChatMessageModel(role="assistant", content=content,
                                                        reasoning_content=reasoning, tool_calls=tool_calls),
                logprobs=logprobs, finish_reason=finish_reason, stop_reason=o.stop_reason))
        choices.sort(key=lambda c: c.index)
        prompt_tokens = len(final.prompt_token_ids)
        completion_tokens = sum(len(o.token_ids) for o in final.outputs)
        return ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                      usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                                      total_tokens=prompt_tokens + completion_tokens))

    def _logprobs(self, token_ids, positions, k: int) -> ChatCompletionLogProbs:
        content = []
        for j, tid in enumerate(token_ids):
            pos = positions[j] if positions is not None and j < len(positions) else None
            if pos is None:
                continue
            sampled, top = sampled_and_top(pos, tid, k)
            tok = token_text(self.tokenizer, tid, sampled)
            content.append(ChatLogProbsContent(
                token=tok, logprob=max(sampled.logprob, _MIN_LOGPROB) if sampled is not None else _MIN_LOGPROB,
                bytes=list(tok.encode("utf-8", errors="replace")),
                top_logprobs=[ChatLogProb(token=(t_text := token_text(self.tokenizer, t, e)),
                                          logprob=max(e.logprob, _MIN_LOGPROB),
                                          bytes=list(t_text.encode("utf-8", errors="replace"))) for t, e in top]))
        return ChatCompletionLogProbs(content=content)

    # -- streaming ------------------------------------------------------------------------------------------
    async def _stream(self, req, request_id: str, params, gen, new_parser, think_in_prompt: bool, echo: str) \
            -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        trackers: dict[int, DeltaTracker] = {}
        parsers: dict[int, object] = {}
        reasoners: dict[int, ReasoningStreamer] = {}
        called: dict[int, bool] = {}
        prompt_tokens = 0
        completion_tokens: dict[int, int] = {}

        def usage():
            c = sum(completion_tokens.values())
            return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=c, total_tokens=prompt_tokens + c)

        def chunk(index, delta, logprobs=None, finish_reason=None, stop_reason=None):
            fields = dict(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)
            if stop_reason is not None:
                fields["stop_reason"] = stop_reason
            resp = ChatCompletionStreamResponse(id=request_id, model=self.model_name,
                                                choices=[ChatCompletionResponseStreamChoice(**fields)])
            if continuous:
                resp.usage = usage()
            return sse(resp)

        async for _, out in merge_async_iterators([gen]):
            prompt_tokens = len(out.prompt_token_ids)
            for o in out.outputs:
                i = o.index
                if i not in trackers:
                    trackers[i] = DeltaTracker.for_params(params)
                    if new_parser is not None:
                        parsers[i] = new_parser()
                    if self.reasoning:
                        reasoners[i] = ReasoningStreamer(think_in_prompt)
                    yield chunk(i, DeltaMessageModel(role="assistant", content=""))
                    if echo:
                        yield chunk(i, DeltaMessageModel(content=echo))
                tracker = trackers[i]
                if tracker.finished:
                    continue
                new_text, a, b = tracker.advance(o)
                completion_tokens[i] = len(o.token_ids)
                done = o.finish_reason is not None
                reasoning_delta, content_delta = None, new_text
                if i in reasoners:
                    reasoning_delta, content_delta = reasoners[i].feed(new_text)
                    if done:
                        r2, c2 = reasoners[i].finish()
                        reasoning_delta = _cat(reasoning_delta, r2)
                        content_delta = _cat(content_delta, c2)
                tool_deltas = []
                if i in parsers:
                    parser = parsers[i]
                    msgs = [parser.extract_streaming(content_delta or "")]
                    if done:
                        msgs.append(parser.finish())
                    content_delta = None
                    for msg in msgs:
                        if msg is None:
                            continue
                        content_delta = _cat(content_delta, msg.content)
                        for d in msg.tool_calls:
                            called[i] = True
                            tool_deltas.append(DeltaToolCallModel(
                                index=d.index, id=d.id, type="function" if d.id is not None else None,
                                function=DeltaFunctionCall(name=d.name, arguments=d.arguments_delta)))
                delta = DeltaMessageModel()
                if content_delta:
                    delta.content = content_delta
                if reasoning_delta:
                    delta.reasoning_content = reasoning_delta
                if tool_deltas:
                    delta.tool_calls = tool_deltas
                logprobs = None
                if req.logprobs and b > a:
                    logprobs = self._logprobs(o.token_ids[a:b], (o.logprobs or [])[a:b],
                                              req.top_logprobs or 0)
                if not done and not delta.model_fields_set and logprobs is None:
                    continue
                finish_reason = ("tool_calls" if called.get(i) else o.finish_reason) if done else None
                yield chunk(i, delta, logprobs, finish_reason, o.stop_reason if done else None)
        if include_usage:
            yield sse(ChatCompletionStreamResponse(id=request_id, model=self.model_name, choices=[],
                                                   usage=usage()))


def _echoed_text(req: ChatCompletionRequest) -> str:
    """What `echo` puts before the answer: the last message's text when it has the response's role."""
    if not req.echo or not req.messages:
        return ""
    last = req.messages[-1]
    role = "assistant" if req.add_generation_prompt else last.get("role")
    if last.get("role") != role:
        return ""
    content = last.get("content") or ""
    if isinstance(content, list):  # content parts: their text, one part a line (as vLLM)
        content = "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def _cat(a: Optional[str], b: Optional[str]) -> Optional[str]:
    if not a:
        return b or None
    return a + (b or "")
