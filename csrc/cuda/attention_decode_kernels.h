// Torch-free interface of the CUDA paged decode attention (csrc/cuda/attention_decode_kernels.cu).
// The host launcher (csrc/cuda/attention_decode.cpp) checks the tensors, asks for a plan, allocates
// the split-KV workspace the plan needs, and launches.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/dtype.h"

namespace pagedllm::cuda {

struct PagedAttentionParams {
  int num_seqs;
  int num_heads;
  int num_kv_heads;
  int head_size;           // 64, 80, 96, 128 or 256
  int block_size;          // 16 or 32
  int max_blocks_per_seq;  // block_tables.size(1)
  int64_t q_stride_seq, q_stride_head;      // query's strides (last dim contiguous)
  int64_t out_stride_seq, out_stride_head;  // out's strides (last dim contiguous)
  int64_t bt_stride_seq;                    // block_tables' row stride
  float scale;
  int sliding_window;  // <= 0: none
};

// How the context is cut: partition p of a sequence covers keys [p * partition_size,
// (p + 1) * partition_size). num_partitions == 1: one pass writes `out` directly and no workspace
// is needed; otherwise the workspace holds per-partition partial results (see the launcher).
struct PagedAttentionPlan {
  int partition_size;  // in tokens, a multiple of block_size
  int num_partitions;  // per sequence (an upper bound: the grid's z extent)
};

// Chooses the plan for these sizes on the current device (reads the SM count and the kernel's
// occupancy once per device).
cudaError_t plan_paged_attention(DType dtype, const PagedAttentionParams& p, PagedAttentionPlan* plan);

// Decode attention: one query token per sequence (at position seq_len - 1) over its paged KV.
// With plan.num_partitions > 1 the three workspace buffers must hold
//   tmp_out    [num_seqs, num_heads, num_partitions, head_size] float
//   max_logits [num_seqs, num_heads, num_partitions] float
//   exp_sums   [num_seqs, num_heads, num_partitions] float
// (uninitialized is fine); otherwise they may be null.
cudaError_t launch_paged_attention(
    DType dtype,
    void* out,                    // [num_seqs, num_heads, head_size], strides out_stride_*
    const void* query,            // [num_seqs, num_heads, head_size], strides q_stride_*
    const void* key_cache,        // [num_blocks, num_kv_heads, block_size, head_size], contiguous, 16-byte aligned
    const void* value_cache,      // [num_blocks, num_kv_heads, block_size, head_size], contiguous, 16-byte aligned
    const int32_t* block_tables,  // [num_seqs, max_blocks_per_seq], row stride bt_stride_seq
    const int32_t* seq_lens,      // [num_seqs]; 0 = padding row (output zeros)
    float* tmp_out, float* max_logits, float* exp_sums,  // split-KV workspace (see above)
    const PagedAttentionParams& p, const PagedAttentionPlan& plan, cudaStream_t stream);

}  // namespace pagedllm::cuda
