// dtype plumbing for the torch-free kernels: DType -> C++ type dispatch, float conversions,
// and 16-byte vectors (8 x bf16/fp16, 4 x fp32) for coalesced loads and stores.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/dtype.h"
#include "cuda/launch.cuh"

namespace pagedllm::cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// kN elements of T in 16 bytes, loaded and stored as one uint4.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];

  __device__ __forceinline__ static Vec16 load(const T* p PAGEDLLM_EMU_SITE_PARAMS) {
    PAGEDLLM_EMU_CHECK(p, 16, false);
    Vec16 r;
    *reinterpret_cast<uint4*>(r.v) = *reinterpret_cast<const uint4*>(p);
    return r;
  }
  __device__ __forceinline__ void store(T* p PAGEDLLM_EMU_SITE_PARAMS) const {
    PAGEDLLM_EMU_CHECK(p, 16, true);
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(v);
  }
  __device__ __forceinline__ void to_floats(float* out) const {
#pragma unroll
    for (int i = 0; i < kN; ++i) out[i] = to_float(v[i]);
  }
  __device__ __forceinline__ static Vec16 from_floats(const float* in) {
    Vec16 r;
#pragma unroll
    for (int i = 0; i < kN; ++i) r.v[i] = from_float<T>(in[i]);
    return r;
  }
};

// True when p is 16-byte aligned (vector loads need it; callers fall back to scalars otherwise).
__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

}  // namespace pagedllm::cuda

// Runs the statement list with `scalar_t` bound to the C++ type of a DType (host code in .cu files).
#define PAGEDLLM_CUDA_DISPATCH_DTYPE(DTYPE, ...)                        \
  [&] {                                                                 \
    switch (DTYPE) {                                                    \
      case ::pagedllm::cuda::DType::kFloat32: {                         \
        using scalar_t = float;                                         \
        return __VA_ARGS__();                                           \
      }                                                                 \
      case ::pagedllm::cuda::DType::kFloat16: {                         \
        using scalar_t = __half;                                        \
        return __VA_ARGS__();                                           \
      }                                                                 \
      default: {                                                        \
        using scalar_t = __nv_bfloat16;                                 \
        return __VA_ARGS__();                                           \
      }                                                                 \
    }                                                                   \
  }()
