"""Tool-call parsers: one-shot results on hand-written outputs, malformed output kept as content, and streaming ==
one-shot for every way of cutting the output into deltas (1-char deltas, every 2-way cut, random cuts, and the same
for every prefix of every sample, i.e. for outputs cut short anywhere)."""
import json
import random
import re
import zlib
from pathlib import Path

import pytest

from pagedllm.chat.tool_parsers import (DeltaMessage, DeltaToolCall, ExtractedToolCalls, ToolParser, get_tool_parser,
                                        list_tool_parsers, pick_tool_parser, register_tool_parser)
from pagedllm.chat.tool_parsers import registry
from pagedllm.chat.tool_parsers.base import WhitespaceGate
from pagedllm.outputs import ToolCall

ID_RE = re.compile(r"^chatcmpl-tool-[0-9a-f]{32}$")
# ../shared/reference/templates from the repository root (test data of others: read in place, never copied). From a
# git worktree under a sub-folder the same folder sits further up, so look in every ancestor, the nearest first.
TEMPLATES = next((p / "shared/reference/templates" for p in Path(__file__).resolve().parents[2].parents
                  if (p / "shared/reference/templates").is_dir()),
                 Path(__file__).resolve().parents[2].parent / "shared/reference/templates")


def dumps(obj):
    return json.dumps(obj, ensure_ascii=False)


WEATHER = {"city": "Paris", "unit": "celsius"}
NESTED = {"filter": {"tags": ["a", "b"], "range": {"min": -1.5, "max": 1000}}, "flag": True, "none": None,
          "rows": [[1, 2], [3, {"deep": {"deeper": ["x"]}}]]}
UNICODE = {"city": "Zürich", "note": "東京 🙂", "quote": "\"ça\"\n"}

# Each case: (output text, expected content, expected [(name, arguments JSON)]).
HERMES_CASES = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
     None, [("get_weather", dumps(WEATHER))]),
    ('Let me look.\n<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\nand\n'
     '<tool_call>{"name": "b", "arguments": {}}</tool_call> done',
     "Let me look.\n\nand\n done", [("a", '{"x": 1}'), ("b", "{}")]),
    ("\n<tool_call>\n" + dumps({"name": "deep", "arguments": NESTED}) + "\n</tool_call>\n", None,
     [("deep", dumps(NESTED))]),
    ("<tool_call>" + json.dumps({"name": "u", "arguments": UNICODE}) + "</tool_call>",   # \\u escapes in the output
     None, [("u", dumps(UNICODE))]),
    # Arguments given as a string holding JSON.
    ('<tool_call>{"name": "s", "arguments": "{\\"a\\": 1}"}</tool_call>', None, [("s", '{"a": 1}')]),
    ('<tool_call>{"name": "noargs"}</tool_call>', None, [("noargs", "{}")]),
    ('<tool_call>{"name": "p", "parameters": {"k": "v"}}</tool_call>', None, [("p", '{"k": "v"}')]),
    ('<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "a", "arguments": {"n": 2}}</tool_call>',
     None, [("a", "{}"), ("a", '{"n": 2}')]),
    # Malformed: the text stays in the content.
    ('<tool_call>{"name": "f", "arguments": {</tool_call>', '<tool_call>{"name": "f", "arguments": {</tool_call>', []),
    ('Sure <tool_call>{"name": "f", "arguments": {}}', 'Sure <tool_call>{"name": "f", "arguments": {}}', []),
    ('<tool_call>{"name": 3, "arguments": {}}</tool_call>', '<tool_call>{"name": 3, "arguments": {}}</tool_call>', []),
    ('<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>',
     '<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>', []),
    ('<tool_call>{"name": "f", "arguments": "not json"}</tool_call>',
     '<tool_call>{"name": "f", "arguments": "not json"}</tool_call>', []),
    ('<tool_call>["f", {}]</tool_call>', '<tool_call>["f", {}]</tool_call>', []),
    ('<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
     '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>', []),
    ('<tool_call>{"name": "f", "arguments": {"x": 1e999}}</tool_call>',
     '<tool_call>{"name": "f", "arguments": {"x": 1e999}}</tool_call>', []),
    ('<tool_call></tool_call>', '<tool_call></tool_call>', []),
    ('<tool_call>{"name": "f", "arguments": {}} extra</tool_call>',
     '<tool_call>{"name": "f", "arguments": {}} extra</tool_call>', []),
    # A good call, then a bad one: the good one is parsed, the bad one stays text.
    ('<tool_call>{"name": "a", "arguments": {}}</tool_call> <tool_call>oops</tool_call>',
     " <tool_call>oops</tool_call>", [("a", "{}")]),
    # A broken block whose end tag also closes a good one: the first <tool_call>'s block (up to the only end tag) is
    # bad JSON, so that tag is text; scanning resumes after it and the second block parses.
    ('<tool_call>{bad <tool_call>{"name": "g", "arguments": {}}</tool_call>', "<tool_call>{bad ", [("g", "{}")]),
    ("Paris is the capital of France.", "Paris is the capital of France.", []),
    ("", None, []),
    ("  \n ", None, []),
    ("text <tool_", "text <tool_", []),
    ("stray </tool_call> tag", "stray </tool_call> tag", []),
    ("<tool_call>", "<tool_call>", []),
]

