"""Prompt types accepted by LLM.generate and LLMEngine.add_request (vLLM's TypedDicts)."""
from __future__ import annotations

import numbers
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


def token_id_list(ids) -> list[int]:
    """A TokensPrompt's prompt_token_ids as a list of Python ints; ValueError for anything else (a float, a
    bool, a string, a nested list) so a bad prompt fails its own request before it reaches the engine."""
    if isinstance(ids, (str, bytes, dict)) or not hasattr(ids, "__iter__"):
        raise ValueError(f"prompt_token_ids must be a list of integers, got {type(ids).__name__}.")
    ids = list(ids)
    bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, numbers.Integral)), _NONE)
    if bad is not _NONE:
        raise ValueError(f"prompt_token_ids must contain only integers, got {bad!r}.")
    return [int(t) for t in ids]


def checked_prompt_text(text) -> str:
    """A prompt's text, refused with a ValueError when it is not a str or cannot be UTF-8 encoded (a lone
    surrogate such as '\\ud800' would otherwise fail inside the tokenizer with its own message)."""
    if not isinstance(text, str):
        raise ValueError(f"A text prompt must be a string, got {type(text).__name__}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"The prompt is not valid Unicode: it contains a lone surrogate at position {e.start} "
                         f"({text[e.start]!r}).") from None
    return text


_NONE = object()
