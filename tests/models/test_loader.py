"""Model sources and checkpoint formats: HF folders (safetensors, sharded, .bin), GGUF files, hub ids,
errors that say what to do, tokenizer / generation defaults, dtype resolution."""
import json

import pytest
import torch

from models_testing import make_hf_model, tiny_config, write_llama_gguf
from pagedllm.models import (build_model, get_model_class, load_generation_config, load_model, load_tokenizer,
                             resolve_dtype, resolve_model)


def _assert_llama_weights_equal(model, hf):
    sd = hf.state_dict()
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        qkv = torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        torch.testing.assert_close(layer.self_attn.qkv_proj.weight, qkv, atol=0, rtol=0)
        gate_up = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        torch.testing.assert_close(layer.mlp.gate_up_proj.weight, gate_up, atol=0, rtol=0)
        torch.testing.assert_close(layer.self_attn.o_proj.weight, sd[p + "self_attn.o_proj.weight"], atol=0, rtol=0)
    torch.testing.assert_close(model.lm_head.weight, sd["lm_head.weight"], atol=0, rtol=0)


@pytest.fixture(scope="module")
def llama():
    return make_hf_model(tiny_config("llama"))


def test_sharded_safetensors(tmp_path, llama):
    llama.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    source = resolve_model(str(tmp_path))
    assert source.format == "hf" and source.path == tmp_path
    _assert_llama_weights_equal(load_model(source, dtype=torch.float32), llama)


def test_pytorch_bin_weights(tmp_path, llama):
    llama.config.save_pretrained(tmp_path)
    torch.save(llama.state_dict(), tmp_path / "pytorch_model.bin")
    torch.save({"not": "weights"}, tmp_path / "training_args.bin")
    _assert_llama_weights_equal(load_model(resolve_model(str(tmp_path)), dtype=torch.float32), llama)


def test_gpt2_legacy_names_and_conv1d(tmp_path):
    """Old GPT-2 checkpoints: no "transformer." prefix, causal-mask buffers, Conv1D [in, out] weights."""
    hf = make_hf_model(tiny_config("gpt2"))
    hf.config.save_pretrained(tmp_path)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.ones(1, 1, 8, 8)
    state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = load_model(resolve_model(str(tmp_path)), dtype=torch.float32)
    sd = hf.state_dict()
    torch.testing.assert_close(model.transformer.h[1].attn.c_attn.weight, sd["transformer.h.1.attn.c_attn.weight"].t())
    torch.testing.assert_close(model.transformer.h[0].mlp.c_fc.bias, sd["transformer.h.0.mlp.c_fc.bias"])
    torch.testing.assert_close(model.transformer.wpe.weight, sd["transformer.wpe.weight"])


def test_missing_and_misshapen_weights_are_errors(tmp_path, llama):
    llama.config.save_pretrained(tmp_path)
    state = dict(llama.state_dict())
    del state["model.layers.1.self_attn.k_proj.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight \(shards \[1\]\)"):
        load_model(resolve_model(str(tmp_path)), dtype=torch.float32)
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        load_model(resolve_model(str(tmp_path)), dtype=torch.float32)


def test_gguf_sources(tmp_path, llama):
    import gguf

    from pagedllm.models import load_config

    folder = tmp_path / "one"
    folder.mkdir()
    write_llama_gguf(folder / "m.gguf", llama, gguf.GGMLQuantizationType.F32)
    by_file, by_folder = resolve_model(str(folder / "m.gguf")), resolve_model(str(folder))
    assert by_file == resolve_model(folder / "m.gguf")
    assert by_file.format == by_folder.format == "gguf" and by_file.path == by_folder.path
    assert load_config(by_file).architectures in (None, [], ["LlamaForCausalLM"])
    assert load_generation_config(by_file) == {}
    (folder / "n.gguf").write_bytes((folder / "m.gguf").read_bytes())
    with pytest.raises(ValueError, match="2 .gguf files"):
        resolve_model(str(folder))


def test_bad_sources_say_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model(str(tmp_path / "weights.pt"))
    with pytest.raises(ValueError, match="no config.json and no .gguf"):
        resolve_model(str(tmp_path))
    # a hub id that cannot be fetched (offline here; unknown repo where the hub is reachable)
    with pytest.raises(ValueError, match="local model folder .* or a .gguf file"):
        resolve_model("pagedllm-tests/no-such-model-3f9a1c")


def test_unknown_architecture_names_it_and_the_supported_ones():
    from transformers import LlamaConfig

    config = LlamaConfig(architectures=["FalconForCausalLM"])
    with pytest.raises(ValueError, match="FalconForCausalLM.*LlamaForCausalLM.*GPT2LMHeadModel"):
        get_model_class(config)
    config = LlamaConfig()
    config.architectures = None
    assert get_model_class(config).__name__ == "LlamaForCausalLM"  # from model_type


def test_tokenizer_and_generation_config(tmp_path, llama):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = template
    llama.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9, "eos_token_id": 2}))
    source = resolve_model(str(tmp_path))
    loaded = load_tokenizer(source)
    assert loaded("hello world", add_special_tokens=False).input_ids == [3, 4]
    assert loaded.chat_template == template
    assert load_tokenizer(source, tokenizer=str(tmp_path)).eos_token_id == 2
    gen = load_generation_config(source)
    assert gen["temperature"] == 0.6 and gen["top_p"] == 0.9
    (tmp_path / "generation_config.json").unlink()
    assert load_generation_config(source) == {}


def test_resolve_dtype():
    from transformers import LlamaConfig

    half_ckpt = LlamaConfig(dtype="float16")
    assert resolve_dtype("auto", half_ckpt, "cpu") == torch.float32
    assert resolve_dtype("auto", half_ckpt, "cuda") == torch.float16
    assert resolve_dtype("auto", LlamaConfig(dtype="float32"), "cuda") == torch.bfloat16
    assert resolve_dtype("half", None, "cpu") == torch.float16
    assert resolve_dtype(torch.bfloat16, None, "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="Unknown dtype 'int8'"):
        resolve_dtype("int8", None, "cpu")


def test_build_model_on_meta_device_allocates_nothing():
    model = build_model(tiny_config("qwen3"), torch.bfloat16, "meta")
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in model.parameters())
    assert len(model.attention_layers()) == 2
    assert json.dumps(type(model).packed_modules_mapping)  # declared data
