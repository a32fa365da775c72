"""Reasoning split for models that think in <think>...</think> (Qwen3, DeepSeek-R1, QwQ ...).

    split_reasoning("<think>\\nThe capital is Paris.\\n</think>\\n\\nParis.") -> ("The capital is Paris.", "Paris.")

Rules (one shot and streaming alike):
- The output opens with "<think>" (after optional whitespace): reasoning runs to the first "</think>", the content
  is what follows it.
- No opening tag, but the template already put "<think>" at the end of the prompt (think_in_prompt=True), or,
  when that is not known (think_in_prompt=None), the output holds a "</think>": the text before "</think>" is
  reasoning, the text after it content.
- Otherwise there is no reasoning: the content is the output as it is.
- A reasoning block that never closes (the output was cut) is all reasoning, and the content is None.
- The reasoning is stripped of surrounding whitespace; the content after "</think>" of its leading whitespace
  (the "\\n\\n" models put there); either is None when empty or whitespace.

Streaming: ReasoningStreamer(think_in_prompt).feed(delta) -> (reasoning_delta, content_delta) and finish();
the deltas concatenate to what split_reasoning returns. With think_in_prompt=None and an output that does not open
with "<think>", nothing can be said until "</think>" shows up or the output ends, so the streamer holds the text
back: callers that stream should pass think_in_prompt (e.g. prompt.rstrip().endswith("<think>")).
"""
from __future__ import annotations

from typing import Optional

from pagedllm.chat.tool_parsers.base import WhitespaceGate, partial_suffix_len

THINK_START = "<think>"
THINK_END = "</think>"


def split_reasoning(text: str, think_in_prompt: Optional[bool] = None) -> tuple[Optional[str], Optional[str]]:
    """Split a whole output into (reasoning_content, content); see the module docstring for the rules."""
    stripped = text.lstrip()
    if stripped.startswith(THINK_START):
        body = stripped[len(THINK_START):]
    elif think_in_prompt or (think_in_prompt is None and THINK_END in text):
        body = text
    else:
        return None, WhitespaceGate.apply(text)
    reasoning, sep, content = body.partition(THINK_END)
    return (WhitespaceGate.apply(reasoning, drop_leading=True, drop_trailing=True),
            WhitespaceGate.apply(content, drop_leading=True) if sep else None)


class ReasoningStreamer:
    """Streaming split_reasoning for one request: feed text deltas, get (reasoning_delta, content_delta) back
    (each None when empty), then finish() once."""

    _START, _REASONING, _AFTER, _PLAIN = range(4)

    def __init__(self, think_in_prompt: Optional[bool] = None):
        self.think_in_prompt = think_in_prompt
        self._state = self._START
        self._buffer = ""
        self._reasoning = WhitespaceGate(drop_leading=True, drop_trailing=True)
        self._after = WhitespaceGate(drop_leading=True)
        self._plain = WhitespaceGate()
        self._finished = False

    def feed(self, delta: str) -> tuple[Optional[str], Optional[str]]:
        if self._finished:
            raise RuntimeError("feed() after finish(): use one ReasoningStreamer per request")
        self._buffer += delta
        return self._advance(final=False)

    def finish(self) -> tuple[Optional[str], Optional[str]]:
        if self._finished:
            return None, None
        out = self._advance(final=True)
        self._finished = True
        return out

    def _advance(self, final: bool) -> tuple[Optional[str], Optional[str]]:
        reasoning: list[str] = []
        content: list[str] = []
        buf = self._buffer
        if self._state == self._START:
            stripped = buf.lstrip()
            if stripped.startswith(THINK_START):
                self._state = self._REASONING
                buf = stripped[len(THINK_START):]
            elif not final and THINK_START.startswith(stripped):
                pass                                   # whitespace or a partial "<think>": wait
            elif self.think_in_prompt or (self.think_in_prompt is None and THINK_END in buf):
                self._state = self._REASONING
            elif self.think_in_prompt is False or final:
                self._state = self._PLAIN
            # else (unknown, no "</think>" yet): wait
        if self._state == self._REASONING:
            i = buf.find(THINK_END)
            if i >= 0:
                reasoning.append(self._reasoning.feed(buf[:i]))
                buf = buf[i + len(THINK_END):]
                self._state = self._AFTER
            else:
                end = len(buf) if final else len(buf) - partial_suffix_len(buf, THINK_END)
                reasoning.append(self._reasoning.feed(buf[:end]))
                buf = buf[end:]
        if self._state == self._AFTER:
            content.append(self._after.feed(buf))
            buf = ""
        elif self._state == self._PLAIN:
            content.append(self._plain.feed(buf))
            buf = ""
        self._buffer = buf
        if final:
            for gate in (self._reasoning, self._after, self._plain):
                gate.finish()
        return "".join(reasoning) or None, "".join(content) or None
