"""Helpers of the model tests: tiny random HF models of every architecture, running our model over a
batch of prefills then decodes on a paged KV cache, and writing GGUF files the way llama.cpp does."""
from __future__ import annotations


import numpy as np
import torch

from pagedllm.layers.attention_metadata import AttentionMetadata, set_attention_metadata
from pagedllm.models import cpu_decoder_layers
from pagedllm.models.utils import native_ops

BLOCK_SIZE = 16
VOCAB = 211  # odd on purpose


def tiny_config(arch: str):
    """hidden 128, 2 layers, 4 query heads / 2 KV heads of head_dim 64 (a size the kernels support)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":  # llama3 rope scaling with a short original context, so the scaling shows
        return tf.LlamaConfig(**common, tie_word_embeddings=False, rope_parameters=dict(
            rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64))
    if arch == "mistral":  # window 8: shorter than the prompts, so the window shows
        return tf.MistralConfig(**common, sliding_window=8, tie_word_embeddings=True)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, tie_word_embeddings=False)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=2, n_positions=256,
                             bos_token_id=1, eos_token_id=2)
    raise KeyError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]


def make_hf_model(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """An HF model with every parameter random (biases and norm weights too, so a bias or norm
    weight loaded wrongly shows), in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or ".ln_" in name):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    return model.to(dtype).eval()


class PagedRunner:
    """Our model over a batch of sequences on a paged KV cache: one prefill step for all prompts, then
    decode steps. Sequence i owns a private run of blocks (room for prompt + max_new tokens)."""

    def __init__(self, model, prompt_lens: list[int], max_new: int, native: bool, dtype=torch.float32):
        self.model, self.native = model, native
        cpu_decoder_layers.install(model)  # as the engine's model runner does
        self.lens = list(prompt_lens)
        per_seq = [(n + max_new + BLOCK_SIZE - 1) // BLOCK_SIZE for n in prompt_lens]
        first = [sum(per_seq[:i]) for i in range(len(per_seq))]
        self.tables = [list(range(f, f + n)) for f, n in zip(first, per_seq)]
        width = max(per_seq)
        self.block_tables = torch.tensor([t + [0] * (width - len(t)) for t in self.tables], dtype=torch.int32)
        num_blocks = sum(per_seq) + 1
        for attn in model.attention_layers():
            shape = (num_blocks, attn.num_kv_heads, BLOCK_SIZE, attn.head_size)
            # unused slots poisoned: reading one would put NaN in the logits
            attn.kv_cache = (torch.full(shape, float("nan"), dtype=dtype), torch.full(shape, float("nan"), dtype=dtype))

    def _slot(self, seq: int, pos: int) -> int:
        return self.tables[seq][pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE

    def _run(self, input_ids: list[int], positions: list[int], md: AttentionMetadata) -> torch.Tensor:
        with torch.no_grad(), native_ops(self.native), set_attention_metadata(md):
            hidden = self.model(torch.tensor(input_ids), torch.tensor(positions))
            return self.model.compute_logits(hidden)

    def prefill(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Logits [len_i, vocab] of every prompt position, all prompts in one step."""
        i32 = dict(dtype=torch.int32)
        starts = np.cumsum([0] + self.lens).tolist()
        md = AttentionMetadata(
            slot_mapping=torch.tensor([self._slot(i, p) for i, n in enumerate(self.lens) for p in range(n)]),
            num_prefills=len(prompts), num_prefill_tokens=starts[-1], max_prefill_query_len=max(self.lens),
            prefill_query_start_loc=torch.tensor(starts, **i32), prefill_seq_lens=torch.tensor(self.lens, **i32),
            prefill_block_tables=self.block_tables, num_decodes=0, decode_seq_lens=None, decode_block_tables=None)
        logits = self._run([t for p in prompts for t in p], [p for n in self.lens for p in range(n)], md)
        return [logits[starts[i]:starts[i + 1]] for i in range(len(prompts))]

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """One new token per sequence, at position len_i; returns logits [num_seqs, vocab]."""
        positions = list(self.lens)
        self.lens = [n + 1 for n in self.lens]
        md = AttentionMetadata(
            slot_mapping=torch.tensor([self._slot(i, p) for i, p in enumerate(positions)]),
            num_prefills=0, num_prefill_tokens=0, max_prefill_query_len=0, prefill_query_start_loc=None,
            prefill_seq_lens=None, prefill_block_tables=None, num_decodes=len(tokens),
            decode_seq_lens=torch.tensor(self.lens, dtype=torch.int32), decode_block_tables=self.block_tables)
        return self._run(tokens, positions, md)


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


# --- GGUF files as llama.cpp writes them -------------------------------------------------------------


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (q with n_head, k with n_kv_head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_HF_TO_GGUF_LLAMA = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def gguf_name_llama(hf_name: str) -> str:
    if hf_name in _HF_TO_GGUF_LLAMA:
        return _HF_TO_GGUF_LLAMA[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.N.rest
    return f"blk.{layer}.{_HF_TO_GGUF_LLAMA[rest]}"


def write_llama_gguf(path, hf_model, qtype, tensor_qtypes: dict | None = None) -> None:
    """hf_model (a LlamaForCausalLM) as a llama.cpp GGUF: names, q/k permutation, 2-D weights stored
    as qtype (1-D norms as F32), metadata for transformers' GGUF config reader. tensor_qtypes:
    {gguf name: (qtype, raw uint8 blocks)} stores those tensors as given instead (K-quants)."""
    import gguf

    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    tensor_qtypes = tensor_qtypes or {}
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = t.float().numpy()
        if name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        gname = gguf_name_llama(name)
        if gname in tensor_qtypes:
            q, raw = tensor_qtypes[gname]
            writer.add_tensor(gname, raw, raw_dtype=q)
        elif w.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gname, np.ascontiguousarray(w, dtype=np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gname, w.astype(np.float16))
        else:
            writer.add_tensor(gname, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def hf_state_from_gguf(path, hf_model) -> dict[str, torch.Tensor]:
    """transformers' own GGUF reading (names, permutation, dequantization) of the file."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf_model)["tensors"]


_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def write_gguf(path, hf_model, arch: str) -> None:
    """Any supported HF model as an F32 GGUF of architecture arch ("llama", "qwen2", "qwen3", "gpt2"),
    named through gguf's tensor name map as llama.cpp's converter does: llama q/k rows permuted,
    GPT-2's Conv1D weights stored transposed (nn.Linear layout), tied heads without output.weight."""
    import gguf

    cfg = hf_model.config
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_head_count(cfg.num_attention_heads)
    if arch == "gpt2":
        writer.add_feed_forward_length(4 * cfg.hidden_size)
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
        writer.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])  # gpt2's vocab size comes from here
    else:
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_vocab_size(cfg.vocab_size)
    tied = getattr(cfg, "tie_word_embeddings", False)
    for name, t in hf_model.state_dict().items():
        if (name == "lm_head.weight" and tied) or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        w = t.float().numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        elif arch == "gpt2" and name.endswith(_CONV1D):
            w = w.T
        base, suffix = name.rsplit(".", 1)
        writer.add_tensor(f"{name_map.get_name(base)}.{suffix}", np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
