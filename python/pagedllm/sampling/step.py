"""The engine's sampling step: the processors (in vLLM's order: user logits processors,
allowed_token_ids, bad_words, min_tokens, logit_bias, penalties; structured outputs fill the token
bitmask), then temperature, min_p, top_k, top_p, the bitmask and the draw, all inside the
sample_tokens op (Philox(seed, offset) per row: batch-independent); logprobs of the raw logits."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pagedllm.layers.sampler import Sampler, SamplingTensors
from pagedllm.sampling.processors.base import ProcessorChain, SampleRow, SamplingBatch
from pagedllm.sampling.processors.penalties import LogitBias, Penalties
from pagedllm.sampling.processors.token_masks import AllowedTokenIds, BadWords, MinTokens
from pagedllm.sampling.processors.user_processors import UserLogitsProcessors
from pagedllm.sampling_params import SamplingParams


@dataclass
class SampleResult:
    token_id: int
    logprob: Optional[float]    # raw logprob of the sampled token (None when nobody asked)
    rank: Optional[int]         # 1 = the most likely token
    top_logprobs: Optional[list[tuple[int, float]]] = None  # requested top-k (token, logprob)


def wants_logprob(p: SamplingParams) -> bool:
    # The sampled token's logprob is needed for logprobs, and to rank best_of samples.
    return p.logprobs is not None or (p.best_of or p.n) > p.n


def rows_tensors(rows: list[SampleRow], device: torch.device,
                 token_bitmask: Optional[torch.Tensor] = None) -> SamplingTensors:
    """The sample_tokens parameters of the rows (their draws at each row's offset)."""
    p = [r.params for r in rows]
    return SamplingTensors.build([x.temperature for x in p], [x.top_k for x in p], [x.top_p for x in p],
                                 [x.min_p for x in p], [r.seed for r in rows], [r.offset for r in rows],
                                 device=device, token_bitmask=token_bitmask)


def default_processors(tokenizer, structured=None) -> ProcessorChain:
    """The engine's chain; `structured` (a StructuredOutputs processor) goes last."""
    procs = [UserLogitsProcessors(), AllowedTokenIds(), BadWords(tokenizer), MinTokens(), LogitBias(), Penalties()]
    if structured is not None:
        procs.append(structured)
    return ProcessorChain(procs)


class StepSampler:
    """The whole sampling step of the engine: processors, the sample_tokens op, logprobs."""

    def __init__(self, chain: Optional[ProcessorChain] = None, tokenizer=None):
        self.chain = chain if chain is not None else default_processors(tokenizer)
        self.sampler = Sampler()

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> list[SampleResult]:
        """logits: [len(rows), vocab] float32 from the model (not modified)."""
        batch = SamplingBatch(logits, rows)
        if any(r.state is not None for r in rows):
            self.chain.apply(batch)
        tokens = self.sampler(batch.processed, rows_tensors(rows, logits.device, batch.bitmask))
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
