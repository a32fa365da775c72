"""All decoder layers of a Llama-family model in one call of the CPU op decoder_layers
(csrc/cpu/decoder_layers.cpp), for float32, bfloat16 and float16 models on the CPU.

The op chains the same kernels as the modules of models/llama.py, in the same order: its results
are the Python loop's bit for bit, without ~13 Python-dispatched ops a layer (on the default model
a 32-sequence decode step spent ~10 ms of ~55 in them; a bfloat16 batch-1 step ~3 ms of ~12). It
applies when every layer is a LlamaDecoderLayer with SiLU, the weights are of one of those dtypes on
the CPU, the hidden states are in that dtype and the kernels (not the plain-torch references) run;
PAGEDLLM_CPU_FUSED_LAYERS=0 keeps the Python loop. The flattened argument lists are
built once and rebuilt when the packed weights (layers/linear.py) or the KV caches change.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from pagedllm import _ops
from pagedllm.layers import linear as linear_mod
from pagedllm.layers.activation import SiluAndMul
from pagedllm.layers.attention_metadata import AttentionMetadata
from pagedllm.models.utils import use_native_ops

ENV = "PAGEDLLM_CPU_FUSED_LAYERS"
_ABSENT = torch.empty(0)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _packed(linear) -> tuple[torch.Tensor, int]:
    """(packed data, kind): kind -1 without a packed copy, else PackedWeight.kind."""
    p = linear.packed
    return (_ABSENT, -1) if p is None else (p.data, p.kind)


def _linear_tensors(linear) -> tuple[list[torch.Tensor], int]:
    data, kind = _packed(linear)
    bias = linear.bias if linear.bias is not None else _ABSENT
    return [linear.weight, data, bias], kind


class CpuDecoderLayers:
    """The flattened layers of one LlamaModel; call it in place of the layer loop."""

    def __init__(self, model):
        first = model.layers[0]
        attn = first.self_attn
        self.attns = [layer.self_attn.attn for layer in model.layers]
        self.dtype = first.input_layernorm.weight.dtype  # every layer's (_structure_ok)
        self.generation = linear_mod.pack_generation()
        self.caches = [a.kv_cache for a in self.attns]  # held, so that an identity check cannot be fooled by reuse
        rope = attn.rotary_emb
        tensors = [rope.cos_sin_cache]
        ints = [attn.num_heads, attn.num_kv_heads, attn.head_dim, int(rope.is_neox_style),
                linear_mod.PACKED_MIN_ROWS, linear_mod.QUANTIZED_MIN_ROWS, linear_mod.PACKED_MAX_ROWS,
                linear_mod.NATIVE16_MAX_ROWS, linear_mod.BF16_DOT_MAX_ROWS]
        for layer in model.layers:
            a, mlp = layer.self_attn, layer.mlp
            qkv, qkv_kind = _linear_tensors(a.qkv_proj)
            o, o_kind = _linear_tensors(a.o_proj)
            gate_up, gate_up_kind = _linear_tensors(mlp.gate_up_proj)
            down, down_kind = _linear_tensors(mlp.down_proj)
            norms = [a.q_norm.weight, a.k_norm.weight] if a.qk_norm else [_ABSENT, _ABSENT]
            tensors += [layer.input_layernorm.weight, *qkv, *norms, *o, layer.post_attention_layernorm.weight,
                        *gate_up, *down, *a.attn.kv_cache]
            ints += [qkv_kind, o_kind, gate_up_kind, down_kind, a.attn.sliding_window]
        self.tensors, self.ints = tensors, ints
        self.floats = [first.input_layernorm.variance_epsilon, attn.attn.scale]

    def current(self) -> bool:
        """Whether what the flattened lists depend on, and can change after loading, is unchanged: the
        packed copies (a reload repacks) and the KV caches (bound by the model runner)."""
        return (self.generation == linear_mod.pack_generation()
                and all(a.kv_cache is c for a, c in zip(self.attns, self.caches)))

    def __call__(self, positions: torch.Tensor, hidden: torch.Tensor,
                 md: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = _ops.decoder_layers(
            hidden, positions, self.tensors, self.ints, self.floats, md.slot_mapping, md.num_prefill_tokens,
            md.max_prefill_query_len, md.num_decodes, md.prefill_query_start_loc, md.prefill_seq_lens,
            md.prefill_block_tables, md.decode_seq_lens, md.decode_block_tables)
        return hidden, residual


def decode_loop(model, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                seq_lens: torch.Tensor, block_tables: torch.Tensor, sampling, num_steps: int) -> Optional[torch.Tensor]:
    """num_steps decode steps of a LlamaForCausalLM through the decode_loop op (csrc/cpu/decode_loop.cpp: the
    forward, compute_logits and the sample_tokens op of each step, in C++): tokens [num_steps, n]; None where
    the op would not be model's own forward (another forward or head, a sharded vocabulary, not float32 on the
    CPU, the layers op off): the caller then steps in Python. sampling: the first step's SamplingTensors."""
    from pagedllm.models.llama import LlamaForCausalLM, LlamaModel

    inner, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if (not isinstance(model, LlamaForCausalLM) or type(model).forward is not LlamaForCausalLM.forward
            or type(model).compute_logits is not LlamaForCausalLM.compute_logits
            or type(inner).forward is not LlamaModel.forward or inner.cpu_layers is None
            or type(head) is not linear_mod.LMHead or head.shard_rows is not None
            or type(inner.embed_tokens) is not linear_mod.VocabEmbedding or inner.embed_tokens.vocab_start is not None
            or inner.embed_tokens.weight.dtype != torch.float32 or sampling.token_bitmask is not None):
        return None
    embedding = inner.embed_tokens.weight
    layers = inner.cpu_layers(embedding[:1])  # the op applies to float32 hidden states [rows, hidden] here
    if layers is None:
        return None
    data, kind = _packed(head)
    return _ops.decode_loop(input_ids, positions, layers.tensors, layers.ints, layers.floats, slot_mapping, seq_lens,
                            block_tables, embedding, inner.norm.weight, [head.head_weight, data, _ABSENT], kind,
                            sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p, sampling.seeds,
                            sampling.offsets, num_steps)


