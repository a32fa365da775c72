"""What a decode / verify step costs, learned online: seconds = fixed + per_token * tokens.

Fitted by least squares over the recent decode and verification steps (weights decaying by `decay` per
step, so a change of load or batch size is followed within a few dozen steps). Steps that carry a
prompt chunk are not recorded: a prefill token costs differently from a decode or verified token.

The fit needs steps of different sizes; speculation itself provides them (a verify step is longer than
a decode step). While the recent steps all had one size, the last fitted ratio fixed / per_token is kept
and scaled to the time those steps took (`prior_fixed_tokens` before any fit), so the model follows the
load; that remembered ratio drifts slowly back to the prior, which makes the policy try speculation
again now and then (a bounded exploration cost) instead of trusting one old fit for ever.
"""
from __future__ import annotations

from typing import Optional


class StepCostModel:
    def __init__(self, decay: float = 0.95, prior_fixed_tokens: float = 8.0, min_spread: float = 1.0,
                 relax: float = 0.02):
        self.decay = decay
        self.prior_fixed_tokens = prior_fixed_tokens
        self.fixed_tokens = prior_fixed_tokens  # fixed / per_token of the last fit: a step's cost in tokens
        self.relax = relax  # per step without a fit, fixed_tokens moves this fraction back to the prior
        self.min_spread = min_spread            # the weighted std-dev of step sizes a fit needs (tokens)
        self._s0 = self._sn = self._snn = self._st = self._snt = 0.0

    def observe(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or not seconds > 0:
            return
        d = self.decay
        n = float(num_tokens)
        self._s0 = d * self._s0 + 1.0
        self._sn = d * self._sn + n
        self._snn = d * self._snn + n * n
        self._st = d * self._st + seconds
        self._snt = d * self._snt + n * seconds
        if self._fit() is None:
            # No fit (the recent steps had one size): the shape is only remembered, and drifts back to
            # the prior slowly, so a cost learned under a passing load does not stop speculation for good.
            self.fixed_tokens += self.relax * (self.prior_fixed_tokens - self.fixed_tokens)

    def _fit(self) -> Optional[tuple[float, float]]:
        """The least-squares (fixed, per_token) of the recent steps, when their sizes spread enough and
        the slope is physical; it also becomes the remembered shape."""
        mean_n, mean_t = self._sn / self._s0, self._st / self._s0
        var_n = self._snn / self._s0 - mean_n * mean_n
        if self._s0 < 8 or var_n < self.min_spread ** 2:  # a few noisy steps decide nothing
            return None
        per_token = (self._snt / self._s0 - mean_n * mean_t) / var_n
        if not per_token > 0:
            return None  # bigger steps cheaper: the noise of a loaded machine
        fixed = max(mean_t - per_token * mean_n, 0.0)  # < 0: a step costs only its tokens
        self.fixed_tokens = fixed / per_token
        return fixed, per_token

    def coefficients(self) -> Optional[tuple[float, float]]:
        """(fixed seconds, seconds per token), or None before any step was seen."""
        if self._s0 <= 0:
            return None
        fit = self._fit()
        if fit is not None:
            return fit
        per_token = (self._st / self._s0) / (self.fixed_tokens + self._sn / self._s0)
        return self.fixed_tokens * per_token, per_token
