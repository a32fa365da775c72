"""From a step's logits to sampled tokens and their logprobs, for every SamplingParams field.

Order (vLLM's): raw logprobs are taken from the model's logits first; then user logits
processors, allowed_token_ids, bad_words, min_tokens (stop tokens masked), logit_bias, the
repetition / frequency / presence penalties; then temperature, min_p, top_k, top_p and the
draw, all inside the sample_tokens op (Philox(seed, offset) per row: batch-independent).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch

from pagedllm.layers.sampler import Sampler, SamplingTensors
from pagedllm.sampling_params import SamplingParams


@dataclass
class SampleRow:
    """What the sampler needs to know about one row of logits."""
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    seed: int
    offset: int                 # how many tokens this sequence sampled before: the Philox counter
    stop_token_ids: frozenset = frozenset()   # EOS and stop_token_ids (masked until min_tokens)


@dataclass
class SampleResult:
    token_id: int
    logprob: Optional[float]    # raw logprob of the sampled token (None when nobody asked)
    rank: Optional[int]         # 1 = the most likely token
    top_logprobs: Optional[list[tuple[int, float]]] = None  # requested top-k (token, logprob)


def _call_processor(proc, prompt_ids: list[int], output_ids: list[int], row: torch.Tensor) -> torch.Tensor:
    try:
        nparams = len(inspect.signature(proc).parameters)
    except (TypeError, ValueError):
        nparams = 2
    return proc(prompt_ids, output_ids, row) if nparams == 3 else proc(output_ids, row)


def _bad_word_ids(params: SamplingParams, tokenizer) -> list[list[int]]:
    cached = getattr(params, "_bad_word_token_ids", None)
    if cached is None:
        cached = []
        for word in params.bad_words or []:
            # Both with and without a leading space, as vLLM does: the word may start mid-text or after a space.
            for text in (word, " " + word.lstrip()):
                ids = tokenizer.encode(text, add_special_tokens=False) if tokenizer is not None else []
                if ids and ids not in cached:
                    cached.append(ids)
        params._bad_word_token_ids = cached
    return cached


def apply_logits_processors(logits: torch.Tensor, rows: list[SampleRow], tokenizer=None) -> torch.Tensor:
    """In place on logits [num_rows, vocab] (float32); returns it."""
    vocab = logits.shape[1]
    for i, r in enumerate(rows):
        p = r.params
        if p.logits_processors:
            for proc in p.logits_processors:
                logits[i] = _call_processor(proc, r.prompt_token_ids, r.output_token_ids, logits[i])
        if p.allowed_token_ids is not None:
            keep = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
            keep[torch.tensor([t for t in p.allowed_token_ids if 0 <= t < vocab], dtype=torch.long,
                              device=logits.device)] = True
            logits[i].masked_fill_(~keep, float("-inf"))
        if p.bad_words:
            out = r.output_token_ids
            for ids in _bad_word_ids(p, tokenizer):
                prefix = ids[:-1]
                if len(out) >= len(prefix) and (not prefix or out[len(out) - len(prefix):] == prefix):
                    logits[i, ids[-1]] = float("-inf")
        if p.min_tokens and len(r.output_token_ids) < p.min_tokens and r.stop_token_ids:
            logits[i, [t for t in r.stop_token_ids if 0 <= t < vocab]] = float("-inf")
        if p.logit_bias:
            ids = [t for t in p.logit_bias if 0 <= t < vocab]
            logits[i, ids] += torch.tensor([p.logit_bias[t] for t in ids], device=logits.device)
    _apply_penalties(logits, rows)
    return logits


def _apply_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> None:
    idx = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0
           or r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0]
    if not idx:
        return
    vocab = logits.shape[1]
    for i in idx:
        p, r = rows[i].params, rows[i]
        out = torch.tensor(r.output_token_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(out[out < vocab], minlength=vocab).to(logits.dtype) if len(out) else None
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
            ids = torch.tensor([t for t in r.prompt_token_ids if t < vocab], dtype=torch.long, device=logits.device)
            seen[ids] = True
            if counts is not None:
                seen |= counts > 0
            row = logits[i]
            penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            logits[i] = torch.where(seen, penalized, row)
        if counts is not None:
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _needs_processing(p: SamplingParams) -> bool:
    return bool(p.logits_processors or p.allowed_token_ids is not None or p.bad_words or p.min_tokens
                or p.logit_bias or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty)


def wants_logprob(p: SamplingParams) -> bool:
    # The sampled token's logprob is needed for logprobs, and to rank best_of samples.
    return p.logprobs is not None or (p.best_of or p.n) > p.n


class StepSampler:
    """The whole sampling step of the engine: logits processing, the sample_tokens op, logprobs."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer  # for bad_words
        self.sampler = Sampler()

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> list[SampleResult]:
        """logits: [len(rows), vocab] float32 from the model (not modified)."""
        processed = logits
        if any(_needs_processing(r.params) for r in rows):
            processed = apply_logits_processors(logits.clone(), rows, self.tokenizer)
        p = [r.params for r in rows]
        tensors = SamplingTensors.build([x.temperature for x in p], [x.top_k for x in p], [x.top_p for x in p],
                                        [x.min_p for x in p], [r.seed for r in rows], [r.offset for r in rows],
                                        device=logits.device)
        tokens = self.sampler(processed, tensors)
        tokens_l = tokens.tolist()
        if not any(wants_logprob(r.params) for r in rows):
            return [SampleResult(tok, None, None) for tok in tokens_l]

        raw_logprobs = torch.log_softmax(logits, dim=-1)  # vLLM's default: logprobs of the raw model output
        chosen = raw_logprobs.gather(1, tokens.view(-1, 1))
        ranks = (raw_logprobs > chosen).sum(dim=1) + 1
        want = [r.params.logprobs or 0 for r in rows]
        max_k = max(want)
        top = torch.topk(raw_logprobs, max_k, dim=1) if max_k else None
        chosen_l, ranks_l = chosen.view(-1).tolist(), ranks.tolist()
        top_v = top.values.tolist() if top is not None else None
        top_i = top.indices.tolist() if top is not None else None
        return [SampleResult(tokens_l[i], chosen_l[i], ranks_l[i],
                             list(zip(top_i[i][:k], top_v[i][:k])) if k else None)
                for i, k in enumerate(want)]
