"""Chat templates: pagedllm renders exactly as transformers' apply_chat_template(tokenize=False) on the same
template and messages (shipped templates, templates written here, the real vLLM example templates), the sandbox
holds, content formats, template resolution and errors."""
import copy
import json
from datetime import datetime
from pathlib import Path

import pytest

from model_factory import make_tokenizer
from pagedllm.chat.template import (CONTINUE_GENERATION_ERROR, apply_chat_template, detect_content_format,
                                    load_chat_template, prepare_messages, render_chat_template,
                                    resolve_chat_template, shipped_template, shipped_templates,
                                    special_token_vars)

# Real templates from vLLM's examples, kept next to the checkout (never copied into the project); a
# worktree one level further down finds them one folder higher.
REFERENCE_TEMPLATES = next((root / "shared/reference/templates" for root in Path(__file__).parents[2].parents[:2]
                            if (root / "shared/reference/templates").is_dir()),
                           Path(__file__).parents[2].parent / "shared/reference/templates")

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "description": "The city, e.g. Zürich"},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"],
                                           "description": "Temperature unit"}},
                   "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "description": "IANA zone"}},
                   "required": ["tz"]}}}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
DOCUMENTS = [{"title": "Paris", "text": "Paris is the capital of France <and> its largest city."},
             {"title": "Café", "text": "Ein Café in Zürich 😀"}]

# Templates written for these tests: each leans on a different part of the renderer.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
OPENAI_PARTS = """{{ bos_token }}
{%- for message in messages %}
    {{- '[' + message.role + ']' }}
    {%- if message.content is string %}
        {{- message.content }}
    {%- else %}
        {%- for part in message.content %}
            {%- if part.type == 'text' %}{{ part.text }}{% endif %}
            {%- if not loop.last %} | {% endif %}
        {%- endfor %}
    {%- endif %}
    {{- eos_token }}
{%- endfor %}
{%- if add_generation_prompt %}[assistant]{% endif %}"""
FEATURES = """{%- set ns = namespace(users=0) %}
{%- for message in messages %}
  {%- if message.role not in ['system', 'user', 'assistant', 'tool'] %}
    {{- raise_exception('Unknown role: ' + message.role) }}
  {%- endif %}
  {%- if message.role == 'user' %}{% set ns.users = ns.users + 1 %}{% endif %}
  {%- if message.role == 'system' %}{% continue %}{% endif %}
  <{{ message.role }}>{{ message.content | trim }}
  {%- if message.tool_calls is defined %}
    {%- for call in message.tool_calls %} CALL {{ call.function | tojson(indent=1, sort_keys=true) }}{% endfor %}
  {%- endif %}
  {%- if message.role == 'user' and message.content == 'STOP' %}{% break %}{% endif %}
{% endfor %}
{%- if tools %}TOOLS {{ tools | map(attribute='function.name') | join(',') }} {{ tools[0] | tojson }}{% endif %}
{%- if documents %}{% for d in documents %} DOC {{ d.title }}: {{ d.text | tojson }}{% endfor %}{% endif %}
users={{ ns.users }}
{%- if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>{% endif %}
{%- if add_generation_prompt %}<assistant>{% generation %}{% endgeneration %}{% endif %}"""

TEST_TEMPLATES = {"chatml": CHATML, "openai_parts": OPENAI_PARTS, "features": FEATURES}


def _reference_templates() -> dict:
    if not REFERENCE_TEMPLATES.is_dir():
        return {}
    return {p.stem: p.read_text() for p in sorted(REFERENCE_TEMPLATES.glob("*.jinja"))}


def all_templates() -> dict:
    templates = {name[:-len(".jinja")]: shipped_template(name) for name in shipped_templates()}
    templates.update(TEST_TEMPLATES)
    templates.update({f"ref:{k}": v for k, v in _reference_templates().items()})
    return templates


