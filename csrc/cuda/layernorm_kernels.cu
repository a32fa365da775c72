// RMS norm and fused residual-add + RMS norm, CUDA kernels (torch-free; see layernorm_kernels.h).
//
// Math and rounding order as HF LlamaRMSNorm (python/pagedllm/layers/rms_norm.py):
//   inv = rsqrt(sum(x^2) / hidden + eps)   (fp32)
//   out = T(float(w) * float(T(float(x) * inv)))
// Fused: r = T(float(x) + float(residual)) is stored as the new residual and normalized.
//
// One thread block per row. Two paths:
//  * vector path (hidden % (16 / sizeof(T)) == 0, 16-byte aligned pointers and row strides, row
//    fits in registers): each thread owns kVecs 16-byte vectors of the row (vector v lives in
//    thread v % blockDim.x, slot v / blockDim.x, so every load instruction of a warp is 512
//    contiguous bytes). All loads of a thread are issued before any use, the row stays in
//    registers across the block reduction, and is written once: each byte of input (and residual)
//    is read once and written once, the floor for a bandwidth-bound op.
//  * generic path (any hidden, e.g. 769, unaligned views, or rows too long for registers): scalar
//    strided loops; the second pass re-reads the row (an L2 hit for rows this size).
#include "cuda/layernorm_kernels.h"
#include "cuda/launch.cuh"

#include <type_traits>

#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"

namespace pagedllm::cuda {
namespace {

// The vector path's widest block. 512 threads x kVecs <= 8 vectors covers hidden <= 32768 (bf16)
// or 16384 (fp32); __launch_bounds__(512) leaves up to 128 registers per thread for the row.
constexpr int kMaxVecThreads = 512;
constexpr int kMaxVecsPerThread = 8;
// The block size the vector path aims for: 256 threads let 8 blocks (2048 threads) share an SM,
// so each SM keeps >= 64 KiB of loads in flight at hidden 4096 bf16 (2 vectors per thread).
constexpr int kTargetThreads = 256;
// ...which needs <= 32 registers per thread: rows of <= 2 vectors per thread ask ptxas for 4 CTAs of
// the widest block (4 x 512 threads); longer rows keep their registers (they hold the row).
template <int kVecs>
constexpr int vec_min_blocks() { return kVecs <= 2 ? 4 : 0; }  // 0: no minimum (ptxas chooses)

template <typename T>
__device__ __forceinline__ T norm_times_weight(float x, float inv, T w) {
  // HF order: round the normalized value to T, then multiply by the weight and round again.
  return from_float<T>(to_float(w) * to_float(from_float<T>(x * inv)));
}

// ptxas sm_90, registers for kVecs 1/2/4/8 (bf16; fp16; fp32): 25/31/50/84; 27/28/32/54; 19/26/32/56.
// No spills, 128 B smem (block_sum scratch).
// Claims checked against the sm_90 cubin by tests/kernels/test_sass.py (format: tests/kernels/cubin_inspect.py):
// occupancy(sm_90) if kVecs <= 2: >= 8 CTAs/SM of 256 threads with 0 B dynamic smem
// occupancy(sm_90) if kVecs == 4: >= 4 CTAs/SM of 256 threads with 0 B dynamic smem
// occupancy(sm_90) if kVecs == 8: >= 2 CTAs/SM of 256 threads with 0 B dynamic smem
// sass(sm_90) if all: LDG.E.128 STG.E.128
template <typename T, int kVecs>
__global__ void __launch_bounds__(kMaxVecThreads, vec_min_blocks<kVecs>())
    rms_norm_vec_kernel(T* __restrict__ out,           // [rows, hidden], row stride out_stride
                        const T* __restrict__ input,   // [rows, hidden], row stride input_stride
                        const T* __restrict__ weight,  // [hidden]
                        int64_t input_stride, int64_t out_stride, int hidden, float eps) {
  using V = Vec16<T>;
  constexpr int kN = V::kN;
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int nvec = hidden / kN;
  const T* x = input + row * input_stride;

  V vals[kVecs];
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int v = threadIdx.x + j * blockDim.x;
    if (v < nvec) vals[j] = V::load(x + v * kN);
  }
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int v = threadIdx.x + j * blockDim.x;
    if (v < nvec) {
#pragma unroll
      for (int e = 0; e < kN; ++e) {
        const float f = to_float(vals[j].v[e]);
        ss += f * f;
      }
    }
  }
  ss = block_sum(ss, scratch);
  const float inv = rsqrtf(ss / static_cast<float>(hidden) + eps);

