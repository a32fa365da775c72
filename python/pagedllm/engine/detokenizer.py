"""Incremental detokenization: each new token's text from a small window of tokens, so a step
costs O(1) per sequence and multibyte characters split across tokens come out whole.

The window [prefix_offset, read_offset) is text already emitted; decoding
[prefix_offset, end) and keeping what follows the window's text gives the new characters. When
the tail is an incomplete UTF-8 sequence (it decodes to U+FFFD) nothing is emitted and the offsets
stay, so the character is emitted once its last byte arrives and the final text never holds a
U+FFFD that the full decode would not.
"""
from __future__ import annotations

from pagedllm.engine.sequence import Sequence

# Prompt tokens decoded as context before the first output token (leading spaces depend on it).
_INITIAL_OFFSET = 5


def _ids_to_tokens(tokenizer, ids: list[int], skip_special_tokens: bool) -> list[str]:
    tokens = tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)
    return [t for t in tokens if t is not None]


def _tokens_to_text(tokenizer, tokens: list[str], skip_special_tokens: bool,
                    spaces_between_special_tokens: bool) -> str:
    if not tokens:
        return ""
    if spaces_between_special_tokens or not hasattr(tokenizer, "all_special_tokens"):
        return tokenizer.convert_tokens_to_string(tokens)
    # Join runs of ordinary tokens; special tokens stand alone with no space between them.
    special = set(tokenizer.all_special_tokens)
    parts, run = [], []
    for tok in tokens:
        if tok in special:
            if run:
                parts.append(tokenizer.convert_tokens_to_string(run))
                run = []
            if not skip_special_tokens:
                parts.append(tok)
        else:
            run.append(tok)
    if run:
        parts.append(tokenizer.convert_tokens_to_string(run))
    return "".join(parts)


def detokenize_incrementally(tokenizer, seq: Sequence) -> str:
    """Appends the text of seq's newest output token(s) to seq.output_text; returns the new text."""
    params = seq.request.params
    skip = params.skip_special_tokens
    spaces = params.spaces_between_special_tokens
    if seq.tokens is None:
        context = _ids_to_tokens(tokenizer, seq.prompt_token_ids[-(_INITIAL_OFFSET + 2):], skip)
        seq.tokens = context
        seq.read_offset = len(context)
        seq.prefix_offset = max(len(context) - _INITIAL_OFFSET, 0)
        seq._detok_ids = 0
    new_ids = seq.output_token_ids[seq._detok_ids:]
    seq._detok_ids = len(seq.output_token_ids)
    seq.tokens.extend(_ids_to_tokens(tokenizer, new_ids, skip))
    prefix_text = _tokens_to_text(tokenizer, seq.tokens[seq.prefix_offset:seq.read_offset], skip, spaces)
    text = _tokens_to_text(tokenizer, seq.tokens[seq.prefix_offset:], skip, spaces)
    if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
        return ""  # nothing new, or a character still waiting for its last bytes
    new_text = text[len(prefix_text):]
    seq.prefix_offset, seq.read_offset = seq.read_offset, len(seq.tokens)
    seq.output_text += new_text
    return new_text


def decode_token(tokenizer, token_id: int) -> str:
    """The text of one token alone (for Logprob.decoded_token)."""
    return tokenizer.decode([token_id])
