"""The tool-parser interface, its result types, and the machinery every parser shares.

A parser turns generated text into (content, tool calls), in one shot or incrementally:

    parser = get_tool_parser("hermes")()
    parser.extract_tool_calls(text)            -> ExtractedToolCalls (stateless: any instance will do)

    parser = get_tool_parser("hermes")()       # one instance per request
    for delta in text_deltas:
        msg = parser.extract_streaming(delta)  -> Optional[DeltaMessage]
    msg = parser.finish()                      -> Optional[DeltaMessage]

Streaming equals one shot: the streamed content deltas concatenate to the one-shot content ("" where it is None)
and the streamed tool calls (index, name, concatenated arguments) equal the one-shot calls; only ids differ.

How that is guaranteed. Each parser writes one method, `_scan(text, final)`, over the part of the output not
yet resolved. It returns events (content strings and parsed calls, in order) for the longest prefix of `text`
whose meaning no continuation can change, and how many characters that prefix holds; the rest waits for more
text. With final=True (end of output) it resolves everything. The one-shot path is the streaming path fed the
whole text at once, so splitting the text differently can only change *when* events come out, never *what*
they are, provided `_scan` only resolves what is settled (the tests feed every split of many samples).

The price of that equality: a call is emitted whole (its id, name and full arguments in one DeltaToolCall)
once it is known to be well formed, since a call streamed piecewise could still turn out malformed, and
malformed calls belong to the content. Text that might still become a call (a partial "<tool_call>" tag, an
unfinished JSON object) is held back until it is settled.
"""
from __future__ import annotations

import abc
import json
import math
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from pagedllm.outputs import FunctionCall, ToolCall


@dataclass
class ExtractedToolCalls:
    """One-shot result: content keeps only the text outside the calls (None if empty or whitespace)."""
    tools_called: bool
    tool_calls: list[ToolCall]
    content: Optional[str]


@dataclass
class DeltaToolCall:
    """One streamed piece of tool call number `index` (0-based, in output order). The first piece of a call
    carries its id and name; later pieces (if any) carry id=None, name=None and append to its arguments."""
    index: int
    id: Optional[str]
    name: Optional[str]
    arguments_delta: str


@dataclass
class DeltaMessage:
    """What one text delta adds to the message (OpenAI streaming shape)."""
    content: Optional[str] = None
    tool_calls: list[DeltaToolCall] = field(default_factory=list)


def make_tool_call_id() -> str:
    """A fresh tool call id: "chatcmpl-tool-" + 32 hex digits (uuid4), as vLLM makes them."""
    return "chatcmpl-tool-" + uuid.uuid4().hex


@dataclass
class ParsedCall:
    """A well-formed call found by a parser's _scan: a name and its arguments as a JSON object string, and the
    call's id when the model wrote one (mistral's [CALL_ID]); else the parser makes one."""
    name: str
    arguments: str
    id: Optional[str] = None


Event = Union[str, ParsedCall]

MALFORMED = object()


# --------------------------------------------------------------------------------------------------------------
# Helpers shared by the parsers.

def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _finite_float(s: str) -> float:
    value = float(s)
    if not math.isfinite(value):
        raise ValueError(f"{s} does not fit a finite float")
    return value


# Strict JSON: NaN / Infinity / 1e999 would come back out of json.dumps as non-JSON, so they are malformed.
JSON_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def json_loads(s: str) -> Any:
    """json.loads that raises ValueError on anything json.dumps could not write back as JSON."""
    return JSON_DECODER.decode(s)


def dump_arguments(arguments: dict) -> str:
    """Arguments object -> the JSON string of FunctionCall.arguments (non-ASCII kept as is)."""
    return json.dumps(arguments, ensure_ascii=False)


def arguments_to_json(arguments: Any) -> Optional[str]:
    """Normalize a call's arguments: an object, or a string holding a JSON object, gives its JSON string;
    anything else (a list, a number, a string that is not a JSON object) gives None (malformed)."""
    if isinstance(arguments, str):
        try:
            arguments = json_loads(arguments)
        except (ValueError, RecursionError):
            return None
    if not isinstance(arguments, dict):
        return None
    return dump_arguments(arguments)


