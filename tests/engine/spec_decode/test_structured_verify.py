"""Verification of drafts under a grammar, at the rejection sampler: row j is masked as after drafts[:j]
(the walk leaves the matcher where it was), the emitted tokens keep the grammar-masked target
distribution (chi-square over seeds, a point-mass draft as ngram's), drafts are valid up to the first
one the grammar refuses, and with a reasoning parser the mask starts after the end tag inside the drafts."""
import math

import pytest
import torch

from model_factory import make_tokenizer
from pagedllm.engine.spec_decode.rejection_sampler import verify
from pagedllm.sampling.grammar.manager import StructuredOutputManager
from pagedllm.sampling.processors.base import ProcessorChain, SampleRow, SamplingBatch
from pagedllm.sampling.processors.structured import StructuredOutputs
from pagedllm.sampling.structured_params import GuidedDecodingParams, StructuredOutputsConfig
from pagedllm.sampling_params import SamplingParams

N = 1200
CHOICES = ["ab cd", "ab ef", "gh"]


def _chi2_limit(dof: int) -> float:
    """P(X > limit) ~ 1e-4 for chi-square with dof degrees of freedom (Wilson-Hilferty)."""
    z = 3.719
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def _chi2(counts: dict, probs: torch.Tensor, n: int) -> tuple[float, int]:
    """Chi-square of counts against probs (outcomes expected fewer than 5 times pooled), and its dof."""
    big = [t for t in range(probs.shape[0]) if probs[t] * n >= 5]
    small = [t for t in range(probs.shape[0]) if 0 < probs[t] * n < 5]
    observed = [counts.get(t, 0) for t in big] + ([sum(counts.get(t, 0) for t in small)] if small else [])
    expected = [float(probs[t]) * n for t in big] + ([float(probs[small].sum()) * n] if small else [])
    assert sum(observed) == n  # nothing outside the support
    return sum((o - e) ** 2 / e for o, e in zip(observed, expected)), len(observed) - 1


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _setup(tok, backend, reasoning_parser=None, **kw):
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    manager = StructuredOutputManager(tok, len(tok), [eos], StructuredOutputsConfig(reasoning_parser=reasoning_parser))
    chain = ProcessorChain([StructuredOutputs(manager, tok)])
    params = SamplingParams(structured_outputs=GuidedDecodingParams(backend=backend, **kw), temperature=1.0)
    state = chain.added(params, tok.encode("Pick one:"))
    state.states[0].compiled.result()
    return chain, params, state


def _masks(chain, state, tok, drafts, rows):
    batch = SamplingBatch(torch.zeros(rows, len(tok)), [SampleRow(None, [], [], 0, 0, state=state)] * rows)
    valid = chain.apply_drafts(batch, drafts)
    return batch.token_bitmask().clone(), valid


