"""Mistral tool calls: "[TOOL_CALLS]" then a JSON list of calls

    Some text[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "f", "arguments": {}}]

or, Mistral's v11 tokenizer form, one call per marker: "[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}", with
the model's own call id in later versions: "[TOOL_CALLS]get_weather[CALL_ID]a1b2C3d4E[ARGS]{...}" (that id is
the call's id).
A single JSON object after the marker is accepted too. Text before the marker (and after the calls) is content; a
marker not followed by well-formed calls (bad JSON, wrong shape, nothing) is content with what follows it.
"""
from __future__ import annotations

import re

from pagedllm.chat.tool_parsers.base import (JSON_DECODER, MALFORMED, TaggedToolParser, call_from_object,
                                             arguments_to_json, ParsedCall, skip_ws)
from pagedllm.chat.tool_parsers.registry import register_tool_parser

ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")
_ID_RE = re.compile(r"[A-Za-z0-9]+")


def _decode_at(text: str, pos: int, final: bool):
    """raw_decode at pos -> (value, end); None: not decodable yet (or bad, which only the end tells apart)."""
    try:
        return JSON_DECODER.raw_decode(text, pos)
    except (ValueError, RecursionError):
        return MALFORMED if final else None


@register_tool_parser("mistral")
class MistralToolParser(TaggedToolParser):
    START = "[TOOL_CALLS]"

    def _parse_call_at(self, text: str, pos: int, final: bool):
        pos = skip_ws(text, pos)
        if pos == len(text):
            return MALFORMED if final else None
        if text[pos] in "[{":
            decoded = _decode_at(text, pos, final)
            if decoded is None or decoded is MALFORMED:
                return decoded
            value, end = decoded
            items = value if isinstance(value, list) else [value]
            calls = [call_from_object(item) for item in items]
            if not calls or any(call is None for call in calls):
                return MALFORMED
            return calls, end

        # v11: name[ARGS]{...} or name[CALL_ID]id[ARGS]{...}
        m = _NAME_RE.match(text, pos)
        if m is None:
            return MALFORMED
        after, call_id = m.end(), None
        if text.startswith(CALL_ID, after):
            id_match = _ID_RE.match(text, after + len(CALL_ID))
            if id_match is None:
                return MALFORMED if final or after + len(CALL_ID) < len(text) else None
            after, call_id = id_match.end(), id_match.group(0)
        rest = text[after:]
        if after == len(text) or (not final and (ARGS.startswith(rest) or (call_id is None and CALL_ID.startswith(rest)))):
            return MALFORMED if final else None     # the name, the id or a marker may still be growing
        if not text.startswith(ARGS, after):
            return MALFORMED
        pos = skip_ws(text, after + len(ARGS))
        if pos == len(text):
            return MALFORMED if final else None
        if text[pos] != "{":
            return MALFORMED
        decoded = _decode_at(text, pos, final)
        if decoded is None or decoded is MALFORMED:
            return decoded
        value, end = decoded
        arguments = arguments_to_json(value)
        if arguments is None:
            return MALFORMED
        return [ParsedCall(m.group(0), arguments, call_id)], end
