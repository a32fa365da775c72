"""allowed_token_ids, bad_words and min_tokens: features that forbid tokens (logit -inf)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from pagedllm.sampling.processors.base import SamplingBatch, SamplingProcessor


class AllowedTokenIds(SamplingProcessor):
    name = "allowed_token_ids"

    def added(self, params, prompt_token_ids) -> Optional[Any]:
        if params.allowed_token_ids is None:
            return None
        return torch.tensor(params.allowed_token_ids, dtype=torch.long)

    def apply(self, batch: SamplingBatch, rows: list[int], states: list[Any]) -> None:
        logits = batch.logits
        for i, ids in zip(rows, states):
            keep = torch.zeros(batch.vocab, dtype=torch.bool, device=logits.device)
            keep[ids[(ids >= 0) & (ids < batch.vocab)].to(logits.device)] = True
            logits[i].masked_fill_(~keep, float("-inf"))


class BadWords(SamplingProcessor):
    """A bad word's last token is forbidden when the output ends with the word's other tokens."""
    name = "bad_words"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def added(self, params, prompt_token_ids) -> Optional[Any]:
        if not params.bad_words:
            return None
        word_ids: list[list[int]] = []
        for word in params.bad_words:
            # Both with and without a leading space, as vLLM does: the word may start mid-text or after a space.
            for text in (word, " " + word.lstrip()):
                ids = self.tokenizer.encode(text, add_special_tokens=False) if self.tokenizer is not None else []
                if ids and ids not in word_ids:
                    word_ids.append(ids)
        return word_ids

    def apply(self, batch: SamplingBatch, rows: list[int], states: list[Any]) -> None:
        for i, word_ids in zip(rows, states):
            out = batch.rows[i].output_token_ids
            for ids in word_ids:
                prefix = ids[:-1]
                if len(out) >= len(prefix) and (not prefix or out[len(out) - len(prefix):] == prefix):
                    batch.logits[i, ids[-1]] = float("-inf")


class MinTokens(SamplingProcessor):
    """Stop tokens (EOS and stop_token_ids) are forbidden until min_tokens were generated."""
    name = "min_tokens"

    def added(self, params, prompt_token_ids) -> Optional[Any]:
        return params.min_tokens or None

    def apply(self, batch: SamplingBatch, rows: list[int], states: list[Any]) -> None:
        for i, min_tokens in zip(rows, states):
            r = batch.rows[i]
            if len(r.output_token_ids) < min_tokens and r.stop_token_ids:
                batch.logits[i, [t for t in r.stop_token_ids if 0 <= t < batch.vocab]] = float("-inf")
