// Torch-free launchers of the RMS norm kernels (csrc/cuda/layernorm_kernels.cu).
// Pointers are device pointers of the DType's element type; strides are in elements.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/dtype.h"

namespace pagedllm::cuda {

// out[r] = T(w * T(x[r] * rsqrt(mean(x[r]^2) + eps))), fp32 math.
cudaError_t launch_rms_norm(DType dtype,
                            void* out,           // [rows, hidden], row stride out_stride
                            const void* input,   // [rows, hidden], row stride input_stride
                            const void* weight,  // [hidden]
                            int64_t rows, int64_t hidden, int64_t input_stride, int64_t out_stride,
                            float epsilon, cudaStream_t stream);

// In place: residual[r] = T(input[r] + residual[r]); input[r] = rms_norm(residual[r]) * w.
cudaError_t launch_fused_add_rms_norm(DType dtype,
                                      void* input,         // [rows, hidden], row stride input_stride
                                      void* residual,      // [rows, hidden], row stride residual_stride
                                      const void* weight,  // [hidden]
                                      int64_t rows, int64_t hidden, int64_t input_stride,
                                      int64_t residual_stride, float epsilon, cudaStream_t stream);

}  // namespace pagedllm::cuda
