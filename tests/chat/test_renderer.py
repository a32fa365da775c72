"""ChatRenderer: the one choice of template and tool parser that offline LLM.chat, the server and the CLI share."""
import pytest

from pagedllm.chat.chat import render_conversations
from pagedllm.chat.renderer import ChatRenderer
from pagedllm.chat.template import shipped_template
from pagedllm.chat.tool_parsers.auto import AutoToolParser
from pagedllm.chat.tool_parsers.registry import get_tool_parser

PLAIN = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
HERMES = shipped_template("chatml_hermes_tools")
LLAMA3 = shipped_template("llama3_json_tools")
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]


class _Tok:
    chat_template = PLAIN
    special_tokens_map = {"eos_token": "<|im_end|>"}


@pytest.mark.parametrize("default,template,tools,name,expected", [
    (None, PLAIN, None, None, None),                 # no tools, nothing named: no parsing
    (None, HERMES, None, None, None),
    (None, PLAIN, None, "pythonic", "pythonic"),     # a parser named for the call applies even without tools
    (None, HERMES, TOOLS, "mistral", "mistral"),     # ... and wins over the template
    ("llama3_json", HERMES, TOOLS, None, "llama3_json"),   # the renderer's default (--tool-call-parser) over the template
    ("llama3_json", PLAIN, None, None, None),        # ... only when tools are given
    (None, HERMES, TOOLS, None, "hermes"),           # the template's format
    (None, LLAMA3, TOOLS, None, "llama3_json"),
    (None, PLAIN, TOOLS, None, "auto"),              # tools, nothing decides: every format is recognised
])
def test_tool_parser_choice(default, template, tools, name, expected):
    parser = ChatRenderer(_Tok(), tool_parser=default).tool_parser_for(template, tools, name)
    if expected is None:
        assert parser is None
    else:
        assert type(parser) is get_tool_parser(expected)
    if expected == "auto":
        assert isinstance(parser, AutoToolParser)


def test_unknown_default_parser_fails_at_construction():
    with pytest.raises(ValueError, match="Unknown tool parser 'nope'"):
        ChatRenderer(_Tok(), tool_parser="nope")


def test_template_choice(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("FILE{{ messages[0].content }}")
    r = ChatRenderer(_Tok())
    assert r.template_for() == PLAIN                                  # the tokenizer's own
    assert r.template_for("chatml_hermes_tools") == HERMES            # a shipped name (trusted caller)
    assert r.template_for(str(path)) == "FILE{{ messages[0].content }}"   # a path (trusted caller)
    # From a request: the text itself, never a file or a shipped name.
    assert r.template_for(str(path), template_text_only=True) == str(path)
    assert r.template_for("chatml_hermes_tools", template_text_only=True) == "chatml_hermes_tools"
    assert ChatRenderer(_Tok(), chat_template="chatml_hermes_tools").template_for() == HERMES   # the default
    assert ChatRenderer(_Tok(), chat_template="chatml_hermes_tools").template_for(PLAIN, template_text_only=True) \
        == PLAIN


def test_offline_and_server_render_the_same_prompt():
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    template, (offline,) = render_conversations(_Tok(), [conv], chat_template="chatml_hermes_tools", tools=TOOLS)
    r = ChatRenderer(_Tok(), chat_template="chatml_hermes_tools")
    server = r.render(conv, template=r.template_for(None, TOOLS), tools=TOOLS)
    assert template == HERMES and offline == server
    assert '"name": "f"' in offline and offline.endswith("<|im_start|>assistant\n")