def _tool_call(name, arguments, call_id):
    """An assistant tool call as clients send it (OpenAI format: arguments is a JSON string)."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def _conversations():
    system = {"role": "system", "content": "You are a helpful assistant. Réponds brièvement."}
    user = {"role": "user", "content": "What is the weather in Paris? 天气 <b>"}
    tool_turns = [
        {"role": "assistant", "content": None,
         "tool_calls": [_tool_call("get_weather", {"city": "Paris", "unit": "celsius"}, "call_1")]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": '{"temp": 22, "sky": "clear"}'},
        {"role": "assistant", "content": "It is 22 °C and clear in Paris."},
        {"role": "user", "content": "Thanks!"},
    ]
    return {
        "single": [user],
        "system": [system, user],
        "multi_turn": [system, user, {"role": "assistant", "content": "  Sunny, 22 °C.  "},
                       {"role": "user", "content": "And tomorrow?"}],
        "tool_history": [system, user] + tool_turns,
    }


def _hf_messages(messages):
    """The same conversation as vLLM hands it to transformers: tool-call arguments as objects (templates expect
    objects; the JSON strings clients send are parsed), a None content as ""."""
    out = copy.deepcopy(messages)
    for m in out:
        if "content" in m and m["content"] is None:
            m["content"] = ""
        for call in m.get("tool_calls") or []:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return out


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _hf(tok, template, messages, **kw):
    return tok.apply_chat_template(_hf_messages(messages), chat_template=template, tokenize=False, **kw)


def _ours(tok, template, messages, *, chat_template_kwargs=None, **kw):
    return apply_chat_template(tok, messages, template, chat_template_kwargs=chat_template_kwargs, **kw)


# The reference llama3.1 template prints today's date unless given one: fix it so both renders agree.
FIXED_DATE = {"date_string": "26 Jul 2024"}


@pytest.mark.parametrize("template_name", list(all_templates()))
@pytest.mark.parametrize("conversation", list(_conversations()))
@pytest.mark.parametrize("extras", ["plain", "tools", "documents", "tools+documents"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_equals_transformers(tok, template_name, conversation, extras, add_generation_prompt):
    template = all_templates()[template_name]
    messages = _conversations()[conversation]
    tools = TOOLS if "tools" in extras else None
    documents = DOCUMENTS if "documents" in extras else None
    kw = dict(tools=tools, documents=documents, add_generation_prompt=add_generation_prompt)
    expected = _hf(tok, template, messages, **kw, **FIXED_DATE)
    got = _ours(tok, template, messages, chat_template_kwargs=FIXED_DATE, **kw)
    assert got == expected
    if tools and "tools" in template_name:
        assert "get_weather" in got and "Current weather in a city" in got
    if "Zürich" in got or "天气" in got:  # tojson keeps non-ASCII as is (ensure_ascii=False)
        assert "\\u" not in got


@pytest.mark.parametrize("template_name", list(all_templates()))
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["plain", "tools"])
def test_continue_final_message_equals_transformers(tok, template_name, tools):
    template = all_templates()[template_name]
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is"}]
    kw = dict(tools=tools, add_generation_prompt=False, continue_final_message=True)
    expected = _hf(tok, template, messages, **kw, **FIXED_DATE)
    got = _ours(tok, template, messages, chat_template_kwargs=FIXED_DATE, **kw)
    assert got == expected
    assert got.endswith("The capital of France is")


def test_continue_final_message_with_trailing_space_trimmed_by_template(tok):
    # The template trims the message: the cut lands right after the trimmed text, as in transformers.
    template = all_templates()["llama3_json_tools"]
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there "}]
    got = _ours(tok, template, messages, add_generation_prompt=False, continue_final_message=True)
    assert got == _hf(tok, template, messages, continue_final_message=True)
    assert got.endswith("<|end_header_id|>\n\nHello there")


def test_shipped_templates_are_the_three_promised():
    assert shipped_templates() == ["chatml_hermes_tools.jinja", "gpt2_eos.jinja", "llama3_json_tools.jinja"]


def test_chatml_hermes_renders_tools_calls_and_responses(tok):
    messages = _conversations()["tool_history"] + [
        {"role": "assistant", "content": "Checking both.", "tool_calls": [
            _tool_call("get_weather", {"city": "Zürich"}, "c2"), _tool_call("get_time", {"tz": "Europe/Zurich"}, "c3")]},
        {"role": "tool", "tool_call_id": "c2", "content": "5 °C"},
        {"role": "tool", "tool_call_id": "c3", "content": "09:00"}]
    got = _ours(tok, "chatml_hermes_tools", messages, tools=TOOLS)
    system = got.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert "<tools>\n" + json.dumps(WEATHER_TOOL, ensure_ascii=False) + "\n" in system
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
            '"unit": "celsius"}}\n</tool_call><|im_end|>\n') in got
    assert ('<|im_start|>assistant\nChecking both.\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Zürich"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
            '{"tz": "Europe/Zurich"}}\n</tool_call><|im_end|>\n') in got
    # consecutive tool results share one user turn
    assert ("<|im_start|>user\n<tool_response>\n5 °C\n</tool_response>\n<tool_response>\n09:00\n"
            "</tool_response><|im_end|>\n<|im_start|>assistant\n") in got
    assert got.endswith("<|im_start|>assistant\n")


def test_llama3_json_renders_tools_and_calls(tok):
    messages = _conversations()["tool_history"]
    got = _ours(tok, "llama3_json_tools", messages, tools=TOOLS)
    assert got.startswith(tok.bos_token + "<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython")
    assert json.dumps(WEATHER_TOOL["function"], indent=4, ensure_ascii=False) in got
    assert ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": '
            '{"city": "Paris", "unit": "celsius"}}<|eot_id|>') in got
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp": 22, "sky": "clear"}<|eot_id|>' in got
    assert got.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_gpt2_eos_joins_turns_with_eos(tok):
    messages = _conversations()["multi_turn"]
    got = _ours(tok, "gpt2_eos", messages)
    eos = tok.eos_token
    assert got == f"What is the weather in Paris? 天气 <b>{eos}  Sunny, 22 °C.  {eos}And tomorrow?{eos}"


def test_chat_template_kwargs_and_special_tokens_reach_the_template(tok):
    messages = _conversations()["system"]
    plain = _ours(tok, FEATURES, messages)
    no_think = _ours(tok, FEATURES, messages, chat_template_kwargs={"enable_thinking": False})
    assert "<think>" not in plain and no_think.endswith("<think>\n\n</think><assistant>")
    assert no_think == _hf(tok, FEATURES, messages, add_generation_prompt=True, enable_thinking=False)
    vars_ = special_token_vars(tok)
    assert vars_["bos_token"] == "<|endoftext|>" and vars_["eos_token"] == "<|im_end|>"
    got = _ours(tok, OPENAI_PARTS, messages)
    assert got.startswith("<|endoftext|>[system]") and "<|im_end|>[user]" in got


def test_strftime_now_is_available(tok):
    before = datetime.now().strftime("%Y-%m-%d")
    got = render_chat_template("{{ strftime_now('%Y-%m-%d') }}", [])
    assert got in (before, datetime.now().strftime("%Y-%m-%d"))


def test_tojson_is_not_html_escaped_and_keeps_unicode():
    messages = [{"role": "user", "content": "<a href='x'>&</a> café 😀"}]
    got = render_chat_template("{{ messages[0].content | tojson }}|{{ messages[0] | tojson(indent=2) }}", messages)
    assert got.split("|")[0] == '"<a href=\'x\'>&</a> café 😀"'
    assert '\n  "role": "user"' in got


# --- content formats ---------------------------------------------------------------------------------

@pytest.mark.parametrize("template,expected", [
    (CHATML, "string"),
    (OPENAI_PARTS, "openai"),
    (FEATURES, "string"),
    ("{% for m in messages %}{% set c = m['content'] %}{% for p in c %}{{ p['text'] }}{% endfor %}{% endfor %}",
     "openai"),
    ("{% set loop_messages = messages[1:] %}{% for m in loop_messages %}"
     "{% for p in m.content | selectattr('type', 'equalto', 'text') %}{{ p.text }}{% endfor %}{% endfor %}",
     "openai"),
    ("{{ messages[0]['content'][0]['text'] }}", "openai"),
    ("{% for m in messages %}{{ m.content[0].text }}{% endfor %}", "openai"),
    ("{% for m in messages %}{{ m.content | trim }}{% for t in m.tool_calls %}{{ t.id }}{% endfor %}{% endfor %}",
     "string"),
    ("{% for x in tools %}{% for c in x.content %}{{ c }}{% endfor %}{% endfor %}", "string"),
    ("{% if %}", "string"),  # does not parse: detection falls back, rendering reports it
])
def test_detect_content_format(template, expected):
    assert detect_content_format(template) == expected


def test_detect_content_format_of_shipped_and_reference_templates():
    for name in shipped_templates():
        assert detect_content_format(shipped_template(name)) == "string", name
    refs = _reference_templates()
    if not refs:
        pytest.skip(f"{REFERENCE_TEMPLATES} is absent")
    assert detect_content_format(refs["hermes_tools"]) == "string"
    assert detect_content_format(refs["llama3.1_json_tools"]) == "openai"


PARTS = [{"type": "text", "text": "Part one"}, "Part two", {"type": "text", "text": None},
         {"type": "input_text", "text": "Part three"}]


def test_prepare_messages_string_joins_text_parts():
    messages = [{"role": "user", "content": PARTS}, {"role": "assistant", "content": None}]
    original = copy.deepcopy(messages)
    prepared = prepare_messages(messages, "string")
    assert prepared == [{"role": "user", "content": "Part one\nPart two\nPart three"},
                        {"role": "assistant", "content": ""}]
    assert messages == original


def test_prepare_messages_openai_keeps_parts():
    messages = [{"role": "user", "content": PARTS}, {"role": "system", "content": "Be brief."},
                {"role": "tool", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    prepared = prepare_messages(messages, "openai")
    assert prepared[0]["content"] == [{"type": "text", "text": "Part one"}, {"type": "text", "text": "Part two"},
                                      {"type": "text", "text": "Part three"}]
    assert prepared[1]["content"] == [{"type": "text", "text": "Be brief."}]
    assert prepared[2]["content"] == "a\nb"  # tool results stay strings: templates print them as text


def test_prepare_messages_parses_tool_call_arguments():
    messages = [{"role": "assistant", "content": "", "tool_calls": [
        _tool_call("f", {"x": [1, {"y": "ü"}]}, "a"),
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{not json"}},
        {"id": "c", "type": "function", "function": {"name": "h", "arguments": {"already": "object"}}}]},
        {"role": "assistant", "content": "no calls", "tool_calls": []},
        {"role": "tool", "tool_call_id": "a", "name": "f", "content": "ok"}]
    prepared = prepare_messages(messages, "string")
    args = [c["function"]["arguments"] for c in prepared[0]["tool_calls"]]
    assert args == [{"x": [1, {"y": "ü"}]}, {}, {"already": "object"}]
    assert "tool_calls" not in prepared[1]
    assert prepared[2] == {"role": "tool", "tool_call_id": "a", "name": "f", "content": "ok"}
    assert isinstance(messages[0]["tool_calls"][0]["function"]["arguments"], str)  # input untouched


def test_string_format_of_list_content_renders_as_joined_string(tok):
    messages = [{"role": "user", "content": PARTS}]
    got = _ours(tok, CHATML, messages, content_format="auto")
    assert got == _hf(tok, CHATML, [{"role": "user", "content": "Part one\nPart two\nPart three"}],
                      add_generation_prompt=True)
    forced = _ours(tok, OPENAI_PARTS, messages, content_format="string")
    assert "[user]Part one\nPart two\nPart three" in forced
    parts = _ours(tok, OPENAI_PARTS, messages, content_format="auto")
    assert "[user]Part one | Part two | Part three" in parts


@pytest.mark.parametrize("content,match", [
    ([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}], "text-only"),
    ([{"text": "no type"}], "Missing 'type'"),
    ({"type": "text", "text": "a dict"}, "string or a list"),
])
def test_prepare_messages_rejects_non_text_content(content, match):
    with pytest.raises(ValueError, match=match):
        prepare_messages([{"role": "user", "content": content}], "string")


def test_bad_content_format_name(tok):
    with pytest.raises(ValueError, match="chat_template_content_format"):
        _ours(tok, CHATML, [{"role": "user", "content": "x"}], content_format="html")


# --- the sandbox -------------------------------------------------------------------------------------

@pytest.mark.parametrize("attack", [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__['datetime'] }}",
    "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ lipsum.__globals__['os'].popen('touch MARKER').read() }}",
    "{{ namespace.__init__.__globals__ }}",
    "{% set ns = namespace() %}{% set ns.__dict__ = 1 %}",
    "{{ messages.append({'role': 'user'}) }}",
    "{{ messages[0].update({'content': 'x'}) }}",
    "{{ ''|attr('__class__') }}",
])
def test_sandbox_refuses_and_executes_nothing(tmp_path, monkeypatch, attack):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    with pytest.raises(ValueError, match="sandbox|unsafe|cannot store"):
        render_chat_template(attack, [{"role": "user", "content": "hi"}])
    assert not marker.exists()


# --- errors ------------------------------------------------------------------------------------------

def test_raise_exception_becomes_value_error():
    with pytest.raises(ValueError, match="Unknown role: robot"):
        render_chat_template(FEATURES, [{"role": "robot", "content": "beep"}])


def test_template_syntax_and_undefined_errors_are_value_errors():
    with pytest.raises(ValueError, match="does not parse"):
        render_chat_template("{% for m in messages %}", [])
    with pytest.raises(ValueError, match="undefined"):
        render_chat_template("{{ nothing.there }}", [])


def test_continue_final_message_and_add_generation_prompt_conflict():
    with pytest.raises(ValueError) as e:
        render_chat_template(CHATML, [{"role": "user", "content": "x"}], add_generation_prompt=True,
                             continue_final_message=True)
    assert str(e.value) == CONTINUE_GENERATION_ERROR
    assert str(e.value).startswith("continue_final_message and add_generation_prompt are not compatible.")


def test_continue_final_message_needs_the_message_in_the_output():
    drops_last = "{% for m in messages[:-1] %}{{ m.content }}{% endfor %}"
    with pytest.raises(ValueError, match="does not appear"):
        render_chat_template(drops_last, [{"role": "user", "content": "a"},
                                          {"role": "assistant", "content": "b"}], continue_final_message=True)
    with pytest.raises(ValueError, match="empty"):
        render_chat_template(CHATML, [], continue_final_message=True)


def test_bad_tools_and_documents():
    with pytest.raises(ValueError, match="JSON schema"):
        render_chat_template(CHATML, [], tools=["get_weather"])
    with pytest.raises(ValueError, match="'title' and 'text'"):
        render_chat_template(CHATML, [], documents=["just text"])


# --- which template ----------------------------------------------------------------------------------

class _Tok:
    def __init__(self, chat_template=None):
        self.chat_template = chat_template
        self.special_tokens_map = {"eos_token": "</s>"}


def test_template_resolution_order(tmp_path):
    own = "{{ 'own' }}"
    path = tmp_path / "mine.jinja"
    path.write_text("{{ 'from file' }}")
    assert resolve_chat_template(_Tok(own), "{{ 'arg' }}") == "{{ 'arg' }}"
    assert resolve_chat_template(_Tok(own), str(path)) == "{{ 'from file' }}"
    assert resolve_chat_template(_Tok(own), path) == "{{ 'from file' }}"
    assert resolve_chat_template(_Tok(own), "chatml_hermes_tools") == shipped_template("chatml_hermes_tools")
    assert resolve_chat_template(_Tok(own), None, model_type="gpt2") == own
    assert resolve_chat_template(_Tok(None), None, model_type="gpt2") == shipped_template("gpt2_eos")
    named = {"default": "{{ 'default' }}", "tool_use": "{{ 'tool_use' }}", "rag": "{{ 'rag' }}"}
    assert resolve_chat_template(_Tok(named), None) == "{{ 'default' }}"
    assert resolve_chat_template(_Tok(named), None, tools=TOOLS) == "{{ 'tool_use' }}"
    assert resolve_chat_template(_Tok(named), "rag") == "{{ 'rag' }}"


def test_no_template_is_a_value_error_that_says_how_to_pass_one():
    with pytest.raises(ValueError, match="chat_template=") as e:
        resolve_chat_template(_Tok(None), None, model_type="llama")
    assert ".jinja" in str(e.value) and "chatml_hermes_tools" in str(e.value)
    with pytest.raises(ValueError, match="several chat templates"):
        resolve_chat_template(_Tok({"a": "x", "b": "y"}), None)


def test_missing_template_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_chat_template(str(tmp_path / "absent.jinja"))
    with pytest.raises(ValueError, match="Could not read"):
        load_chat_template(tmp_path / "absent.jinja")
    with pytest.raises(ValueError, match="ships no chat template"):
        shipped_template("../template")


def test_gpt2_fallback_renders_with_eos(tok):
    got = apply_chat_template(_Tok(None), [{"role": "user", "content": "Hi"}], model_type="gpt2")
    assert got == "Hi</s>"


# --- the parser each shipped template calls for ---------------------------------------------------------

def test_pick_tool_parser_for_shipped_templates():
    from pagedllm.chat.tool_parsers import registry
    assert registry.pick_tool_parser(shipped_template("chatml_hermes_tools")) == "hermes"
    assert registry.pick_tool_parser(shipped_template("llama3_json_tools")) == "llama3_json"
    assert registry.pick_tool_parser(shipped_template("gpt2_eos")) is None