LLAMA3_CASES = [
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', None,
     [("get_weather", dumps(WEATHER))]),
    ('<|python_tag|>{"name": "f", "arguments": {"a": 1}}', None, [("f", '{"a": 1}')]),
    ('{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}', None, [("a", '{"x": 1}'), ("b", "{}")]),
    (' \n{"name": "a", "parameters": {}} ;\n{"name": "b", "parameters": {"y": [1]}};\n', None,
     [("a", "{}"), ("b", '{"y": [1]}')]),
    (dumps({"name": "deep", "parameters": NESTED}), None, [("deep", dumps(NESTED))]),
    (dumps({"name": "u", "parameters": UNICODE}), None, [("u", dumps(UNICODE))]),
    ('{"type": "function", "name": "f", "parameters": {"q": "x"}}', None, [("f", '{"q": "x"}')]),
    # Everything else is content, as it is.
    ("The weather in Paris is sunny.", "The weather in Paris is sunny.", []),
    ('{"answer": 42}', '{"answer": 42}', []),
    ('{"name": "Bob", "age": 3}', '{"name": "Bob", "age": 3}', []),     # a JSON answer, not a call
    ('{"name": "f", "parameters": [1]}', '{"name": "f", "parameters": [1]}', []),
    ('{"name": null, "parameters": {}}', '{"name": null, "parameters": {}}', []),
    ('{"name": "f", "parameters": {}} and more', '{"name": "f", "parameters": {}} and more', []),
    ('{"name": "f", "parameters": {', '{"name": "f", "parameters": {', []),
    ('{"name": "f", "parameters": {}};; x', '{"name": "f", "parameters": {}};; x', []),
    ('{"name": "f", "parameters": {}} {"name": "g", "parameters": {}}',
     '{"name": "f", "parameters": {}} {"name": "g", "parameters": {}}', []),
    ('Sure: {"name": "f", "parameters": {}}', 'Sure: {"name": "f", "parameters": {}}', []),
    ("<|python_tag|>", "<|python_tag|>", []),
    ('<|python_tag|>brave_search.call(query="x")', '<|python_tag|>brave_search.call(query="x")', []),
    ('{"name": "f", "parameters": {"x": NaN}}', '{"name": "f", "parameters": {"x": NaN}}', []),
    ("{not json at all", "{not json at all", []),
    ("", None, []),
    ("\n\n", None, []),
]

