"""LLM.embed equals sentence-transformers on the same weights (fp32, cosine >= 0.9999 per text): the shipped
all-MiniLM-L6-v2 (BERT, mean pooling, Normalize) and tiny decoder embedders (last-token / mean pooling)."""
import pytest
import torch
import torch.nn.functional as F

from pagedllm import LLM, PoolingParams
from pooling_models import TEXTS, decoder_embedder, minilm

st = pytest.importorskip("sentence_transformers")


def _st_embed(path, texts, normalize=None):
    model = st.SentenceTransformer(str(path), device="cpu")
    return model.encode(texts, convert_to_tensor=True, batch_size=3).float()


def _ours(outs):
    return torch.tensor([o.outputs.embedding for o in outs])


def _assert_close(ours, ref):
    assert ours.shape == ref.shape
    cos = F.cosine_similarity(ours, ref, dim=-1)
    assert (cos >= 0.9999).all(), cos
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-3)


@pytest.fixture(scope="module")
def minilm_llm():
    return LLM(str(minilm()))


def test_minilm_matches_sentence_transformers(minilm_llm):
    path = minilm()
    outs = minilm_llm.embed(TEXTS)
    _assert_close(_ours(outs), _st_embed(path, TEXTS))
    assert all(abs(torch.tensor(o.outputs.embedding).norm().item() - 1) < 1e-5 for o in outs)
    assert outs[0].outputs.hidden_size == 384
    assert outs[1].prompt_token_ids == minilm_llm.get_tokenizer()(TEXTS[1])["input_ids"]


def test_minilm_defaults_come_from_sentence_transformers_files(minilm_llm):
    d = minilm_llm.llm_engine.defaults
    assert (d.embed_pooling, d.normalize) == ("MEAN", True)
    assert minilm_llm.llm_engine.max_model_len == 256  # sentence_bert_config.json's max_seq_length


def test_normalize_off_gives_the_raw_mean(minilm_llm):
    raw = _ours(minilm_llm.embed(TEXTS[:2], pooling_params=PoolingParams(normalize=False)))
    normed = _ours(minilm_llm.embed(TEXTS[:2]))
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(2), atol=1e-3)
    torch.testing.assert_close(F.normalize(raw, dim=-1), normed, atol=1e-5, rtol=1e-4)


def test_token_id_input_equals_text_input(minilm_llm):
    ids = minilm_llm.get_tokenizer()(TEXTS[3])["input_ids"]
    by_ids = minilm_llm.embed({"prompt_token_ids": ids})[0].outputs.embedding
    by_text = minilm_llm.embed(TEXTS[3])[0].outputs.embedding
    torch.testing.assert_close(torch.tensor(by_ids), torch.tensor(by_text), atol=1e-6, rtol=0)


def test_truncation_keeps_the_last_tokens(minilm_llm):
    ids = minilm_llm.get_tokenizer()(TEXTS[3])["input_ids"]
    out = minilm_llm.embed(TEXTS[3], truncate_prompt_tokens=5)[0]
    assert out.prompt_token_ids == ids[-5:]
    same = minilm_llm.embed({"prompt_token_ids": ids[-5:]})[0]
    torch.testing.assert_close(torch.tensor(out.outputs.embedding), torch.tensor(same.outputs.embedding))


def test_batching_does_not_change_results(minilm_llm):
    alone = [_ours(minilm_llm.embed(t)) for t in TEXTS]
    together = _ours(minilm_llm.embed(TEXTS))
    torch.testing.assert_close(torch.cat(alone), together, atol=1e-5, rtol=1e-4)


def test_bad_prompts_fail_alone(minilm_llm):
    from pagedllm.llm import RequestErrors
    long_text = "word " * 400
    with pytest.raises(RequestErrors) as info:
        minilm_llm.embed([TEXTS[0], long_text, {"prompt_token_ids": [101, 10**6, 102]}, TEXTS[1]])
    err = info.value
    assert set(err.errors) == {1, 2}
    assert "longer than the maximum model length of 256" in err.errors[1]
    assert "out of vocabulary" in err.errors[2]
    good = _ours([err.outputs[0], err.outputs[3]])
    _assert_close(good, _ours(minilm_llm.embed([TEXTS[0], TEXTS[1]])))


