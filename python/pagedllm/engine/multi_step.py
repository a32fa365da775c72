"""Multi-step decoding (vLLM's num_scheduler_steps): a decode-only step runs k forward passes in a row, each
feeding its sampled tokens to the next, before the engine's per-token work (detokenizing, stop checks, outputs).

Why: on a CPU a decode step streams every weight (~96 MB for the default model), which evicts the caches; the
Python of the next step (scheduler, inputs, sampler set-up, detokenizer, outputs) then runs cold: ~0.6 ms of a
~4 ms batch-1 step (the first torch dispatch after a step's weight stream costs ~20 us, ~2 us warm;
benchmarks/RESULTS.md "Eighth session"). k forwards back to back pay the engine's part once per k tokens.

The tokens are the single steps' tokens: the same ops run on the same rows, and sampling is Philox(seed, offset)
per row with offset the request's step, so draw i is the one the i-th single step would make. A sequence that stops
inside the k steps (EOS, stop token or string) keeps its tokens up to the stop; the later ones are dropped. Their KV
is real KV of real tokens, so the prefix cache may register it.

When (steps() says 1 otherwise): every scheduled sequence decodes one token and samples plainly (no logits
processor of any kind: penalties, bias, allowed / bad words, min_tokens, structured outputs, user processors; no
logprobs; not a fork point of n > 1; no beam search), nothing waits or is swapped out (a new request would wait
for the k steps), no speculative decoding, tensor_parallel_size 1. k is at most num_scheduler_steps and the
fewest tokens any of the sequences may still generate (max_tokens, max_model_len); the slots of the k - 1 extra
tokens are reserved before the forwards (block manager append_slots with placeholders, replace_tokens after),
and a batch whose extra slots do not fit runs as a single step.
"""
from __future__ import annotations

import numpy as np

from pagedllm.engine.runner_io import StepInput, build_step_input
from pagedllm.engine.scheduler import SchedulerOutput
from pagedllm.sampling.processors.base import SampleRow
from pagedllm.sampling.step import wants_logprob

_PLACEHOLDER = 0  # the token id of a reserved slot until its token is sampled
# The LLM class's default on a CPU (EngineArgs.num_scheduler_steps None). Offline, nothing streams and every
# request is added up front. Default model, decode ms per token, medians of 10 alternating requests: batch 1
# 4.33 single, 3.78 k=4, 3.54 k=8, 3.46 k=16; batch 32 29.8 -> 28.8 at k=8 (benchmarks/RESULTS.md "Eighth
# session"). 8: most of the gain, and a sequence that stops on EOS wastes under 8 forwards.
# The server (AsyncLLMEngine) keeps single steps unless asked: streamed tokens and new requests would wait.
OFFLINE_CPU_STEPS = 8


def offline_scheduler_steps(args) -> int:
    """EngineArgs.num_scheduler_steps for the offline LLM class when not given: OFFLINE_CPU_STEPS on a CPU, else 1."""
    return OFFLINE_CPU_STEPS if args.resolve_device().type == "cpu" else 1


class MultiStep:
    """The engine's multi-step decoding: which steps run k forwards (steps), and their inputs and commit."""

    def __init__(self, num_scheduler_steps: int, scheduler, block_manager, max_model_len: int):
        self.k = num_scheduler_steps
        self.scheduler = scheduler
        self.bm = block_manager
        self.max_model_len = max_model_len

    def steps(self, sched: SchedulerOutput, rows: dict[int, list[SampleRow]], plain_request) -> int:
        """How many forwards this step may run in a row (1: a single step). plain_request(req): not a beam search."""
        if (self.k <= 1 or sched.prefills or not sched.decodes or sched.preempted or sched.swap_in or sched.swap_out
                or self.scheduler.waiting or self.scheduler.swapped):
            return 1
        k = self.k
        for item in sched.decodes:
            seq = item.seq
            params = seq.request.params
            r = rows.get(seq.seq_id)
            if (r is None or len(r) != 1 or r[0].state is not None or wants_logprob(params)
                    or not plain_request(seq.request)):
                return 1
            left = self.max_model_len - seq.num_tokens
            if params.max_tokens is not None:
                left = min(left, params.max_tokens - len(seq.output_token_ids))
            k = min(k, left)
            if k <= 1:
                return 1
        return k

    def reserve(self, sched: SchedulerOutput, k: int) -> bool:
        """The slots of each sequence's k - 1 extra tokens (placeholders until sampled); False, with nothing
        reserved, when they do not all fit."""
        done, copies = [], []
        for item in sched.decodes:
            seq_id = item.seq.seq_id
            if not self.bm.can_append(seq_id, k - 1):
                for s in done:
                    self.bm.truncate(s.seq_id, s.num_tokens)
                return False
            copies += self.bm.append_slots(seq_id, [_PLACEHOLDER] * (k - 1))
            done.append(item.seq)
        sched.block_copies.extend(copies)
        self.scheduler.fill_block_tables(sched)
        return True

    def step_input(self, sched: SchedulerOutput, block_size: int, k: int) -> StepInput:
        """The first forward's inputs, with the slots of all k: slot_mapping [k * n], forward i's at [i n, (i + 1) n]."""
        step = build_step_input(sched, block_size)
        n = len(sched.decodes)
        tables = step.decode_block_tables.astype(np.int64)
        pos = step.positions[None, :] + np.arange(k)[:, None]  # [k, n]
        step.slot_mapping = (tables[np.arange(n)[None, :], pos // block_size] * block_size
                             + pos % block_size).reshape(-1)
        return step

    def commit(self, sched: SchedulerOutput, tokens: list[list[int]], k: int) -> None:
        """The k forwards' KV is written: the placeholders become the sampled tokens and the slots computed.
        tokens[i][j]: forward i's token of decode j (forward i < k - 1 feeds forward i + 1)."""
        for j, item in enumerate(sched.decodes):
            seq = item.seq
            self.bm.replace_tokens(seq.seq_id, seq.num_tokens, [tokens[i][j] for i in range(k - 1)])
            seq.num_computed_tokens = item.start + k
            self.bm.mark_computed(seq.seq_id, seq.num_computed_tokens)