MISTRAL_CASES = [
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]', None,
     [("get_weather", dumps(WEATHER))]),
    ('Sure.[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]', "Sure.",
     [("a", '{"x": 1}'), ("b", "{}")]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}', None, [("get_weather", dumps(WEATHER))]),
    ('[TOOL_CALLS]a[ARGS]{"x": 1}[TOOL_CALLS]b.c-d[ARGS]{}', None, [("a", '{"x": 1}'), ("b.c-d", "{}")]),
    ('[TOOL_CALLS]{"name": "f", "arguments": {}}', None, [("f", "{}")]),
    ("[TOOL_CALLS]" + dumps([{"name": "deep", "arguments": NESTED}]), None, [("deep", dumps(NESTED))]),
    ("[TOOL_CALLS]u[ARGS]" + json.dumps(UNICODE), None, [("u", dumps(UNICODE))]),
    ('[TOOL_CALLS][{"name": "f", "arguments": {}}] ok', " ok", [("f", "{}")]),
    # Malformed: content.
    ('[TOOL_CALLS] [{"name": "f", "arguments": {]', '[TOOL_CALLS] [{"name": "f", "arguments": {]', []),
    ("[TOOL_CALLS]", "[TOOL_CALLS]", []),
    ("[TOOL_CALLS] []", "[TOOL_CALLS] []", []),
    ('[TOOL_CALLS] [{"name": 1, "arguments": {}}]', '[TOOL_CALLS] [{"name": 1, "arguments": {}}]', []),
    ('[TOOL_CALLS] [{"name": "f", "arguments": 5}]', '[TOOL_CALLS] [{"name": "f", "arguments": 5}]', []),
    ("[TOOL_CALLS]f[ARGS][1]", "[TOOL_CALLS]f[ARGS][1]", []),
    ("[TOOL_CALLS]f(x)", "[TOOL_CALLS]f(x)", []),
    ('[TOOL_CALLS]f[ARGS]{"a": ', '[TOOL_CALLS]f[ARGS]{"a": ', []),
    ("[TOOL_CALLS]f[AR", "[TOOL_CALLS]f[AR", []),
    ('[TOOL_CALLS]bad [TOOL_CALLS][{"name": "g", "arguments": {}}]', "[TOOL_CALLS]bad ", [("g", "{}")]),
    ("No tools needed.", "No tools needed.", []),
    ("ends with [TOOL_CA", "ends with [TOOL_CA", []),
    ("", None, []),
]

PYTHONIC_CASES = [
    ('[get_weather(city="Paris", unit="celsius")]', None, [("get_weather", dumps(WEATHER))]),
    ("[f(a=1, b='x'), g()]", None, [("f", '{"a": 1, "b": "x"}'), ("g", "{}")]),
    ('[f(d={"k": [1, 2.5, None, True, False]}, t=(1, 2), n=-3, p=+0.5)]', None,
     [("f", dumps({"d": {"k": [1, 2.5, None, True, False]}, "t": [1, 2], "n": -3, "p": 0.5}))]),
    ("<|python_start|>[f(a=1)]<|python_end|>", None, [("f", '{"a": 1}')]),
    ("[f(city='Zürich', note='東京 🙂', quote='\"ça\"\\n')]", None, [("f", dumps(UNICODE))]),
    ("\n [f()] \n", None, [("f", "{}")]),
    ("[deep(" + ", ".join(f"{k}={v!r}" for k, v in NESTED.items()) + ")]", None, [("deep", dumps(NESTED))]),
    # Not a list of literal keyword calls: content.
    ("Hello there", "Hello there", []),
    ("[1, 2]", "[1, 2]", []),
    ("[f(1)]", "[f(1)]", []),
    ("[f(a=b)]", "[f(a=b)]", []),
    ("[f(a=1+2)]", "[f(a=1+2)]", []),
    ("[f(**k)]", "[f(**k)]", []),
    ("[obj.method(a=1)]", "[obj.method(a=1)]", []),
    ("[f(a=1)", "[f(a=1)", []),
    ("[f(a=1)] trailing", "[f(a=1)] trailing", []),
    ("[f(a=1)] # comment", "[f(a=1)] # comment", []),
    ("[]", "[]", []),
    ("[f(a=1), 2]", "[f(a=1), 2]", []),
    ("[f(a=1, a=2)]", "[f(a=1, a=2)]", []),
    ("[f(a=b'x')]", "[f(a=b'x')]", []),
    ("[f(a=1e999)]", "[f(a=1e999)]", []),
    ("[f(a={1: 2})]", "[f(a={1: 2})]", []),
    ("[f(a={'k': 1, **d})]", "[f(a={'k': 1, **d})]", []),
    ('[f(a=__import__("os").system("echo hi"))]', '[f(a=__import__("os").system("echo hi"))]', []),
    ("[link](http://example.com)", "[link](http://example.com)", []),
    ("Calling: [f(a=1)]", "Calling: [f(a=1)]", []),
    ("", None, []),
]

CASES = {"hermes": HERMES_CASES, "llama3_json": LLAMA3_CASES, "mistral": MISTRAL_CASES, "pythonic": PYTHONIC_CASES}
ALL_CASES = [(name, *case) for name, cases in CASES.items() for case in cases]


