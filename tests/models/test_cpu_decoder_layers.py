"""decoder_layers (every Llama-family decoder layer of a step in one CPU op) gives the Python layer
loop's results bit for bit: prefill and decode steps of every Llama-family architecture, without
packed weights, with fp32 panels and with GGUF codes, and in bfloat16 / float16; mixed steps through
the engine; weights reloaded after the first use; and it runs only where it applies."""
import gguf
import numpy as np
import pytest
import torch

from models_testing import VOCAB, PagedRunner, make_hf_model, tiny_config
from pagedllm import LLM, SamplingParams, _ops
from pagedllm.layers import linear as linear_mod
from pagedllm.layers.linear import LMHead, Linear, pack_linear_weights
from pagedllm.models import cpu_decoder_layers, load_model, loader, resolve_model

FUSED_ARCHS = ["llama", "mistral", "qwen2", "qwen3"]  # mistral: sliding window; qwen2: q/k/v bias; qwen3: q/k norm
PROMPT_LENS = [5, 19, 37]


def _q4_1(hf) -> None:
    """Every matrix of hf made exactly of GGUF Q4_1 blocks (as a Q4_1 checkpoint loads)."""
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                raw = gguf.quants.quantize(p.numpy(), gguf.GGMLQuantizationType.Q4_1)
                deq = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1).reshape(p.shape)
                p.copy_(torch.from_numpy(np.ascontiguousarray(deq)))


@pytest.fixture(scope="module", params=[(a, w) for a in FUSED_ARCHS for w in ("fp32", "q4_1")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def folder(request, tmp_path_factory):
    arch, weights = request.param
    hf = make_hf_model(tiny_config(arch))
    if weights == "q4_1":
        _q4_1(hf)
    path = tmp_path_factory.mktemp(f"{arch}-{weights}")
    hf.save_pretrained(path)
    return path


def _logits(model, fused: bool, monkeypatch, lens=PROMPT_LENS) -> list[torch.Tensor]:
    """A prefill of the prompts (three: 61 rows), then three decode steps (a row each), on a fresh paged cache."""
    monkeypatch.setenv(cpu_decoder_layers.ENV, "1" if fused else "0")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lens]
    runner = PagedRunner(model, lens, max_new=3, native=False, dtype=next(model.parameters()).dtype)
    out = runner.prefill(prompts)
    for step in range(3):
        out.append(runner.decode([(17 * step + 5 * i) % VOCAB for i in range(len(lens))]))
    return out


def _count_calls(monkeypatch) -> list[int]:
    calls = []
    real = _ops.decoder_layers
    monkeypatch.setattr(_ops, "decoder_layers", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    return calls


@pytest.mark.parametrize("pack", [False, True], ids=["unpacked", "packed"])
def test_same_bits_as_the_layer_loop(folder, pack, monkeypatch):
    model = load_model(resolve_model(str(folder)), dtype=torch.float32)
    if pack:
        assert pack_linear_weights(model) > 0
        kinds = {m.packed.qtype for m in model.modules() if isinstance(m, (Linear, LMHead))}
        assert kinds == ({3} if "q4_1" in folder.name else {0})
    calls = _count_calls(monkeypatch)
    fused = _logits(model, True, monkeypatch)
    assert calls == [sum(PROMPT_LENS), 3, 3, 3]
    loop = _logits(model, False, monkeypatch)
    assert len(calls) == 4
    for a, b in zip(fused, loop):
        assert torch.equal(a, b)


@pytest.mark.parametrize("decodes", [5, 14])
def test_many_decodes_same_bits(folder, decodes, monkeypatch):
    """Decode steps whose GEMMs fetch the next layer's KV blocks (csrc/cpu/fetch_ahead.h) while they
    compute (GGUF codes from 3 rows, in the register-expanded tiles up to 12; fp32 panels from 13); the
    results stay the layer loop's (sliding window: mistral; prompts past the window and across blocks)."""
    model = load_model(resolve_model(str(folder)), dtype=torch.float32)
    assert pack_linear_weights(model) > 0
    lens = [1 + (7 * i) % 40 for i in range(decodes)]
    calls = _count_calls(monkeypatch)
    fused = _logits(model, True, monkeypatch, lens)
    assert calls == [sum(lens), decodes, decodes, decodes]
    loop = _logits(model, False, monkeypatch, lens)
    for a, b in zip(fused, loop):
        assert torch.equal(a, b)


CHUNKED_LENS = [[130, 70, 97], [250, 5, 200, 147]]  # 297 and 602 rows: MLPs in 2 and 4 row chunks


def _chunked_prefill_same_bits(model, monkeypatch) -> None:
    for lens in CHUNKED_LENS:
        calls = _count_calls(monkeypatch)
        fused = _logits(model, True, monkeypatch, lens)
        assert calls == [sum(lens)] + [len(lens)] * 3
        loop = _logits(model, False, monkeypatch, lens)
        for a, b in zip(fused, loop):
            assert torch.equal(a, b)


def test_prefill_mlp_in_row_chunks_same_bits(folder, monkeypatch):
    """A prefill of 256+ rows through packed weights: the op runs each layer's MLP in row chunks so that the
    gate_up output stays in cache; every row's result is still the layer loop's, which runs the MLP over all
    rows at once. The packed kernels take every row count here, as on an AMD host."""
    monkeypatch.setattr(linear_mod, "PACKED_MAX_ROWS", linear_mod.NO_ROW_LIMIT)
    model = load_model(resolve_model(str(folder)), dtype=torch.float32)
    assert pack_linear_weights(model) > 0
    _chunked_prefill_same_bits(model, monkeypatch)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_int8_prefill_mlp_in_row_chunks_same_bits(arch, tmp_path, monkeypatch):
    """The same in the int8 mode (every row quantized and multiplied alone), on Q4_1 weights; and its decode
    steps of 5 and 14 sequences (the GEMMs fetching the next layer's KV, as above)."""
    hf = make_hf_model(tiny_config(arch))
    _q4_1(hf)
    hf.save_pretrained(tmp_path)
    model = load_model(resolve_model(str(tmp_path)), dtype=torch.float32)
    assert pack_linear_weights(model, int8=True) > 0
    assert all(m.packed.int8 for m in model.modules() if isinstance(m, Linear))
    _chunked_prefill_same_bits(model, monkeypatch)
    for decodes in (5, 14):  # decode steps whose int8 GEMMs fetch the next layer's KV blocks
        lens = [1 + (7 * i) % 40 for i in range(decodes)]
        for a, b in zip(_logits(model, True, monkeypatch, lens), _logits(model, False, monkeypatch, lens)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,dot", [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, False)],
                         ids=["bf16-dot", "bf16", "fp16"])
def test_16_bit_models_same_bits(folder, dtype, dot, monkeypatch):
    """A model kept in bfloat16 / float16: decode steps of up to 16 rows through its own 16-bit panels
    (fp32 math, rounded back), prefill and 20-row decode steps through torch's 16-bit linear; or (bf16 on an
    AVX512_BF16 CPU) every step of up to BF16_DOT_MAX_ROWS rows through bf16_dot_linear; the op gives the
    layer loop's bits either way."""
    if dot and not linear_mod.bf16_dot_available():
        pytest.skip("this CPU has no AVX512_BF16")
    monkeypatch.setenv(linear_mod.BF16_DOT_ENV, "1" if dot else "0")
    model = load_model(resolve_model(str(folder)), dtype=dtype)
    assert pack_linear_weights(model) > 0
    kind = linear_mod.BF16_DOT_KIND if dot else 30 if dtype == torch.bfloat16 else 1
    assert {m.packed.qtype for m in model.modules() if isinstance(m, Linear)} == {kind}
    for lens in (PROMPT_LENS, [1 + (7 * i) % 40 for i in range(20)]):
        calls = _count_calls(monkeypatch)
        fused = _logits(model, True, monkeypatch, lens)
        assert calls == [sum(lens)] + [len(lens)] * 3
        loop = _logits(model, False, monkeypatch, lens)
        for a, b in zip(fused, loop):
            assert a.dtype == torch.float32 and torch.equal(a, b)


def test_mixed_steps_through_the_engine(tmp_path, monkeypatch):
    """Chunked prefill of 16 tokens a step: prefill chunks and decodes share steps. Tokens and
    logprobs equal with the op and with the layer loop."""
    hf = make_hf_model(tiny_config("qwen3"))
    hf.save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(2)
    prompts = [{"prompt_token_ids": torch.randint(3, VOCAB, (n,), generator=g).tolist()} for n in (3, 40, 9, 27)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)
    results = []
    for fused in ("1", "0"):
        monkeypatch.setenv(cpu_decoder_layers.ENV, fused)
        llm = LLM(str(tmp_path), skip_tokenizer_init=True, kv_cache_space=0.01, max_model_len=128,
                  enable_chunked_prefill=True, max_num_batched_tokens=16)
        calls = _count_calls(monkeypatch)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert bool(calls) == (fused == "1")
        results.append([(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in e.items()} for e in o.outputs[0].logprobs])
                        for o in outs])
    assert results[0] == results[1]


