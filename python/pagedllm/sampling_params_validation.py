"""SamplingParams checks: every field's type and value, with vLLM's ValueError wording where vLLM has one.

normalize_fields() runs first (types: str / numpy scalars / lists in the wrong places become ValueErrors, accepted
values get their canonical Python type), then verify_values() checks ranges. Both raise ValueError only, so a caller
(LLM.generate, AsyncLLMEngine, the server's 400s) can tell a bad request from an engine failure.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's documented range for logit_bias values

_INT_FIELDS = ("n", "best_of", "top_k", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs",
               "truncate_prompt_tokens", "seed")
_FLOAT_FIELDS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p")
_OPTIONAL = {"best_of", "max_tokens", "logprobs", "prompt_logprobs", "truncate_prompt_tokens", "seed"}


def _type_name(value: Any) -> str:
    return type(value).__name__


def _as_int(name: str, value: Any) -> int:
    # bool is an int subclass but True as a count or a seed is a caller's mistake; floats are refused even when
    # integral (vLLM: "top_k must be an integer, got float"), numpy integers are accepted.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if name in ("n", "best_of"):
            raise ValueError(f"{name} must be an int, but is of type {type(value)}")
        raise ValueError(f"{name} must be an integer, got {_type_name(value)}")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {_type_name(value)}.")
    return value if type(value) in (int, float) else float(value)  # as given (vLLM's messages show 0, not 0.0)


def _int_list(name: str, value: Any) -> list[int]:
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a list of integers, got {_type_name(value)}.")
    items = list(value)
    if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in items):
        raise ValueError(f"{name} must contain only integers, got {items}.")
    return [int(t) for t in items]


def _str_list(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (bytes, dict)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a string or a list of strings, got {_type_name(value)}.")
    items = list(value)
    if not all(isinstance(s, str) for s in items):
        raise ValueError(f"{name} must contain only strings, got {items}.")
    return items


def _logit_bias(value: Any) -> dict[int, float]:
    if not isinstance(value, dict):
        raise ValueError(f"logit_bias must be a dict mapping token ids to biases, got {_type_name(value)}.")
    bias: dict[int, float] = {}
    bad_keys = []
    for key, v in value.items():
        try:
            tok = int(key)  # the server's JSON keys are strings ("50256")
        except (TypeError, ValueError):
            bad_keys.append(key)
            continue
        if isinstance(key, float) and key != tok:
            bad_keys.append(key)
            continue
        b = _as_float(f"logit_bias[{key!r}]", v)
        if not -LOGIT_BIAS_LIMIT <= b <= LOGIT_BIAS_LIMIT:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {v} for token {key!r}.")
        bias[tok] = float(b)
    if bad_keys:
        raise ValueError(f"logit_bias contains key(s) that cannot be converted to integer token IDs: {bad_keys!r}")
    return bias


def normalize_fields(p) -> None:
    """Checks each field's type and stores it in its canonical form (in place on SamplingParams p)."""
    for name in _INT_FIELDS:
        value = getattr(p, name)
        if value is None and name in _OPTIONAL:
            continue
        if isinstance(value, bool) and name in ("logprobs", "prompt_logprobs"):
            value = int(value)  # vLLM: logprobs=True means 1
        setattr(p, name, _as_int(name, value))
    for name in _FLOAT_FIELDS:
        setattr(p, name, _as_float(name, getattr(p, name)))
    p.stop = [] if p.stop is None else _str_list("stop", p.stop)
    p.stop_token_ids = [] if p.stop_token_ids is None else _int_list("stop_token_ids", p.stop_token_ids)
    if p.bad_words is not None:
        p.bad_words = _str_list("bad_words", p.bad_words)
    if p.allowed_token_ids is not None:
        p.allowed_token_ids = _int_list("allowed_token_ids", p.allowed_token_ids)
    if p.logit_bias is not None:
        p.logit_bias = _logit_bias(p.logit_bias)
    if p.logits_processors is not None:
        if not isinstance(p.logits_processors, (list, tuple)) or not all(callable(f) for f in p.logits_processors):
            raise ValueError("logits_processors must be a list of callables, got "
                             f"{_type_name(p.logits_processors)}.")
        p.logits_processors = list(p.logits_processors)


