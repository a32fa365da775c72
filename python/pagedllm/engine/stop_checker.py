"""Decides after each new token whether a sequence is done, and trims its text as vLLM does."""
from __future__ import annotations

from typing import Optional

from pagedllm.engine.sequence import Sequence


def check_stop(seq: Sequence, new_text: str, eos_token_ids: frozenset, max_model_len: int) -> Optional[tuple]:
    """(finish_reason, stop_reason) when seq must stop after its newest token, else None."""
    params = seq.request.params
    token = seq.output_token_ids[-1]
    n_out = len(seq.output_token_ids)
    if n_out >= params.min_tokens:
        if not params.ignore_eos and token in eos_token_ids:
            _drop_token_text(seq, new_text, params)
            return "stop", None
        if token in params.stop_token_ids:
            _drop_token_text(seq, new_text, params)
            return "stop", token
        if params.stop and new_text:
            hit = _find_stop_string(seq, len(new_text), params.stop, params.include_stop_str_in_output)
            if hit is not None:
                return "stop", hit
    if params.max_tokens is not None and n_out >= params.max_tokens:
        return "length", None
    if seq.num_tokens >= max_model_len:
        return "length", None
    return None


def _drop_token_text(seq: Sequence, new_text: str, params) -> None:
    # A stop token's own text (when it has any after skip_special_tokens) is not part of the output.
    if new_text and not params.include_stop_str_in_output:
        seq.output_text = seq.output_text[: len(seq.output_text) - len(new_text)]


def _find_stop_string(seq: Sequence, new_chars: int, stops: list[str], include: bool) -> Optional[str]:
    """Stop strings may straddle tokens: search the new text plus the tail before it that a stop
    string could start in. The earliest match wins; the text is cut at it (or after it)."""
    text = seq.output_text
    best = None
    for stop in stops:
        start = max(0, len(text) - new_chars - len(stop) + 1)
        idx = text.find(stop, start)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, stop)
    if best is None:
        return None
    idx, stop = best
    seq.output_text = text[: idx + len(stop)] if include else text[:idx]
    return stop
