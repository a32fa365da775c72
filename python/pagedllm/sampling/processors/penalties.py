"""logit_bias, then the repetition / frequency / presence penalties (vLLM's order)."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
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
        """Every biased row in one index_add_ over the flat logits (one host-to-device copy per tensor)."""
        logits = batch.logits
        flat, values = [], []
        for i, (ids, bias) in zip(rows, states):
            ok = (ids >= 0) & (ids < batch.vocab)  # the engine rejects others; direct callers may not
            flat.append(ids[ok] + i * batch.vocab)   # a dict's keys: each logit gets at most one add
            values.append(bias[ok])
        logits.view(-1).index_add_(0, torch.cat(flat).to(logits.device, non_blocking=True),
                                   torch.cat(values).to(logits.device, logits.dtype, non_blocking=True))


class Penalties(SamplingProcessor):
    """Repetition penalty over prompt + output tokens; frequency and presence over output tokens."""
    name = "penalties"

    def added(self, params, prompt_token_ids) -> Optional[Any]:
        if params.repetition_penalty == 1.0 and not params.presence_penalty and not params.frequency_penalty:
            return None
        return params

    def apply(self, batch: SamplingBatch, rows: list[int], states: list[Any]) -> None:
        """All penalized rows at once: their token ids go to the device in one copy (flat row * vocab + id
        indices), never a copy per row. Multiplying or dividing by a repetition penalty of 1.0 and subtracting
        zero counts leave a logit's bits unchanged, so rows without one penalty kind need no mask of their own."""
        logits = batch.logits
        vocab, dev = batch.vocab, logits.device
        n = len(rows)
        counted: list[np.ndarray] = []   # flat indices of output tokens (counts)
        seen: list[np.ndarray] = []      # flat indices of prompt tokens (repetition penalty only)
        for k, (i, p) in enumerate(zip(rows, states)):
            r = batch.rows[i]
            out = np.asarray(r.output_token_ids, dtype=np.int64)
            counted.append(out[out < vocab] + k * vocab)
            if p.repetition_penalty != 1.0:
                prompt = np.asarray(r.prompt_token_ids, dtype=np.int64)
                seen.append(prompt[prompt < vocab] + k * vocab)
        flat_out, flat_prompt = np.concatenate(counted), np.concatenate(seen or [np.zeros(0, np.int64)])
        host = torch.from_numpy(np.concatenate([flat_out, flat_prompt,
                                                np.asarray(rows, dtype=np.int64)]))
        knobs = torch.tensor([[p.repetition_penalty, p.frequency_penalty, p.presence_penalty] for p in states],
                             dtype=logits.dtype)
        host, knobs = host.to(dev, non_blocking=True), knobs.to(dev, non_blocking=True)
        out_idx, prompt_idx = host[:len(flat_out)], host[len(flat_out):len(flat_out) + len(flat_prompt)]
        row_idx = host[len(flat_out) + len(flat_prompt):]
        counts = torch.bincount(out_idx, minlength=n * vocab).view(n, vocab).to(logits.dtype)
        present = counts > 0
        rep, freq, pres = knobs[:, 0:1], knobs[:, 1:2], knobs[:, 2:3]
        sub = logits.index_select(0, row_idx)
        was_seen = present.clone()
        was_seen.view(-1)[prompt_idx] = True
        sub = torch.where(was_seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub -= freq * counts + pres * present.to(logits.dtype)
        logits.index_copy_(0, row_idx, sub)
