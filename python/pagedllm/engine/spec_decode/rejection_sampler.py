"""Verifies k proposed tokens against the target model's k + 1 rows of logits (one forward).

Row j of the logits predicts the token after the sequence + drafts[:j]; its sampling row (penalties,
min_tokens, bad words ... and the Philox counter) is the one plain decoding would build there, and a
structured output's mask is its matcher's after drafts[:j] (ProcessorChain.apply_drafts: the matcher walks
the drafts and rolls back). Drafts past the first the grammar refuses, or past one that ends it, are never
accepted.
- Greedy: the target's token t_j (the first index of the largest processed logit, as sample_tokens)
  is computed for every row; drafts are accepted while d_j == t_j; the first mismatch emits t_j, and
  when all match the bonus t_k follows. The tokens are exactly plain greedy decoding's.
- Random: p_j = the processed, filtered (temperature, top_k, top_p, min_p) target distribution, q_j the
  proposer's (a point mass for ngram). d_j is accepted when u < p_j(d_j) / q_j(d_j); the first rejection
  draws from the residual max(p_j - q_j, 0) (renormalised); when all are accepted the bonus is drawn
  from p_k. Each emitted token is then distributed exactly as p (Leviathan et al. 2023).
Randomness: Philox(seed, counter = (m, stream)) for the sequence's m-th output token, one stream per
use (accept / draw), never the (m, 0) counter of sample_tokens: a seeded request repeats exactly.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from pagedllm.sampling.processors.base import ProcessorChain, SampleRow, SamplingBatch
from pagedllm.sampling.step import SampleResult, wants_logprob
from pagedllm.layers.sampler import GREEDY_TEMPERATURE, _to_int64, filtered_probs, philox4x32, unpack_bitmask

_MASK32 = 0xFFFFFFFF
STREAM_DRAFT, STREAM_ACCEPT, STREAM_DRAW = 1, 2, 3


def philox_uniforms(seed: int, counters: list[int], stream: int) -> torch.Tensor:
    """float32 uniforms in [0, 1), one per counter: (x0 >> 8) * 2^-24 of Philox(seed, (c, c >> 32, stream, 0))."""
    seed = _to_int64(seed)
    c = torch.tensor(counters, dtype=torch.int64)
    key = (torch.tensor(seed & _MASK32), torch.tensor((seed >> 32) & _MASK32))
    x0, _, _, _ = philox4x32((c & _MASK32, (c >> 32) & _MASK32, torch.full_like(c, stream), torch.zeros_like(c)), key)
    return (x0 >> 8).to(torch.float32) * 2.0 ** -24


def rows_for_drafts(row: SampleRow, drafts: list[int]) -> list[SampleRow]:
    """The sampling rows of positions 0..len(drafts): each sees the drafts before it as output."""
    return [replace(row, output_token_ids=row.output_token_ids + drafts[:j], offset=row.offset + j)
            for j in range(len(drafts) + 1)]


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits with every token the packed int32 bitmask forbids (bit clear) at -inf: what sample_tokens
    reads for them."""
    allowed = unpack_bitmask(bitmask.to(logits.device), logits.shape[1])
    return logits.masked_fill(~allowed, float("-inf"))


def speculative_logits(logits: torch.Tensor, rows: list[SampleRow], chain: Optional[ProcessorChain] = None,
                       drafts: Optional[list[int]] = None, positions: Optional[list[int]] = None
                       ) -> tuple[torch.Tensor, int]:
    """float32 logits after the rows' sampling processors (the engine's chain: penalties, bias, token masks,
    the grammar's bitmask), as the sampling step applies them, and how many leading drafts may be emitted.
    With drafts, the rows are positions of one sequence's proposal (row r at positions[r], default r):
    a processor that follows the tokens (a grammar) sees drafts[:positions[r]] before row r."""
    batch = SamplingBatch(logits.float(), rows)
    valid = len(drafts) if drafts is not None else 0
    if chain is not None and any(r.state is not None for r in rows):
        if drafts is None:
            chain.apply(batch)
        else:
            valid = chain.apply_drafts(batch, drafts, positions)
    out = batch.processed
    if batch.bitmask is not None:
        out = apply_bitmask(out, batch.bitmask)
    return out, valid


def processed_logits(logits: torch.Tensor, rows: list[SampleRow], chain: Optional[ProcessorChain] = None,
                     drafts: Optional[list[int]] = None, positions: Optional[list[int]] = None) -> torch.Tensor:
    return speculative_logits(logits, rows, chain, drafts, positions)[0]


