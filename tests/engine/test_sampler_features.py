"""Every SamplingParams knob changes the output the way vLLM's does, on a tiny random model."""
import math

import pytest

from model_factory import make_tiny_model
from pagedllm import LLM, SamplingParams

PROMPT = {"prompt_token_ids": [11, 12, 13, 14, 15, 16, 17]}
BEST_OF_SEED = 7


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("m"), "llama")
    llm = LLM(str(path), num_gpu_blocks_override=64, max_model_len=256, seed=0)
    llm.model_path = str(path)
    return llm


def gen(llm, **kw):
    kw.setdefault("temperature", 0.0)
    kw.setdefault("max_tokens", 12)
    kw.setdefault("ignore_eos", True)
    return llm.generate([PROMPT], SamplingParams(**kw), use_tqdm=False)[0]


def test_logit_bias_forces_a_token(llm):
    out = gen(llm, logit_bias={42: 100.0})
    assert out.outputs[0].token_ids == [42] * 12


def test_allowed_token_ids(llm):
    out = gen(llm, temperature=1.0, seed=3, allowed_token_ids=[50, 60, 70], max_tokens=30)
    assert set(out.outputs[0].token_ids) <= {50, 60, 70}


def _world(logits_by_token):
    """A logits processor leaving only these tokens, at these logits (the penalties apply after processors)."""
    def processor(output_ids, logits):
        logits[:] = -math.inf
        for tok, value in logits_by_token.items():
            logits[tok] = value
        return logits
    return processor


def _penalized_greedy(logits_by_token, steps, prompt, presence=0.0, frequency=0.0, repetition=1.0):
    """The reference: vLLM's penalties on a fixed logit table, then greedy."""
    out = []
    for _ in range(steps):
        scores = {}
        for tok, x in logits_by_token.items():
            count = out.count(tok)
            if repetition != 1.0 and (count or tok in prompt):
                x = x / repetition if x > 0 else x * repetition
            scores[tok] = x - frequency * count - presence * (count > 0)
        out.append(max(scores, key=scores.get))
    return out


# Token 11 (the best) is in the prompt: the repetition penalty counts prompt tokens; no two scores ever tie.
WORLD = {40: 1.0, 41: 0.37, 11: 1.2, 42: -0.21}


@pytest.mark.parametrize("penalties", [dict(presence=1.1), dict(frequency=0.29), dict(repetition=1.7),
                                       dict(presence=0.4, frequency=0.13, repetition=1.3)])
def test_penalties_match_the_reference(llm, penalties):
    kw = {"presence_penalty": penalties.get("presence", 0.0), "frequency_penalty": penalties.get("frequency", 0.0),
          "repetition_penalty": penalties.get("repetition", 1.0)}
    expected = _penalized_greedy(WORLD, 16, PROMPT["prompt_token_ids"], **penalties)
    assert len(set(expected)) > 1 and expected != _penalized_greedy(WORLD, 16, PROMPT["prompt_token_ids"])
    got = gen(llm, max_tokens=16, logits_processors=[_world(WORLD)], **kw).outputs[0].token_ids
    assert got == expected


def test_huge_repetition_penalty_never_repeats(llm):
    huge = gen(llm, max_tokens=30, repetition_penalty=1e6).outputs[0].token_ids
    assert len(set(huge)) == len(huge)  # any seen token is pushed to the bottom: no repeats at all
    assert not set(huge) & set(PROMPT["prompt_token_ids"])


def test_min_tokens_masks_eos(llm):
    eos = 2
    forced = gen(llm, ignore_eos=False, logit_bias={eos: 100.0}, max_tokens=10)
    assert forced.outputs[0].token_ids == [eos] and forced.outputs[0].finish_reason == "stop"
    delayed = gen(llm, ignore_eos=False, logit_bias={eos: 100.0}, min_tokens=4, max_tokens=10)
    assert len(delayed.outputs[0].token_ids) == 5 and delayed.outputs[0].token_ids[-1] == eos


def test_bad_words(llm):
    tok = llm.get_tokenizer()
    base = gen(llm, max_tokens=20).outputs[0].token_ids
    # A greedy token that is a whole word on its own: banning the word must change the output right there.
    for pos, t in enumerate(base):
        word = tok.decode([t]).strip()
        forms = [tok.encode(w, add_special_tokens=False) for w in (word, " " + word)]
        if word and [t] in forms:
            break
    else:
        pytest.fail("no greedy token re-encodes to itself as a word")
    banned = {ids[0] for ids in forms if len(ids) == 1}
    out = gen(llm, max_tokens=20, bad_words=[word]).outputs[0].token_ids
    assert t in banned
    assert out[:pos] == base[:pos] and out[pos] != base[pos]   # the same text up to the banned word, then not it
    assert not banned & set(out)


