// Torch-free launcher of the paged prefill attention kernels (csrc/cuda/attention_prefill_kernels.cu).
// Semantics: the paged_prefill_attention schema in csrc/torch_bindings.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/dtype.h"

namespace pagedllm::cuda {

// Causal attention of each sequence's new query tokens over its cached + new KV; causal = false:
// every query sees all seq_len keys of its sequence (encoders; sliding_window must be 0).
// The caller has validated shapes and dtypes; the values of query_start_loc, seq_lens and
// block_tables are trusted (reading them would need a device sync): q_len <= max_query_len,
// q_len <= seq_len, block ids in range. Returns the launch error, or cudaErrorInvalidValue for an
// unsupported head size / block size.
cudaError_t launch_paged_prefill_attention(
    DType dtype,
    void* out,                        // [num_tokens, num_heads, head_size], strides (out_token_stride, out_head_stride, 1)
    const void* query,                // [num_tokens, num_heads, head_size], strides (q_token_stride, q_head_stride, 1)
    const void* key_cache,            // [num_blocks, num_kv_heads, block_size, head_size], contiguous
    const void* value_cache,          // [num_blocks, num_kv_heads, block_size, head_size], contiguous
    const int32_t* block_tables,      // [num_seqs, block_table_stride]
    const int32_t* query_start_loc,   // [num_seqs + 1]
    const int32_t* seq_lens,          // [num_seqs]
    int num_seqs, int num_heads, int num_kv_heads, int head_size, int block_size, int max_query_len,
    int64_t block_table_stride, int64_t q_token_stride, int64_t q_head_stride,
    int64_t out_token_stride, int64_t out_head_stride, float scale, int sliding_window, bool causal,
    cudaStream_t stream);

}  // namespace pagedllm::cuda
