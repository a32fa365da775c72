"""Chat templates: which template a model gets, what the messages look like to it, and sandboxed rendering.

The rendering is transformers' apply_chat_template (tokenize=False) reimplemented: the same jinja2
ImmutableSandboxedEnvironment settings and globals, the same template variables and the same message
normalisation, so a template renders here exactly as it does there. What vLLM adds on top (content format,
tool-call arguments parsed into objects) happens before, in `prepare_messages`.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Union

from pagedllm.chat.render_pool import RenderLimits, default_pool
from pagedllm.chat.sandbox import TemplateFailure

ChatTemplateContentFormatOption = Literal["auto", "string", "openai"]
ChatTemplateContentFormat = Literal["string", "openai"]

TEMPLATES_DIR = Path(__file__).parent / "templates"

# model_type -> the template pagedllm ships for a family whose checkpoints carry none.
FALLBACK_TEMPLATES = {"gpt2": "gpt2_eos.jinja"}

CONTINUE_GENERATION_ERROR = (
    "continue_final_message and add_generation_prompt are not compatible. Use continue_final_message when you want "
    "the model to continue the final message, and add_generation_prompt when you want to add a header that will "
    "prompt it to start a new assistant message instead.")

# Text content parts: part type -> the key that holds its text.
_TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
               "thinking": "thinking"}
# transformers passes a message's reasoning to templates under these names (the first is the usual one).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


# --- finding the template ---------------------------------------------------------------------------

def shipped_templates() -> list[str]:
    """File names of the templates pagedllm ships (python/pagedllm/chat/templates)."""
    return sorted(p.name for p in TEMPLATES_DIR.glob("*.jinja"))


def shipped_template(name: str) -> str:
    """The text of a shipped template, by file name with or without ".jinja"."""
    path = TEMPLATES_DIR / (name if name.endswith(".jinja") else name + ".jinja")
    if path.parent != TEMPLATES_DIR or not path.is_file():
        raise ValueError(f"pagedllm ships no chat template {name!r}; shipped: {', '.join(shipped_templates())}")
    return path.read_text(encoding="utf-8")


def _existing_file(value: str) -> Optional[Path]:
    if not value or "\n" in value or len(value) > 4096:
        return None
    try:
        path = Path(value).expanduser()
        return path if path.is_file() else None
    except (OSError, ValueError):
        return None


def load_chat_template(chat_template: Union[str, os.PathLike]) -> str:
    """The text of a chat_template argument: a path to a .jinja file, the name of a shipped template
    ("chatml_hermes_tools"), or the template itself."""
    if isinstance(chat_template, os.PathLike):
        try:
            return Path(chat_template).read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"Could not read the chat template file {os.fspath(chat_template)!r}: {e}") from e
    if not isinstance(chat_template, str):
        raise TypeError(f"chat_template must be a str (a template or a path), got {type(chat_template).__name__}")
    path = _existing_file(chat_template)
    if path is not None:
        return path.read_text(encoding="utf-8")
    if any(mark in chat_template for mark in ("{{", "{%", "{#", "\n")):
        return chat_template
    stem = chat_template[:-len(".jinja")] if chat_template.endswith(".jinja") else chat_template
    if (TEMPLATES_DIR / f"{stem}.jinja").is_file() and "/" not in stem and os.sep not in stem:
        return shipped_template(stem)
    if chat_template.endswith(".jinja") or "/" in chat_template or os.sep in chat_template:
        raise ValueError(f"The chat template {chat_template!r} looks like a file path, but no such file exists "
                         f"(nor a shipped template of that name: {', '.join(shipped_templates())})")
    return chat_template  # a template without any Jinja syntax: constant text


def _template_from_dict(templates: Mapping[str, str], name: Optional[str], tools) -> str:
    if name is not None and name in templates:
        return templates[name]
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    raise ValueError("This model has several chat templates and no default: pass the name of one as chat_template "
                     f"(one of {sorted(templates)}) or a template of your own.")


def resolve_chat_template(tokenizer, chat_template: Union[str, os.PathLike, None] = None, *,
                          tools: Optional[list] = None, model_type: Optional[str] = None) -> str:
    """The template text: the chat_template argument, else the tokenizer's own (tokenizer_config.json or GGUF
    metadata), else the one pagedllm ships for a known template-less family (model_type), else ValueError."""
    own = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if chat_template is not None:
        if isinstance(own, Mapping) and isinstance(chat_template, str) and chat_template in own:
            return own[chat_template]
        return load_chat_template(chat_template)
    if isinstance(own, Mapping) and own:
        return _template_from_dict(own, None, tools)
    if isinstance(own, str) and own:
        return own
    if model_type in FALLBACK_TEMPLATES:
        return shipped_template(FALLBACK_TEMPLATES[model_type])
    raise ValueError(
        "This model's tokenizer has no chat template (none in tokenizer_config.json / the GGUF metadata), and "
        f"pagedllm ships none for model type {model_type!r}. Pass one: llm.chat(messages, chat_template=...) with "
        "a Jinja template string or the path to a .jinja file, or the name of a template pagedllm ships "
        f"({', '.join(t[:-len('.jinja')] for t in shipped_templates())}).")


# --- the sandbox (chat/sandbox.py; renders run in worker processes: chat/render_pool.py) ----------------

@functools.lru_cache(maxsize=None)
def _environment():
    """The sandbox environment, in this process for parsing only (content-format detection)."""
    from pagedllm.chat.sandbox import make_environment
    return make_environment()


# --- content format: does the template want a string or the list of parts? ----------------------------

def _unwrap(node):
    """The expression under filters, tests and slices: messages|reverse, messages[1:], content is string."""
    from jinja2 import nodes
    while True:
        if isinstance(node, (nodes.Filter, nodes.Test)) and node.node is not None:
            node = node.node
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
            node = node.node
        elif isinstance(node, nodes.CondExpr):
            node = node.expr1
        else:
            return node


def _key(node) -> Optional[str]:
    """The attribute / constant key a Getattr / Getitem reads (x.key, x['key']), else None."""
    from jinja2 import nodes
    if isinstance(node, nodes.Getattr):
        return node.attr
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
        return node.arg.value
    return None


def _aliases(ast, seeds: set[str], is_source) -> set[str]:
    """seeds plus every name assigned ({% set x = ... %}) from an expression is_source accepts, transitively."""
    from jinja2 import nodes
    names = set(seeds)
    changed = True
    while changed:
        changed = False
        for assign in ast.find_all(nodes.Assign):
            if isinstance(assign.target, nodes.Name) and assign.target.name not in names \
                    and is_source(_unwrap(assign.node), names):
                names.add(assign.target.name)
                changed = True
    return names


def detect_content_format(template: str) -> ChatTemplateContentFormat:
    """"openai" when the template walks a message's content as a list of parts ({% for part in
    message['content'] %}, message.content[0]['text'], ... | selectattr / map over it), else "string"."""
    from jinja2 import nodes
    try:
        ast = _environment().parse(template)
    except Exception:
        return "string"

    def is_name(node, names):
        return isinstance(node, nodes.Name) and node.name in names

    # messages and what is assigned from it (messages[1:], messages|reverse, ...)
    message_lists = _aliases(ast, {"messages"}, is_name)

    def is_message(node, names):  # a loop variable over the messages, or messages[i]
        node = _unwrap(node)
        return is_name(node, names) or (isinstance(node, nodes.Getitem) and _key(node) is None
                                        and is_name(_unwrap(node.node), message_lists))

    messages = {loop.target.name for loop in ast.find_all(nodes.For)
                if isinstance(loop.target, nodes.Name) and is_name(_unwrap(loop.iter), message_lists)}
    messages = _aliases(ast, messages, is_message)

    def is_content(node, names):  # message.content / message['content'] or a name assigned from one
        node = _unwrap(node)
        return is_name(node, names) or (_key(node) == "content" and is_message(node.node, messages))

    contents = _aliases(ast, set(), is_content)
    for loop in ast.find_all(nodes.For):
        if is_content(loop.iter, contents):
            return "openai"
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        # content[...]['text'] / content[0].type
        if _key(node) in ("text", "type") and isinstance(node.node, nodes.Getitem) and _key(node.node) is None \
                and is_content(node.node.node, contents):
            return "openai"
    return "string"


def resolve_content_format(template: str, given: ChatTemplateContentFormatOption = "auto") \
        -> ChatTemplateContentFormat:
    if given not in ("auto", "string", "openai"):
        raise ValueError(f"chat_template_content_format must be 'auto', 'string' or 'openai', got {given!r}")
    return detect_content_format(template) if given == "auto" else given


# --- messages ---------------------------------------------------------------------------------------

def _as_dict(message) -> dict:
    if isinstance(message, Mapping):
        return dict(message)
    if dataclasses.is_dataclass(message) and not isinstance(message, type):
        return {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    if callable(getattr(message, "model_dump", None)):  # pydantic (the OpenAI SDK's message types)
        return message.model_dump()
    raise TypeError(f"A chat message is a dict with 'role' and 'content', got {type(message).__name__}")


def _text_parts(content, role: str) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if isinstance(content, Mapping) or not isinstance(content, Iterable):
        raise ValueError(f"The content of a {role!r} message must be a string or a list of parts, "
                         f"got {type(content).__name__}")
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
            continue
        part = _as_dict(part)
        kind = part.get("type")
        if kind is None:
            raise ValueError("Missing 'type' field in multimodal part.")
        if kind not in _TEXT_PARTS:
            raise ValueError(f"Content part type {kind!r} is not supported: pagedllm serves text-only models "
                             f"(text parts: {', '.join(_TEXT_PARTS)}).")
        text = part.get(_TEXT_PARTS[kind])
        if text is not None:
            texts.append(text)
    return texts


def _parse_arguments(function: dict) -> None:
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments)
        except json.JSONDecodeError:
            function["arguments"] = {}  # as vLLM: a string that is no JSON becomes an empty object
    elif not isinstance(arguments, (dict, list)):
        function["arguments"] = {}


def prepare_messages(messages: Iterable, content_format: ChatTemplateContentFormat = "string") -> list[dict]:
    """The messages as the template sees them (vLLM's parse_chat_messages, text-only): content is a string
    (text parts joined by "\\n") for "string" or a list of {"type": "text", "text": ...} for "openai"; tool
    messages always carry a string; assistant tool_calls get their JSON-string arguments parsed into objects.
    Other keys (name, tool_call_id, reasoning_content, ...) pass through. The input is never modified."""
    if content_format not in ("string", "openai"):
        raise ValueError(f"content_format must be 'string' or 'openai', got {content_format!r}")
    prepared = []
    for raw in messages:
        message = _as_dict(raw)
        check_nesting(message)
        message = copy.deepcopy(message)
        role = message.get("role")
        if not isinstance(role, str):
            raise ValueError(f"Every chat message needs a 'role' (a string), got {raw!r}")
        texts = _text_parts(message.get("content"), role)
        if content_format == "openai" and role != "tool":
            message["content"] = [{"type": "text", "text": t} for t in texts]
        else:
            message["content"] = "\n".join(texts)
        if role == "assistant" and "tool_calls" in message:
            tool_calls = message["tool_calls"]
            if not tool_calls:
                message.pop("tool_calls")  # None or []: the template takes its plain-assistant path
            else:
                calls = []
                for call in tool_calls:
                    call = _as_dict(call)
                    if isinstance(call.get("function"), Mapping) or dataclasses.is_dataclass(call.get("function")):
                        call["function"] = _as_dict(call["function"])
                        _parse_arguments(call["function"])
                    calls.append(call)
                message["tool_calls"] = calls
        prepared.append(message)
    return prepared


MAX_NESTING = 100   # levels of dicts / lists in a message, a tool or a template variable
_NESTING_ERROR = f"A chat message, tool or template variable is nested more than {MAX_NESTING} levels deep."


def check_nesting(value: Any) -> None:
    """ValueError when value holds dicts / lists nested deeper than MAX_NESTING (checked without recursion, so
    600 levels fail cleanly instead of exhausting the interpreter's stack later)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth >= MAX_NESTING:
            raise ValueError(_NESTING_ERROR)
        stack.extend((child, depth + 1) for child in children)


def _plain(value: Any, depth: int = 0) -> Any:
    """What a template may see: plain JSON-like data only (str/int/float/bool/None, dicts, lists, tuples).
    Anything else becomes an inert "<TypeName>" string, so no object with methods reaches the sandbox.
    Data nested deeper than MAX_NESTING levels is a ValueError."""
    if depth > MAX_NESTING:
        raise ValueError(_NESTING_ERROR)
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    depth += 1
    if isinstance(value, Mapping):
        return {_plain(k, depth): _plain(v, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, depth) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v, depth) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name), depth) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump(), depth)
    if callable(getattr(value, "item", None)) and getattr(value, "shape", None) == ():  # numpy / torch scalars
        return _plain(value.item(), depth)
    return f"<{type(value).__name__}>"


