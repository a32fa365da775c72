"""Speculative decoding with structured outputs: at verification the grammar's matcher walks the drafts
(the mask of draft position j is the one after drafts[:j]) and rolls back. Greedy constrained output
(JSON schema, regex, choice) is token-equal to plain decoding over a mixed batch, on both backends, with
drafts verified and accepted; outputs follow their constraint; every KV block is freed; seeded random
sampling with speculation gives valid output and repeats."""
import json
import re

import jsonschema
import pytest

from model_factory import make_tiny_model
from pagedllm import LLM, SamplingParams
from pagedllm.sampling_params import GuidedDecodingParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                                    "maxItems": 4}},
          "required": ["name", "tags"]}
REGEX = r"(ab|cd|[0-9]{1,3}) (ab|cd|[0-9]{1,3})( (ab|cd|[0-9]{1,3})){0,12}\."
CHOICES = ["the cat sat on the mat", "the dog sat on the log", "a bird"]
# Prompt text the constrained outputs can copy: prompt lookup then finds drafts the grammar allows.
PROMPTS = ['{"name": "ab cd", "tags": ["ab", "cd"]} {"name": "ab cd", "tags": ["ab"',
           "ab cd 12 ab cd 12 ab cd 12 ab cd",
           "the cat sat on the mat, a bird, the dog sat on the log, a bird, the cat sat on the",
           "name tags name tags 1 2 3 1 2 3"]


def so(**kw):
    return GuidedDecodingParams(**kw)  # its backend field picks the backend of the request


def _requests(backend, temperature=0.0, seed=None):
    common = dict(temperature=temperature, seed=seed, max_tokens=40)
    kinds = [so(json=SCHEMA, disable_any_whitespace=True, backend=backend), so(regex=REGEX, backend=backend),
             so(choice=CHOICES, backend=backend), so(regex=REGEX, backend=backend)]
    prompts = PROMPTS + PROMPTS[:1]  # the last one is unconstrained, next to the others
    params = [SamplingParams(**common, structured_outputs=k) for k in kinds] + [SamplingParams(**common)]
    return prompts, params


def _check(llm, params, outputs):
    """Each output follows its constraint: a fresh matcher accepts every token and has ended exactly when the
    output finished with "stop" (the grammar ended); the texts parse / match."""
    manager = llm.llm_engine.admission.manager
    for p, o in zip(params, outputs):
        if p.structured_outputs is None:
            continue
        matcher = manager.matcher(p.structured_outputs, manager.compile_async(p.structured_outputs).result())
        assert all(matcher.accept(t) for t in o.token_ids), o.text
        assert matcher.is_terminated() == (o.finish_reason == "stop"), (o.text, o.finish_reason)
    name, regex, choice = outputs[0], outputs[1], outputs[2]
    if name.finish_reason == "stop":
        jsonschema.validate(json.loads(name.text, strict=False), SCHEMA)  # strict: the tiny vocabulary's bytes
    assert choice.finish_reason == "stop" and choice.text in CHOICES
    for o in (regex, outputs[3]):
        if o.finish_reason == "stop":
            assert re.fullmatch(REGEX, o.text), o.text


@pytest.fixture(scope="module")
def spec(path):
    llm = LLM(path, kv_cache_space=0.05, max_model_len=256, speculative_config=NGRAM)
    llm.llm_engine.speculator.cost_aware = False  # every proposal verified in full
    return llm


def _run(llm, prompts, params):
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_greedy_structured_output_equals_plain_decoding(plain, spec, backend):
    prompts, params = _requests(backend)
    stats = spec.llm_engine.stats["spec_decode"]
    drafts, accepted = stats.num_draft_tokens, stats.num_accepted_tokens
    blocks = spec.llm_engine.block_manager.num_free_blocks
    ref, got = _run(plain, prompts, params), _run(spec, prompts, params)
    assert [(o.token_ids, o.text, o.finish_reason) for o in got] == \
           [(o.token_ids, o.text, o.finish_reason) for o in ref]
    _check(spec, params, got)
    assert stats.num_draft_tokens > drafts and stats.num_accepted_tokens > accepted
    assert stats.num_draft_tokens - drafts > stats.num_accepted_tokens - accepted  # some rejected too
    assert spec.llm_engine.block_manager.num_free_blocks == blocks
    assert spec.llm_engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_seeded_sampling_with_speculation_follows_the_grammar_and_repeats(spec, backend):
    prompts, params = _requests(backend, temperature=0.9, seed=3)
    first = _run(spec, prompts, params)
    _check(spec, params, first)
    assert [o.token_ids for o in _run(spec, prompts, params)] == [o.token_ids for o in first]
    assert [o.token_ids for o in _run(spec, prompts[1:2], params[1:2])] == [first[1].token_ids]
    assert spec.llm_engine.block_manager.num_used_blocks == 0


@pytest.fixture(scope="module")
def draft_spec(path, tmp_path_factory):
    draft = str(make_tiny_model(tmp_path_factory.mktemp("spec-so-draft"), "llama", seed=1))  # same tokenizer
    llm = LLM(path, kv_cache_space=0.05, max_model_len=256,
              speculative_config={"method": "draft_model", "model": draft, "num_speculative_tokens": 3})
    llm.llm_engine.speculator.cost_aware = False
    return llm


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_draft_model_with_structured_outputs(plain, draft_spec, backend):
    """The draft's own distributions are masked as after its drafts so far; greedy output equals plain
    decoding, seeded sampling follows the grammar."""
    prompts, params = _requests(backend)
    stats = draft_spec.llm_engine.stats["spec_decode"]
    drafts, accepted = stats.num_draft_tokens, stats.num_accepted_tokens
    ref, got = _run(plain, prompts, params), _run(draft_spec, prompts, params)
    assert [(o.token_ids, o.finish_reason) for o in got] == [(o.token_ids, o.finish_reason) for o in ref]
    _check(draft_spec, params, got)
    assert stats.num_draft_tokens > drafts and stats.num_accepted_tokens > accepted
    prompts, params = _requests(backend, temperature=0.9, seed=5)
    _check(draft_spec, params, _run(draft_spec, prompts, params))
    assert draft_spec.llm_engine.block_manager.num_used_blocks == 0