  T* o = out + row * out_stride;
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int v = threadIdx.x + j * blockDim.x;
    if (v < nvec) {
      const V w = V::load(weight + v * kN);
      V r;
#pragma unroll
      for (int e = 0; e < kN; ++e) r.v[e] = norm_times_weight(to_float(vals[j].v[e]), inv, w.v[e]);
      r.store(o + v * kN);
    }
  }
}

// ptxas sm_90, registers for kVecs 1/2/4/8 (bf16; fp16; fp32): 26/32/54/102; 27/32/52/100; 25/32/54/86
// (kVecs 2 was 35 / 34 registers, 6 CTAs of 256 threads, before vec_min_blocks capped it at 32).
// No spills, 128 B smem.
// Claims checked against the sm_90 cubin by tests/kernels/test_sass.py (format: tests/kernels/cubin_inspect.py):
// occupancy(sm_90) if kVecs <= 2: >= 8 CTAs/SM of 256 threads with 0 B dynamic smem
// occupancy(sm_90) if kVecs == 4: >= 4 CTAs/SM of 256 threads with 0 B dynamic smem
// occupancy(sm_90) if kVecs == 8: >= 2 CTAs/SM of 256 threads with 0 B dynamic smem
// sass(sm_90) if all: LDG.E.128 STG.E.128
template <typename T, int kVecs>
__global__ void __launch_bounds__(kMaxVecThreads, vec_min_blocks<kVecs>())
    fused_add_rms_norm_vec_kernel(T* __restrict__ input,         // [rows, hidden], row stride input_stride
                                  T* __restrict__ residual,      // [rows, hidden], row stride residual_stride
                                  const T* __restrict__ weight,  // [hidden]
                                  int64_t input_stride, int64_t residual_stride, int hidden, float eps) {
  using V = Vec16<T>;
  constexpr int kN = V::kN;
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int nvec = hidden / kN;
  T* x = input + row * input_stride;
  T* res = residual + row * residual_stride;

  V xs[kVecs], sums[kVecs];  // sums: residual on load, then the rounded x + residual
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int v = threadIdx.x + j * blockDim.x;
    if (v < nvec) {
      xs[j] = V::load(x + v * kN);
      sums[j] = V::load(res + v * kN);
    }
  }
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int v = threadIdx.x + j * blockDim.x;
    if (v < nvec) {
#pragma unroll
      for (int e = 0; e < kN; ++e) {
        const T s = from_float<T>(to_float(xs[j].v[e]) + to_float(sums[j].v[e]));
        sums[j].v[e] = s;
        const float f = to_float(s);
        ss += f * f;
      }
      sums[j].store(res + v * kN);
    }
  }
  ss = block_sum(ss, scratch);
  const float inv = rsqrtf(ss / static_cast<float>(hidden) + eps);

#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int v = threadIdx.x + j * blockDim.x;
    if (v < nvec) {
      const V w = V::load(weight + v * kN);
      V r;
#pragma unroll
      for (int e = 0; e < kN; ++e) r.v[e] = norm_times_weight(to_float(sums[j].v[e]), inv, w.v[e]);
      r.store(x + v * kN);
    }
  }
}

