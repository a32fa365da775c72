"""Structured outputs through the OpenAI server on the default model, driven by the openai client:
response_format json_schema / json_object, `structured_outputs` and vLLM 0.10's guided_* in the body,
tool_choice "required" and named (whole and streamed), and the OpenAI-shaped 400s."""
import json
import re

import jsonschema
import openai
import pytest

from pagedllm import AsyncEngineArgs, AsyncLLMEngine
from pagedllm.entrypoints.openai.api_server import build_app
from server_utils import ServerThread

pytestmark = pytest.mark.slow  # the default model on a CPU: minutes
MODEL = "smol"
SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "enum": ["Paris", "Berlin", "Rome"]},
    "population": {"type": "integer", "minimum": 1, "maximum": 99999999}}, "required": ["city", "population"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "description": "Adds two integers", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 999}},
        "required": ["a", "b"]}}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0, "max_tokens": 80}


@pytest.fixture(scope="module")
def server():
    eng = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(max_model_len=1024, seed=0))
    app = build_app(eng, served_model_names=[MODEL])
    with ServerThread(app) as s:
        yield s
    eng.shutdown()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


def test_response_format_json_schema_and_json_object(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A city as JSON."}],
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "city", "schema": SCHEMA, "strict": True}}, **GREEDY)
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content":
                                                               'Reply with the JSON object {"ok": true}.'}],
                                       response_format={"type": "json_object"}, **GREEDY)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       response_format={"type": "text"}, temperature=0, max_tokens=4)
    assert r.choices[0].message.content


def test_structured_outputs_and_guided_fields_in_the_body(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Pick a colour."}],
                                       extra_body={"structured_outputs": {"choice": ["red", "blue"]}}, **GREEDY)
    assert r.choices[0].message.content in ("red", "blue")
    r = client.completions.create(model=MODEL, prompt="An IP address: ", temperature=0, max_tokens=20,
                                  extra_body={"guided_regex": r"[0-9]{1,3}(\.[0-9]{1,3}){3}"})
    assert re.fullmatch(r"[0-9]{1,3}(\.[0-9]{1,3}){3}", r.choices[0].text)
    r = client.completions.create(model=MODEL, prompt="A city: ", temperature=0, max_tokens=60,
                                  extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


def test_tool_choice_required(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", **GREEDY)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        tool = next(t for t in TOOLS if t["function"]["name"] == call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_tool_choice_named_whole_and_streamed(client):
    named = {"type": "function", "function": {"name": "add"}}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Add 2 and 3."}],
                                       tools=TOOLS, tool_choice=named, **GREEDY)
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "add" and not r.choices[0].message.content
    jsonschema.validate(json.loads(calls[0].function.arguments), TOOLS[1]["function"]["parameters"])

    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Add 2 and 3."}],
                                            tools=TOOLS, tool_choice=named, stream=True, **GREEDY)
    ids, names, args, finishes, content = set(), [], "", [], ""
    for chunk in stream:
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                assert d.index == 0
                if d.id:
                    ids.add(d.id)
                if d.function and d.function.name:
                    names.append(d.function.name)
                args += (d.function.arguments or "") if d.function else ""
            content += c.delta.content or ""
            if c.finish_reason:
                finishes.append(c.finish_reason)
    assert len(ids) == 1 and names == ["add"] and len(finishes) == 1 and not content
    assert json.loads(args) == json.loads(calls[0].function.arguments)  # greedy: the same call


def test_tool_choice_required_streamed(client):
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                            stream=True, **GREEDY)
    calls, finishes = {}, []
    for chunk in stream:
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": None, "arguments": ""})
                entry["name"] = entry["name"] or (d.function.name if d.function else None)
                entry["arguments"] += (d.function.arguments or "") if d.function else ""
            if c.finish_reason:
                finishes.append(c.finish_reason)
    assert finishes == ["tool_calls"] and calls
    for entry in calls.values():
        tool = next(t for t in TOOLS if t["function"]["name"] == entry["name"])
        jsonschema.validate(json.loads(entry["arguments"]), tool["function"]["parameters"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(tool_choice="required"), "`tools` must be set"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
     "Tool 'nope' has not been passed in `tools`"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "json_schema.schema"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
     "Grammar error"),
    (dict(extra_body={"structured_outputs": {"choice": ["a"], "regex": "b"}}), "only use one kind"),
    (dict(extra_body={"structured_outputs": {"choise": ["a"]}}), "structured_outputs"),
])
def test_openai_shaped_400s(client, kwargs, message):
    with pytest.raises(openai.BadRequestError, match=message) as info:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **kwargs)
    assert info.value.status_code == 400 and info.value.body.get("type", "invalid_request_error")
