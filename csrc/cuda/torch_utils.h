// Host-side helpers for the CUDA launchers: torch dtype -> DType, the current stream, guards.
// Only csrc/cuda/*.cpp include this; kernel files (*.cu) see raw pointers and DType.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "cuda/dtype.h"

namespace pagedllm::cuda {

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::ScalarType::Float: return DType::kFloat32;
    case at::ScalarType::Half: return DType::kFloat16;
    case at::ScalarType::BFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "pagedllm CUDA ops support float32, float16 and bfloat16, got ", t);
  }
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Every launcher returns the cudaError_t of its launch; this turns a failure into a Python error.
#define PAGEDLLM_CUDA_CHECK(expr)                                                   \
  do {                                                                              \
    cudaError_t err__ = (expr);                                                     \
    TORCH_CHECK(err__ == cudaSuccess, "CUDA error in ", #expr, ": ",                \
                cudaGetErrorString(err__));                                         \
  } while (0)

}  // namespace pagedllm::cuda