def call_from_object(obj: Any, arg_keys: tuple[str, ...] = ("arguments", "parameters"),
                     require_arguments: bool = False) -> Optional[ParsedCall]:
    """{"name": str, "<one of arg_keys>": object} -> ParsedCall, anything else -> None. Without any of arg_keys the
    call takes no arguments ("{}") unless require_arguments."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    for key in arg_keys:
        if key in obj:
            arguments = arguments_to_json(obj[key])
            return None if arguments is None else ParsedCall(name.strip(), arguments)
    return None if require_arguments else ParsedCall(name.strip(), "{}")


def partial_suffix_len(text: str, token: str, start: int = 0) -> int:
    """Length of the longest suffix of text[start:] that is a proper prefix of token (text that could still
    grow into token, so must wait)."""
    for k in range(min(len(token) - 1, len(text) - start), 0, -1):
        if text.endswith(token[:k]):
            return k
    return 0


def skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


class WhitespaceGate:
    """Streams text while deciding, as one-shot code would on the whole text, what to do with whitespace:
    drop_leading / drop_trailing strip it; otherwise whitespace-only text yields nothing (the one-shot value
    is None) and leading whitespace is held until something else arrives, then passed on with it.
      (False, False) ~ s if s.strip() else None;  (True, False) ~ s.lstrip() or None;  (True, True) ~ s.strip() or None
    """

    def __init__(self, drop_leading: bool = False, drop_trailing: bool = False):
        self.drop_leading = drop_leading
        self.drop_trailing = drop_trailing
        self.started = False   # some non-whitespace text went out
        self._held = ""

    def feed(self, text: str) -> str:
        if not text:
            return ""
        if self.started and not self.drop_trailing:
            return text
        text = self._held + text
        self._held = ""
        if not text.strip():      # nothing but whitespace so far (leading), or since the last text (trailing)
            self._held = text
            return ""
        if not self.started:
            self.started = True
            if self.drop_leading:
                text = text.lstrip()
        if self.drop_trailing:
            body = text.rstrip()
            self._held = text[len(body):]
            text = body
        return text

    def finish(self) -> str:
        # Held text is whitespace that is leading (nothing else came: None) or trailing with drop_trailing.
        self._held = ""
        return ""

    @staticmethod
    def apply(text: str, drop_leading: bool = False, drop_trailing: bool = False) -> Optional[str]:
        """The one-shot equivalent."""
        if not text.strip():
            return None
        if drop_leading:
            text = text.lstrip()
        if drop_trailing:
            text = text.rstrip()
        return text


# --------------------------------------------------------------------------------------------------------------

class ToolParser(abc.ABC):
    """Base class of the tool-call parsers. Subclasses implement `_scan` (see the module docstring)."""

    name: str = ""   # the registry name, set by @register_tool_parser

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer   # unused by the text parsers here; kept for parsers that need token ids
        self._buffer = ""            # output text not yet resolved by _scan
        self._gate = WhitespaceGate()
        self._num_calls = 0
        self._finished = False
        self._broken = False         # _scan raised: everything from there on is content

    @abc.abstractmethod
    def _scan(self, text: str, final: bool) -> tuple[list[Event], int]:
        """Resolve the settled prefix of `text` (the unresolved output so far): return its events in order and its
        length. final=True: the output ends here, resolve all of it (return len(text)). Must not raise for any
        text; per-request state (e.g. "this output is plain content") may live on self."""

    # ---- one shot -------------------------------------------------------------------------------------------
    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        """Parse a whole output. Never raises: malformed calls stay in the content."""
        fresh = type(self)(self.tokenizer)
        content: list[str] = []
        calls: list[ToolCall] = []
        for msg in (fresh.extract_streaming(text), fresh.finish()):
            if msg is None:
                continue
            if msg.content:
                content.append(msg.content)
            for d in msg.tool_calls:
                if d.id is not None:
                    calls.append(ToolCall(id=d.id, function=FunctionCall(name=d.name, arguments=d.arguments_delta)))
                else:
                    calls[d.index].function.arguments += d.arguments_delta
        return ExtractedToolCalls(tools_called=bool(calls), tool_calls=calls, content="".join(content) or None)

    # ---- streaming ------------------------------------------------------------------------------------------
    def extract_streaming(self, delta_text: str) -> Optional[DeltaMessage]:
        """Feed the next text delta of this request's output; returns what it settles (None: nothing yet)."""
        if self._finished:
            raise RuntimeError("extract_streaming() after finish(): use one parser instance per request")
        self._buffer += delta_text
        return self._advance(final=False)

    def finish(self) -> Optional[DeltaMessage]:
        """The output is complete: flush everything still held back. Call once."""
        if self._finished:
            return None
        msg = self._advance(final=True)
        self._finished = True
        return msg

    def _advance(self, final: bool) -> Optional[DeltaMessage]:
        events: list[Event]
        if self._broken:
            events, used = [self._buffer], len(self._buffer)
        else:
            try:
                events, used = self._scan(self._buffer, final)
                if final and used != len(self._buffer):
                    raise AssertionError(f"{type(self).__name__}._scan left text unresolved at the end")
            except Exception:   # a parser bug must not lose text: the rest of the output becomes content
                self._broken = True
                events, used = [self._buffer], len(self._buffer)
        self._buffer = self._buffer[used:]

        content: list[str] = []
        deltas: list[DeltaToolCall] = []
        for event in events:
            if isinstance(event, ParsedCall):
                deltas.append(DeltaToolCall(index=self._num_calls, id=event.id or make_tool_call_id(), name=event.name,
                                            arguments_delta=event.arguments))
                self._num_calls += 1
            elif event:
                content.append(self._gate.feed(event))
        if final:
            content.append(self._gate.finish())
        text = "".join(content)
        if not text and not deltas:
            return None
        return DeltaMessage(content=text or None, tool_calls=deltas)