def supported(model, hidden: torch.Tensor) -> bool:
    """Whether decoder_layers can run model's layers on this input (cheap: checked every step)."""
    if (use_native_ops() or hidden.device.type != "cpu" or hidden.dtype not in DTYPES or hidden.dim() != 2
            or os.environ.get(ENV, "1") == "0"):
        return False
    return getattr(model, "_cpu_layers_ok", None) is not False


def _structure_ok(model) -> bool:
    """Once per model: every layer is the plain Llama decoder layer the op mirrors."""
    from pagedllm.layers.rms_norm import RMSNorm
    from pagedllm.models.llama import LlamaDecoderLayer

    eps = {m.variance_epsilon for m in model.modules() if isinstance(m, RMSNorm)}
    layers = list(model.layers)
    if not layers or len(eps) != 1:
        return False
    first = layers[0].self_attn
    for layer in layers:
        a = layer.self_attn
        if (type(layer) is not LlamaDecoderLayer or not isinstance(layer.mlp.act_fn, SiluAndMul)
                or layer.mlp.act_fn.act is not F.silu or a.rotary_emb is not first.rotary_emb
                or a.attn.kv_cache is None or a.attn.scale != first.attn.scale
                or (a.num_heads, a.num_kv_heads, a.head_dim) != (first.num_heads, first.num_kv_heads, first.head_dim)):
            return False
    weights = [p for p in model.layers.parameters()] + [first.rotary_emb.cos_sin_cache]
    dtype = weights[0].dtype
    if dtype != torch.float32:  # a 16-bit model's packed weights are its own 16-bit panels (layers/linear.py)
        linears = [m for layer in layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                    layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        kinds = (*linear_mod.WIDE16_QTYPES, linear_mod.BF16_DOT_KIND)
        if any(m.packed is not None and m.packed.qtype not in kinds for m in linears):
            return False
    return dtype in DTYPES and all(t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for t in weights)


def for_model(model) -> Optional[CpuDecoderLayers]:
    """The model's CpuDecoderLayers, built (or rebuilt after a repack or a new KV cache) on demand;
    None when its layers are not of the supported form."""
    cached = getattr(model, "_cpu_layers", None)
    if cached is not None and cached.current():
        return cached
    if not _structure_ok(model):
        if all(layer.self_attn.attn.kv_cache is not None for layer in model.layers):
            model._cpu_layers_ok = False  # final: the structure does not change
        return None
    model._cpu_layers = CpuDecoderLayers(model)
    return model._cpu_layers


class _Installed:
    """What a LlamaModel calls in place of its layer loop (LlamaModel.cpu_layers): the model's
    CpuDecoderLayers when the op applies to this input, else None."""

    def __init__(self, model):
        self._model = [model]  # a list: not registered as a submodule (no cycle in modules())

    def __call__(self, hidden: torch.Tensor) -> Optional[CpuDecoderLayers]:
        model = self._model[0]
        layers = for_model(model) if supported(model, hidden) else None
        return layers if layers is not None and layers.dtype == hidden.dtype else None


def install(model: torch.nn.Module) -> None:
    """The model runner's call: every Llama-family decoder stack of model gets the op (used where it
    applies: float32, bfloat16 or float16 on the CPU, the kernels on, PAGEDLLM_CPU_FUSED_LAYERS not 0)."""
    from pagedllm.models.llama import LlamaModel

    for module in model.modules():
        if isinstance(module, LlamaModel):
            module.cpu_layers = _Installed(module)


def release(model: torch.nn.Module) -> None:
    """Forgets every CpuDecoderLayers in model (they hold the KV cache): called when the cache is released."""
    for module in model.modules():
        if getattr(module, "_cpu_layers", None) is not None:
            module._cpu_layers = None
