// Torch-free launcher of the rotary embedding kernel (csrc/cuda/pos_encoding_kernels.cu).
// Pointers are device pointers of the DType's element type (positions: int64); strides in elements.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/dtype.h"

namespace pagedllm::cuda {

// In place on query and key: rotates the first rot_dim dims of every head (neox: halves,
// GPT-J: interleaved pairs) by the angles of cos_sin_cache[positions[t]].
cudaError_t launch_rotary_embedding(DType dtype,
                                    const int64_t* positions,    // [num_tokens]
                                    void* query,                 // [num_tokens, num_heads, head_size], strides q_token_stride, q_head_stride, 1
                                    void* key,                   // [num_tokens, num_kv_heads, head_size], strides k_token_stride, k_head_stride, 1; or nullptr
                                    const void* cos_sin_cache,   // [max_position, rot_dim]: cos | sin halves
                                    int64_t num_tokens, int64_t max_position, int64_t rot_dim,
                                    int64_t num_heads, int64_t num_kv_heads, int64_t q_token_stride,
                                    int64_t q_head_stride, int64_t k_token_stride, int64_t k_head_stride,
                                    bool is_neox, cudaStream_t stream);

}  // namespace pagedllm::cuda