def verify_values(p) -> None:
    """Ranges, in vLLM's order and words (SamplingParams._verify_args), once every field has its type."""
    if p.n < 1:
        raise ValueError(f"n must be at least 1, got {p.n}.")
    if p.best_of < p.n:
        raise ValueError(f"best_of must be greater than or equal to n, got n={p.n} and best_of={p.best_of}.")
    if not -2.0 <= p.presence_penalty <= 2.0:
        raise ValueError(f"presence_penalty must be in [-2, 2], got {p.presence_penalty}.")
    if not -2.0 <= p.frequency_penalty <= 2.0:
        raise ValueError(f"frequency_penalty must be in [-2, 2], got {p.frequency_penalty}.")
    if not math.isfinite(p.repetition_penalty):
        raise ValueError(f"repetition_penalty must be a finite number, got {p.repetition_penalty}.")
    if p.repetition_penalty <= 0.0:
        raise ValueError(f"repetition_penalty must be greater than zero, got {p.repetition_penalty}.")
    if not math.isfinite(p.temperature):
        raise ValueError(f"temperature must be a finite number, got {p.temperature}.")
    if p.temperature < 0.0:
        raise ValueError(f"temperature must be non-negative, got {p.temperature}.")
    if not 0.0 < p.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p.top_p}.")
    if p.top_k < -1:
        raise ValueError(f"top_k must be -1 (disable), or at least 1, got {p.top_k}.")
    if not 0.0 <= p.min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {p.min_p}.")
    if p.max_tokens is not None and p.max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {p.max_tokens}.")
    if p.min_tokens < 0:
        raise ValueError(f"min_tokens must be greater than or equal to 0, got {p.min_tokens}.")
    if p.max_tokens is not None and p.min_tokens > p.max_tokens:
        raise ValueError(f"min_tokens must be less than or equal to max_tokens={p.max_tokens}, got {p.min_tokens}.")
    if p.logprobs is not None and p.logprobs < 0:
        raise ValueError(f"logprobs must be non-negative, got {p.logprobs}.")
    if p.prompt_logprobs is not None and p.prompt_logprobs < 0:
        raise ValueError(f"prompt_logprobs must be non-negative, got {p.prompt_logprobs}.")
    if p.truncate_prompt_tokens is not None and p.truncate_prompt_tokens < 1:
        raise ValueError(f"truncate_prompt_tokens must be >= 1, got {p.truncate_prompt_tokens}")
    if any(not s for s in p.stop):
        raise ValueError("stop cannot contain an empty string.")
    if p.stop and not p.detokenize:
        raise ValueError("stop strings are only supported when detokenize is True. Set detokenize=True to use stop.")
    if p.bad_words is not None and any(not w for w in p.bad_words):
        raise ValueError(f"bad_words cannot contain an empty string. Got bad_words={p.bad_words}")
    if p.seed is not None and not INT64_MIN <= p.seed <= INT64_MAX:
        raise ValueError(f"seed must be in [{INT64_MIN}, {INT64_MAX}], got {p.seed}.")
    if p.allowed_token_ids is not None and len(p.allowed_token_ids) == 0:
        raise ValueError("allowed_token_ids is not None and empty!")


def verify_greedy_sampling(p) -> None:
    """vLLM's _verify_greedy_sampling: every greedy sample would be the same sequence."""
    if p.n > 1:
        raise ValueError(f"n must be 1 when using greedy sampling, got {p.n}.")
    if p.best_of > 1:
        raise ValueError(f"best_of must be 1 when using greedy sampling, got {p.best_of}.")
