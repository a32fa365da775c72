"""tool_choice "required" / named: the schema that constrains the output and the calls read back."""
import json

import jsonschema
import pytest

from pagedllm.chat.tool_choice import (ForcedToolCallParser, tool_calls_from_output, tool_choice_schema,
                                       validate_tool_choice)

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"]}}},
]


def test_errors_in_vllm_words():
    with pytest.raises(ValueError, match="When using `tool_choice`, `tools` must be set."):
        validate_tool_choice("required", None)
    with pytest.raises(ValueError, match="Tool 'nope' has not been passed in `tools`."):
        validate_tool_choice({"type": "function", "function": {"name": "nope"}}, TOOLS)
    with pytest.raises(ValueError, match="named tool_choice"):
        validate_tool_choice({"type": "function"}, TOOLS)
    validate_tool_choice("auto", None)
    validate_tool_choice("none", TOOLS)


def test_required_schema_accepts_calls_of_the_tools_only():
    schema = tool_choice_schema("required", TOOLS)
    jsonschema.validate([{"name": "add", "parameters": {"a": 1, "b": 2}}], schema)
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Paris"}},
                         {"name": "add", "parameters": {"a": 1, "b": 2}}], schema)
    for bad in ([], [{"name": "add", "parameters": {"city": "x"}}], [{"name": "other", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_named_schema_is_the_parameters():
    schema = tool_choice_schema({"type": "function", "function": {"name": "add"}}, TOOLS)
    assert schema == TOOLS[1]["function"]["parameters"]
    assert tool_choice_schema("auto", TOOLS) is None and tool_choice_schema("none", TOOLS) is None


def test_calls_read_back():
    calls = tool_calls_from_output("required", '[{"name": "add", "parameters": {"a": 1, "b": 2}}]')
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("add", {"a": 1, "b": 2})]
    named = tool_calls_from_output({"type": "function", "function": {"name": "add"}}, '{"a": 1, "b": 2}')
    assert len(named) == 1 and named[0].function.name == "add" and named[0].function.arguments == '{"a": 1, "b": 2}'
    assert tool_calls_from_output("required", '[{"name": "add", "par') == []  # cut by max_tokens


def test_streaming_parser_named_streams_one_call():
    p = ForcedToolCallParser({"type": "function", "function": {"name": "add"}})
    deltas = [p.extract_streaming(t) for t in ['{"a"', ': 1, "b"', ': 2}']]
    assert p.finish() is None
    pieces = [d.tool_calls[0] for d in deltas]
    assert pieces[0].id is not None and pieces[0].name == "add" and all(x.id is None for x in pieces[1:])
    assert {x.index for x in pieces} == {0}
    assert "".join(x.arguments_delta for x in pieces) == '{"a": 1, "b": 2}'


def test_streaming_parser_required_sends_the_calls_at_the_end():
    p = ForcedToolCallParser("required")
    assert p.extract_streaming('[{"name": "add", ') is None
    assert p.extract_streaming('"parameters": {"a": 1, "b": 2}}]') is None
    done = p.finish()
    assert [(d.index, d.name, json.loads(d.arguments_delta)) for d in done.tool_calls] == [(0, "add", {"a": 1, "b": 2})]
