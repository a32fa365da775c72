"""The small interface every grammar backend implements (xgrammar, llguidance).

A backend turns a StructuredOutputsParams into a compiled grammar (tokenizer-specific, slow: done
off the engine thread) and a compiled grammar into matchers (one per sequence: cheap). `validate`
is the tokenizer-free parse the engine runs when a request is added, so a bad constraint fails its
own request at once, in vLLM's words.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from pagedllm.sampling.structured_params import StructuredOutputsParams


class GrammarMatcher(ABC):
    """One sequence's position in its grammar."""

    @abstractmethod
    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False when the grammar rejects it (the state is unchanged)."""

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (int32 [rows, ceil(vocab / 32)], bit set = allowed)."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """The grammar has ended (its stop token was accepted, or nothing can follow)."""

    @abstractmethod
    def fork(self) -> "GrammarMatcher":
        """An independent copy at the same position (n > 1 samples of one prompt)."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last num_tokens accepted tokens (speculative decoding walks its drafts, then returns)."""


class GrammarBackend(ABC):
    name: str

    @abstractmethod
    def validate(self, so: StructuredOutputsParams) -> None:
        """Raises ValueError (vLLM's wording) when this backend cannot take the constraint."""

    @abstractmethod
    def compile(self, so: StructuredOutputsParams) -> Any:
        """The compiled grammar (opaque; shared by every request with the same spec)."""

    @abstractmethod
    def matcher(self, compiled: Any) -> GrammarMatcher:
        """A fresh matcher at the start of the grammar."""


def is_lark(grammar: str) -> bool:
    """EBNF (GBNF) rules use '::='; Lark uses 'name: ...'. vLLM tells them apart the same way."""
    lines = [ln.split("#", 1)[0].strip() for ln in grammar.splitlines()]
    return not any("::=" in ln for ln in lines if ln and not ln.startswith("//"))


def choice_literals(choices: list[str]) -> str:
    """The choices as alternatives of double-quoted literals (valid in both EBNF and Lark)."""
    import json
    return " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def without_additional_properties(schema: Any) -> Any:
    """disable_additional_properties: every object schema that does not say otherwise gets
    additionalProperties false (recursively), as vLLM does."""
    if isinstance(schema, dict):
        out = {k: without_additional_properties(v) for k, v in schema.items()}
        if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [without_additional_properties(v) for v in schema]
    return schema
