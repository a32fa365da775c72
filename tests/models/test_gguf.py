"""GGUF loading: dequantization of every supported tensor type, llama.cpp names and q/k permutation
mapped back to HF, tied embeddings when output.weight is absent, logits of a GGUF model."""
import gguf
import numpy as np
import pytest
import torch

from models_testing import PagedRunner, hf_logits, hf_state_from_gguf, make_hf_model, write_llama_gguf
from pagedllm.models import iter_weights, load_config, load_model, resolve_model

Q = gguf.GGMLQuantizationType


def gguf_llama_config(tie: bool = False):
    """K-quants pack 256 values per block: every weight's row length must be a multiple of 256."""
    import transformers as tf

    return tf.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=128,
                          rms_norm_eps=1e-5, tie_word_embeddings=tie)


@pytest.fixture(scope="module")
def hf_llama():
    return make_hf_model(gguf_llama_config())


# The bound on |dequantized - original| per tensor, as a fraction of the tensor's max |value|:
# F16 / BF16 round to 11 / 8 mantissa bits; Q8_0 rounds to amax/127 steps (half a step of error);
# Q4_0 has step d = amax/8 and codes -8..7, so the value opposite the block max clips by a whole step;
# Q4_1 rounds to (max - min)/15 steps (half a step <= amax / 15). With a little margin.
ROUNDTRIP_TOL = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 5e-3, Q.Q8_0: 1 / 200, Q.Q4_0: 1 / 7.5, Q.Q4_1: 1 / 14}


@pytest.mark.parametrize("qtype", list(ROUNDTRIP_TOL), ids=lambda q: q.name)
def test_quantized_weights_dequantize_to_the_originals(tmp_path, hf_llama, qtype):
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, hf_llama, qtype)
    ours = dict(iter_weights(resolve_model(str(path))))
    original = hf_llama.state_dict()
    assert set(ours) == set(original)  # lm_head included: untied
    for name, w in original.items():
        got = ours[name]
        assert got.shape == w.shape and got.dtype == torch.float32, name
        tol = 0.0 if w.dim() == 1 else ROUNDTRIP_TOL[qtype] * w.abs().max().item()
        assert (got - w).abs().max().item() <= tol, name
    # and exactly what transformers' GGUF reader gives for the same file
    ref = hf_state_from_gguf(path, hf_llama)
    for name, got in ours.items():
        torch.testing.assert_close(got, ref[name].float(), atol=0, rtol=0)