def one_shot(parser_name, text):
    result = get_tool_parser(parser_name)().extract_tool_calls(text)
    assert isinstance(result, ExtractedToolCalls)
    assert result.tools_called == bool(result.tool_calls)
    assert result.content is None or result.content.strip()
    for call in result.tool_calls:
        assert isinstance(call, ToolCall) and call.type == "function" and ID_RE.match(call.id)
        assert isinstance(json.loads(call.function.arguments), dict)
    return result.content, [(c.function.name, c.function.arguments) for c in result.tool_calls]


def streamed(parser_name, chunks):
    """Feed chunks to one parser instance; check the delta shapes; return (content, [(name, arguments)])."""
    parser = get_tool_parser(parser_name)()
    content, calls = [], []
    messages = [parser.extract_streaming(chunk) for chunk in chunks]
    messages.append(parser.finish())
    for msg in messages:
        if msg is None:
            continue
        assert isinstance(msg, DeltaMessage)
        assert msg.content or msg.tool_calls, "an empty DeltaMessage should be None"
        if msg.content:
            content.append(msg.content)
        for d in msg.tool_calls:
            assert isinstance(d, DeltaToolCall)
            if d.id is not None:    # the first delta of a call: id and name
                assert d.index == len(calls) and ID_RE.match(d.id) and d.name
                calls.append([d.id, d.name, d.arguments_delta])
            else:
                assert d.name is None and d.index < len(calls)
                calls[d.index][2] += d.arguments_delta
    assert not parser._broken, "a parser's _scan raised"
    assert len({c[0] for c in calls}) == len(calls), "tool call ids must be unique"
    return "".join(content) or None, [(name, args) for _, name, args in calls]


def chunkings(text, seed=0, n_random=6):
    yield [text]
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]
    rng = random.Random(seed)
    for _ in range(n_random):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8)))) if len(text) > 1 else []
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        if rng.random() < 0.5:   # servers may send empty deltas
            pieces.insert(rng.randrange(len(pieces) + 1), "")
        yield pieces


# ---------------------------------------------------------------------------------------------------------------
# One shot

@pytest.mark.parametrize("parser_name,text,content,calls", ALL_CASES)
def test_one_shot(parser_name, text, content, calls):
    assert one_shot(parser_name, text) == (content, calls)


def test_mistral_call_id_is_the_calls_id():
    """Mistral's "[CALL_ID]" form: the model's id becomes the tool call's id, one shot and streamed in any chunks."""
    text = 'Sure.[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Paris"}[TOOL_CALLS]f[ARGS]{}'
    result = get_tool_parser("mistral")().extract_tool_calls(text)
    assert result.content == "Sure."
    assert [(c.id, c.function.name, c.function.arguments) for c in result.tool_calls][0] == (
        "a1B2c3D4e", "get_weather", '{"city": "Paris"}')
    assert ID_RE.match(result.tool_calls[1].id)  # no [CALL_ID]: a generated id
    for chunks in chunkings(text):
        parser = get_tool_parser("mistral")()
        deltas = [d for m in [*map(parser.extract_streaming, chunks), parser.finish()] if m for d in m.tool_calls]
        firsts = [(d.id, d.name) for d in deltas if d.id is not None]
        assert firsts[0] == ("a1B2c3D4e", "get_weather") and firsts[1][1] == "f" and ID_RE.match(firsts[1][0])
        assert "".join(d.arguments_delta for d in deltas if d.index == 0) == '{"city": "Paris"}'
    for bad in ["[TOOL_CALLS]f[CALL_ID][ARGS]{}", "[TOOL_CALLS]f[CALL_ID]ab", "[TOOL_CALLS]f[CALL_ID]a-b[ARGS]{}"]:
        assert one_shot("mistral", bad) == (bad, [])
        assert streamed("mistral", list(bad)) == (bad, [])


@pytest.mark.parametrize("parser_name,text,content,calls", [c for c in ALL_CASES if not c[3]])
def test_no_call_keeps_the_whole_text(parser_name, text, content, calls):
    # Malformed calls are never dropped: with no call parsed the content is the output itself (None if blank).
    assert one_shot(parser_name, text)[0] == WhitespaceGate.apply(text) == content


