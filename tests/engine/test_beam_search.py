"""LLM.beam_search equals transformers' generate(num_beams=w, do_sample=False, length_penalty=...)
token for token (every returned beam, in order, and its score), for widths 1 (= greedy) to 4, with
beams ending at EOS and at max_tokens; the beams share KV blocks while they run and every block is
back when they finish."""
import random

import pytest
import torch

from hf_reference import hf_greedy, hf_model
from model_factory import make_tiny_model
from pagedllm import LLM, SamplingParams
from pagedllm.beam_search import BeamSearchOutput
from pagedllm.sampling_params import BeamSearchParams

MAX_TOKENS = 8
# fp32 on both sides, other summation orders: logprobs agree to ~1e-5.
SCORE_ATOL = 1e-3


@pytest.fixture(scope="module")
def tiny():
    import tempfile
    root = tempfile.mkdtemp()
    path = str(make_tiny_model(root, "llama"))
    return path, LLM(path, kv_cache_space=0.05, max_model_len=256)


def _prompts(vocab: int, lens=(5, 17, 33)) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lens]


@torch.inference_mode()
def hf_beams(model, prompt: list[int], width: int, length_penalty: float, max_tokens: int, eos: int):
    """[(generated tokens up to and including EOS, score)] best first, from transformers."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         num_beams=width, num_return_sequences=width, do_sample=False,
                         length_penalty=length_penalty, max_new_tokens=max_tokens, eos_token_id=eos,
                         pad_token_id=eos, early_stopping=False, return_dict_in_generate=True, output_scores=True)
    beams = []
    # num_beams=1 is transformers' greedy search, which reports no sequence score.
    scores = out.sequences_scores.tolist() if width > 1 else [None]
    for seq, score in zip(out.sequences.tolist(), scores):
        gen = seq[len(prompt):]
        if eos in gen:
            gen = gen[:gen.index(eos) + 1]
        beams.append((gen, score))
    return beams


def _check(llm, path, prompts, width, length_penalty, eos):
    engine = llm.llm_engine
    engine.eos_token_ids = frozenset({eos})
    params = BeamSearchParams(beam_width=width, max_tokens=MAX_TOKENS, length_penalty=length_penalty)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    assert engine.block_manager.num_used_blocks == 0
    model = hf_model(path)
    for prompt, out in zip(prompts, outs):
        assert isinstance(out, BeamSearchOutput) and len(out.sequences) == width
        ref = hf_beams(model, prompt, width, length_penalty, MAX_TOKENS, eos)
        for seq, (ref_tokens, ref_score) in zip(out.sequences, ref):
            assert seq.tokens[:len(prompt)] == prompt
            gen = seq.tokens[len(prompt):]
            assert gen == ref_tokens
            assert seq.finish_reason == ("stop" if gen[-1] == eos else "length")
            if ref_score is not None:
                assert abs(seq.cum_logprob / len(gen) ** length_penalty - ref_score) < SCORE_ATOL


@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beams_equal_transformers_ending_at_eos(tiny, width, length_penalty):
    path, llm = tiny
    prompts = _prompts(llm.llm_engine.vocab_size)
    # An EOS that greedy reaches at its 3rd token: some beams end there, others run on to max_tokens.
    eos = hf_greedy(hf_model(path), prompts[0], 3)[0][2]
    _check(llm, path, prompts, width, length_penalty, eos)


@pytest.mark.parametrize("width", [1, 4])
def test_beams_equal_transformers_ending_at_max_tokens(tiny, width):
    path, llm = tiny
    _check(llm, path, _prompts(llm.llm_engine.vocab_size), width, 1.0, eos=2)


def test_width_1_is_greedy(tiny):
    path, llm = tiny
    llm.llm_engine.eos_token_ids = frozenset({2})
    prompts = _prompts(llm.llm_engine.vocab_size)
    beams = llm.beam_search([{"prompt_token_ids": p} for p in prompts],
                            BeamSearchParams(beam_width=1, max_tokens=MAX_TOKENS, ignore_eos=True))
    greedy = llm.generate([{"prompt_token_ids": p} for p in prompts],
                          SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)
    for p, b, g in zip(prompts, beams, greedy):
        assert b.sequences[0].tokens == p + g.outputs[0].token_ids


def test_beams_share_blocks_and_free_them(tiny):
    path, llm = tiny
    engine = llm.llm_engine
    engine.eos_token_ids = frozenset({2})
    bm = engine.block_manager
    before = bm.num_used_blocks
    prompt = _prompts(engine.vocab_size, lens=(40,))[0]  # 2 full blocks + a partial one
    engine.add_request("beams", {"prompt_token_ids": prompt},
                       BeamSearchParams(beam_width=4, max_tokens=6, ignore_eos=True))
    for _ in range(3):
        engine.step()
    beams = engine.requests["beams"].seqs
    assert len(beams) == 4
    tables = [bm.get_block_table(s.seq_id) for s in beams]
    assert all(t[:2] == tables[0][:2] for t in tables)  # the prompt's full blocks are shared ...
    assert len({b for t in tables for b in t}) == bm.num_used_blocks - before  # ... and counted once
    assert bm.ref_count(tables[0][0]) == 4
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert [o.request_id for o in outputs] == ["beams"] and outputs[0].finished
    assert len(outputs[0].outputs) == 4 and all(len(o.token_ids) == 6 for o in outputs[0].outputs)
    assert bm.num_used_blocks == before


def test_beam_search_with_preemption_equals_without(tiny):
    """A cache so small that beams get preempted (recomputed) mid-search: same beams."""
    path, _ = tiny
    prompts = _prompts(400, lens=(30, 45))  # the tiny vocabulary has 446 tokens
    params = BeamSearchParams(beam_width=3, max_tokens=MAX_TOKENS, ignore_eos=True)
    ref = LLM(path, kv_cache_space=0.05, max_model_len=256).beam_search([{"prompt_token_ids": p} for p in prompts],
                                                                        params)
    small = LLM(path, num_gpu_blocks_override=8, max_model_len=64, max_num_batched_tokens=64)
    got = small.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    assert small.llm_engine.scheduler.num_preemptions > 0
    assert [[s.tokens for s in o.sequences] for o in got] == [[s.tokens for s in o.sequences] for o in ref]
    assert small.llm_engine.block_manager.num_used_blocks == 0


def test_text_drops_the_eos_unless_asked(tiny):
    path, llm = tiny
    engine = llm.llm_engine
    prompt = _prompts(engine.vocab_size)[0]
    eos = hf_greedy(hf_model(path), prompt, 3)[0][2]
    engine.eos_token_ids = frozenset({eos})
    tok = llm.get_tokenizer()
    for include in (False, True):
        out = llm.beam_search([{"prompt_token_ids": prompt}],
                              BeamSearchParams(beam_width=2, max_tokens=MAX_TOKENS, include_stop_str_in_output=include))
        for seq in out[0].sequences:
            gen = seq.tokens[len(prompt):]
            if seq.finish_reason == "stop" and not include:
                gen = gen[:-1]
            assert seq.text == tok.decode(gen)


def test_bad_params_raise():
    with pytest.raises(ValueError, match="beam_width must be at least 1"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens must be at least 1"):
        BeamSearchParams(beam_width=2, max_tokens=0)


@pytest.mark.slow
def test_default_model_beams_equal_transformers():
    from pagedllm.models.loader import load_hf_reference
    llm = LLM(max_model_len=512)
    tok = llm.get_tokenizer()
    eos = tok.eos_token_id
    hf = load_hf_reference(None)
    prompts = [tok.encode(p) for p in ("The capital of France is", "def fibonacci(n):")]
    for width in (1, 4):
        outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts],
                               BeamSearchParams(beam_width=width, max_tokens=MAX_TOKENS))
        for prompt, out in zip(prompts, outs):
            ref = hf_beams(hf, prompt, width, 1.0, MAX_TOKENS, eos)
            assert [s.tokens[len(prompt):] for s in out.sequences] == [t for t, _ in ref]
    assert llm.llm_engine.block_manager.num_used_blocks == 0
