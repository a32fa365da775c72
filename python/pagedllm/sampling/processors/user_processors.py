"""SamplingParams.logits_processors: vLLM 0.10's per-request callables, (output_ids, logits) or
(prompt_ids, output_ids, logits) -> logits, applied row by row first."""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch

from pagedllm.sampling.processors.base import SamplingBatch, SamplingProcessor


def _call(proc, prompt_ids: list[int], output_ids: list[int], row: torch.Tensor) -> torch.Tensor:
    try:
        nparams = len(inspect.signature(proc).parameters)
    except (TypeError, ValueError):
        nparams = 2
    return proc(prompt_ids, output_ids, row) if nparams == 3 else proc(output_ids, row)


class UserLogitsProcessors(SamplingProcessor):
    name = "logits_processors"

    def added(self, params, prompt_token_ids) -> Optional[Any]:
        return params if params.logits_processors else None

    def apply(self, batch: SamplingBatch, rows: list[int], states: list[Any]) -> None:
        logits = batch.logits
        for i in rows:
            r = batch.rows[i]
            # The params of the row, not the state: the async engine wraps a request's processors.
            for proc in r.params.logits_processors or []:
                logits[i] = _call(proc, r.prompt_token_ids, r.output_token_ids, logits[i])
