"""16-bit checkpoints on the CPU: a bf16 / fp16 HF folder loaded as float32 keeps its weights as 16-bit
panels (csrc/cpu/wide16_linear.cpp) and still equals HF transformers' float32 greedy decoding, through
the fused decoder layers and the Python layer loop; dtype=bfloat16 on a CPU without bf16 hardware
computes in float32 on bf16-rounded weights (pagedllm/cpu_features.py)."""
import pytest
import torch

from model_factory import make_tiny_model
from test_generate_vs_hf import GREEDY, _check, _prompts

from pagedllm import LLM, _ops
from pagedllm.cpu_features import FEATURES_ENV, cpu_math_dtype, native_16bit_math
from pagedllm.layers import linear as linear_mod
from pagedllm.layers.linear import Linear, LMHead
from pagedllm.models import cpu_decoder_layers

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("wide16")


def _model(llm):
    return llm.llm_engine.runner.model


def _packed_kinds(llm) -> set[int]:
    """The packed kinds of the model's Linears and head (None: not packed)."""
    return {m.packed and m.packed.qtype for m in _model(llm).modules() if isinstance(m, (Linear, LMHead))}


@pytest.mark.parametrize("arch,dtype,kind", [("llama", torch.bfloat16, 30), ("qwen2", torch.bfloat16, 30),
                                             ("llama", torch.float16, 1)])
def test_16_bit_folder_matches_hf_through_the_fused_layers(root, arch, dtype, kind):
    path = str(make_tiny_model(root, arch, dtype=dtype))
    llm = LLM(path, kv_cache_space=0.05, max_model_len=256)
    assert llm.llm_engine.dtype == torch.float32
    assert _packed_kinds(llm) == {kind}  # every Linear and the head: 16-bit panels
    layers = cpu_decoder_layers.for_model(_model(llm).model)
    assert layers is not None and kind in layers.ints  # the fused op gets the 16-bit panels
    prompts = _prompts(llm.llm_engine.vocab_size)
    _check(llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False), prompts, path)


def test_16_bit_folder_matches_hf_through_the_layer_loop(root, monkeypatch):
    monkeypatch.setenv(cpu_decoder_layers.ENV, "0")
    calls = []
    real = _ops.wide16_linear
    monkeypatch.setattr(linear_mod._ops, "wide16_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    path = str(make_tiny_model(root, "llama", dtype=torch.bfloat16))
    llm = LLM(path, kv_cache_space=0.05, max_model_len=256)
    prompts = _prompts(llm.llm_engine.vocab_size)
    _check(llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False), prompts, path)
    assert len(prompts) in calls  # the decode steps of all prompts went through the 16-bit panels


def _outputs(llm, prompts):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in e.items()} for e in o.outputs[0].logprobs])
            for o in outs]


def test_bfloat16_without_bf16_hardware_is_float32_math_on_bf16_weights(root, monkeypatch):
    """dtype=bfloat16 of an fp32 folder, on a CPU without bf16 hardware: the same model, bit for bit,
    as the fp32 engine on the folder saved in bf16."""
    monkeypatch.setenv(FEATURES_ENV, "avx2,fma,f16c")
    fp32_path = str(make_tiny_model(root, "llama"))
    llm = LLM(fp32_path, dtype="bfloat16", kv_cache_space=0.05, max_model_len=256)
    assert llm.llm_engine.dtype == torch.float32
    for p in _model(llm).parameters():
        assert p.dtype == torch.float32 and torch.equal(p, p.bfloat16().float())
    assert _packed_kinds(llm) == {30}
    prompts = _prompts(llm.llm_engine.vocab_size)
    got = _outputs(llm, prompts)
    del llm
    bf16_folder = LLM(str(make_tiny_model(root, "llama", dtype=torch.bfloat16)), kv_cache_space=0.05, max_model_len=256)
    assert got == _outputs(bf16_folder, prompts)


@pytest.mark.parametrize("dot", ["1", "0"])
def test_bfloat16_with_bf16_hardware_stays_bfloat16(root, monkeypatch, dot):
    """Where AVX512_BF16 / AMX-BF16 exist (here: claimed through the override), the model is bf16 and
    torch's GEMMs (oneDNN) run its prefill; its decode GEMMs (1-NATIVE16_MAX_ROWS rows) stream its own
    bits as 16-bit panels (wide16_linear, fp32 math rounded back to bf16), or, where the running CPU really
    has AVX512_BF16 (and PAGEDLLM_CPU_BF16_DOT is not 0), its GEMMs of 1-BF16_DOT_MAX_ROWS rows take
    bf16_dot_linear."""
    monkeypatch.setenv(FEATURES_ENV, "avx512f,amx_bf16")
    monkeypatch.setenv(linear_mod.BF16_DOT_ENV, dot)
    llm = LLM(str(make_tiny_model(root, "llama")), dtype="bfloat16", kv_cache_space=0.05, max_model_len=256)
    assert llm.llm_engine.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in _model(llm).parameters())
    dot_kind = dot == "1" and linear_mod.bf16_dot_available()
    assert _packed_kinds(llm) == {linear_mod.BF16_DOT_KIND if dot_kind else 30}  # the bf16 weights themselves
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], GREEDY, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == GREEDY.max_tokens


@pytest.mark.parametrize("flags,bf16,fp16", [("none", False, False), ("avx2,f16c", False, False),
                                             ("avx512_bf16", True, False), ("AMX_BF16", True, False),
                                             ("amx_fp16", False, True), ("avx512_fp16, amx_bf16", True, True)])
def test_16_bit_math_selection(monkeypatch, flags, bf16, fp16):
    monkeypatch.setenv(FEATURES_ENV, flags)
    assert native_16bit_math(torch.bfloat16) is bf16 and native_16bit_math(torch.float16) is fp16
    assert cpu_math_dtype(torch.bfloat16, CPU) == (torch.bfloat16 if bf16 else torch.float32)
    assert cpu_math_dtype(torch.float16, CPU) == (torch.float16 if fp16 else torch.float32)
    assert cpu_math_dtype(torch.float32, CPU) == torch.float32
    assert cpu_math_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16  # GPUs: as asked
