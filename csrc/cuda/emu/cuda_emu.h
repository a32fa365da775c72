// The CUDA dialect as host C++: force-included (-include) into every csrc/cuda/*_kernels.cu when
// the emulator library builds them with g++ (CMake target _C_emu). Keywords, built-in variables,
// intrinsics and the runtime API map onto the fiber runtime of emu_runtime.h. nvcc never sees it.
#pragma once

#ifndef PAGEDLLM_CUDA_EMU
#error "cuda_emu.h is only for the emulator build (PAGEDLLM_CUDA_EMU)"
#endif

// Before the CUDA headers, which keep an existing definition of these (crt/host_defines.h).
#define __global__
#define __device__
#define __host__
// Static __shared__ variables: one instance per program (blocks run one at a time), gathered in
// one section so that the runtime poisons all of them at every block start.
#define __shared__ static __attribute__((section("pagedllm_emu_smem"), aligned(16)))

#include <cuda_runtime.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda/emu/emu_runtime.h"

#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __forceinline__
#define __forceinline__ inline

// ---- built-in variables ----
#define threadIdx (::emu::g_cur->tid)
#define blockIdx (::emu::g_block->bid)
#define blockDim (::emu::g_block->bdim)
#define gridDim (::emu::g_block->gdim)

// ---- barriers and warp collectives (the call site's file and line name the errors) ----
#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ((void)::emu::warp_collective(::emu::syncwarp_mask(__VA_ARGS__), __FILE__, __LINE__))
#define __shfl_sync(m, v, s, ...) ::emu::shfl_idx(m, v, s, __FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_xor_sync(m, v, s, ...) ::emu::shfl_xor(m, v, s, __FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_up_sync(m, v, s, ...) ::emu::shfl_up(m, v, s, __FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_down_sync(m, v, s, ...) ::emu::shfl_down(m, v, s, __FILE__, __LINE__, ##__VA_ARGS__)
#define __ballot_sync(m, p) ::emu::ballot(m, p, __FILE__, __LINE__)

namespace emu {

inline unsigned syncwarp_mask(unsigned m = 0xffffffffu) { return m; }

template <typename T>
T shuffle(unsigned mask, T v, int src, const char* file, int line) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 64 bits");
  const int lane = lane_id();
  std::memcpy(exchange_slot(g_block->warps[g_cur->lin >> 5].gen, lane), &v, sizeof(T));
  const unsigned gen = warp_collective(mask, file, line);
  if (!(mask >> src & 1u)) fail(file, line, "shuffle reads lane %d, outside the mask 0x%08x", src, mask);
  T r;
  std::memcpy(&r, exchange_slot(gen, src), sizeof(T));
  return r;
}
// Source lanes as the CUDA programming guide defines them (a source outside the lane's
// width-segment returns the lane's own value).
template <typename T>
T shfl_idx(unsigned m, T v, int src, const char* file, int line, int width = 32) {
  return shuffle(m, v, (lane_id() & ~(width - 1)) + (src & (width - 1)), file, line);
}
template <typename T>
T shfl_xor(unsigned m, T v, int lane_mask, const char* file, int line, int width = 32) {
  const int lane = lane_id();
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  return shuffle(m, v, src, file, line);
}
template <typename T>
T shfl_up(unsigned m, T v, unsigned delta, const char* file, int line, int width = 32) {
  const int lane = lane_id();
  int src = lane - static_cast<int>(delta);
  if (src < (lane & ~(width - 1))) src = lane;
  return shuffle(m, v, src, file, line);
}
template <typename T>
T shfl_down(unsigned m, T v, unsigned delta, const char* file, int line, int width = 32) {
  const int lane = lane_id();
  int src = lane + static_cast<int>(delta);
  if (src >= (lane & ~(width - 1)) + width) src = lane;
  return shuffle(m, v, src, file, line);
}
inline unsigned ballot(unsigned m, bool p, const char* file, int line) {
  exchange_slot(g_block->warps[g_cur->lin >> 5].gen, lane_id())[0] = p;
  const unsigned gen = warp_collective(m, file, line);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) {
    if ((m >> l & 1u) && exchange_slot(gen, l)[0]) r |= 1u << l;
  }
  return r;
}

// ---- launches: PAGEDLLM_LAUNCH (csrc/cuda/launch.cuh) expands to emu::launch(...)(args) ----
template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  LaunchInfo info;
  template <typename... A>
  void operator()(A&&... args) const {
    // Arguments are copied, as a launch copies them into the parameter space.
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    auto k = kernel;
    run_grid(info, [&] { std::apply(k, params); });
  }
};

inline dim3 to_dim3(dim3 d) { return d; }
inline dim3 to_dim3(unsigned x) { return dim3(x); }
inline dim3 to_dim3(int x) { return dim3(static_cast<unsigned>(x)); }

template <typename... P, typename G, typename B>
Launcher<P...> launch(void (*kernel)(P...), const char* name, const char* file, int line, G grid, B block,
                      size_t smem, cudaStream_t) {
  return Launcher<P...>{kernel, LaunchInfo{name, file, line, to_dim3(grid), to_dim3(block), smem,
                                           reinterpret_cast<const void*>(kernel)}};
}

}  // namespace emu

// ---- device functions and intrinsics on the host ----
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
namespace emu {
template <typename To, typename From>
inline To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between sizes");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}
}  // namespace emu
inline uint32_t __float_as_uint(float f) { return ::emu::bit_cast<uint32_t>(f); }
inline float __uint_as_float(uint32_t u) { return ::emu::bit_cast<float>(u); }
inline int __float_as_int(float f) { return ::emu::bit_cast<int>(f); }
inline float __int_as_float(int i) { return ::emu::bit_cast<float>(i); }
inline unsigned long long __double2ull_rn(double x) { return x <= 0 ? 0ull : static_cast<unsigned long long>(std::nearbyint(x)); }
inline unsigned long long __double2ull_ru(double x) { return x <= 0 ? 0ull : static_cast<unsigned long long>(std::ceil(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
template <typename T>
inline T __ldg(const T* p) {
  ::emu::check_access(p, sizeof(T), false, __FILE__, __LINE__);
  return *p;
}
#define __cvta_generic_to_shared(p) ::emu::cvta_shared(p, __FILE__, __LINE__)
// Shared-memory atomics: fibers switch only at barriers and collectives, so a read-modify-write
// is never interleaved with another thread's.
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned o = *p;
  *p = o + v;
  return o;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long o = *p;
  *p = o + v;
  return o;
}
inline int atomicMax(int* p, int v) {
  const int o = *p;
  if (v > o) *p = v;
  return o;
}
inline int atomicMin(int* p, int v) {
  const int o = *p;
  if (v < o) *p = v;
  return o;
}

// The runtime API (cudaGetDevice, cudaFuncSetAttribute, the occupancy query, cudaGetLastError)
// is the toolkit's declarations, defined for the emulated device in emu_cudart.cpp.
// nvcc's C++ overloads of two of them (cuda_runtime.h defines them only under __CUDACC__).
template <typename K>
inline cudaError_t cudaFuncSetAttribute(K* kernel, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
template <typename K>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, K* kernel, int block_size,
                                                                 size_t dynamic_smem) {
  return ::cudaOccupancyMaxActiveBlocksPerMultiprocessor(num_blocks, reinterpret_cast<const void*>(kernel),
                                                         block_size, dynamic_smem);
}
