"""Draft-model speculation keeps the target's sampling distribution, end to end in the engine: with a
tiny draft close to the target (its weights plus noise: the drafts are often accepted, often not)
verifying 2 drafts a step, the joint distribution of the first three sampled tokens (top_k=2, so 8
outcomes; tokens 2 and 3 come out of the rejection sampler) matches the exact one computed from the
target's own logprobs (chi-square). Seeds are fixed, so the test is deterministic."""
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import pytest

from model_factory import make_tiny_model
from pagedllm import LLM, SamplingParams

N = 800
TEMPERATURE = 1.5
TOP_K = 2
PROMPT = [5, 77, 131, 9, 250, 40]


def _chi2_limit(dof: int) -> float:
    """P(X > limit) ~ 1e-4 for chi-square with dof degrees of freedom (Wilson-Hilferty)."""
    z = 3.719  # the standard normal's 1 - 1e-4 quantile
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    target = make_tiny_model(tmp_path_factory.mktemp("stat-target"), "llama")
    draft = Path(shutil.copytree(target, tmp_path_factory.mktemp("stat-draft") / "draft"))
    gen = torch.Generator().manual_seed(0)
    for f in draft.glob("*.safetensors"):
        weights = load_file(f)
        save_file({k: w + 0.08 * w.std() * torch.randn(w.shape, generator=gen) if w.dim() > 1 else w
                   for k, w in weights.items()}, f, metadata={"format": "pt"})
    return str(target), str(draft)


def _next_token_probs(llm: LLM, prefixes: list[list[int]]) -> list[dict[int, float]]:
    """The sampling distribution (temperature, top_k) after each prefix, from the raw logprobs."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prefixes],
                        SamplingParams(temperature=0, max_tokens=1, logprobs=TOP_K), use_tqdm=False)
    dists = []
    for o in outs:
        top = sorted(o.outputs[0].logprobs[0].items(), key=lambda kv: -kv[1].logprob)[:TOP_K]
        weights = {t: math.exp(lp.logprob / TEMPERATURE) for t, lp in top}
        total = sum(weights.values())
        dists.append({t: w / total for t, w in weights.items()})
    return dists


def _exact_joint(llm: LLM) -> dict[tuple[int, int, int], float]:
    (p1,) = _next_token_probs(llm, [PROMPT])
    firsts = list(p1)
    p2 = dict(zip(firsts, _next_token_probs(llm, [PROMPT + [a] for a in firsts])))
    pairs = [(a, b) for a in firsts for b in p2[a]]
    p3 = dict(zip(pairs, _next_token_probs(llm, [PROMPT + list(ab) for ab in pairs])))
    return {(a, b, c): p1[a] * p2[a][b] * p3[(a, b)][c] for (a, b) in pairs for c in p3[(a, b)]}


def test_draft_model_sampling_keeps_the_target_distribution(paths):
    target, draft = paths
    exact = _exact_joint(LLM(target, kv_cache_space=0.05, max_model_len=64))
    assert len(exact) == TOP_K ** 3 and math.isclose(sum(exact.values()), 1.0, rel_tol=1e-6)

    spec = LLM(target, kv_cache_space=0.05, max_model_len=64, max_num_seqs=256,
               speculative_config={"method": "draft_model", "model": draft, "num_speculative_tokens": 2})
    spec.llm_engine.speculator.cost_aware = False  # both drafts verified on every step
    # max_tokens=4: after the first token (the prompt's step) one round verifies tokens 2 and 3.
    params = [SamplingParams(temperature=TEMPERATURE, top_k=TOP_K, max_tokens=4, ignore_eos=True, seed=s)
              for s in range(N)]
    outs = spec.generate([{"prompt_token_ids": PROMPT}] * N, params, use_tqdm=False)
    counts = dict.fromkeys(exact, 0)
    for o in outs:
        counts[tuple(o.outputs[0].token_ids[:3])] += 1  # a KeyError: a token outside the target's top_k
    stats = spec.llm_engine.stats["spec_decode"]
    assert stats.num_accepted_tokens > N // 10 and stats.num_draft_tokens - stats.num_accepted_tokens > N // 10

    # Outcomes expected fewer than 5 times are pooled (the chi-square approximation needs it).
    big = [k for k in exact if exact[k] * N >= 5]
    small = [k for k in exact if exact[k] * N < 5]
    observed = [counts[k] for k in big] + ([sum(counts[k] for k in small)] if small else [])
    expected = [exact[k] * N for k in big] + ([sum(exact[k] for k in small) * N] if small else [])
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    assert chi2 < _chi2_limit(len(observed) - 1), (chi2, observed, expected)
    assert spec.llm_engine.block_manager.num_used_blocks == 0
