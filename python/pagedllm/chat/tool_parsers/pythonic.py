"""Pythonic tool calls (Llama 3.2 / Llama 4 pythonic templates): the whole output is a Python list of calls

    [get_weather(city='Paris', days=3), get_time()]

optionally between "<|python_start|>" and "<|python_end|>". Parsed with ast, never evaluated: each element is
a call of a plain name with keyword arguments only (each once), whose values are literals (str, int, float, bool,
None, and lists, tuples and str-keyed dicts of them, nested; -1 and +1.5 are literals too). Anything else is
content.
"""
from __future__ import annotations

import ast
import math
from typing import Any

from pagedllm.chat.tool_parsers.base import (ParsedCall, WholeOutputToolParser, dump_arguments, skip_ws)
from pagedllm.chat.tool_parsers.registry import register_tool_parser

PYTHON_START = "<|python_start|>"
PYTHON_END = "<|python_end|>"


class _NotLiteral(Exception):
    pass


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float) and math.isfinite(value):
            return value
        raise _NotLiteral   # bytes, complex, Ellipsis, inf (1e999)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = node.operand
        if (isinstance(operand, ast.Constant) and isinstance(operand.value, (int, float))
                and not isinstance(operand.value, bool)):
            value = -operand.value if isinstance(node.op, ast.USub) else operand.value
            if math.isfinite(value):
                return value
        raise _NotLiteral
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values):
            if not (isinstance(k, ast.Constant) and isinstance(k.value, str)):   # None key: **spread
                raise _NotLiteral
            out[k.value] = _literal(v)
        return out
    raise _NotLiteral


def parse_pythonic_calls(source: str):
    """'[f(a=1), g()]' -> [ParsedCall], or None if it is not exactly a list of literal keyword calls."""
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    body = tree.body
    if not isinstance(body, ast.List) or not body.elts:
        return None
    calls = []
    try:
        for node in body.elts:
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)) or node.args:
                return None
            arguments = {}
            for kw in node.keywords:
                if kw.arg is None or kw.arg in arguments:     # **kwargs, or f(a=1, a=2)
                    return None
                arguments[kw.arg] = _literal(kw.value)
            calls.append(ParsedCall(node.func.id, dump_arguments(arguments)))
    except (_NotLiteral, RecursionError):
        return None
    return calls


@register_tool_parser("pythonic")
class PythonicToolParser(WholeOutputToolParser):

    def _classify(self, text: str, final: bool):
        if not final:
            # Settled early only when the output cannot start like a call list; otherwise wait for its end.
            rest = text[skip_ws(text, 0):]
            if PYTHON_START.startswith(rest):
                return None
            if rest.startswith(PYTHON_START):
                rest = rest[len(PYTHON_START):].lstrip()
                if not rest:
                    return None
            return None if rest.startswith("[") else self.CONTENT
        s = text.strip()
        if s.startswith(PYTHON_START):
            s = s[len(PYTHON_START):].lstrip()
        if s.endswith(PYTHON_END):
            s = s[:-len(PYTHON_END)].rstrip()
        # The list must be the whole text: no trailing comment or other tail that ast would let through.
        if not (s.startswith("[") and s.endswith("]")):
            return self.CONTENT
        calls = parse_pythonic_calls(s)
        return calls if calls else self.CONTENT