// ptxas sm_90: 22 / 20 / 21 registers (bf16 / fp16 / fp32), no spills, 128 B smem.
// Generic path. out may equal input: every element is read and written by the same thread, read first.
// Claims checked against the sm_90 cubin by tests/kernels/test_sass.py (format: tests/kernels/cubin_inspect.py):
// occupancy(sm_90) if all: >= 2 CTAs/SM of 1024 threads with 0 B dynamic smem
template <typename T>
__global__ void __launch_bounds__(1024)
    rms_norm_generic_kernel(T* out,           // [rows, hidden], row stride out_stride
                            const T* input,   // [rows, hidden], row stride input_stride
                            const T* weight,  // [hidden]
                            int64_t input_stride, int64_t out_stride, int hidden, float eps) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* x = input + row * input_stride;
  float ss = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float f = to_float(x[i]);
    ss += f * f;
  }
  ss = block_sum(ss, scratch);
  const float inv = rsqrtf(ss / static_cast<float>(hidden) + eps);
  T* o = out + row * out_stride;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = norm_times_weight(to_float(x[i]), inv, weight[i]);
}

// ptxas sm_90: 22 / 20 / 21 registers (bf16 / fp16 / fp32), no spills, 128 B smem.
// Generic fused path: pass 1 writes the rounded sum into residual, pass 2 reads it back (the same
// thread wrote that element, so program order makes it visible) and writes the normed row to input.
// Claims checked against the sm_90 cubin by tests/kernels/test_sass.py (format: tests/kernels/cubin_inspect.py):
// occupancy(sm_90) if all: >= 2 CTAs/SM of 1024 threads with 0 B dynamic smem
template <typename T>
__global__ void __launch_bounds__(1024)
    fused_add_rms_norm_generic_kernel(T* input,         // [rows, hidden], row stride input_stride
                                      T* residual,      // [rows, hidden], row stride residual_stride
                                      const T* weight,  // [hidden]
                                      int64_t input_stride, int64_t residual_stride, int hidden, float eps) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  T* x = input + row * input_stride;
  T* res = residual + row * residual_stride;
  float ss = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const T s = from_float<T>(to_float(x[i]) + to_float(res[i]));
    res[i] = s;
    const float f = to_float(s);
    ss += f * f;
  }
  ss = block_sum(ss, scratch);
  const float inv = rsqrtf(ss / static_cast<float>(hidden) + eps);
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) x[i] = norm_times_weight(to_float(res[i]), inv, weight[i]);
}

inline int round_up32(int64_t n) { return static_cast<int>((n + 31) / 32 * 32); }

// Vector-path launch shape for a row of nvec 16-byte vectors: threads (a multiple of 32, as
// block_sum needs) and vectors per thread (a power of two, a template parameter). Aim at
// kTargetThreads threads; give each thread more vectors (up to 8) before growing the block.
// Returns false when the row does not fit in 512 x 8 vectors.
inline bool vec_launch_shape(int64_t nvec, int* threads, int* vecs) {
  if (nvec > static_cast<int64_t>(kMaxVecThreads) * kMaxVecsPerThread) return false;
  int k = 1;
  while (k < kMaxVecsPerThread && nvec > static_cast<int64_t>(kTargetThreads) * k) k *= 2;
  *vecs = k;
  *threads = round_up32((nvec + k - 1) / k);  // <= 512 by the first check
  return true;
}

// Generic path: one thread per element up to 1024 (a multiple of 32 for block_sum).
inline int generic_threads(int64_t hidden) { return hidden >= 1024 ? 1024 : round_up32(hidden); }