@pytest.mark.parametrize("parser_name", sorted(CASES))
def test_unicode_arguments_are_kept_as_is(parser_name):
    text = {"hermes": '<tool_call>{"name": "f", "arguments": {"q": "日本語 é 🙂"}}</tool_call>',
            "llama3_json": '{"name": "f", "parameters": {"q": "日本語 é 🙂"}}',
            "mistral": '[TOOL_CALLS][{"name": "f", "arguments": {"q": "日本語 é 🙂"}}]',
            "pythonic": "[f(q='日本語 é 🙂')]"}[parser_name]
    (_, ((name, arguments),)) = one_shot(parser_name, text)
    assert arguments == '{"q": "日本語 é 🙂"}'
    assert "\\u" not in arguments


@pytest.mark.parametrize("parser_name", sorted(CASES))
def test_ids_are_fresh(parser_name):
    text = {"hermes": '<tool_call>{"name": "f", "arguments": {}}</tool_call>' * 2,
            "llama3_json": '{"name": "f", "parameters": {}}; {"name": "f", "parameters": {}}',
            "mistral": '[TOOL_CALLS][{"name": "f", "arguments": {}}, {"name": "f", "arguments": {}}]',
            "pythonic": "[f(), f()]"}[parser_name]
    parser = get_tool_parser(parser_name)()
    first, second = parser.extract_tool_calls(text), parser.extract_tool_calls(text)
    ids = [c.id for c in first.tool_calls + second.tool_calls]
    assert len(ids) == 4 and len(set(ids)) == 4 and all(ID_RE.match(i) for i in ids)


def test_one_shot_leaves_a_streaming_instance_alone():
    parser = get_tool_parser("hermes")()
    assert parser.extract_streaming("Hi <tool_") is not None
    parser.extract_tool_calls('<tool_call>{"name": "x", "arguments": {}}</tool_call>')
    assert streamed_rest(parser, 'call>{"name": "f", "arguments": {}}</tool_call>') == [("f", "{}")]


def streamed_rest(parser, text):
    calls = []
    for msg in (parser.extract_streaming(text), parser.finish()):
        if msg is not None:
            calls += [(d.name, d.arguments_delta) for d in msg.tool_calls]
    return calls


# ---------------------------------------------------------------------------------------------------------------
# Streaming == one shot

@pytest.mark.parametrize("parser_name,text,content,calls", ALL_CASES)
def test_streaming_equals_one_shot(parser_name, text, content, calls):
    for i, chunks in enumerate(chunkings(text, seed=zlib.crc32(f"{parser_name}:{text}".encode()))):
        assert streamed(parser_name, chunks) == (content, calls), f"chunking #{i}: {chunks!r}"


@pytest.mark.parametrize("parser_name", sorted(CASES))
def test_streaming_equals_one_shot_on_every_prefix(parser_name):
    # Every sample cut short anywhere (an output stopped by max_tokens): streaming must still match one shot.
    rng = random.Random(1234)
    for text, _, _ in CASES[parser_name]:
        for k in range(len(text) + 1):
            prefix = text[:k]
            expected = one_shot(parser_name, prefix)
            for chunks in ([prefix], list(prefix), *[rng_split(prefix, rng) for _ in range(2)]):
                assert streamed(parser_name, chunks) == expected, (prefix, chunks)


def rng_split(text, rng):
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, 4)))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("parser_name", sorted(CASES))
def test_streaming_equals_one_shot_on_mangled_outputs(parser_name):
    # Random deletions, duplications and swaps of the samples: whatever comes out, never raise, stream == one shot,
    # and no call parsed means the text is all content.
    rng = random.Random(99)
    texts = [t for t, _, _ in CASES[parser_name]]
    for _ in range(300):
        text = list(rng.choice(texts) + rng.choice(["", " ", "\n"]) + rng.choice(texts))
        for _ in range(rng.randint(1, 4)):
            if not text:
                break
            i, j = sorted(rng.randrange(len(text)) for _ in range(2))
            op = rng.randrange(3)
            if op == 0:
                del text[i:j + 1]
            elif op == 1:
                text[i:i] = text[i:j + 1]
            else:
                text[i], text[j] = text[j], text[i]
        text = "".join(text)
        expected = one_shot(parser_name, text)
        if not expected[1]:
            assert expected[0] == WhitespaceGate.apply(text)
        assert streamed(parser_name, list(text)) == expected, text
        assert streamed(parser_name, rng_split(text, rng)) == expected, text