def test_embed_errors_in_vllms_words(minilm_llm):
    with pytest.raises(ValueError, match="does not support matryoshka representation"):
        minilm_llm.embed("hi", pooling_params=PoolingParams(dimensions=8))
    with pytest.raises(ValueError, match=r"Task embed only supports \['dimensions', 'normalize'\]"):
        minilm_llm.embed("hi", pooling_params=PoolingParams(use_activation=True))
    with pytest.raises(ValueError, match="Classification API is not supported by this model"):
        minilm_llm.classify("hi")
    with pytest.raises(ValueError, match="only supported for generative models"):
        minilm_llm.generate("hi")
    with pytest.raises(ValueError, match="At least one prompt"):
        minilm_llm.embed([])


@pytest.mark.parametrize("arch,pooling", [("llama", "lasttoken"), ("qwen3", "lasttoken"), ("qwen2", "mean"),
                                          ("mistral", "mean")])
def test_decoder_embedder_matches_sentence_transformers(pooling_root, arch, pooling):
    path = decoder_embedder(pooling_root, arch, pooling)
    texts = ["Hello world! How are you today?", "The capital of France is Paris.", "def add(a, b):"]
    llm = LLM(str(path), runner="pooling", convert="embed")
    _assert_close(_ours(llm.embed(texts)), _st_embed(path, texts))
    # the step's scratch KV cache is gone with the step: no layer keeps one
    assert all(layer.kv_cache is None for layer in llm.llm_engine.model.attention_layers())


def test_decoder_embedder_dimensions_on_a_matryoshka_model(pooling_root):
    import json
    path = decoder_embedder(pooling_root, "llama", "lasttoken", normalize=True)
    cfg = json.loads((path / "config.json").read_text())
    llm = LLM(str(path), runner="pooling", max_model_len=32)
    full = _ours(llm.embed(TEXTS[:2], pooling_params=PoolingParams(normalize=False)))
    cfg_path = path.parent / "matryoshka"
    if not cfg_path.exists():
        import shutil
        shutil.copytree(path, cfg_path)
        cfg["is_matryoshka"] = True
        (cfg_path / "config.json").write_text(json.dumps(cfg))
    llm = LLM(str(cfg_path), runner="pooling", max_model_len=32)
    cut = _ours(llm.embed(TEXTS[:2], pooling_params=PoolingParams(dimensions=16)))
    torch.testing.assert_close(cut, F.normalize(full[:, :16], dim=-1), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="at most the model's hidden size"):
        llm.embed("hi", pooling_params=PoolingParams(dimensions=4096))
    with pytest.raises(ValueError, match="longer than the maximum model length of 32"):
        llm.embed("word " * 200)


def test_generate_model_is_not_a_pooling_model(pooling_root):
    from model_factory import make_tiny_model
    llm = LLM(str(make_tiny_model(pooling_root, "llama")), kv_cache_space=0.05)
    with pytest.raises(ValueError, match=r"LLM.embed\(\) is only supported for pooling models"):
        llm.embed("hi")


@pytest.mark.slow
def test_default_model_as_an_embedder_matches_transformers():
    """The built-in GGUF model with task="embed" (vLLM 0.10's name): LAST pooling + normalize of the final-normed
    hidden states, as transformers computes them from the same dequantized weights."""
    from pagedllm.models.loader import load_hf_reference
    llm = LLM(task="embed")
    texts = ["The capital of France is Paris.", "I like turtles."]
    ours = _ours(llm.embed(texts))
    hf = load_hf_reference(None)
    tok = llm.get_tokenizer()
    with torch.no_grad():
        ref = torch.stack([hf.model(**tok(t, return_tensors="pt")).last_hidden_state[0, -1] for t in texts])
    _assert_close(ours, F.normalize(ref, dim=-1))