def _probs(processed: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    p = rows[0].params
    n = len(rows)
    probs = filtered_probs(processed, torch.full((n,), float(p.temperature)), torch.full((n,), p.top_k),
                           torch.full((n,), float(p.top_p)), torch.full((n,), float(p.min_p)))
    total = probs.sum(dim=-1, keepdim=True)
    # A row with no finite logit has no distribution: sample_tokens takes its greedy token.
    bad = ~(total > 0) | ~torch.isfinite(total)
    if bad.any():
        greedy = torch.zeros_like(probs).scatter_(1, processed.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(bad, greedy, probs)
        total = probs.sum(dim=-1, keepdim=True)
    return probs / total


def target_probs(logits: torch.Tensor, rows: list[SampleRow], chain: Optional[ProcessorChain] = None,
                 drafts: Optional[list[int]] = None, positions: Optional[list[int]] = None) -> torch.Tensor:
    """Processed, filtered, normalised float32 probabilities [rows, vocab] (rows of one sampling kind)."""
    return _probs(processed_logits(logits, rows, chain, drafts, positions), rows)


def processed_argmax(logits: torch.Tensor, rows: list[SampleRow], chain: Optional[ProcessorChain] = None,
                     drafts: Optional[list[int]] = None, positions: Optional[list[int]] = None) -> list[int]:
    return processed_logits(logits, rows, chain, drafts, positions).argmax(dim=-1).tolist()


def greedy_targets(logits: list[torch.Tensor]) -> list[list[int]]:
    """The argmax of every row of several sequences' raw logits in one call (a per-sequence argmax over
    the vocabulary costs a thread-pool round trip each)."""
    if not logits:
        return []
    flat = torch.cat(logits).argmax(dim=-1).tolist()
    out, start = [], 0
    for part in logits:
        out.append(flat[start:start + part.shape[0]])
        start += part.shape[0]
    return out


def draw(probs: torch.Tensor, u: float) -> int:
    """Inverse CDF: the first token whose running mass exceeds u * total; never a zero-probability token."""
    cum = probs.cumsum(dim=0)
    idx = int(torch.searchsorted(cum, u * cum[-1], right=True))  # cum rises there: probs[idx] > 0
    if idx >= probs.shape[0]:  # rounding left no such token: the last one of non-zero probability
        idx = int(torch.flatnonzero(probs > 0)[-1])
    return idx


def verify(logits: torch.Tensor, drafts: list[int], row: SampleRow, chain: Optional[ProcessorChain] = None,
           draft_probs: Optional[torch.Tensor] = None, target: Optional[list[int]] = None
           ) -> tuple[list[SampleResult], int]:
    """logits: [len(drafts) + 1, vocab] raw target logits; row: the sampling row of position 0;
    draft_probs: [len(drafts), vocab] the proposer's distributions (None: point masses, as ngram);
    target: at temperature 0, the rows' greedy tokens when the caller computed them (greedy_targets).
    Returns (the emitted tokens' results, the number of accepted drafts)."""
    k = len(drafts)
    rows = rows_for_drafts(row, drafts)
    params = row.params
    # valid: the drafts that may be emitted at all (a grammar stops before a draft it refuses, which row
    # j's mask rejects anyway, and after one that ends it: the sequence ends there, later rows are moot).
    if params.temperature < GREEDY_TEMPERATURE:
        valid = k
        if target is None:
            processed, valid = speculative_logits(logits, rows, chain, drafts)
            target = processed.argmax(dim=-1).tolist()
        accepted = 0
        while accepted < valid and drafts[accepted] == target[accepted]:
            accepted += 1
        tokens = drafts[:accepted] + [target[accepted]]
    else:
        processed, valid = speculative_logits(logits, rows, chain, drafts)
        probs = _probs(processed, rows)
        m = [row.offset + j for j in range(k + 1)]
        u_accept = philox_uniforms(row.seed, m[:k], STREAM_ACCEPT).tolist() if k else []
        u_draw = philox_uniforms(row.seed, m, STREAM_DRAW).tolist()
        accepted = 0
        tokens = []
        while accepted < valid:
            d = drafts[accepted]
            p_d = float(probs[accepted, d])
            q_d = 1.0 if draft_probs is None else float(draft_probs[accepted, d])
            if u_accept[accepted] * q_d < p_d:  # accept with probability min(1, p/q)
                tokens.append(d)
                accepted += 1
                continue
            if draft_probs is None:
                residual = probs[accepted].clone()
                residual[d] = 0.0
            else:
                residual = (probs[accepted] - draft_probs[accepted]).clamp_(min=0.0)
            if not bool((residual > 0).any()):  # p == q up to rounding: p itself is the residual's limit
                residual = probs[accepted]
            tokens.append(draw(residual, u_draw[accepted]))
            break
        if accepted == valid:  # all (valid) drafts accepted: the next token from p there
            tokens.append(draw(probs[accepted], u_draw[accepted]))
    return _results(logits, tokens, params), accepted


def _results(logits: torch.Tensor, tokens: list[int], params) -> list[SampleResult]:
    if not wants_logprob(params):
        return [SampleResult(t, None, None) for t in tokens]
    raw = torch.log_softmax(logits[:len(tokens)].float(), dim=-1)  # vLLM's default: raw model logprobs
    idx = torch.tensor(tokens).view(-1, 1)
    chosen = raw.gather(1, idx)
    ranks = ((raw > chosen).sum(dim=1) + 1).tolist()
    k = params.logprobs or 0
    top = torch.topk(raw, k, dim=1) if k else None
    out = []
    for j, t in enumerate(tokens):
        tops = list(zip(top.indices[j].tolist(), top.values[j].tolist())) if top is not None else None
        out.append(SampleResult(t, float(chosen[j]), ranks[j], tops))
    return out
