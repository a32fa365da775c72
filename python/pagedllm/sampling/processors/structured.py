"""Structured outputs as a SamplingProcessor: the request's grammar compiles off the engine thread
(the request is not scheduled until it is ready); each sequence then holds a matcher that fills its
row of the token bitmask, follows every sampled token, forks with n > 1, and ends the sequence when
the grammar ends. With a reasoning parser the constraint starts after the reasoning's end tag."""
from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Optional

from pagedllm.sampling.grammar.backend import GrammarMatcher
from pagedllm.sampling.grammar.manager import StructuredOutputManager
from pagedllm.sampling.processors.base import SamplingBatch, SamplingProcessor
from pagedllm.sampling.structured_params import REASONING_PARSERS, StructuredOutputsParams, structured_of

logger = logging.getLogger(__name__)


def _ends_with(ids: list[int], tail: list[int]) -> bool:
    return bool(tail) and len(ids) >= len(tail) and ids[len(ids) - len(tail):] == tail


def _last_index(ids: list[int], sub: list[int]) -> int:
    n = len(sub)
    for i in range(len(ids) - n, -1, -1):
        if ids[i:i + n] == sub:
            return i
    return -1


@dataclass
class GrammarState:
    so: StructuredOutputsParams
    compiled: Future
    manager: StructuredOutputManager
    reasoning_end: list[int] = field(default_factory=list)   # token ids of "</think>" ([] : no reasoning)
    reasoning_ended: bool = True
    recent: list[int] = field(default_factory=list)           # tail of the reasoning, to find its end
    matcher: Optional[GrammarMatcher] = None
    terminated: bool = False

    def get_matcher(self) -> GrammarMatcher:
        if self.matcher is None:
            self.matcher = self.manager.matcher(self.so, self.compiled.result())
        return self.matcher


class StructuredOutputs(SamplingProcessor):
    name = "structured_outputs"

    def __init__(self, manager: StructuredOutputManager, tokenizer):
        self.manager = manager
        parser = manager.config.reasoning_parser
        self.reasoning_end: list[int] = []
        self.reasoning_start: list[int] = []
        if parser is not None and tokenizer is not None:
            self.reasoning_end = tokenizer.encode(REASONING_PARSERS[parser], add_special_tokens=False)
            self.reasoning_start = tokenizer.encode("<think>", add_special_tokens=False)

    def validate(self, params) -> None:
        """At add_request: a bad constraint fails its own request, in vLLM's words."""
        so = structured_of(params)
        if so is not None:
            self.manager.validate(so)

    def added(self, params, prompt_token_ids) -> Optional[Any]:
        so = structured_of(params)
        if so is None:
            return None
        if so._backend is None:
            self.manager.validate(so)
        ended = True
        if self.reasoning_end:
            # vLLM's reasoning-aware mode: a prompt that already closed its reasoning (a template that
            # turns thinking off writes "<think></think>") is constrained from the first token.
            end_at = _last_index(prompt_token_ids, self.reasoning_end)
            ended = end_at >= 0 and end_at > _last_index(prompt_token_ids, self.reasoning_start)
        return GrammarState(so, self.manager.compile_async(so), self.manager, self.reasoning_end, ended)

    def ready(self, state: GrammarState) -> bool:
        return state.compiled.done()

    def apply(self, batch: SamplingBatch, rows: list[int], states: list[GrammarState]) -> None:
        bitmask = None
        for i, st in zip(rows, states):
            if not st.reasoning_ended or st.terminated:
                continue
            if bitmask is None:
                bitmask = batch.token_bitmask()
            st.get_matcher().fill_bitmask(bitmask, i)

    def accepted(self, state: GrammarState, token_id: int) -> bool:
        if state.terminated:
            return True
        if not state.reasoning_ended:
            state.recent = (state.recent + [token_id])[-len(state.reasoning_end):]
            state.reasoning_ended = _ends_with(state.recent, state.reasoning_end)
            return False
        matcher = state.get_matcher()
        if not matcher.accept(token_id):
            # Only possible when another feature forced a token the grammar forbids (e.g. min_tokens
            # hid the only token the grammar allowed): the output cannot continue within the grammar.
            logger.warning("structured outputs: token %d is not allowed by the grammar; finishing", token_id)
            state.terminated = True
            return True
        state.terminated = matcher.is_terminated()
        return state.terminated

    def forked(self, state: GrammarState) -> GrammarState:
        return GrammarState(state.so, state.compiled, state.manager, state.reasoning_end, state.reasoning_ended,
                            list(state.recent), state.matcher.fork() if state.matcher is not None else None,
                            state.terminated)
