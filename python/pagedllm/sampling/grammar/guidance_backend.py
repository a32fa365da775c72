"""llguidance (the fallback backend: JSON-schema features and options xgrammar lacks). A grammar
is its serialized llguidance form; a matcher is an LLMatcher over the model's tokenizer."""
from __future__ import annotations

import json
from typing import Any

import torch

from pagedllm.sampling.grammar.backend import (GrammarBackend, GrammarMatcher, choice_literals, is_lark,
                                               without_additional_properties)
from pagedllm.sampling.structured_params import StructuredOutputsParams


class _GuidanceMatcher(GrammarMatcher):
    def __init__(self, matcher):
        self._m = matcher

    def accept(self, token_id: int) -> bool:
        if self._m.is_stopped():
            return False
        # try_consume_tokens leaves a refused token unconsumed and the matcher usable (consume_token would
        # put it in its error state): a refused speculative draft must not break the matcher.
        return self._m.try_consume_tokens([token_id]) == 1 and not self._m.is_error()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        from llguidance.torch import fill_next_token_bitmask
        fill_next_token_bitmask(self._m, bitmask, row)

    def is_terminated(self) -> bool:
        return self._m.is_stopped()

    def fork(self) -> "_GuidanceMatcher":
        return _GuidanceMatcher(self._m.deep_copy())

    def rollback(self, num_tokens: int) -> None:
        if not self._m.rollback(num_tokens):
            raise RuntimeError(f"llguidance could not roll back {num_tokens} tokens: {self._m.get_error()}")


class GuidanceBackend(GrammarBackend):
    name = "guidance"

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        import llguidance
        import llguidance.hf

        self._ll = llguidance
        eos = sorted(stop_token_ids) if stop_token_ids else None
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)

    def _grammar(self, so: StructuredOutputsParams) -> str:
        ll, kind = self._ll.LLMatcher, so.kind
        if kind in ("json", "json_object"):
            schema = so.schema() if kind == "json" else {"type": "object"}
            if so.disable_additional_properties:
                schema = without_additional_properties(schema)
            defaults: dict[str, Any] = {"whitespace_flexible": not so.disable_any_whitespace}
            if so.whitespace_pattern is not None:
                defaults["whitespace_pattern"] = so.whitespace_pattern
            return ll.grammar_from_json_schema(json.dumps(schema), defaults=defaults)
        if kind == "regex":
            return ll.grammar_from_regex(so.regex)
        if kind == "choice":
            return ll.grammar_from_lark(f"start: {choice_literals(so.choice)}")
        if kind == "grammar":
            from llguidance.gbnf_to_lark import gbnf_to_lark
            lark = so.grammar if is_lark(so.grammar) else gbnf_to_lark(so.grammar)
            return ll.grammar_from_lark(lark)
        raise ValueError("The guidance backend does not support structural_tag.")

    def validate(self, so: StructuredOutputsParams) -> None:
        try:
            grammar = self._grammar(so)
        except ValueError:
            raise
        except Exception as e:  # gbnf_to_lark / schema conversion errors
            raise ValueError(f"Grammar error: {e}") from e
        err = self._ll.LLMatcher.validate_grammar(grammar, self._tokenizer)  # "" when valid
        if err:
            raise ValueError(f"Grammar error: {err}")

    def compile(self, so: StructuredOutputsParams) -> Any:
        return self._grammar(so)

    def matcher(self, compiled: Any) -> GrammarMatcher:
        m = self._ll.LLMatcher(self._tokenizer, compiled, log_level=0)
        if m.is_error():
            raise ValueError(f"Grammar error: {m.get_error()}")
        return _GuidanceMatcher(m)