def test_a_first_delta_carries_id_and_name():
    parser = get_tool_parser("hermes")()
    assert parser.extract_streaming("Hello <tool") == DeltaMessage(content="Hello ")
    assert parser.extract_streaming('_call>{"name": "get_weather", "arguments": {"city": "Pa') is None
    msg = parser.extract_streaming('ris"}}</tool_call> bye')
    assert msg.content == " bye"
    (d,) = msg.tool_calls
    assert (d.index, d.name, d.arguments_delta) == (0, "get_weather", '{"city": "Paris"}') and ID_RE.match(d.id)
    assert parser.finish() is None
    assert parser.finish() is None
    with pytest.raises(RuntimeError):
        parser.extract_streaming("more")


def test_plain_text_streams_without_delay():
    # Content that cannot be a call goes out with the delta that brings it (except a possible partial marker).
    for name, first in [("hermes", "The answer"), ("mistral", "The answer"), ("llama3_json", "The answer"),
                        ("pythonic", "The answer")]:
        parser = get_tool_parser(name)()
        assert parser.extract_streaming(first) == DeltaMessage(content=first), name
        assert parser.extract_streaming(" is 4.") == DeltaMessage(content=" is 4."), name
        assert parser.finish() is None


def test_leading_whitespace_waits_for_content():
    parser = get_tool_parser("hermes")()
    assert parser.extract_streaming("\n\n") is None
    assert parser.extract_streaming("Hi") == DeltaMessage(content="\n\nHi")
    parser = get_tool_parser("hermes")()
    assert parser.extract_streaming("\n") is None
    assert parser.extract_streaming('<tool_call>{"name": "f"}</tool_call>').content is None
    assert parser.extract_streaming("  ") is None
    assert parser.finish() is None


class _Exploding(ToolParser):
    def _scan(self, text, final):
        if "boom" in text:
            raise KeyError("parser bug")
        return [text], len(text)


def test_a_parser_bug_keeps_the_text_as_content():
    assert _Exploding().extract_tool_calls("a boom b") == ExtractedToolCalls(False, [], "a boom b")
    parser = _Exploding()
    out = [parser.extract_streaming(c) for c in ["ok ", "bo", "om", " end"]] + [parser.finish()]
    assert "".join(m.content for m in out if m) == "ok boom end"


# ---------------------------------------------------------------------------------------------------------------
# Registry

def test_registry_lists_and_gets_the_parsers():
    assert list_tool_parsers() == ["auto", "hermes", "llama3_json", "mistral", "pythonic"]
    for name in list_tool_parsers():
        cls = get_tool_parser(name)
        assert issubclass(cls, ToolParser) and cls.name == name


def test_unknown_parser_names_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown tool parser 'nope'.*auto, hermes, llama3_json, mistral, pythonic"):
        get_tool_parser("nope")


def test_register_a_parser():
    @register_tool_parser("test_upper")
    class Upper(ToolParser):
        def _scan(self, text, final):
            return [text.upper()], len(text)
    try:
        assert get_tool_parser("test_upper") is Upper and "test_upper" in list_tool_parsers()
        assert Upper().extract_tool_calls("abc").content == "ABC"
        with pytest.raises(ValueError, match="already registered"):
            register_tool_parser("test_upper")(type("Other", (Upper,), {}))
    finally:
        registry._PARSERS.pop("test_upper", None)


def _template(name):
    path = TEMPLATES / name
    if not path.is_file():
        pytest.skip(f"reference template {path} is not there")
    return path.read_text()


@pytest.mark.parametrize("file,expected", [("hermes_tools.jinja", "hermes"),
                                           ("llama3.1_json_tools.jinja", "llama3_json")])
def test_pick_tool_parser_on_reference_templates(file, expected):
    assert pick_tool_parser(_template(file)) == expected


@pytest.mark.parametrize("template,expected", [
    (None, None),
    ("", None),
    ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}", None),
    ("{% for t in tools %}{{ t | tojson }}{% endfor %}For each call: <tool_call>{json}</tool_call>", "hermes"),
    ("{% if tools %}[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS]{% endif %}{{ '[TOOL_CALLS]' + m.content }}",
     "mistral"),
    ("Respond in the format [func_name1(params_name1=params_value1, params_name2=params_value2...), "
     "func_name2(params)]", "pythonic"),
    ("Use exact format: [func_name1(param1=value1, param2=value2), func_name2(...)]", "pythonic"),
    ("{{- '<|python_start|>' }}", "pythonic"),
    ("{%- if builtin_tools is defined %}{{- '<|python_tag|>' + tool_call.name }}{% endif %}", "llama3_json"),
    ('Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.',
     "llama3_json"),
])
def test_pick_tool_parser(template, expected):
    assert pick_tool_parser(template) == expected


