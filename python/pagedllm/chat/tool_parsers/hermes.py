"""Hermes-style tool calls (Qwen2.5, Hermes 2/3, most ChatML models):

    Some text <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
    <tool_call>{"name": "get_time", "arguments": {}}</tool_call>

Each <tool_call>...</tool_call> holding one JSON object with a string "name" and an object "arguments" (or a string
holding a JSON object; "parameters" is accepted too, a missing one means {}) is a call. Everything else is content:
text before, between and after the calls, an unterminated <tool_call>, a block whose JSON is bad or of the wrong shape.
"""
from __future__ import annotations

from pagedllm.chat.tool_parsers.base import (MALFORMED, TaggedToolParser, call_from_object, json_loads)
from pagedllm.chat.tool_parsers.registry import register_tool_parser


@register_tool_parser("hermes")
class HermesToolParser(TaggedToolParser):
    START = "<tool_call>"
    END = "</tool_call>"

    def _parse_call_at(self, text: str, pos: int, final: bool):
        end = text.find(self.END, pos)
        if end < 0:
            # Unterminated so far: wait for the end tag; at the end of the output it is content.
            return MALFORMED if final else None
        try:
            call = call_from_object(json_loads(text[pos:end].strip()))
        except (ValueError, RecursionError):
            call = None
        if call is None:
            return MALFORMED
        return [call], end + len(self.END)
