"""The only importer of pagedllm._C: one typed wrapper per op. Wrappers allocate outputs;
the ops write into what they are given (see csrc/torch_bindings.cpp for every shape)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional

import torch

from pagedllm import _C  # noqa: F401 - loading the library registers torch.ops._C.*

ops = torch.ops._C
# Where the kernel ops (norms, rotary, cache, attention, sampling) run: _C, or the CUDA emulator
# library _C_emu (csrc/cuda/emu: the CUDA kernels and launchers on CPU fibers, CPU tensors in and
# out) after use_kernel_backend("cuda_emu"). The other ops always come from _C.
kernels = ops
KERNEL_BACKENDS = ("native", "cuda_emu")
# PAGEDLLM_CUDA_EMU_LIBRARY: another build of it (scripts/emu_mutations.sh tests seeded bugs so).
_EMU_LIBRARY = Path(os.environ.get("PAGEDLLM_CUDA_EMU_LIBRARY") or Path(__file__).with_name("_C_emu.so"))


def cuda_emu_available() -> bool:
    """True when the CUDA emulator library was built (it needs the CUDA headers at build time)."""
    return _EMU_LIBRARY.exists()


def _load_cuda_emu():
    if not hasattr(torch.ops, "_C_emu") or not hasattr(torch.ops._C_emu, "configure"):
        if not cuda_emu_available():
            raise RuntimeError(f"the CUDA emulator library {_EMU_LIBRARY} was not built "
                               "(setup.py builds it where the CUDA headers exist)")
        torch.ops.load_library(str(_EMU_LIBRARY))
    return torch.ops._C_emu


def set_kernel_backend(name: str, *, reverse_schedule: bool = False, sm_count: int = 132, device: int = 0,
                       count: bool = False) -> None:
    """"native": the kernel ops of _C for the tensors' device. "cuda_emu": the CUDA kernels, run by
    the emulator on CPU tensors, with the fiber schedule reversed or not, an emulated SM count and
    device id (the launchers cache per-device facts: give each SM count its own id), and the
    memory counters of cuda_emu_stats() collected or not."""
    global kernels
    if name not in KERNEL_BACKENDS:
        raise ValueError(f"kernel backend must be one of {KERNEL_BACKENDS}, got {name!r}")
    if name == "native":
        kernels = ops
        return
    global _emu_config
    emu = _load_cuda_emu()
    _emu_config = (sm_count, device, reverse_schedule, count)
    emu.configure(*_emu_config)
    kernels = emu


_EMU_DEFAULT_CONFIG = (132, 0, False, False)   # set_kernel_backend's defaults
_emu_config = _EMU_DEFAULT_CONFIG               # what the emulator library was last configured with


def kernel_backend() -> str:
    """The backend the kernel ops run on now: "native" or "cuda_emu"."""
    return "native" if kernels is ops else "cuda_emu"


@contextlib.contextmanager
def use_kernel_backend(name: str, **options) -> Iterator[None]:
    """set_kernel_backend for a with-block; the previous backend comes back after it."""
    global kernels, _emu_config
    previous, previous_config = kernels, _emu_config
    set_kernel_backend(name, **options)
    try:
        yield
    finally:
        kernels = previous
        if _emu_config != previous_config:  # the emulator's schedule / SM count / counters come back too
            _emu_config = previous_config
            _load_cuda_emu().configure(*previous_config)


CUDA_EMU_STATS = ("blocks", "barriers", "collectives", "cp_requests", "cp_sectors", "cp_ideal_sectors",
                  "ldsm_phases", "ldsm_wavefronts", "vec_requests", "vec_sectors", "vec_ideal_sectors",
                  "smem_requests", "smem_wavefronts", "smem_ideal_wavefronts")


def cuda_emu_stats(reset: bool = False) -> dict[str, int]:
    """The emulator's counters since the last reset: blocks run, barriers, warp collectives,
    cp.async warp requests with the 32-byte sectors they touch and the fewest their bytes could
    take, ldmatrix 8-row phases and their shared-memory wavefronts, 16-byte global load / store
    warp requests with their sectors and ideal, 16-byte shared-memory load / store warp requests
    with their wavefronts and ideal (the memory counters only while the backend was set with
    count=True)."""
    emu = _load_cuda_emu()
    values = dict(zip(CUDA_EMU_STATS, emu.stats()))
    if reset:
        emu.reset_stats()
    return values


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    kernels.rms_norm(out, x, weight, eps)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: residual += x; x = rms_norm(residual) * weight."""
    kernels.fused_add_rms_norm(x, residual, weight, eps)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: Optional[torch.Tensor],
                     head_size: int, cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    """In place on query and key."""
    kernels.rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    kernels.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                    sliding_window: int = 0, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decode attention: query [num_seqs, num_heads, head_size] -> same shape."""
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    kernels.paged_attention(out, query, key_cache, value_cache, block_tables, seq_lens, scale, sliding_window)
    return out


def paged_prefill_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, max_query_len: int, scale: float,
                            sliding_window: int = 0, out: Optional[torch.Tensor] = None,
                            causal: bool = True) -> torch.Tensor:
    """Causal varlen attention of new query tokens over cached + new KV (causal=False: each query sees
    all of its sequence's keys, for encoders)."""
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    kernels.paged_prefill_attention(out, query, key_cache, value_cache, block_tables, query_start_loc,
                                    seq_lens, max_query_len, scale, sliding_window, causal)
    return out


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, min_p: torch.Tensor, seeds: torch.Tensor,
                  offsets: torch.Tensor, token_bitmask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One token id per row of logits [batch, vocab] (float32). token_bitmask: int32
    [batch, ceil(vocab / 32)], bit set = allowed (structured outputs); None: every token allowed."""
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    kernels.sample_tokens(out, logits, temperature, top_k, top_p, min_p, seeds, offsets, token_bitmask)
    return out


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """CPU, float32: weight [N, K] -> the panel layout packed_linear reads ([ceil(N / 32), K, 32])."""
    return ops.pack_linear_weight(weight)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor],
                  out_features: int) -> torch.Tensor:
    """CPU, float32: x [..., K] @ W^T (+ bias) -> [..., out_features], W packed by pack_linear_weight."""
    return ops.packed_linear(x, packed, bias, out_features)


def pack_wide16_linear_weight(weight: torch.Tensor, qtype: int) -> torch.Tensor:
    """CPU, float32 weight [N, K] whose every value is exactly a bfloat16 (qtype 30) or float16 (qtype 1)
    -> those 16-bit values in the panel layout ([ceil(N / 32), K, 32]); empty when one is not."""
    return ops.pack_wide16_linear_weight(weight, qtype)


def wide16_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor],
                  out_features: int) -> torch.Tensor:
    """CPU, float32: x [..., K] @ W^T (+ bias) over the 16-bit panels of pack_wide16_linear_weight,
    widened to fp32 in registers; bit-identical to packed_linear on the fp32 weight."""
    return ops.wide16_linear(x, packed, bias, out_features)


def pack_bf16_dot_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """CPU, bfloat16 weight [N, K] -> the input-pair panels bf16_dot_linear reads ([ceil(N / 32), K / 2, 64]);
    empty for an odd K or on a CPU without AVX512_BF16."""
    return ops.pack_bf16_dot_linear_weight(weight)


def bf16_dot_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor],
                    out_features: int) -> torch.Tensor:
    """CPU, bfloat16: x [..., K] @ W^T (+ bias) through AVX512_BF16 dot products (bf16 products, fp32 sums,
    the result rounded to bfloat16), W packed by pack_bf16_dot_linear_weight."""
    return ops.bf16_dot_linear(x, packed, bias, out_features)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """CPU, float32: x [rows, 2 d] = [gate | up] -> silu(gate) * up, [rows, d]."""
    out = torch.empty((x.shape[0], x.shape[1] // 2), dtype=x.dtype, device=x.device)
    ops.silu_and_mul(out, x)
    return out


def encoder_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seq_len: int, scale: float) -> torch.Tensor:
    """CPU, float32: bidirectional attention within each sequence of a flat batch. query [n, heads, d],
    key / value [n, kv_heads, d] (strided views of a fused QKV output are fine), cu_seqlens int32
    [num_seqs + 1] -> [n, heads, d]."""
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    ops.encoder_attention(out, query, key, value, cu_seqlens, max_seq_len, scale)
    return out


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   x_bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """CPU, float32, in place: x = LayerNorm(x + x_bias + residual) * weight + bias; returns x."""
    ops.add_layer_norm(x, residual, weight, bias, x_bias, eps)
    return x


def bias_gelu(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """CPU, float32, in place: x = gelu(x + bias) (erf form, F.gelu's default); returns x."""
    ops.bias_gelu(x, bias)
    return x


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


def decode_loop(input_ids: torch.Tensor, positions: torch.Tensor, tensors: list[torch.Tensor], ints: list[int],
                floats: list[float], slot_mapping: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                embedding: torch.Tensor, norm_weight: torch.Tensor, head: list[torch.Tensor], head_kind: int,
                temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                seeds: torch.Tensor, offsets: torch.Tensor, num_steps: int) -> torch.Tensor:
    """CPU, float32: num_steps decode steps of a Llama-family model in one call (argument layout:
    csrc/cpu/decode_loop.cpp; built by models/cpu_decoder_layers.py) -> tokens [num_steps, num_seqs] int64."""
    return ops.decode_loop(input_ids, positions, tensors, ints, floats, slot_mapping, seq_lens, block_tables,
                           embedding, norm_weight, head, head_kind, temperature, top_k, top_p, min_p, seeds, offsets,
                           num_steps)


def pack_quantized_linear_weight(weight: torch.Tensor, qtype: int) -> torch.Tensor:
    """CPU, float32 weight [N, K] whose every run of 32 inputs is exactly dequantized GGUF blocks of
    type qtype (a GGML type id: Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8, Q4_K 12, Q6_K 14) -> its codes, uint8
    [ceil(N / 32), K / 32, block bytes]; an empty tensor when the weight is not exactly of that form."""
    return ops.pack_quantized_linear_weight(weight, qtype)


def quantized_linear(x: torch.Tensor, packed: torch.Tensor, qtype: int, bias: Optional[torch.Tensor],
                     out_features: int) -> torch.Tensor:
    """CPU, float32: x [..., K] @ W^T (+ bias) over the codes of pack_quantized_linear_weight;
    bit-identical to packed_linear on the fp32 weight."""
    return ops.quantized_linear(x, packed, qtype, bias, out_features)


def pack_int8_linear_weight(codes: torch.Tensor, qtype: int, out_features: int) -> torch.Tensor:
    """The codes of pack_quantized_linear_weight (weight [out_features, K], type qtype) rearranged for the
    int8 mode's integer dot products: uint8 [ceil(out_features / 8), K / 32, block bytes]."""
    return ops.pack_int8_linear_weight(codes, qtype, out_features)


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPU, float32 x [..., K] (K a multiple of 32) quantized as int8_linear does: per block of 32 inputs
    d = max|x| / 127, q = round_half_even(x * (1 / d)). Returns (q int8 [M, K], d [M, K / 32],
    int8 sums of inputs 0-15 and 16-31 of each block, int32 [M, K / 32, 2])."""
    q, d, sums = ops.quantize_rows_int8(x)
    return q, d, sums


def int8_linear(x: torch.Tensor, packed: torch.Tensor, qtype: int, bias: Optional[torch.Tensor],
                out_features: int) -> torch.Tensor:
    """CPU, float32 x [..., K] -> [..., out_features]: x quantized per block to int8, integer dot products
    with the codes of pack_int8_linear_weight (the opt-in quantization="gguf_int8" mode)."""
    return ops.int8_linear(x, packed, qtype, bias, out_features)
