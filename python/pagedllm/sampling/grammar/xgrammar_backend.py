"""xgrammar (the default backend): GrammarCompiler over the model's tokenizer, one GrammarMatcher
per sequence."""
from __future__ import annotations

import json
from typing import Any

import torch

from pagedllm.sampling.grammar.backend import (GrammarBackend, GrammarMatcher, choice_literals, is_lark,
                                               without_additional_properties)
from pagedllm.sampling.structured_params import StructuredOutputsParams

# JSON-schema keywords xgrammar does not enforce (vLLM's list): under "auto" such a schema goes to
# llguidance instead of being silently loosened.
_UNSUPPORTED = {
    "integer": ("multipleOf",), "number": ("multipleOf",),
    "array": ("uniqueItems", "contains", "minContains", "maxContains"),
    "object": ("patternProperties", "propertyNames"),
}


def unsupported_json_features(schema: Any) -> list[str]:
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            types = node.get("type")
            types = types if isinstance(types, list) else [types]
            for t in types:
                found.extend(k for k in _UNSUPPORTED.get(t, ()) if k in node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return found


class _XgrMatcher(GrammarMatcher):
    def __init__(self, matcher):
        self._m = matcher

    def accept(self, token_id: int) -> bool:
        return self._m.accept_token(token_id)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self._m.is_terminated()

    def fork(self) -> "_XgrMatcher":
        return _XgrMatcher(self._m.fork())

    def rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)  # unlimited since xgrammar 0.1.2x (max_rollback_tokens is deprecated)


class XgrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)  # our cache is by spec

    @staticmethod
    def _schema(so: StructuredOutputsParams) -> dict:
        schema = so.schema()
        return without_additional_properties(schema) if so.disable_additional_properties else schema

    @staticmethod
    def _whitespace(so: StructuredOutputsParams) -> dict:
        # disable_any_whitespace: no whitespace at all (compact separators), as vLLM's users expect
        if so.disable_any_whitespace:
            return {"any_whitespace": False, "separators": (",", ":")}
        return {"any_whitespace": True}

    def validate(self, so: StructuredOutputsParams) -> None:
        xgr, kind = self._xgr, so.kind
        if so.whitespace_pattern is not None:
            raise ValueError("xgrammar does not support whitespace_pattern.")
        if kind == "json" and unsupported_json_features(self._schema(so)):
            raise ValueError("The provided JSON schema contains features not supported by xgrammar.")
        parse, message = {
            "json": (lambda: xgr.Grammar.from_json_schema(json.dumps(self._schema(so)), **self._whitespace(so)),
                     "Failed to transform json schema into a grammar: "),
            "regex": (lambda: xgr.Grammar.from_regex(so.regex), "Failed to transform regex into a grammar: "),
            "choice": (lambda: xgr.Grammar.from_ebnf(f"root ::= {choice_literals(so.choice or [])}"),
                       "Failed to transform choices into a grammar: "),
            "grammar": (lambda: xgr.Grammar.from_lark(so.grammar) if is_lark(so.grammar)
                        else xgr.Grammar.from_ebnf(so.grammar), "Invalid grammar specification. "),
            "structural_tag": (lambda: self._compile_structural_tag(so.structural_tag, compile_=False),
                               "Invalid structural tag specification. "),
            "json_object": (lambda: None, ""),
        }[kind]
        try:
            parse()
        except Exception as e:  # xgrammar raises its own error types (RuntimeError, InvalidJSONError ...)
            raise ValueError(f"{message}{e}") from e

    def _compile_structural_tag(self, text: str, compile_: bool = True):
        xgr = self._xgr
        spec = json.loads(text)
        if isinstance(spec, dict) and "structures" in spec:  # vLLM's older {"structures", "triggers"} form
            tags = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"])
                    for s in spec["structures"]]
            if compile_:
                return self._compiler.compile_structural_tag(tags, spec["triggers"])
            return xgr.Grammar.from_structural_tag(tags, spec["triggers"])
        if compile_:
            return self._compiler.compile_structural_tag(text)
        return xgr.Grammar.from_structural_tag(text)

    def compile(self, so: StructuredOutputsParams) -> Any:
        c, kind = self._compiler, so.kind
        if kind == "json":
            return c.compile_json_schema(json.dumps(self._schema(so)), **self._whitespace(so))
        if kind == "json_object":
            return c.compile_json_schema('{"type": "object"}', **self._whitespace(so))
        if kind == "regex":
            return c.compile_regex(so.regex)
        if kind == "choice":
            return c.compile_grammar(f"root ::= {choice_literals(so.choice)}")
        if kind == "grammar":
            return c.compile_lark(so.grammar) if is_lark(so.grammar) else c.compile_grammar(so.grammar)
        return self._compile_structural_tag(so.structural_tag)

    def matcher(self, compiled: Any) -> GrammarMatcher:
        return _XgrMatcher(self._xgr.GrammarMatcher(compiled))
