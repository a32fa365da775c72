"""Prompt types accepted by LLM.generate and LLMEngine.add_request (vLLM's TypedDicts)."""
from __future__ import annotations

from typing import Union

from typing_extensions import NotRequired, TypedDict


class TextPrompt(TypedDict):
    prompt: str
    multi_modal_data: NotRequired[dict]
    mm_processor_kwargs: NotRequired[dict]
    cache_salt: NotRequired[str]


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
    prompt: NotRequired[str]
    multi_modal_data: NotRequired[dict]
    cache_salt: NotRequired[str]


PromptType = Union[str, TextPrompt, TokensPrompt]