def _template_messages(messages: Iterable) -> list[dict]:
    """As transformers hands messages to a template: keys whose value is None dropped, a message's reasoning
    under reasoning_content (and thinking), plain data only."""
    out = []
    for message in messages:
        message = _plain({k: v for k, v in _as_dict(message).items() if v is not None})
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


# --- rendering --------------------------------------------------------------------------------------

_CONTINUE_TAG = "PAGEDLLM_CONTINUE_FINAL_MESSAGE_TAG "


def _tag_final_message(messages: list[dict]) -> str:
    """Appends _CONTINUE_TAG to the last text of the final message; returns that text (before the tag)."""
    if not messages:
        raise ValueError("continue_final_message is set but the conversation is empty!")
    content = messages[-1].get("content")
    if isinstance(content, str):
        messages[-1]["content"] = content + _CONTINUE_TAG
        return content
    if isinstance(content, (list, tuple)):
        for part in reversed(content):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                text = part["text"]
                part["text"] = text + _CONTINUE_TAG
                return text
        raise ValueError("continue_final_message is set but we could not find any text to continue in the final "
                         "message!")
    raise ValueError('continue_final_message is set but the final message has no "content" to continue!')


def _cut_after_final_message(rendered: str, final_text: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if tag not in rendered or final_text.strip() not in rendered:
        raise ValueError("continue_final_message is set but the final message does not appear in the chat after "
                         "applying the chat template (the template drops or rewrites it), so it cannot be "
                         f"continued. Final message: {final_text.strip()!r}")
    at = rendered.rindex(tag)
    if rendered[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()  # the template trimmed the message: so do we


def render_chat_template(template: str, messages: Iterable, *, tools: Optional[list] = None,
                         documents: Optional[list] = None, add_generation_prompt: bool = False,
                         continue_final_message: bool = False, limits: Optional[RenderLimits] = None,
                         **template_vars) -> str:
    """Renders one conversation as transformers' tokenizer.apply_chat_template(..., tokenize=False) does.
    template_vars are further template variables (bos_token, eos_token, enable_thinking, ...).
    The render runs in a worker process under limits (time, memory, output size: RenderLimits' defaults when
    None). Every template failure (raise_exception, undefined values, sandbox violations, a limit reached) is a
    ValueError whose message names the problem, never a Python exception name."""
    if continue_final_message and add_generation_prompt:
        raise ValueError(CONTINUE_GENERATION_ERROR)
    if tools is not None:
        for tool in tools:
            if not isinstance(tool, Mapping):
                raise ValueError(f"Each tool is a JSON schema dict (OpenAI function format), got {type(tool).__name__}")
    if documents is not None:
        for document in documents:
            if not isinstance(document, Mapping):
                raise ValueError("Documents should be a list of dicts with 'title' and 'text' keys!")
    reserved = {"messages", "tools", "documents", "add_generation_prompt"} & set(template_vars)
    if reserved:
        raise ValueError(f"template variable {sorted(reserved)[0]!r} is set by chat() itself")
    for value in (tools, documents, template_vars):
        check_nesting(value)
    chat = _template_messages(messages)
    final_text = _tag_final_message(chat) if continue_final_message else None
    variables = {"messages": chat, "tools": _plain(tools), "documents": _plain(documents),
                 "add_generation_prompt": add_generation_prompt, **_plain(template_vars)}
    try:
        rendered = default_pool().render(template, variables, limits)
    except TemplateFailure as e:
        raise ValueError(e.message) from None
    if final_text is not None:
        rendered = _cut_after_final_message(rendered, final_text)
    return rendered


def special_token_vars(tokenizer) -> dict:
    """The tokenizer's special tokens as template variables (bos_token, eos_token, ...), as transformers passes them."""
    if tokenizer is None:
        return {}
    mapping = getattr(tokenizer, "special_tokens_map", None) or {}
    return {k: v for k, v in dict(mapping).items() if isinstance(k, str)}


def apply_chat_template(tokenizer, messages: Iterable, chat_template: Union[str, os.PathLike, None] = None, *,
                        content_format: ChatTemplateContentFormatOption = "auto", tools: Optional[list] = None,
                        documents: Optional[list] = None, add_generation_prompt: bool = True,
                        continue_final_message: bool = False, chat_template_kwargs: Optional[dict] = None,
                        model_type: Optional[str] = None, limits: Optional[RenderLimits] = None) -> str:
    """The prompt text of one conversation: resolve the template, prepare the messages for its content
    format, render with the tokenizer's special tokens and chat_template_kwargs as variables."""
    template = resolve_chat_template(tokenizer, chat_template, tools=tools, model_type=model_type)
    fmt = resolve_content_format(template, content_format)
    variables = {**special_token_vars(tokenizer), **(chat_template_kwargs or {})}
    return render_chat_template(template, prepare_messages(messages, fmt), tools=tools, documents=documents,
                                add_generation_prompt=add_generation_prompt,
                                continue_final_message=continue_final_message, limits=limits, **variables)
