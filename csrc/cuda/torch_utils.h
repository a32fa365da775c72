// Host-side helpers for the CUDA launchers: torch dtype -> DType, the current stream, guards.
// Only csrc/cuda/*.cpp include this; kernel files (*.cu) see raw pointers and DType.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#ifdef PAGEDLLM_CUDA_EMU
#include <cuda_runtime_api.h>  // implemented for the emulated device by csrc/cuda/emu/emu_cudart.cpp
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

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

#ifdef PAGEDLLM_CUDA_EMU
// The emulated device (csrc/cuda/emu) computes in host memory: its "CUDA tensors" are CPU tensors,
// it has one stream and nothing to guard.
inline bool on_cuda_device(const at::Tensor& t) { return t.is_cpu(); }
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};
inline cudaStream_t current_stream() { return nullptr; }
#else
inline bool on_cuda_device(const at::Tensor& t) { return t.is_cuda(); }
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#endif

// Every launcher returns the cudaError_t of its launch; this turns a failure into a Python error.
#define PAGEDLLM_CUDA_CHECK(expr)                                                   \
  do {                                                                              \
    cudaError_t err__ = (expr);                                                     \
    TORCH_CHECK(err__ == cudaSuccess, "CUDA error in ", #expr, ": ",                \
                cudaGetErrorString(err__));                                         \
  } while (0)

}  // namespace pagedllm::cuda
