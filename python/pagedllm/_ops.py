"""The only importer of pagedllm._C: one typed wrapper per op. Wrappers allocate outputs;
the ops write into what they are given (see csrc/torch_bindings.cpp for every shape)."""
from __future__ import annotations

from typing import Optional

import torch

from pagedllm import _C  # noqa: F401 - loading the library registers torch.ops._C.*

ops = torch.ops._C


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    ops.rms_norm(out, x, weight, eps)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: residual += x; x = rms_norm(residual) * weight."""
    ops.fused_add_rms_norm(x, residual, weight, eps)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: Optional[torch.Tensor],
                     head_size: int, cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    """In place on query and key."""
    ops.rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                    sliding_window: int = 0, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decode attention: query [num_seqs, num_heads, head_size] -> same shape."""
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    ops.paged_attention(out, query, key_cache, value_cache, block_tables, seq_lens, scale, sliding_window)
    return out


def paged_prefill_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, max_query_len: int, scale: float,
                            sliding_window: int = 0, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal varlen attention of new query tokens over cached + new KV."""
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    ops.paged_prefill_attention(out, query, key_cache, value_cache, block_tables, query_start_loc,
                                seq_lens, max_query_len, scale, sliding_window)
    return out


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, min_p: torch.Tensor, seeds: torch.Tensor,
                  offsets: torch.Tensor, token_bitmask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One token id per row of logits [batch, vocab] (float32). token_bitmask: int32
    [batch, ceil(vocab / 32)], bit set = allowed (structured outputs); None: every token allowed."""
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    ops.sample_tokens(out, logits, temperature, top_k, top_p, min_p, seeds, offsets, token_bitmask)
    return out


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """CPU, float32: weight [N, K] -> the panel layout packed_linear reads ([ceil(N / 32), K, 32])."""
    return ops.pack_linear_weight(weight)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor],
                  out_features: int) -> torch.Tensor:
    """CPU, float32: x [..., K] @ W^T (+ bias) -> [..., out_features], W packed by pack_linear_weight."""
    return ops.packed_linear(x, packed, bias, out_features)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """CPU, float32: x [rows, 2 d] = [gate | up] -> silu(gate) * up, [rows, d]."""
    out = torch.empty((x.shape[0], x.shape[1] // 2), dtype=x.dtype, device=x.device)
    ops.silu_and_mul(out, x)
    return out


def decoder_layers(hidden: torch.Tensor, positions: torch.Tensor, tensors: list[torch.Tensor], ints: list[int],
                   floats: list[float], slot_mapping: torch.Tensor, num_prefill_tokens: int,
                   max_prefill_query_len: int, num_decodes: int, prefill_query_start_loc: Optional[torch.Tensor],
                   prefill_seq_lens: Optional[torch.Tensor], prefill_block_tables: Optional[torch.Tensor],
                   decode_seq_lens: Optional[torch.Tensor],
                   decode_block_tables: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU, float32: every Llama-family decoder layer of one step (argument layout:
    csrc/cpu/decoder_layers.cpp; built by models/cpu_decoder_layers.py) -> (hidden, residual)."""
    hidden, residual = ops.decoder_layers(hidden, positions, tensors, ints, floats, slot_mapping, num_prefill_tokens,
                                          max_prefill_query_len, num_decodes, prefill_query_start_loc,
                                          prefill_seq_lens, prefill_block_tables, decode_seq_lens,
                                          decode_block_tables)
    return hidden, residual


def pack_quantized_linear_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """CPU, float32 weight [N, K] whose every run of 32 inputs is exactly d * q + m (bits 4: GGUF Q4_1)
    or d * q (bits 8: Q8_0), d and m fp16 -> its codes, uint8 [ceil(N / 32), K / 32, block bytes];
    an empty tensor when the weight is not exactly of that form."""
    return ops.pack_quantized_linear_weight(weight, bits)


def quantized_linear(x: torch.Tensor, packed: torch.Tensor, bits: int, bias: Optional[torch.Tensor],
                     out_features: int) -> torch.Tensor:
    """CPU, float32: x [..., K] @ W^T (+ bias) over the codes of pack_quantized_linear_weight;
    bit-identical to packed_linear on the fp32 weight."""
    return ops.quantized_linear(x, packed, bits, bias, out_features)
