"""Tool calls in any known format, for when neither the caller (tool_parser) nor the chat template names one.

How ambiguity is settled (the output decides, once, and then one format's parser reads all of it):
1. By how the output starts (leading whitespace skipped):
   "[TOOL_CALLS]" -> mistral, "<tool_call>" -> hermes, "<|python_tag|>" or "{" -> llama3_json,
   "<|python_start|>" or "[" -> pythonic. The whole-output formats (llama3_json, pythonic) are only calls when the
   entire output is calls, so an answer that merely starts with "{" or "[" stays content, as with those parsers.
   While the start could still grow into a longer marker ("[TOOL", "<tool_"), nothing is decided.
2. Otherwise the output starts as content, and the first complete "<tool_call>" or "[TOOL_CALLS]" in it decides
   between hermes and mistral; a marker of the other format after that one is content.
So one-shot and streaming agree: each decision is made on a prefix that no continuation can change.
"""
from __future__ import annotations

from typing import Any, Optional

from pagedllm.chat.tool_parsers.base import Event, ToolParser, partial_suffix_len, skip_ws
from pagedllm.chat.tool_parsers.registry import get_tool_parser, register_tool_parser

# Markers at the start of the output, longest first where one is a prefix of another ("[TOOL_CALLS]" before "[").
_STARTS = (("[TOOL_CALLS]", "mistral"), ("<tool_call>", "hermes"), ("<|python_tag|>", "llama3_json"),
           ("<|python_start|>", "pythonic"), ("{", "llama3_json"), ("[", "pythonic"))
# Markers that may follow content.
_TAGS = (("<tool_call>", "hermes"), ("[TOOL_CALLS]", "mistral"))
_CONTENT = "content"


def _by_start(rest: str, final: bool) -> Optional[str]:
    """The format the output's start names, _CONTENT for none, None while undecided (never when final)."""
    if not rest:
        return _CONTENT if final else None
    if not final and any(marker.startswith(rest) and marker != rest for marker, _ in _STARTS if len(marker) > 1):
        return None
    for marker, name in _STARTS:
        if rest.startswith(marker):
            return name
    return _CONTENT


@register_tool_parser("auto")
class AutoToolParser(ToolParser):

    def __init__(self, tokenizer: Any = None):
        super().__init__(tokenizer)
        self._delegate: Optional[ToolParser] = None   # the format's parser, once decided
        self._content_first = False                     # the output started as content: the first tag decides

    def _decide(self, name: str) -> ToolParser:
        self._delegate = get_tool_parser(name)(self.tokenizer)
        return self._delegate

    def _scan(self, text: str, final: bool) -> tuple[list[Event], int]:
        if self._delegate is not None:
            return self._delegate._scan(text, final)
        if not self._content_first:
            name = _by_start(text[skip_ws(text, 0):], final)
            if name is None:
                return [], 0
            if name != _CONTENT:
                return self._decide(name)._scan(text, final)
            self._content_first = True
        found = [(i, name) for i, name in ((text.find(tag), name) for tag, name in _TAGS) if i >= 0]
        if found:
            # Text before the first tag is content for that format's parser too: it reads from here on.
            return self._decide(min(found)[1])._scan(text, final)
        end = len(text) if final else len(text) - max(partial_suffix_len(text, tag) for tag, _ in _TAGS)
        return [text[:end]], end
