"""The Jinja sandbox chat templates run in, and the render under an output-size budget.

Standard library and jinja2 only, no relative imports: the render worker process (render_worker.py) loads this file
by itself, without the pagedllm package (whose import would load torch into every worker).
The environment is transformers' (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, the same globals),
with these differences:
- an unsafe attribute access fails instead of rendering as "";
- namespace() refuses underscore names;
- no constant folding (optimized=False): the compiler would otherwise expand `{{ 'a' * 10**7 }}` into the compiled
  code, unbounded and outside any render budget, and keep it alive in a template cache;
- `*` and `+` refuse results larger than the output budget before building them, so `'a' * 10**9` fails cleanly.
Time and memory are not bounded here (a single C call such as str.center cannot be interrupted from Python): the
worker process that runs this code enforces them (render_pool.py).
"""
from __future__ import annotations

import collections
import json
import operator
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_MAX_OUTPUT_CHARS = 16 << 20


class TemplateFailure(Exception):
    """A template that cannot be rendered: kind is "syntax", "sandbox", "error" or "output_limit"."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


class OutputLimitError(TemplateError):
    pass


class _GenerationTag(jinja2.ext.Extension):
    # {% generation %}...{% endgeneration %} marks assistant text for transformers' training masks;
    # rendering only needs its body.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    # namespace() objects refuse underscore-prefixed names: no dunder ever gets stored on one.
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a chat template cannot store {name!r} on a namespace")


def _size(value) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else 0


class ChatTemplateEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "+"})
    max_output_chars = DEFAULT_MAX_OUTPUT_CHARS   # set per render by render_template

    def unsafe_undefined(self, obj, attribute):
        # The stock sandbox hands back an Undefined for an unsafe attribute (''.__class__ renders as "");
        # here the attempt itself fails, so such a template never renders.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe.")

    def call_binop(self, context, op, left, right):
        if op == "*":
            for seq, count in ((left, right), (right, left)):
                if _size(seq) and isinstance(count, int) and _size(seq) * count > self.max_output_chars:
                    raise OutputLimitError(self._limit_message())
            return operator.mul(left, right)
        if _size(left) + _size(right) > self.max_output_chars:
            raise OutputLimitError(self._limit_message())
        return operator.add(left, right)

    def _limit_message(self) -> str:
        return f"the chat template's output is over the limit of {self.max_output_chars} characters"


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Not jinja's own tojson: that one HTML-escapes <, >, & and ' (templates want the raw JSON).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


def make_environment() -> ChatTemplateEnvironment:
    env = ChatTemplateEnvironment(trim_blocks=True, lstrip_blocks=True,
                                  extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.optimized = False   # no constant folding (see the module docstring)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


class TemplateCache:
    """Compiled templates by source text, least recently used first out. Bounded in entries and in source
    characters; the compiled code holds no rendered output (no constant folding)."""

    def __init__(self, env, max_entries: int = 32, max_chars: int = 4 << 20):
        self.env = env
        self.max_entries = max_entries
        self.max_chars = max_chars
        self._entries: collections.OrderedDict[str, object] = collections.OrderedDict()
        self._chars = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, source: str):
        compiled = self._entries.get(source)
        if compiled is not None:
            self._entries.move_to_end(source)
            return compiled
        try:
            compiled = self.env.from_string(source)
        except TemplateSyntaxError as e:
            raise TemplateFailure("syntax", f"The chat template does not parse (line {e.lineno}): {e.message}") \
                from None
        if len(source) <= self.max_chars:
            self._entries[source] = compiled
            self._chars += len(source)
            while len(self._entries) > self.max_entries or self._chars > self.max_chars:
                old, _ = self._entries.popitem(last=False)
                self._chars -= len(old)
        return compiled


def render_template(cache: TemplateCache, source: str, variables: dict, max_output_chars: int) -> str:
    """The rendered text; a TemplateFailure for every template problem (syntax, sandbox, raise_exception,
    undefined values, Python errors inside the template, output over max_output_chars)."""
    env = cache.env
    env.max_output_chars = max_output_chars
    compiled = cache.get(source)
    parts: list[str] = []
    total = 0
    try:
        for chunk in compiled.generate(**variables):
            total += len(chunk)
            if total > max_output_chars:
                raise OutputLimitError(env._limit_message())
            parts.append(chunk)
    except OutputLimitError as e:
        raise TemplateFailure("output_limit", f"The chat template failed: {e}") from None
    except SecurityError as e:
        raise TemplateFailure("sandbox", f"The chat template tried something the sandbox forbids: {e}") from None
    except TemplateError as e:
        raise TemplateFailure("error", f"The chat template failed: {e}") from None
    except RecursionError:
        raise TemplateFailure("error", "The chat template failed: it recursed too deeply (a macro that calls "
                                       "itself without end, or data nested too deep)") from None
    except OverflowError as e:   # the sandbox's range() limit, or a number too large
        raise TemplateFailure("error", f"The chat template failed: {_plain_message(e)}") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - a Python error inside the template (1/0, 'a' - 1, ...) is its failure
        raise TemplateFailure("error", f"The chat template failed: {_plain_message(e)}") from None
    return "".join(parts)


def _plain_message(e: BaseException) -> str:
    """An exception's message without Python internals ("range too big, maximum size for range is 100000")."""
    text = str(e).strip()
    return text or "the template raised an error"
