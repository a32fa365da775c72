"""Llama 3.x JSON tool calls: the whole output (optionally after "<|python_tag|>") is one JSON object

    {"name": "get_weather", "parameters": {"city": "Paris"}}

or several separated by ";" ('{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"x": 1}}').
"arguments" is accepted in place of "parameters"; one of the two is required (a JSON answer that merely has a
"name" key is not a call). Anything else, including text around the objects, is content: the output as it is.
"""
from __future__ import annotations

from pagedllm.chat.tool_parsers.base import (JSON_DECODER, WholeOutputToolParser, call_from_object, skip_ws)
from pagedllm.chat.tool_parsers.registry import register_tool_parser

PYTHON_TAG = "<|python_tag|>"


@register_tool_parser("llama3_json")
class Llama3JsonToolParser(WholeOutputToolParser):

    def _classify(self, text: str, final: bool):
        pos = skip_ws(text, 0)
        rest = text[pos:]
        if not final and PYTHON_TAG.startswith(rest):   # nothing yet, or a partial "<|python_tag|>"
            return None
        if rest.startswith(PYTHON_TAG):
            pos += len(PYTHON_TAG)
        calls = []
        while True:
            pos = skip_ws(text, pos)
            if pos == len(text):
                # Complete only at the end of the output, and only with at least one call (a trailing ";" is fine).
                if not final:
                    return None
                return calls if calls else self.CONTENT
            if text[pos] != "{":
                return self.CONTENT
            try:
                obj, pos = JSON_DECODER.raw_decode(text, pos)
            except (ValueError, RecursionError):
                # Bad JSON, or JSON not finished yet: only the end of the output tells them apart.
                return self.CONTENT if final else None
            call = call_from_object(obj, arg_keys=("parameters", "arguments"), require_arguments=True)
            if call is None:
                return self.CONTENT
            calls.append(call)
            pos = skip_ws(text, pos)
            if pos == len(text):
                return calls if final else None
            if text[pos] != ";":
                return self.CONTENT
            pos += 1
