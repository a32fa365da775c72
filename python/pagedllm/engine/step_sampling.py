"""The driver's half of a step (rank 0): which hidden rows need logits, and what is made of the logits
the model runner returns: the samples (processors, sample_tokens, logprobs: sampling/step.py), the
prompt logprobs with their text, the speculative verification rows.

Sampling stays here, next to the requests, rather than in the runner: the processors (user logits
processors, grammars, penalties) need request objects and callables, and under tensor parallelism
only rank 0 samples, so the runner returns whole logits (all-gathered vocab shards) and never sees a
SamplingParams. The logits of a step are small next to its forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from pagedllm.engine.request_failures import sample_isolated
from pagedllm.engine.runner_io import StepInput
from pagedllm.engine.scheduler import SchedulerOutput
from pagedllm.outputs import Logprob
from pagedllm.sampling.processors.base import SampleRow
from pagedllm.sampling.step import SampleResult, StepSampler


@dataclass
class StepResult:
    samples: dict[int, list[SampleResult]]            # seq_id -> one result (n results for a fork point)
    prompt_logprobs: dict[int, list[Optional[dict]]]  # seq_id -> entries for the positions computed this step
    failures: dict[int, BaseException] = field(default_factory=dict)  # seq_id -> its rows' sampling error
    spec_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # seq_id -> [1 + drafts, vocab] (verify)


@dataclass
class _Plan:
    rows: list[SampleRow]
    owners: list[int]                                        # seq_id of each sampling row
    prompt: dict[int, tuple[int, list[int], list[int]]]      # seq_id -> (group, positions, target tokens)
    prompt_k: dict[int, int]                                 # seq_id -> its prompt_logprobs
    spec: list[int]                                          # seq_ids of the verification group, in order
    spec_lens: list[int]


class StepSampling:
    def __init__(self, chain=None, text_of: Callable[[int], Optional[str]] = lambda _: None):
        self.sampler = StepSampler(chain)
        self.text_of = text_of

    def plan(self, sched: SchedulerOutput, sample_rows: dict[int, list[SampleRow]], step: StepInput) -> _Plan:
        """Fills step.logits_rows: group 0 the sampling rows (each sampling sequence's last token, n rows
        at a fork point), then each prompt-logprobs sequence's positions, then the verification rows."""
        sample_idx, rows, owners, spec, spec_lens, spec_idx = [], [], [], [], [], []
        prompt, prompt_k, groups = {}, {}, [None]
        claimed: dict[str, int] = {}  # request id -> prompt positions already taken this step
        offset = 0
        for item in sched.scheduled:
            seq = item.seq
            if seq.request.params.prompt_logprobs is not None:
                plen = len(seq.prompt_token_ids)
                # Positions already reported (a recompute after preemption, or a forked sample) are skipped.
                done = len(seq.request.prompt_logprobs) - 1 if seq.request.prompt_logprobs else 0
                done = max(done, claimed.get(seq.request.request_id, 0))
                here = [p for p in range(item.start, item.start + item.num_new_tokens) if done <= p < plen - 1]
                if here:
                    claimed[seq.request.request_id] = here[-1] + 1
                    first = offset + here[0] - item.start
                    prompt[seq.seq_id] = (len(groups), here, [seq.prompt_token_ids[p + 1] for p in here])
                    prompt_k[seq.seq_id] = seq.request.params.prompt_logprobs
                    groups.append(np.arange(first, first + len(here), dtype=np.int64))
            if item.spec_token_ids:
                spec.append(seq.seq_id)
                spec_lens.append(item.num_new_tokens)
                spec_idx.append(np.arange(offset, offset + item.num_new_tokens, dtype=np.int64))
            if item.samples and seq.seq_id in sample_rows:
                for r in sample_rows[seq.seq_id]:
                    sample_idx.append(offset + item.num_new_tokens - 1)
                    rows.append(r)
                    owners.append(seq.seq_id)
            offset += item.num_new_tokens
        groups[0] = np.asarray(sample_idx, dtype=np.int64)
        groups.append(np.concatenate(spec_idx) if spec_idx else np.zeros(0, dtype=np.int64))
        step.logits_rows = groups
        return _Plan(rows, owners, prompt, prompt_k, spec, spec_lens)

    def finish(self, plan: _Plan, logits: list[Optional[torch.Tensor]]) -> StepResult:
        samples: dict[int, list[SampleResult]] = {}
        failures: dict[int, BaseException] = {}
        if plan.rows:
            results, failed_rows = sample_isolated(self.sampler, logits[0], plan.rows)  # a bad row fails its seq only
            for i, owner in enumerate(plan.owners):
                if i in failed_rows:
                    failures.setdefault(owner, failed_rows[i])
                samples.setdefault(owner, []).append(results[i])
        prompt_results = {seq_id: self._prompt_logprobs(logits[g], targets, plan.prompt_k[seq_id])
                          for seq_id, (g, _, targets) in plan.prompt.items()}
        spec_logits = {}
        if plan.spec:
            for seq_id, part in zip(plan.spec, logits[-1].float().cpu().split(plan.spec_lens)):
                spec_logits[seq_id] = part
        return StepResult(samples, prompt_results, failures, spec_logits)

    def _prompt_logprobs(self, logits: torch.Tensor, targets: list[int], k: int) -> list[Optional[dict]]:
        lp = torch.log_softmax(logits, dim=-1)
        tgt = torch.tensor(targets, dtype=torch.int64).view(-1, 1).to(lp.device)
        chosen = lp.gather(1, tgt)
        ranks = ((lp > chosen).sum(dim=1) + 1).tolist()
        chosen = chosen.view(-1).tolist()
        top = torch.topk(lp, k, dim=1) if k else None
        entries = []
        for r, tok in enumerate(targets):
            d = {tok: Logprob(chosen[r], ranks[r], self.text_of(tok))}
            if top is not None:
                for j, (t, v) in enumerate(zip(top.indices[r].tolist(), top.values[r].tolist())):
                    d.setdefault(t, Logprob(v, j + 1, self.text_of(t)))
            entries.append(d)
        return entries
