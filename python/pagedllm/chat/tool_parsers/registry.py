"""Tool-parser registry: name -> parser class, and the choice of a parser from a chat template's text."""
from __future__ import annotations

import importlib
import re
from typing import Callable, Optional

_PARSERS: dict[str, type] = {}
_BUILTIN_MODULES = ("auto", "hermes", "llama3_json", "mistral", "pythonic")


def register_tool_parser(name: str) -> Callable[[type], type]:
    """Class decorator: make a ToolParser subclass available as get_tool_parser(name)."""
    def wrap(cls: type) -> type:
        if name in _PARSERS and _PARSERS[name] is not cls:
            raise ValueError(f"A tool parser named {name!r} is already registered ({_PARSERS[name].__name__})")
        cls.name = name
        _PARSERS[name] = cls
        return cls
    return wrap


def _load_builtin() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"pagedllm.chat.tool_parsers.{module}")


def list_tool_parsers() -> list[str]:
    """The registered parser names, sorted."""
    _load_builtin()
    return sorted(_PARSERS)


def get_tool_parser(name: str) -> type:
    """The parser class registered under name; an unknown name is a ValueError that lists the known ones."""
    _load_builtin()
    try:
        return _PARSERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown tool parser {name!r}; known tool parsers: {', '.join(sorted(_PARSERS))}") from None


# A python-list call format described in the template, e.g. "[func_name1(params_name1=params_value1, ...), ...]"
# (Llama 3.2 / Llama 4 pythonic templates) or "[func_name1(param1=value1, param2=value2), func_name2(...)]".
_PYTHONIC_RE = re.compile(r"\[\s*[A-Za-z_]\w*\(\s*[A-Za-z_]\w*\s*=")


def pick_tool_parser(chat_template: Optional[str]) -> Optional[str]:
    """Infer the tool-call format from a chat template's text; None when it shows no known tool-call format.
    The order matters: a hermes template also mentions "parameters" (in its tool schemas)."""
    if not chat_template:
        return None
    if "<tool_call>" in chat_template:
        return "hermes"
    if "[TOOL_CALLS]" in chat_template:
        return "mistral"
    if "<|python_start|>" in chat_template or _PYTHONIC_RE.search(chat_template):
        return "pythonic"
    if "<|python_tag|>" in chat_template or '"parameters"' in chat_template:
        return "llama3_json"
    return None