class TaggedToolParser(ToolParser):
    """Calls sit between a start marker and something that ends them (hermes: "<tool_call>...</tool_call>",
    mistral: "[TOOL_CALLS]" + JSON); text between calls is content. Subclasses set START and implement
    `_parse_call_at(text, pos, final)`, pos being just past START: it returns (events, end) for a well-formed
    call block, MALFORMED if the block is not one (START then counts as content and scanning resumes after it),
    or None if more text is needed to know (never when final)."""

    START: str = ""

    @abc.abstractmethod
    def _parse_call_at(self, text: str, pos: int, final: bool):
        ...

    def _scan(self, text: str, final: bool) -> tuple[list[Event], int]:
        events: list[Event] = []
        pos = 0
        while True:
            i = text.find(self.START, pos)
            if i < 0:
                end = len(text) if final else len(text) - partial_suffix_len(text, self.START, pos)
                events.append(text[pos:end])
                return events, end
            events.append(text[pos:i])
            result = self._parse_call_at(text, i + len(self.START), final)
            if result is None:            # undecided: wait, starting from the marker
                return events, i
            if result is MALFORMED:      # the marker is plain text; look for the next one after it
                events.append(self.START)
                pos = i + len(self.START)
                continue
            call_events, pos = result
            events.extend(call_events)


class WholeOutputToolParser(ToolParser):
    """The output as a whole is either tool calls (llama3_json, pythonic) or content. Subclasses implement
    `_classify(text, final)`: a list of ParsedCall (non-empty) if the whole text is calls (only when final),
    CONTENT if no continuation of text can be calls, None if still undecided (never when final)."""

    CONTENT = "content"

    def __init__(self, tokenizer: Any = None):
        super().__init__(tokenizer)
        self._is_content = False

    @abc.abstractmethod
    def _classify(self, text: str, final: bool):
        ...

    def _scan(self, text: str, final: bool) -> tuple[list[Event], int]:
        if not self._is_content:
            verdict = self._classify(text, final)
            if verdict is None:
                return [], 0
            if verdict != self.CONTENT:
                return list(verdict), len(text)
            self._is_content = True
        return [text], len(text)
