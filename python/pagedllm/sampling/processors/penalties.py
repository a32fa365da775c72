"""logit_bias, then the repetition / frequency / presence penalties (vLLM's order)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from pagedllm.sampling.processors.base import SamplingBatch, SamplingProcessor


class LogitBias(SamplingProcessor):
    name = "logit_bias"

    def added(self, params, prompt_token_ids) -> Optional[Any]:
        if not params.logit_bias:
            return None
        return (torch.tensor(list(params.logit_bias), dtype=torch.long),
                torch.tensor(list(params.logit_bias.values()), dtype=torch.float32))

    def apply(self, batch: SamplingBatch, rows: list[int], states: list[Any]) -> None:
        logits = batch.logits
        for i, (ids, bias) in zip(rows, states):
            ok = (ids >= 0) & (ids < batch.vocab)  # the engine rejects others; direct callers may not
            logits[i, ids[ok].to(logits.device)] += bias[ok].to(logits.device, logits.dtype)


class Penalties(SamplingProcessor):
    """Repetition penalty over prompt + output tokens; frequency and presence over output tokens."""
    name = "penalties"

    def added(self, params, prompt_token_ids) -> Optional[Any]:
        if params.repetition_penalty == 1.0 and not params.presence_penalty and not params.frequency_penalty:
            return None
        return params

    def apply(self, batch: SamplingBatch, rows: list[int], states: list[Any]) -> None:
        logits = batch.logits
        vocab, dev = batch.vocab, logits.device
        for i, p in zip(rows, states):
            r = batch.rows[i]
            out = torch.tensor(r.output_token_ids, dtype=torch.long, device=dev)
            counts = torch.bincount(out[out < vocab], minlength=vocab).to(logits.dtype) if len(out) else None
            if p.repetition_penalty != 1.0:
                seen = torch.zeros(vocab, dtype=torch.bool, device=dev)
                ids = torch.tensor([t for t in r.prompt_token_ids if t < vocab], dtype=torch.long, device=dev)
                seen[ids] = True
                if counts is not None:
                    seen |= counts > 0
                row = logits[i]
                penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
                logits[i] = torch.where(seen, penalized, row)
            if counts is not None:
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
