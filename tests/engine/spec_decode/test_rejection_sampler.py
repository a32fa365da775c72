"""Rejection sampling keeps the target distribution: over many seeds the first emitted token is
distributed as p (chi-square), whatever the draft (a point mass as ngram's, or a draft model's q);
greedy accepts exactly the argmax prefix."""
import pytest
import torch

from pagedllm.engine.spec_decode.rejection_sampler import draw, verify
from pagedllm.sampling.processors.base import SampleRow
from pagedllm.sampling_params import SamplingParams

VOCAB = 6
N = 1500
# chi-square, 5 degrees of freedom: P(X > 25.7) = 1e-4. Seeds are fixed, so the test is deterministic.
CHI2_LIMIT = 25.7


def _row(params, seed):
    return SampleRow(params, [1, 2], [], seed, 0, frozenset())


def _chi2(counts, probs):
    expected = probs * N
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("draft_kind", ["point", "model"])
def test_first_token_is_distributed_as_the_target(draft_kind):
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB) * 1.5
    params = SamplingParams(temperature=1.0)
    p = torch.softmax(logits, dim=-1)
    q = torch.softmax(torch.randn(2, VOCAB), dim=-1) if draft_kind == "model" else None
    counts = torch.zeros(VOCAB)
    accepted_any = rejected_any = 0
    for seed in range(N):
        if q is None:
            drafts = [2, 4]  # always the same guess: accepted with probability p[0][2]
        else:  # the draft model's own draws from q
            g = torch.Generator().manual_seed(10_000 + seed)
            drafts = [int(torch.multinomial(q[0], 1, generator=g)), int(torch.multinomial(q[1], 1, generator=g))]
        results, accepted = verify(logits, drafts, _row(params, seed), draft_probs=q)
        assert len(results) == accepted + 1 and [r.token_id for r in results[:accepted]] == drafts[:accepted]
        counts[results[0].token_id] += 1
        accepted_any += accepted > 0
        rejected_any += accepted == 0
    assert accepted_any > 50 and rejected_any > 50  # both paths ran
    assert _chi2(counts, p[0]) < CHI2_LIMIT


def test_zero_probability_tokens_are_never_emitted():
    logits = torch.tensor([[0.0, 1.0, float("-inf"), 2.0, float("-inf"), 0.5]] * 3)
    params = SamplingParams(temperature=0.7, top_k=3)
    for seed in range(300):
        results, _ = verify(logits, [2, 4], _row(params, seed))  # drafts the target never picks
        assert all(r.token_id in (1, 3, 5) for r in results)  # top_k=3 keeps tokens 3, 1 and 5


def test_greedy_accepts_the_argmax_prefix_then_corrects():
    logits = torch.zeros(4, VOCAB)
    logits[0, 2] = logits[1, 4] = logits[2, 1] = logits[3, 5] = 1.0   # greedy path: 2, 4, 1, 5
    params = SamplingParams(temperature=0.0)
    results, accepted = verify(logits, [2, 4, 0], _row(params, 0))
    assert accepted == 2 and [r.token_id for r in results] == [2, 4, 1]
    results, accepted = verify(logits, [2, 4, 1], _row(params, 0))
    assert accepted == 3 and [r.token_id for r in results] == [2, 4, 1, 5]   # the bonus token


def test_draw_never_returns_a_zero_probability_token():
    probs = torch.tensor([0.0, 0.25, 0.0, 0.75, 0.0])
    assert [draw(probs, u) for u in (0.0, 0.2, 0.3, 0.999999)] == [1, 1, 3, 3]