template <typename Launch>
cudaError_t dispatch_vecs(int vecs, Launch&& launch) {
  switch (vecs) {
    case 1: launch(std::integral_constant<int, 1>{}); break;
    case 2: launch(std::integral_constant<int, 2>{}); break;
    case 4: launch(std::integral_constant<int, 4>{}); break;
    default: launch(std::integral_constant<int, 8>{}); break;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t rms_norm_typed(T* out, const T* input, const T* weight, int64_t rows, int64_t hidden,
                           int64_t input_stride, int64_t out_stride, float eps, cudaStream_t stream) {
  constexpr int kN = Vec16<T>::kN;
  const bool vec_ok = hidden % kN == 0 && input_stride % kN == 0 && out_stride % kN == 0 && aligned16(out) &&
                      aligned16(input) && aligned16(weight);
  int threads = 0, vecs = 0;
  if (vec_ok && vec_launch_shape(hidden / kN, &threads, &vecs)) {
    return dispatch_vecs(vecs, [&](auto k) {
      PAGEDLLM_LAUNCH(static_cast<unsigned>(rows), threads, 0, stream, rms_norm_vec_kernel<T, decltype(k)::value>)(
          out, input, weight, input_stride, out_stride, static_cast<int>(hidden), eps);
    });
  }
  PAGEDLLM_LAUNCH(static_cast<unsigned>(rows), generic_threads(hidden), 0, stream, rms_norm_generic_kernel<T>)(
      out, input, weight, input_stride, out_stride, static_cast<int>(hidden), eps);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fused_add_rms_norm_typed(T* input, T* residual, const T* weight, int64_t rows, int64_t hidden,
                                     int64_t input_stride, int64_t residual_stride, float eps,
                                     cudaStream_t stream) {
  constexpr int kN = Vec16<T>::kN;
  const bool vec_ok = hidden % kN == 0 && input_stride % kN == 0 && residual_stride % kN == 0 &&
                      aligned16(input) && aligned16(residual) && aligned16(weight);
  int threads = 0, vecs = 0;
  if (vec_ok && vec_launch_shape(hidden / kN, &threads, &vecs)) {
    return dispatch_vecs(vecs, [&](auto k) {
      PAGEDLLM_LAUNCH(static_cast<unsigned>(rows), threads, 0, stream, fused_add_rms_norm_vec_kernel<T, decltype(k)::value>)(
          input, residual, weight, input_stride, residual_stride, static_cast<int>(hidden), eps);
    });
  }
  PAGEDLLM_LAUNCH(static_cast<unsigned>(rows), generic_threads(hidden), 0, stream, fused_add_rms_norm_generic_kernel<T>)(
      input, residual, weight, input_stride, residual_stride, static_cast<int>(hidden), eps);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_rms_norm(DType dtype, void* out, const void* input, const void* weight, int64_t rows,
                            int64_t hidden, int64_t input_stride, int64_t out_stride, float epsilon,
                            cudaStream_t stream) {
  // One block per row: the grid's x dimension holds up to 2^31 - 1 blocks; hidden indexes as int.
  if (rows <= 0) return cudaSuccess;
  if (rows > INT32_MAX || hidden <= 0 || hidden > INT32_MAX) return cudaErrorInvalidValue;
  return PAGEDLLM_CUDA_DISPATCH_DTYPE(dtype, [&] {
    return rms_norm_typed<scalar_t>(static_cast<scalar_t*>(out), static_cast<const scalar_t*>(input),
                                    static_cast<const scalar_t*>(weight), rows, hidden, input_stride, out_stride,
                                    epsilon, stream);
  });
}

cudaError_t launch_fused_add_rms_norm(DType dtype, void* input, void* residual, const void* weight, int64_t rows,
                                      int64_t hidden, int64_t input_stride, int64_t residual_stride,
                                      float epsilon, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (rows > INT32_MAX || hidden <= 0 || hidden > INT32_MAX) return cudaErrorInvalidValue;
  return PAGEDLLM_CUDA_DISPATCH_DTYPE(dtype, [&] {
    return fused_add_rms_norm_typed<scalar_t>(static_cast<scalar_t*>(input), static_cast<scalar_t*>(residual),
                                              static_cast<const scalar_t*>(weight), rows, hidden, input_stride,
                                              residual_stride, epsilon, stream);
  });
}

}  // namespace pagedllm::cuda