def test_reloaded_weights_reach_the_op(tmp_path, monkeypatch):
    paths = []
    for seed in (0, 1):
        hf = make_hf_model(tiny_config("llama"), seed=seed)
        hf.save_pretrained(tmp_path / str(seed))
        paths.append(resolve_model(str(tmp_path / str(seed))))
    model = load_model(paths[0], dtype=torch.float32)
    pack_linear_weights(model)
    before = _logits(model, True, monkeypatch)
    model.load_weights(loader.iter_weights(paths[1], model))
    after = _logits(model, True, monkeypatch)
    assert not torch.equal(before[0], after[0])
    for a, b in zip(after, _logits(model, False, monkeypatch)):
        assert torch.equal(a, b)


def test_where_it_does_not_run(tmp_path, monkeypatch):
    hf = make_hf_model(tiny_config("llama"))
    hf.save_pretrained(tmp_path)
    source = resolve_model(str(tmp_path))
    calls = _count_calls(monkeypatch)
    model = load_model(source, dtype=torch.float32)
    runner = PagedRunner(model, [5], max_new=1, native=True)  # the plain-torch references
    runner.prefill([[5, 6, 7, 8, 9]])
    assert calls == []
    bf16 = load_model(source, dtype=torch.bfloat16)  # a 16-bit model runs through it (test_16_bit_models_same_bits)
    PagedRunner(bf16, [5], max_new=1, native=False, dtype=torch.bfloat16).prefill([[5, 6, 7, 8, 9]])
    assert calls == [5]
    assert cpu_decoder_layers.supported(model.model, torch.zeros(1, 128))
    assert model.model.cpu_layers(torch.zeros(1, 128)) is not None
    # hidden states in another dtype than the model's weights, or of another rank: the layer loop
    assert model.model.cpu_layers(torch.zeros(1, 128, dtype=torch.bfloat16)) is None
    assert bf16.model.cpu_layers(torch.zeros(1, 128)) is None
    assert not cpu_decoder_layers.supported(model.model, torch.zeros(1, 128, dtype=torch.float64))
    assert not cpu_decoder_layers.supported(model.model, torch.zeros(1, 1, 128))
    monkeypatch.setenv(cpu_decoder_layers.ENV, "0")
    assert not cpu_decoder_layers.supported(model.model, torch.zeros(1, 128))