def random_k_blocks(shape, qtype, seed=0, d=0.01) -> np.ndarray:
    """Random K-quant blocks (gguf cannot quantize to these) with sane f16 super-block scales d, dmin = d / 2."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    dmin = np.array([d / 2], dtype=np.float16).view(np.uint8)
    d = np.array([d], dtype=np.float16).view(np.uint8)
    if qtype == Q.Q6_K:  # d is the last field
        raw[..., -2:] = d
    else:  # d, dmin first
        raw[..., 0:2], raw[..., 2:4] = d, dmin
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quant_tensors_map_to_hf(tmp_path, hf_llama, qtype):
    """A permuted tensor (attn_q) and a plain one (ffn_down) stored as K-quant blocks: ours equals
    the gguf package's dequantization, un-permuted, and equals transformers' reading of the file."""
    q_raw = random_k_blocks((256, 256), qtype, seed=1)
    down_raw = random_k_blocks((256, 512), qtype, seed=2)
    path = tmp_path / "k.gguf"
    write_llama_gguf(path, hf_llama, Q.F32, tensor_qtypes={"blk.0.attn_q.weight": (qtype, q_raw),
                                                          "blk.1.ffn_down.weight": (qtype, down_raw)})
    ours = dict(iter_weights(resolve_model(str(path))))
    q = gguf.quants.dequantize(q_raw, qtype)
    q = q.reshape(4, 32, 2, 256).swapaxes(1, 2).reshape(256, 256)  # llama.cpp permute, inverted
    torch.testing.assert_close(ours["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(q), atol=0, rtol=0)
    down = torch.from_numpy(gguf.quants.dequantize(down_raw, qtype))
    assert down.abs().max() > 0
    torch.testing.assert_close(ours["model.layers.1.mlp.down_proj.weight"], down, atol=0, rtol=0)
    ref = hf_state_from_gguf(path, hf_llama)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        torch.testing.assert_close(ours[name], ref[name].float(), atol=0, rtol=0)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_gguf_model_logits_match_hf(tmp_path, tie, native):
    """A Q8_0 GGUF through our loader (config from its metadata) gives HF's logits on the same file."""
    hf = make_hf_model(gguf_llama_config(tie=tie))
    path = tmp_path / "tiny-q8.gguf"
    write_llama_gguf(path, hf, Q.Q8_0)
    source = resolve_model(str(path))
    config = load_config(source)
    assert config.tie_word_embeddings == tie and config.num_key_value_heads == 2 and config.head_dim == 64
    model = load_model(source, dtype=torch.float32)
    assert model.lm_head.tied == tie
    hf.load_state_dict(hf_state_from_gguf(path, hf), strict=not tie)  # tied: lm_head follows the embedding
    if tie:
        hf.tie_weights()
    prompts = [[5, 17, 200, 3, 9, 41, 77], list(range(20, 43))]
    runner = PagedRunner(model, [len(p) for p in prompts], max_new=1, native=native)
    for prompt, ours in zip(prompts, runner.prefill(prompts)):
        torch.testing.assert_close(ours, hf_logits(hf, prompt), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gpt2"])
def test_other_architectures_from_gguf(tmp_path, arch):
    """Config from the GGUF metadata (Qwen3's head_dim from attention.key_length, GPT-2's positions
    from context_length), names back to HF, GPT-2's Conv1D layout: our model's weights equal the HF ones."""
    from models_testing import tiny_config, write_gguf

    cfg = tiny_config(arch)
    if arch == "qwen3":
        cfg.hidden_size = 192  # head_dim 64 != 192 / 4: only key_length tells
    if arch == "gpt2":
        cfg.n_positions = 100  # not GPT2Config's default 1024
    hf = make_hf_model(cfg)
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, hf, arch)
    source = resolve_model(str(path))
    config = load_config(source)
    assert config.model_type == arch and config.num_hidden_layers == 2
    model = load_model(source, config, dtype=torch.float32)
    assert type(model).__name__ == type(hf).__name__
    ours = dict(model.named_parameters())
    sd = hf.state_dict()
    if arch == "gpt2":
        torch.testing.assert_close(ours["transformer.h.1.attn.c_attn.weight"], sd["transformer.h.1.attn.c_attn.weight"].t(), atol=0, rtol=0)
        torch.testing.assert_close(ours["transformer.h.0.mlp.c_proj.bias"], sd["transformer.h.0.mlp.c_proj.bias"], atol=0, rtol=0)
        torch.testing.assert_close(ours["transformer.wpe.weight"], sd["transformer.wpe.weight"], atol=0, rtol=0)
    else:
        attn = model.model.layers[1].self_attn
        qkv = torch.cat([sd[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv"])
        torch.testing.assert_close(attn.qkv_proj.weight, qkv, atol=0, rtol=0)
        if arch == "qwen2":
            bias = torch.cat([sd[f"model.layers.1.self_attn.{n}_proj.bias"] for n in "qkv"])
            torch.testing.assert_close(attn.qkv_proj.bias, bias, atol=0, rtol=0)
        else:
            assert config.head_dim == 64
            torch.testing.assert_close(attn.k_norm.weight, sd["model.layers.1.self_attn.k_norm.weight"], atol=0, rtol=0)
    assert model.lm_head.tied == bool(config.tie_word_embeddings)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0], ids=lambda q: q.name)
def test_quantized_gguf_decodes_from_its_codes(tmp_path, qtype):
    """On the CPU every linear weight of a Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 GGUF is served from its exact codes
    (quantized_linear); prefill and decode logits still equal HF's on the same file."""
    from pagedllm.layers.linear import LMHead, Linear, pack_linear_weights

    hf = make_hf_model(gguf_llama_config())
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    write_llama_gguf(path, hf, qtype)
    model = load_model(resolve_model(str(path)), dtype=torch.float32)
    assert pack_linear_weights(model) > 0
    layers = [m for m in model.modules() if isinstance(m, (Linear, LMHead))]
    assert len(layers) == 2 * 4 + 1 and all(m.packed.qtype == qtype for m in layers)
    _assert_logits_match_hf(model, hf, path)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quant_gguf_decodes_from_its_codes(tmp_path, qtype):
    """The o_proj and down_proj weights of both layers stored as K-quant blocks (q/k/v, gate/up and the rest as F32):
    on the CPU those four are served from their exact codes, the others from fp32 panels; logits equal HF's."""
    from pagedllm.layers.linear import pack_linear_weights

    hf = make_hf_model(gguf_llama_config())
    names = [f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_output", "ffn_down")]
    shapes = [(256, 256), (256, 512)] * 2
    raw = {n: (qtype, random_k_blocks(shape, qtype, seed=i, d=2e-4)) for i, (n, shape) in enumerate(zip(names, shapes))}
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    write_llama_gguf(path, hf, Q.F32, tensor_qtypes=raw)
    model = load_model(resolve_model(str(path)), dtype=torch.float32)
    assert pack_linear_weights(model) > 0
    for layer in model.model.layers:
        assert layer.self_attn.o_proj.packed.qtype == qtype and layer.mlp.down_proj.packed.qtype == qtype
        assert layer.self_attn.qkv_proj.packed.qtype == 0 and layer.mlp.gate_up_proj.packed.qtype == 0
    _assert_logits_match_hf(model, hf, path)


def _assert_logits_match_hf(model, hf, path) -> None:
    """hf loaded from the same GGUF file: prefill (7 and 23 rows: the packed path) and 3 decode steps of
    2 rows give its logits."""
    hf.load_state_dict(hf_state_from_gguf(path, hf))
    prompts = [[5, 17, 200, 3, 9, 41, 77], list(range(20, 43))]
    runner = PagedRunner(model, [len(p) for p in prompts], max_new=3, native=False)
    for prompt, ours in zip(prompts, runner.prefill(prompts)):
        torch.testing.assert_close(ours, hf_logits(hf, prompt), atol=1e-4, rtol=1e-4)
    for step in range(3):  # 2 rows a step
        tokens = [(11 * step + 7 * i) % 256 for i in range(2)]
        ours = runner.decode(tokens)
        for i, prompt in enumerate(prompts):
            prompt.append(tokens[i])
            torch.testing.assert_close(ours[i], hf_logits(hf, prompt)[-1], atol=1e-4, rtol=1e-4)
