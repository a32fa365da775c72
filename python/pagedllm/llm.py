"""LLM: the offline entry point (vLLM's), thin over LLMEngine."""
from __future__ import annotations

import itertools
import time
from typing import Optional, Sequence, Union

from pagedllm.config import EngineArgs
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.engine.multi_step import offline_scheduler_steps
from pagedllm.engine.request_failures import describe
from pagedllm.inputs import PromptType
from pagedllm.outputs import ChatCompletionOutput, RequestOutput
from pagedllm.pooling.llm_api import PoolingMixin
from pagedllm.sampling_params import SamplingParams


class RequestErrors(ValueError):
    """Raised by LLM.generate after every valid request finished when some were invalid.
    .errors: {prompt index: message}; .outputs: the RequestOutputs in input order, None where invalid."""

    def __init__(self, errors: dict[int, str], outputs: list[Optional[RequestOutput]]):
        self.errors, self.outputs = errors, outputs
        detail = "; ".join(f"prompt {i}: {msg}" for i, msg in errors.items())
        super().__init__(detail if len(errors) > 1 else next(iter(errors.values())))


class LLM(PoolingMixin):  # PoolingMixin: embed, classify, score, reward, encode (pooling/llm_api.py)
    def __init__(self, model: Optional[str] = None, **kwargs):
        unknown = sorted(set(kwargs) - EngineArgs.field_names())
        if unknown:
            raise TypeError(f"LLM() got an unexpected keyword argument '{unknown[0]}'")
        args = EngineArgs(model=model, **kwargs)
        if args.num_scheduler_steps is None:  # offline: no stream to keep fine-grained (engine/multi_step.py)
            args.num_scheduler_steps = offline_scheduler_steps(args)
        from pagedllm.pooling.engine import PoolingEngine, wants_pooling
        self.llm_engine = PoolingEngine(args) if wants_pooling(args) else LLMEngine.from_engine_args(args)
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.get_tokenizer()

    def get_default_sampling_params(self) -> SamplingParams:
        return self.llm_engine.get_default_sampling_params()

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]], sampling_params=None, *,
                 use_tqdm: bool = True, **_unused) -> list[RequestOutput]:
        if getattr(self.llm_engine, "is_pooling", False):
            raise ValueError("LLM.generate() is only supported for generative models. Try passing "
                             "`--runner generate` to use the model as a generative model.")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError("The lengths of prompts and params must be the same.")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params] * len(prompts)
        return self._run(prompts, params_list, use_tqdm)

    def beam_search(self, prompts, params, lora_request=None, use_tqdm: bool = False,
                    concurrency_limit: Optional[int] = None) -> list:
        """vLLM's LLM.beam_search: one BeamSearchOutput per prompt (a str, TextPrompt or TokensPrompt), its
        params.beam_width sequences best first. The beams run inside the engine as forked sequences that
        share KV blocks (engine/beam_search.py); the search is transformers' (num_beams, length_penalty)."""
        from pagedllm.beam_search import BeamSearchOutput, BeamSearchSequence
        if lora_request is not None:
            raise ValueError("pagedllm does not support LoRA adapters.")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        limit = concurrency_limit or len(prompts)
        results: list[BeamSearchOutput] = []
        for first in range(0, len(prompts), max(limit, 1)):
            outs = self._run(prompts[first:first + limit], [params] * len(prompts[first:first + limit]), use_tqdm)
            for out in outs:
                results.append(BeamSearchOutput([
                    BeamSearchSequence(tokens=list(out.prompt_token_ids) + list(o.token_ids),
                                       cum_logprob=o.cumulative_logprob, text=o.text,
                                       finish_reason=o.finish_reason, stop_reason=o.stop_reason)
                    for o in out.outputs]))
        return results

    def chat(self, messages, sampling_params=None, *, use_tqdm: bool = True, chat_template=None,
             chat_template_content_format: str = "auto", add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: Optional[list] = None, documents: Optional[list] = None,
             chat_template_kwargs: Optional[dict] = None, tool_parser: Optional[str] = None,
             mm_processor_kwargs: Optional[dict] = None, tool_choice=None) -> list[ChatCompletionOutput]:
        """Answers one conversation (a list of {"role", "content"} messages) or a list of conversations, in
        order: each is rendered with the chat template (the chat_template argument: a template, a path to a
        .jinja file or a shipped template's name; else the tokenizer's; else pagedllm's for GPT-2 / DialoGPT),
        generated with sampling_params (one, or a list with one per conversation), and read back as a
        ChatCompletionOutput: .message (content, tool_calls, reasoning_content), .finish_reason ("tool_calls"
        when tool calls were parsed) and vLLM's .outputs. tools (OpenAI function format) and documents
        ([{"title", "text"}]) reach the template; chat_template_kwargs are further template variables
        (e.g. enable_thinking); tool_parser names the parser ("hermes", "llama3_json", "mistral",
        "pythonic"), else the template's format picks one when tools are given. tool_choice: "auto" (the
        default with tools), "none" (tools left out of the prompt), "required" (at least one call, each one
        of the tools with its parameters' schema) or {"type": "function", "function": {"name": ...}} (one
        call of that function): the last two constrain the output with structured outputs."""
        from pagedllm.chat.chat import chat
        return chat(self, messages, sampling_params, use_tqdm=use_tqdm, chat_template=chat_template,
                    chat_template_content_format=chat_template_content_format,
                    add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                    tools=tools, documents=documents, chat_template_kwargs=chat_template_kwargs,
                    tool_parser=tool_parser, mm_processor_kwargs=mm_processor_kwargs, tool_choice=tool_choice)

    def _run(self, prompts: list, params_list: list, use_tqdm: bool) -> list[RequestOutput]:
        """Every valid request runs to the end; an invalid one (add_request's ValueError) or one that fails
        inside a step fails alone. The engine is left empty on every path, an interrupt included."""
        engine = self.llm_engine
        index_of: dict[str, int] = {}
        errors: dict[int, str] = {}
        try:
            for i, (prompt, params) in enumerate(zip(prompts, params_list)):
                rid = str(next(self._counter))
                try:
                    engine.add_request(rid, prompt, params)
                    index_of[rid] = i
                except Exception as e:  # noqa: BLE001 - a bad request fails alone (ValueError: bad input)
                    errors[i] = describe(e)
            finished = self._run_engine(index_of, errors, use_tqdm)
        finally:
            engine.abort_request([rid for rid in index_of if rid in engine.requests])
            engine.pop_request_errors()
        outputs: list[Optional[RequestOutput]] = [None] * len(prompts)
        for rid, i in index_of.items():
            outputs[i] = finished.get(rid)
        if errors:
            raise RequestErrors(dict(sorted(errors.items())), outputs)
        return outputs

    def _run_engine(self, index_of: dict[str, int], errors: dict[int, str], use_tqdm: bool) -> dict[str, RequestOutput]:
        """Steps until index_of's requests are done; a request's failure goes to errors[its prompt index].
        A step failure that no request was blamed for fails the requests still running with it."""
        engine = self.llm_engine
        total = len(index_of)
        bar = None
        if use_tqdm and total:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True,
                       postfix="est. speed input: 0.00 toks/s, output: 0.00 toks/s")
        done: dict[str, RequestOutput] = {}
        start = time.perf_counter()
        prompt_tokens = out_tokens = 0
        try:
            while engine.has_unfinished_requests():
                try:
                    outputs = engine.step()
                except Exception as e:  # noqa: BLE001 - reported per request below
                    for rid in index_of:
                        if rid not in done and rid in engine.requests:
                            errors[index_of[rid]] = describe(e)
                    engine.abort_request(list(engine.requests))
                    break
                finally:
                    for rid, exc in engine.pop_request_errors().items():
                        if rid in index_of:
                            errors[index_of[rid]] = describe(exc)
                for out in outputs:
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            prompt_tokens += len(out.prompt_token_ids)
                            out_tokens += sum(len(o.token_ids) for o in out.outputs)
                            elapsed = time.perf_counter() - start
                            bar.postfix = (f"est. speed input: {prompt_tokens / elapsed:.2f} toks/s, "
                                           f"output: {out_tokens / elapsed:.2f} toks/s")
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return done