def _allowed(bitmask, vocab):
    return ((bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).bool().flatten(1)[:, :vocab]


def _fresh_masks(chain, state, drafts, vocab):
    """The masks plain decoding would use after drafts[:j], j = 0..len(drafts), from a new matcher, and how
    many rows plain decoding reaches (after a draft that ends the grammar the sequence ends)."""
    st = state.states[0]
    matcher = chain.processors[0].manager.matcher(st.so, st.compiled.result())
    masks = torch.full((len(drafts) + 1, (vocab + 31) // 32), -1, dtype=torch.int32)
    for j in range(len(drafts) + 1):
        if matcher.is_terminated():
            return masks, j
        matcher.fill_bitmask(masks, j)
        if j < len(drafts):
            assert matcher.accept(drafts[j])
    return masks, len(drafts) + 1


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_rows_are_masked_as_after_the_drafts_and_the_matcher_returns(tok, backend):
    chain, params, state = _setup(tok, backend, choice=CHOICES)
    drafts = tok.encode("ab cd", add_special_tokens=False)
    masks, valid = _masks(chain, state, tok, drafts, len(drafts) + 1)
    assert valid == len(drafts)
    fresh = chain.processors[0].manager.matcher(state.states[0].so, state.states[0].compiled.result())
    for j in range(len(drafts) + 1):  # a fresh matcher, fed drafts[:j], gives row j's mask
        if fresh.is_terminated():  # (llguidance ends with the choice's last byte: the sequence ends there)
            break
        row = torch.full((1, masks.shape[1]), -1, dtype=torch.int32)
        fresh.fill_bitmask(row, 0)
        assert torch.equal(row[0], masks[j]), j
        if j < len(drafts):
            assert fresh.accept(drafts[j])
    again, _ = _masks(chain, state, tok, drafts, len(drafts) + 1)
    assert torch.equal(again, masks)  # the walk rolled the matcher back
    bad = drafts[:1] + tok.encode("zz", add_special_tokens=False)[:1] + drafts[1:]
    assert chain.valid_drafts(state, bad) == 1  # up to the first draft the grammar refuses
    assert chain.valid_drafts(state, drafts) == len(drafts)


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_sampling_keeps_the_grammar_masked_distribution(tok, backend):
    chain, params, state = _setup(tok, backend, choice=["a b", "a c", "a d", "ab", "gh"])
    drafts = tok.encode("a b", add_special_tokens=False)  # "a", " b": several tokens may follow "a"
    assert len(drafts) == 2
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, len(tok), generator=gen)
    masks, live = _fresh_masks(chain, state, drafts, len(tok))
    allowed = _allowed(masks, len(tok))
    assert not torch.equal(allowed[0], allowed[1])
    others = allowed[0].clone()
    others[drafts[0]] = False
    logits[0, drafts[0]] = torch.logsumexp(logits[0][others], dim=0)  # the first draft: accepted half the time
    p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    first, second = {}, {}
    for seed in range(N):
        results, accepted = verify(logits, drafts, SampleRow(params, [1], [], seed, 0, frozenset(), state), chain)
        tokens = [r.token_id for r in results]
        assert all(bool(allowed[j, t]) for j, t in enumerate(tokens[:live]))
        first[tokens[0]] = first.get(tokens[0], 0) + 1
        if accepted:
            second[tokens[1]] = second.get(tokens[1], 0) + 1
    n_second = sum(second.values())
    assert 0.2 * N < n_second < 0.8 * N  # both the accepting and the rejecting path ran
    for counts, probs, n in ((first, p[0], N), (second, p[1], n_second)):
        chi2, dof = _chi2(counts, probs, n)
        assert dof >= 1 and chi2 < _chi2_limit(dof), (chi2, dof, counts)
    again, _ = _masks(chain, state, tok, drafts, 3)
    assert torch.equal(again, masks)  # every verification left the matcher where it was


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_greedy_takes_the_masked_argmax(tok, backend):
    chain, params, state = _setup(tok, backend, choice=CHOICES)
    drafts = tok.encode("ab cd", add_special_tokens=False)
    logits = torch.zeros(len(drafts) + 1, len(tok))
    logits[:, tok.encode("zz", add_special_tokens=False)[0]] = 10.0  # the raw argmax, refused everywhere
    for j, d in enumerate(drafts):
        logits[j, d] = 1.0
    row = SampleRow(SamplingParams(temperature=0.0), [1], [], 0, 0, frozenset(), state)
    results, accepted = verify(logits, drafts, row, chain)
    assert accepted == len(drafts) and [r.token_id for r in results[:-1]] == drafts


def test_reasoning_drafts_are_masked_after_the_end_tag(tok):
    chain, params, state = _setup(tok, "xgrammar", reasoning_parser="think", choice=CHOICES)
    st = state.states[0]
    assert not st.reasoning_ended
    thinking = tok.encode("hmm</think>", add_special_tokens=False)
    answer = tok.encode("ab", add_special_tokens=False)
    drafts = thinking + answer
    masks, valid = _masks(chain, state, tok, drafts, len(drafts) + 1)
    assert valid == len(drafts)
    # up to the token that completes the tag: no constraint; after it: the grammar from its start
    assert bool((masks[:len(thinking)] == -1).all())
    fresh = chain.processors[0].manager.matcher(st.so, st.compiled.result())
    row = torch.full((1, masks.shape[1]), -1, dtype=torch.int32)
    fresh.fill_bitmask(row, 0)
    assert torch.equal(masks[len(thinking)], row[0]) and not bool((row == -1).all())
    assert chain.valid_drafts(state, thinking + tok.encode("zz", add_special_tokens=False)) == len(thinking)
    assert not st.reasoning_ended and st.recent == []  # the state is where it was
