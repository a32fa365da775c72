"""Pinning a failure inside a step on the one request that caused it.

The engine runs many requests in one batched step; an exception from one request's own inputs (a user logits
processor, a grammar, a sampling value that slipped past validation, its detokenization) must fail that request
alone. LLMEngine.step is the one place that does it: it records the culprit (LLMEngine.fail_request), finishes the
step for everyone else, then aborts the culprit (its blocks freed) and hands the exception to the caller through
LLMEngine.pop_request_errors(). The helpers here find the culprit:

- guard_processor: a user logits processor reports its own exception instead of raising, so the batch goes on
  with that row's logits unchanged (the row's token is discarded with its request).
- sample_isolated: when the batched sampling step raises anyway, the rows are sampled again one by one (every
  row's draw depends only on its own logits, seed and offset, so the survivors get the tokens the batch would
  have given them) and only the rows that still fail are blamed.
"""
from __future__ import annotations

import inspect
import logging
from typing import Callable, Optional, Sequence

import torch

logger = logging.getLogger(__name__)


def describe(exc: BaseException) -> str:
    """The message a caller gets: a ValueError (bad input) is shown as is, anything else with its type."""
    return str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"


def _arity(proc) -> int:
    try:
        return len(inspect.signature(proc).parameters)
    except (TypeError, ValueError):
        return 2


def guard_processor(proc, on_error: Callable[[BaseException], None]):
    """proc (vLLM's 2- or 3-argument logits processor), reporting its exception to on_error and leaving the
    logits unchanged instead of raising. The wrapper keeps proc's arity."""
    if _arity(proc) == 3:
        def guarded(prompt_ids, output_ids, logits):
            try:
                return proc(prompt_ids, output_ids, logits)
            except Exception as e:  # noqa: BLE001 - reported to the owning request
                on_error(e)
                return logits
    else:
        def guarded(output_ids, logits):
            try:
                return proc(output_ids, logits)
            except Exception as e:  # noqa: BLE001 - reported to the owning request
                on_error(e)
                return logits
    return guarded


def sample_isolated(sampler, logits: torch.Tensor, rows: Sequence) -> tuple[list, dict[int, BaseException]]:
    """sampler(logits, rows), or, when that raises, each row alone: (results with None for a failed row,
    {row index: exception})."""
    try:
        return list(sampler(logits, rows)), {}
    except Exception as batch_error:  # noqa: BLE001 - pinned on rows below
        logger.warning("the sampling step failed (%s); sampling its %d rows one by one to find the culprit",
                       describe(batch_error), len(rows))
    results: list[Optional[object]] = []
    failures: dict[int, BaseException] = {}
    for i, row in enumerate(rows):
        try:
            results.append(sampler(logits[i:i + 1], [row])[0])
        except Exception as e:  # noqa: BLE001 - this row's request fails alone
            results.append(None)
            failures[i] = e
    return results, failures
