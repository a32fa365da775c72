"""tool_choice "required" and named, for the server and LLM.chat alike: the JSON schema that
constrains the output (structured outputs), and the output read back as tool calls.

- "required": a JSON array of at least one {"name": <a tool's name>, "parameters": <its arguments>},
  each item constrained to one of the tools with that tool's parameters schema (vLLM's form).
- {"type": "function", "function": {"name": N}}: the whole output is N's arguments (its parameters
  schema); the answer is one call of N.
"""
from __future__ import annotations

import json
import uuid
from typing import Any, Optional, Union

from pagedllm.outputs import FunctionCall, ToolCall
from pagedllm.sampling.structured_params import StructuredOutputsParams

ToolChoice = Union[str, dict, None]
_ANY_OBJECT = {"type": "object"}


def _function(tool: Any) -> dict:
    """A tool's "function" part as a dict (OpenAI format; pydantic models are dumped)."""
    if hasattr(tool, "model_dump"):
        tool = tool.model_dump(exclude_none=True)
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError("Each tool must be {\"type\": \"function\", \"function\": {\"name\": ..., ...}}.")
    return fn


def named_function(tool_choice: ToolChoice) -> Optional[str]:
    """The function a named tool_choice picks, None for the string forms; ValueError when malformed."""
    if tool_choice is None or isinstance(tool_choice, str):
        return None
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError('A named tool_choice is {"type": "function", "function": {"name": "..."}}.')
    return fn["name"]


def validate_tool_choice(tool_choice: ToolChoice, tools: Optional[list]) -> None:
    """vLLM's checks (its wording): tool_choice needs tools, and a named function must be among them."""
    if tool_choice is None or tool_choice == "none":
        return
    if isinstance(tool_choice, str) and tool_choice not in ("auto", "required"):
        raise ValueError(f"Invalid tool_choice {tool_choice!r}: use \"none\", \"auto\", \"required\" or a named "
                         "function.")
    name = named_function(tool_choice)
    if not tools:
        if tool_choice == "auto":
            return
        raise ValueError("When using `tool_choice`, `tools` must be set.")
    if name is not None and name not in [_function(t)["name"] for t in tools]:
        raise ValueError(f"Tool '{name}' has not been passed in `tools`.")


def tool_choice_schema(tool_choice: ToolChoice, tools: Optional[list]) -> Optional[dict]:
    """The JSON schema the output must follow, or None when tool_choice does not constrain it."""
    validate_tool_choice(tool_choice, tools)
    name = named_function(tool_choice)
    if name is not None:
        fn = next(_function(t) for t in tools if _function(t)["name"] == name)
        return fn.get("parameters") or _ANY_OBJECT
    if tool_choice != "required":
        return None
    items = []
    for tool in tools:
        fn = _function(tool)
        items.append({"type": "object",
                      "properties": {"name": {"type": "string", "enum": [fn["name"]]},
                                     "parameters": fn.get("parameters") or _ANY_OBJECT},
                      "required": ["name", "parameters"]})
    return {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}


def tool_choice_constraint(tool_choice: ToolChoice, tools: Optional[list]) -> Optional[StructuredOutputsParams]:
    schema = tool_choice_schema(tool_choice, tools)
    return StructuredOutputsParams(json=schema) if schema is not None else None


def constrains(tool_choice: ToolChoice) -> bool:
    return tool_choice == "required" or isinstance(tool_choice, dict)


def new_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def tool_calls_from_output(tool_choice: ToolChoice, text: str) -> list[ToolCall]:
    """The tool calls of a constrained output ([] when the text is not the JSON the grammar asked for:
    a response cut by max_tokens)."""
    name = named_function(tool_choice)
    if name is not None:
        return [ToolCall(id=new_call_id(), function=FunctionCall(name=name, arguments=text))]
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return []
    return [ToolCall(id=new_call_id(), function=FunctionCall(name=c["name"],
                                                             arguments=json.dumps(c["parameters"], ensure_ascii=False)))
            for c in calls if isinstance(c, dict) and "name" in c and "parameters" in c]


def constrained_params(sampling_params, constraint: StructuredOutputsParams, count: int, defaults):
    """sampling_params (None, one, or one per conversation) with the constraint set on each (copies)."""
    if sampling_params is None:
        sampling_params = defaults()
    many = isinstance(sampling_params, (list, tuple))
    out = []
    for sp in (sampling_params if many else [sampling_params] * count):
        sp = sp.clone()
        if sp.structured_outputs is not None:
            raise ValueError("tool_choice \"required\" or a named function constrains the output already: "
                             "the sampling params must not set structured_outputs too.")
        sp.structured_outputs = constraint
        out.append(sp)
    return out


def forced_tool_message(result, tool_choice: ToolChoice) -> None:
    """A ChatCompletionOutput of a forced tool call: message.tool_calls from the JSON, content empty."""
    text = result.outputs[0].text if result.outputs else ""
    calls = tool_calls_from_output(tool_choice, text)
    if calls:
        result.message.tool_calls = calls
        result.message.content = None
        result.message.reasoning_content = None
        result.finish_reason = "tool_calls"


class ForcedToolCallParser:
    """The tool-call parser of a constrained output (the server's parser interface): a named choice
    streams its one call's arguments as they come; "required" sends its calls when the array is complete."""

    def __init__(self, tool_choice: ToolChoice):
        self.tool_choice = tool_choice
        self.name = named_function(tool_choice)
        self._text = ""
        self._call_id: Optional[str] = None

    def fresh(self) -> "ForcedToolCallParser":
        return ForcedToolCallParser(self.tool_choice)

    def extract_tool_calls(self, text: str):
        from pagedllm.chat.tool_parsers.base import ExtractedToolCalls
        calls = tool_calls_from_output(self.tool_choice, text)
        return ExtractedToolCalls(bool(calls), calls, None)

    def extract_streaming(self, delta_text: str):
        from pagedllm.chat.tool_parsers.base import DeltaMessage, DeltaToolCall
        self._text += delta_text
        if self.name is None or not delta_text:
            return None
        first = self._call_id is None
        if first:
            self._call_id = new_call_id()
        return DeltaMessage(tool_calls=[DeltaToolCall(0, self._call_id if first else None,
                                                      self.name if first else None, delta_text)])

    def finish(self):
        from pagedllm.chat.tool_parsers.base import DeltaMessage, DeltaToolCall
        if self.name is not None:
            return None
        calls = tool_calls_from_output(self.tool_choice, self._text)
        return DeltaMessage(tool_calls=[DeltaToolCall(i, c.id, c.function.name, c.function.arguments)
                                        for i, c in enumerate(calls)]) if calls else None
