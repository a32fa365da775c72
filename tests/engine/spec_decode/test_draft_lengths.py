"""The cost-aware choice of draft lengths: the step cost model's fit, the acceptance estimate, the
choice (against a brute-force optimum), and the engine under a simulated clock (so no test depends on
this machine's speed): where a step costs its tokens, speculation backs off and the batch is not slower
than plain decoding; where a step is mostly fixed cost, it speculates and is faster."""
import itertools
import random

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.engine.spec_decode.cost_model import StepCostModel
from pagedllm.engine.spec_decode.draft_lengths import AcceptanceRate, choose_draft_lengths


def test_cost_model_fits_fixed_and_per_token_cost():
    model = StepCostModel()
    assert model.coefficients() is None
    for n in [8, 16, 8]:  # too few steps for a fit: the prior shape (fixed = 8 tokens' worth)
        model.observe(n, 0.05 + 0.01 * n)
    fixed, per_token = model.coefficients()
    assert fixed / per_token == pytest.approx(8.0, rel=0.05)
    for n in [8, 16, 8, 24, 40, 8, 12] * 2:
        model.observe(n, 0.05 + 0.01 * n)
    fixed, per_token = model.coefficients()
    assert fixed == pytest.approx(0.05) and per_token == pytest.approx(0.01)


def test_cost_model_keeps_the_last_shape_when_steps_have_one_size():
    model = StepCostModel(relax=0.0)
    for n in [1, 5, 1, 3, 1, 5] * 2:
        model.observe(n, 0.04 + 0.01 * n)  # fixed = 4 tokens' worth
    for _ in range(200):  # then only 8-token steps: the fit fades out
        model.observe(8, 0.04 + 0.01 * 8)
    for _ in range(100):  # and they become twice as slow (a loaded machine)
        model.observe(8, 2 * (0.04 + 0.01 * 8))
    fixed, per_token = model.coefficients()
    assert fixed / per_token == pytest.approx(4.0, rel=1e-3)
    assert fixed + 8 * per_token == pytest.approx(0.24, rel=1e-2)  # (the faded steps weigh 0.95 ** 100)


def test_cost_model_without_fixed_cost_and_its_drift_back_to_the_prior():
    model = StepCostModel(prior_fixed_tokens=8.0, relax=0.05)
    for n in [4, 8, 4, 12, 4, 8] * 2:
        model.observe(n, 0.01 * n - 0.001)  # a slightly negative intercept: a step costs only its tokens
    fixed, _ = model.coefficients()
    assert fixed == 0.0
    for _ in range(300):
        model.observe(4, 0.04)
    assert model.coefficients()[0] / model.coefficients()[1] > 7.0  # no fit left: back near the prior


def test_acceptance_rate_follows_rounds_and_forgets_towards_the_prior():
    rate = AcceptanceRate(prior=0.5, prior_weight=2.0)
    for _ in range(10):
        rate.observe(4, 4)
    assert rate.rate > 0.9
    for _ in range(10):
        rate.observe(4, 0)
    assert rate.rate < 0.4  # a failed round is one trial, a full round four: the fall is slower than the rise
    low = rate.rate
    for _ in range(100):
        rate.skipped()
    assert low < rate.rate < 0.5 + 1e-9 and rate.rate == pytest.approx(0.5, abs=0.02)


def test_a_new_sequence_starts_from_the_engines_recent_acceptance():
    from types import SimpleNamespace
    from pagedllm.engine.spec_decode.config import SpeculativeConfig
    from pagedllm.engine.spec_decode.speculator import Speculator
    spec = Speculator(SpeculativeConfig(method="ngram", num_speculative_tokens=4), None, 256, 256)
    assert spec.acceptance(SimpleNamespace()).rate == pytest.approx(0.6)  # no round yet: the default prior
    for _ in range(30):
        spec.pooled.observe(4, 4)
    fresh = spec.acceptance(SimpleNamespace())
    assert fresh.rate > 0.9
    for _ in range(200):  # its own skipped steps fade towards that prior, not the default one
        fresh.skipped()
    assert fresh.rate > 0.9


