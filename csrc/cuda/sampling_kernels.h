// Torch-free launcher of the sample_tokens CUDA kernel (csrc/cuda/sampling_kernels.cu).
// Semantics: python/pagedllm/layers/sampler.py; Philox convention: csrc/common/philox.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pagedllm::cuda {

// One CTA of 1024 threads per row. Parameter values are not validated here (the host side does
// it where it builds them); out-of-range ones are clamped: top_p to [0, 1], min_p to [0, 1].
cudaError_t launch_sample_tokens(int64_t* out,              // [batch]
                                 const float* logits,       // [batch, vocab], row stride logits_row_stride
                                 const float* temperature,  // [batch]
                                 const int32_t* top_k,      // [batch]
                                 const float* top_p,        // [batch]
                                 const float* min_p,        // [batch]
                                 const int64_t* seeds,      // [batch]
                                 const int64_t* offsets,    // [batch]
                                 int batch, int vocab, int64_t logits_row_stride,
                                 const int32_t* token_bitmask,  // [batch, ceil(vocab / 32)] or nullptr
                                 int64_t mask_row_stride, cudaStream_t stream);

}  // namespace pagedllm::cuda
