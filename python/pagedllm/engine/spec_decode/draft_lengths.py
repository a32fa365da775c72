"""How many drafts each sequence verifies this step: the expected gain against the verification cost.

A sequence's drafts are accepted one after another with (estimated) probability `rate` each, so its i-th
draft yields an extra token with probability rate ** i; verifying it costs one more token in the forward
(StepCostModel: per_token seconds). The step's speed is expected tokens / expected seconds, so a draft is
worth verifying exactly when it raises that ratio: gain * seconds > per_token * tokens. Taking drafts in
falling order of gain while that holds maximises the ratio (the gains of one sequence fall with i, so
every sequence gets a prefix of its proposal). At batch 1 a step is mostly fixed cost (the weights are read
once whatever the token count) and most drafts pay; at batch 8 on a CPU a token costs nearly its full
share and only well-predicted sequences speculate, or none (then the step is plain decoding).
"""
from __future__ import annotations

import heapq
from typing import Hashable, Optional


class AcceptanceRate:
    """One sequence's per-draft acceptance probability: accepted / verified drafts of its recent rounds
    (older rounds weigh less), pulled towards `prior` while it has few rounds."""

    def __init__(self, prior: float = 0.6, prior_weight: float = 2.0, decay: float = 0.8, forget: float = 0.95):
        self.prior, self.prior_weight, self.decay, self.forget = prior, prior_weight, decay, forget
        self.accepted = 0.0
        self.trials = 0.0

    @property
    def rate(self) -> float:
        return (self.accepted + self.prior * self.prior_weight) / (self.trials + self.prior_weight)

    def observe(self, proposed: int, accepted: int) -> None:
        """A round: drafts are checked in order until the first rejection, so it tried accepted (+ 1) drafts."""
        self.accepted = self.decay * self.accepted + accepted
        self.trials = self.decay * self.trials + accepted + (1 if accepted < proposed else 0)

    def skipped(self) -> None:
        """A step with a proposal that was not verified: what was learned fades towards the prior, so a
        sequence judged unpromising is tried again later (at most one draft, at the prior's odds)."""
        self.accepted *= self.forget
        self.trials *= self.forget


def choose_draft_lengths(candidates: list[tuple[Hashable, float, int]], base_tokens: int, base_emitted: float,
                         cost: Optional[tuple[float, float]], budget: int) -> dict[Hashable, int]:
    """candidates: (key, acceptance rate, most drafts it may verify); base_tokens / base_emitted: the step's
    tokens and sampled tokens without drafts; cost: (fixed seconds, seconds per token) of a step; budget:
    the most drafts in all. Returns {key: drafts} for the keys that get at least one."""
    fixed, per_token = cost
    seconds = fixed + per_token * base_tokens
    emitted = float(base_emitted)
    # (-gain, key, i): each sequence's next draft; popping the largest gain first.
    heap = [(-rate, n, key, 1, rate) for n, (key, rate, most) in enumerate(candidates) if most > 0 and rate > 0]
    heapq.heapify(heap)
    most = {key: m for key, _, m in candidates}
    chosen: dict[Hashable, int] = {}
    while heap and budget > 0:
        neg_gain, n, key, i, rate = heapq.heappop(heap)
        gain = -neg_gain
        if gain * seconds <= per_token * emitted:
            break  # no remaining draft (all gain less) raises tokens per second
        chosen[key] = i
        emitted += gain
        seconds += per_token
        budget -= 1
        if i < most[key]:
            heapq.heappush(heap, (-gain * rate, n, key, i + 1, rate))
    return chosen
