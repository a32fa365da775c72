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


@dataclass
class GrammarState:
    so: StructuredOutputsParams
    compiled: Future
    manager: StructuredOutputManager
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
        self.tokenizer = tokenizer
        parser = manager.config.reasoning_parser
        self.end_tag: Optional[str] = REASONING_PARSERS[parser] if parser is not None else None
        # tokens of the reasoning's tail whose text is searched for the tag
        self.tail_tokens = len(tokenizer.encode(self.end_tag, add_special_tokens=False)) + 4 \
            if self.end_tag is not None and tokenizer is not None else 0

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
        if self.end_tag is not None:
            # vLLM's reasoning-aware mode: a prompt that already closed its reasoning (a template that
            # turns thinking off writes "<think></think>") is constrained from the first token.
            text = self.tokenizer.decode(prompt_token_ids)
            ended = text.rfind(self.end_tag) > text.rfind("<think>")
        return GrammarState(so, self.manager.compile_async(so), self.manager, ended)

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

    def apply_drafts(self, batch: SamplingBatch, rows: list[int], state: GrammarState, drafts: list[int],
                     positions: list[int]) -> int:
        # Row at position p gets the matcher's mask after drafts[:p]: the mask plain decoding would use there.
        return self._walk(state, drafts, dict(zip(positions, rows)), batch)

    def valid_drafts(self, state: GrammarState, drafts: list[int]) -> int:
        return self._walk(state, drafts, {}, None)

    def _walk(self, state: GrammarState, drafts: list[int], rows: dict[int, int], batch: Optional[SamplingBatch]
              ) -> int:
        """Follows the drafts from the sequence's state as `accepted` would (the reasoning's end too), filling
        batch's bitmask row rows[p] at each position p the grammar constrains, and rolls the matcher back:
        the state is unchanged. Returns how many leading drafts may be emitted: it stops before the first
        draft the grammar refuses and after one that ends the grammar (the sequence ends there)."""
        if state.terminated:  # the sequence is ending: nothing to mask (as apply)
            return len(drafts)
        ended, recent = state.reasoning_ended, state.recent
        matcher = state.get_matcher() if ended else None
        consumed, valid = 0, len(drafts)
        try:
            for p in range(len(drafts) + 1):
                if ended and p in rows:
                    matcher.fill_bitmask(batch.token_bitmask(), rows[p])
                if p == len(drafts):
                    break
                token = drafts[p]
                if not ended:  # the reasoning's end tag, found as `accepted` finds it
                    recent = (recent + [token])[-self.tail_tokens:]
                    ended = self.end_tag in self.tokenizer.decode(recent)
                    if ended:
                        matcher = state.get_matcher()
                    continue
                if not matcher.accept(token):
                    valid = p
                    break
                consumed += 1
                if matcher.is_terminated():
                    valid = p + 1
                    break
        finally:
            if consumed:
                matcher.rollback(consumed)
        return valid

    def accepted(self, state: GrammarState, token_id: int) -> bool:
        if state.terminated:
            return True
        if not state.reasoning_ended:
            # The tag is found in the text of the last few tokens: a model may spell it in other tokens
            # than the tag's own encoding. The constraint applies from the next token on.
            state.recent = (state.recent + [token_id])[-self.tail_tokens:]
            state.reasoning_ended = self.end_tag in self.tokenizer.decode(state.recent)
            if state.reasoning_ended:
                state.recent = []
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
        return GrammarState(state.so, state.compiled, state.manager, state.reasoning_ended, list(state.recent),
                            state.matcher.fork() if state.matcher is not None else None,
                            state.terminated)