def _speed(lengths, rates, base_tokens, base_emitted, fixed, per_token):
    gain = sum(sum(r ** i for i in range(1, n + 1)) for n, r in zip(lengths, rates))
    return (base_emitted + gain) / (fixed + per_token * (base_tokens + sum(lengths)))


@pytest.mark.parametrize("seed", range(40))
def test_choice_is_the_best_tokens_per_second(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 4)
    rates = [rng.choice([0.05, 0.3, 0.6, 0.9, 0.99]) for _ in range(n)]
    most = [rng.randint(0, 3) for _ in range(n)]
    fixed, per_token = rng.choice([0.0, 1.0, 4.0, 20.0]), 1.0
    budget = rng.randint(0, 12)
    chosen = choose_draft_lengths([(i, r, m) for i, (r, m) in enumerate(zip(rates, most))], n, n,
                                  (fixed, per_token), budget)
    got = [chosen.get(i, 0) for i in range(n)]
    assert all(0 <= g <= m for g, m in zip(got, most)) and sum(got) <= budget
    best = max(_speed(c, rates, n, n, fixed, per_token)
               for c in itertools.product(*[range(m + 1) for m in most]) if sum(c) <= budget)
    assert _speed(got, rates, n, n, fixed, per_token) == pytest.approx(best, rel=1e-9)


def test_choice_at_batch_1_and_batch_8():
    # Batch 1, a step mostly fixed cost: a well-predicted sequence verifies its whole proposal.
    assert choose_draft_lengths([("a", 0.9, 4)], 1, 1, (20.0, 1.0), 100) == {"a": 4}
    # Batch 8 where a token costs its full share: nothing pays, the step is plain decoding.
    assert choose_draft_lengths([(i, 0.9, 4) for i in range(8)], 8, 8, (0.0, 1.0), 100) == {}
    # Batch 8 with some fixed cost: only the well-predicted sequences speculate.
    chosen = choose_draft_lengths([(i, 0.95 if i < 2 else 0.2, 4) for i in range(8)], 8, 8, (8.0, 1.0), 100)
    assert set(chosen) == {0, 1}


# -- the engine under a simulated clock -------------------------------------------------------------------
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def _prompts():
    rng = random.Random(3)
    base = [rng.randrange(3, 400) for _ in range(10)]
    return [base * 4, base[:6] * 5, [rng.randrange(3, 400) for _ in range(30)], base * 2]


def _simulated(llm: LLM, fixed: float, per_token: float):
    """Runs the prompts twice with every step costing fixed + per_token * its tokens on a simulated clock;
    returns (outputs, simulated seconds of the second run) (the first run also teaches the cost model)."""
    engine = llm.llm_engine
    now = [0.0]
    execute = engine.executor.execute_model

    def timed_execute(step, *args, **kwargs):
        now[0] += fixed + per_token * len(step.input_ids)
        return execute(step, *args, **kwargs)

    engine.executor.execute_model = timed_execute
    if engine.speculator is not None:
        engine.speculator.clock = lambda: now[0]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    try:
        llm.generate(prompts, params, use_tqdm=False)
        start = now[0]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], now[0] - start
    finally:
        engine.executor.execute_model = execute


@pytest.mark.parametrize("fixed", [0.0, 1.0, 4.0])
def test_batch_not_slower_where_verifying_costs_a_full_token(path, plain, fixed):
    ref, t_plain = _simulated(plain, fixed, 1.0)
    spec = LLM(path, kv_cache_space=0.05, max_model_len=256, speculative_config=NGRAM)
    got, t_spec = _simulated(spec, fixed, 1.0)
    assert got == ref
    assert t_spec <= t_plain / 0.95


def test_speculates_and_is_faster_where_a_step_is_mostly_fixed_cost(path, plain):
    ref, t_plain = _simulated(plain, 50.0, 1.0)
    spec = LLM(path, kv_cache_space=0.05, max_model_len=256, speculative_config=NGRAM)
    got, t_spec = _simulated(spec, 50.0, 1.0)
    assert got == ref
    stats = spec.llm_engine.stats["spec_decode"]
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0
    assert t_spec < t_plain