# ---------------------------------------------------------------------------------------------------------------
# auto: every known format recognised in the output (when neither tool_parser nor the template names one)

# Outputs that mix formats: the start, else the first complete marker, decides (tool_parsers/auto.py).
AUTO_MIXED_CASES = [
    ('Sure [TOOL_CALLS][{"name": "a", "arguments": {}}] then <tool_call>{"name": "b", "arguments": {}}</tool_call>',
     'Sure  then <tool_call>{"name": "b", "arguments": {}}</tool_call>', [("a", "{}")]),
    ('<tool_call>{"name": "a", "arguments": {}}</tool_call> [TOOL_CALLS][{"name": "b", "arguments": {}}]',
     ' [TOOL_CALLS][{"name": "b", "arguments": {}}]', [("a", "{}")]),
    ('Hi <tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>', "Hi ", [("a", '{"x": 1}')]),
    # A whole-output format decided by the start stays that format: not all calls, so all content.
    ('{"name": "a", "parameters": {}} <tool_call>{"name": "b", "arguments": {}}</tool_call>',
     '{"name": "a", "parameters": {}} <tool_call>{"name": "b", "arguments": {}}</tool_call>', []),
    ("[TOOL", "[TOOL", []),
    ("<tool_", "<tool_", []),
    ("  [TOOL_CALLS]f[ARGS]{}", None, [("f", "{}")]),
]
AUTO_CASES = [(text, content, calls) for cases in CASES.values() for text, content, calls in cases] + AUTO_MIXED_CASES


@pytest.mark.parametrize("text,content,calls", AUTO_CASES)
def test_auto_reads_every_format_as_its_own_parser_does(text, content, calls):
    assert one_shot("auto", text) == (content, calls)
    for i, chunks in enumerate(chunkings(text, seed=zlib.crc32(f"auto:{text}".encode()))):
        assert streamed("auto", chunks) == (content, calls), f"chunking #{i}: {chunks!r}"


def test_auto_streaming_equals_one_shot_on_every_prefix_and_mangled_mixes():
    rng = random.Random(77)
    texts = [t for t, _, _ in AUTO_CASES]
    for text in texts:
        for k in range(len(text) + 1):
            prefix = text[:k]
            expected = one_shot("auto", prefix)
            for chunks in ([prefix], list(prefix), rng_split(prefix, rng)):
                assert streamed("auto", chunks) == expected, (prefix, chunks)
    for _ in range(300):   # two samples of any formats glued and mangled
        text = list(rng.choice(texts) + rng.choice(["", " ", "\n"]) + rng.choice(texts))
        for _ in range(rng.randint(0, 3)):
            if not text:
                break
            i, j = sorted(rng.randrange(len(text)) for _ in range(2))
            text[i:i] = text[i:j + 1] if rng.random() < 0.5 else []
            if rng.random() < 0.5:
                del text[i:j + 1]
        text = "".join(text)
        expected = one_shot("auto", text)
        if not expected[1]:
            assert expected[0] == WhitespaceGate.apply(text)
        assert streamed("auto", list(text)) == expected, text
        assert streamed("auto", rng_split(text, rng)) == expected, text


def test_auto_waits_only_while_a_marker_may_still_grow():
    parser = get_tool_parser("auto")()
    assert parser.extract_streaming("[TOOL") is None          # "[TOOL_CALLS]" or a pythonic list: not yet known
    msg = parser.extract_streaming("_CALLS]f[ARGS]{}")       # now mistral's, and its call is complete
    assert [(d.name, d.arguments_delta) for d in msg.tool_calls] == [("f", "{}")] and parser.finish() is None
    parser = get_tool_parser("auto")()
    assert parser.extract_streaming("The answer") == DeltaMessage(content="The answer")
    assert parser.extract_streaming(" is <tool") == DeltaMessage(content=" is ")
    assert parser.extract_streaming("_call>") is None
