// TORCH_LIBRARY(_C): one schema per op (`Tensor!` = written in place) and the CPU
// implementations. The CUDA implementations are registered in csrc/cuda/cuda_bindings.cpp.
//
// KV cache layout (see DESIGN.md): key_cache and value_cache are each
//   [num_blocks, num_kv_heads, block_size, head_size]
// and a slot is block_id * block_size + offset_in_block.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(_C, m) {
  // out, input: [..., hidden] (input rows may be strided, last dim contiguous); weight: [hidden].
  m.def("rms_norm(Tensor! out, Tensor input, Tensor weight, float epsilon) -> ()");
  // residual += input; input = rms_norm(residual) * weight. input, residual: [num_tokens, hidden].
  m.def("fused_add_rms_norm(Tensor! input, Tensor! residual, Tensor weight, float epsilon) -> ()");
  // positions: [num_tokens] int64; query: [num_tokens, num_heads * head_size] or
  // [num_tokens, num_heads, head_size]; key likewise with num_kv_heads (may be None);
  // cos_sin_cache: [max_position, rot_dim] (cos | sin halves), query's dtype; rot_dim <= head_size.
  m.def(
      "rotary_embedding(Tensor positions, Tensor! query, Tensor!? key, int head_size, "
      "Tensor cos_sin_cache, bool is_neox) -> ()");
  // key, value: [num_tokens, num_kv_heads, head_size]; slot_mapping: [num_tokens] int64,
  // a negative slot is padding and skipped.
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor! key_cache, Tensor! value_cache, "
      "Tensor slot_mapping) -> ()");
  // Decode: one query token per sequence. out, query: [num_seqs, num_heads, head_size];
  // block_tables: [num_seqs, max_blocks] int32; seq_lens: [num_seqs] int32 (0 = padding row,
  // output zeros); sliding_window <= 0: none, else key k is seen by query q iff q - k < window.
  m.def(
      "paged_attention(Tensor! out, Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_tables, Tensor seq_lens, float scale, int sliding_window) -> ()");
  // Prefill / chunked prefill / prefix-cache hits: causal attention of each sequence's new
  // query tokens over its whole KV (cached + new, all already in the cache).
  // out, query: [total_query_tokens, num_heads, head_size]; query_start_loc: [num_seqs + 1]
  // int32; seq_lens: [num_seqs] int32 (context + new). Query i of sequence s sits at position
  // seq_lens[s] - q_len_s + i. max_query_len sizes the CUDA grid without a device sync.
  // causal=False (encoders, sliding_window 0): every query sees all seq_lens[s] keys of its sequence.
  m.def(
      "paged_prefill_attention(Tensor! out, Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_tables, Tensor query_start_loc, Tensor seq_lens, int max_query_len, "
      "float scale, int sliding_window, bool causal=True) -> ()");
  // out: [batch] int64; logits: [batch, vocab] float32 (not modified); temperature, top_p,
  // min_p: [batch] float32 (temperature < 1e-5: greedy argmax); top_k: [batch] int32 (<= 0: off);
  // seeds, offsets: [batch] int64. A row's random draw is Philox(seed, offset): it depends on
  // nothing else in the batch. token_bitmask (optional): [batch, ceil(vocab / 32)] int32, bit
  // (t & 31) of word t >> 5 set = token t allowed; a cleared bit makes the token's logit -inf.
  m.def(
      "sample_tokens(Tensor! out, Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, "
      "Tensor min_p, Tensor seeds, Tensor offsets, Tensor? token_bitmask=None) -> ()");
}

TORCH_LIBRARY_IMPL(_C, CPU, m) {
  m.impl("rms_norm", &pagedllm::cpu::rms_norm);
  m.impl("fused_add_rms_norm", &pagedllm::cpu::fused_add_rms_norm);
  m.impl("rotary_embedding", &pagedllm::cpu::rotary_embedding);
  m.impl("reshape_and_cache", &pagedllm::cpu::reshape_and_cache);
  m.impl("paged_attention", &pagedllm::cpu::paged_attention);
  m.impl("paged_prefill_attention", &pagedllm::cpu::paged_prefill_attention);
  m.impl("sample_tokens", &pagedllm::cpu::sample_tokens);
}