def test_logits_processors_both_signatures(llm):
    seen = {}

    def two_args(output_ids, logits):
        logits[:] = -math.inf
        logits[77] = 0.0
        return logits

    def three_args(prompt_ids, output_ids, logits):
        seen["prompt"] = list(prompt_ids)
        logits[:] = -math.inf
        logits[88 if len(output_ids) % 2 else 77] = 0.0
        return logits

    assert gen(llm, logits_processors=[two_args], max_tokens=4).outputs[0].token_ids == [77] * 4
    assert gen(llm, logits_processors=[three_args], max_tokens=4).outputs[0].token_ids == [77, 88, 77, 88]
    assert seen["prompt"] == PROMPT["prompt_token_ids"]


def test_logprobs_and_prompt_logprobs(llm):
    out = gen(llm, logprobs=3, prompt_logprobs=2, max_tokens=5)
    comp = out.outputs[0]
    assert len(comp.logprobs) == 5
    for tok, entry in zip(comp.token_ids, comp.logprobs):
        assert tok in entry and entry[tok].rank == 1  # greedy: the sampled token is the most likely
        assert len(entry) == 3
    assert comp.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(comp.token_ids, comp.logprobs)))
    plp = out.prompt_logprobs
    assert len(plp) == len(PROMPT["prompt_token_ids"]) and plp[0] is None
    for tok, entry in zip(PROMPT["prompt_token_ids"][1:], plp[1:]):
        assert tok in entry and entry[tok].logprob <= 0 and entry[tok].rank >= 1
    assert all(len(e) in (2, 3) for e in plp[1:])   # top 2, plus the prompt token when it is not among them
    # The prompt logprobs are the model's: compare each against a direct forward (HF transformers, same weights).
    from hf_reference import hf_model
    import torch
    with torch.inference_mode():
        ref = torch.log_softmax(hf_model(llm.model_path)(torch.tensor([PROMPT["prompt_token_ids"]])).logits[0].float(),
                                dim=-1)
    for pos, (tok, entry) in enumerate(zip(PROMPT["prompt_token_ids"][1:], plp[1:])):
        assert entry[tok].logprob == pytest.approx(ref[pos, tok].item(), abs=1e-4)
        assert entry[tok].rank == int((ref[pos] > ref[pos, tok]).sum()) + 1
        top2 = torch.topk(ref[pos], 2).indices.tolist()
        assert [t for t, e in sorted(entry.items(), key=lambda kv: kv[1].rank) if e.rank <= 2][:2] == top2


def test_best_of_keeps_the_most_likely(llm):
    # The same five samples (seeds seed + k) with n=5: best_of=5, n=2 must return the two of highest cumulative
    # logprob among them, best first, which here are not the first two samples.
    every = gen(llm, temperature=1.0, seed=BEST_OF_SEED, n=5, max_tokens=6, logprobs=0).outputs
    ranked = sorted(range(5), key=lambda k: every[k].cumulative_logprob, reverse=True)
    assert sorted(ranked[:2]) != [0, 1]
    out = gen(llm, temperature=1.0, seed=BEST_OF_SEED, n=2, best_of=5, max_tokens=6)
    assert [o.token_ids for o in out.outputs] == [every[k].token_ids for k in ranked[:2]]
    assert [o.cumulative_logprob for o in out.outputs] == pytest.approx([every[k].cumulative_logprob
                                                                         for k in ranked[:2]])


def test_stop_string_is_excluded(llm):
    base = gen(llm, max_tokens=20).outputs[0]
    text = base.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    if not stop.strip():
        pytest.skip("no printable stop string in the middle of the text")
    out = gen(llm, max_tokens=20, stop=[stop]).outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.index(stop)]
    kept = gen(llm, max_tokens=20, stop=[stop], include_stop_str_in_output=True).outputs[0]
    assert kept.text == text[:text.index(stop) + len(stop)]


def test_generation_config_defaults(tmp_path):
    import json
    path = make_tiny_model(tmp_path, "qwen2")
    (path / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "top_p": 0.7, "top_k": 20,
                                                              "repetition_penalty": 1.05}))
    llm = LLM(str(path), num_gpu_blocks_override=16, max_model_len=128)
    p = llm.get_default_sampling_params()
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.3, 0.7, 20, 1.05)


def test_swap_preemption_keeps_results(tmp_path):
    path = make_tiny_model(tmp_path, "llama")
    prompts = [{"prompt_token_ids": [(7 * i + j) % 300 + 3 for j in range(46 + i)]} for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    roomy = LLM(str(path), num_gpu_blocks_override=64, max_model_len=144, enable_prefix_caching=False)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    tight = LLM(str(path), num_gpu_blocks_override=9, max_model_len=144, enable_prefix_caching=False,
                preemption_mode="swap", swap_space=0.01)
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)]
    assert tight.llm_engine.scheduler.num_preemptions > 0
    assert tight.llm_engine.runner.host_kv == {}
    assert got == expected
    assert tight.llm_engine.block_manager.num_used_blocks == 0
