// Torch-free launcher of the KV-cache write kernel (csrc/cuda/cache_kernels.cu).
// Pointers are device pointers of the DType's element type (slot_mapping: int64); strides in elements.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/dtype.h"

namespace pagedllm::cuda {

// key_cache[b, h, o, :] = key[t, h, :] (value likewise) for slot_mapping[t] = b * block_size + o;
// negative slots (padding) and slots >= num_blocks * block_size are skipped.
cudaError_t launch_reshape_and_cache(DType dtype,
                                     const void* key,       // [num_tokens, num_kv_heads, head_size], strides key_token_stride, key_head_stride, 1
                                     const void* value,     // [num_tokens, num_kv_heads, head_size], strides value_token_stride, value_head_stride, 1
                                     void* key_cache,       // [num_blocks, num_kv_heads, block_size, head_size] contiguous
                                     void* value_cache,     // [num_blocks, num_kv_heads, block_size, head_size] contiguous
                                     const int64_t* slot_mapping,  // [num_tokens]
                                     int64_t num_tokens, int64_t num_blocks, int64_t num_kv_heads,
                                     int64_t head_size, int64_t block_size, int64_t key_token_stride,
                                     int64_t key_head_stride, int64_t value_token_stride,
                                     int64_t value_head_stride, cudaStream_t stream);

}  // namespace pagedllm::cuda
