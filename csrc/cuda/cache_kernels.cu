// reshape_and_cache, CUDA kernel (torch-free; see cache_kernels.h).
//
// One thread block per token; its threads stride over the 16-byte chunks of the token's
// num_kv_heads head rows (key and value both), so a warp copies 512 contiguous bytes of a head
// row (or of consecutive rows) per instruction. The destination of head h of token t is the
// contiguous row cache[block, h, offset, :]. A scalar kernel covers unaligned views and head
// sizes that are not a multiple of the vector width. The copy is bit-exact.
#include "cuda/cache_kernels.h"
#include "cuda/launch.cuh"
#include "cuda/vec.cuh"

namespace pagedllm::cuda {
namespace {

// Copies with element type C: Vec16<T> (kN elements) on the vector path, T (1 element) otherwise.
template <typename T, typename C, int kN>
__device__ __forceinline__ void copy_chunk(const T* src, T* dst) {
  if constexpr (kN == 1) {
    *dst = *src;
  } else {
    C::load(src).store(dst);
  }
}

// ptxas sm_90: 32 registers (16-byte path) / 26 (scalar path), every dtype; no spills, no smem.
// Claims checked against the sm_90 cubin by tests/kernels/test_sass.py (format: tests/kernels/cubin_inspect.py):
// occupancy(sm_90) if all: >= 4 CTAs/SM of 512 threads with 0 B dynamic smem
// sass(sm_90) if kN > 1: LDG.E.128 STG.E.128
template <typename T, typename C, int kN>
__global__ void reshape_and_cache_kernel(const T* __restrict__ key,    // [num_tokens, num_kv_heads, head_size], strides k_ts, k_hs, 1
                                         const T* __restrict__ value,  // [num_tokens, num_kv_heads, head_size], strides v_ts, v_hs, 1
                                         T* __restrict__ key_cache,    // [num_blocks, num_kv_heads, block_size, head_size]
                                         T* __restrict__ value_cache,  // [num_blocks, num_kv_heads, block_size, head_size]
                                         const int64_t* __restrict__ slot_mapping,  // [num_tokens]
                                         int64_t num_slots, int num_kv_heads, int head_size, int block_size,
                                         int64_t k_ts, int64_t k_hs, int64_t v_ts, int64_t v_hs) {
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  // Negative: padding. >= num_slots: a caller bug that the CPU op raises on; skipped here rather
  // than written outside the cache (a host-side check would cost a device sync).
  if (slot < 0 || slot >= num_slots) return;
  const int64_t block = slot / block_size, offset = slot - block * block_size;
  const int chunks_per_head = head_size / kN;
  const int n = num_kv_heads * chunks_per_head;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int h = i / chunks_per_head;
    const int e = (i - h * chunks_per_head) * kN;  // element offset inside the head row
    const int64_t dst = ((block * num_kv_heads + h) * block_size + offset) * head_size + e;
    copy_chunk<T, C, kN>(key + token * k_ts + h * k_hs + e, key_cache + dst);
    copy_chunk<T, C, kN>(value + token * v_ts + h * v_hs + e, value_cache + dst);
  }
}

template <typename T>
cudaError_t reshape_and_cache_typed(const T* key, const T* value, T* key_cache, T* value_cache,
                                    const int64_t* slot_mapping, int64_t num_tokens, int64_t num_slots,
                                    int num_kv_heads, int head_size, int block_size, int64_t k_ts, int64_t k_hs,
                                    int64_t v_ts, int64_t v_hs, cudaStream_t stream) {
  constexpr int kN = Vec16<T>::kN;
  // 16-byte chunks need every head row (source and destination) to start 16-byte aligned.
  const bool vec_ok = head_size % kN == 0 && k_ts % kN == 0 && k_hs % kN == 0 && v_ts % kN == 0 &&
                      v_hs % kN == 0 && aligned16(key) && aligned16(value) && aligned16(key_cache) &&
                      aligned16(value_cache);
  const int per_chunk = vec_ok ? kN : 1;
  // One thread per chunk of the token's head rows, up to 512 (e.g. 8 kv heads x 128 bf16 = 128
  // chunks -> 128 threads): enough to cover a token in one pass without idle warps.
  const int64_t chunks = static_cast<int64_t>(num_kv_heads) * (head_size / per_chunk);
  const int threads = static_cast<int>(chunks >= 512 ? 512 : (chunks + 31) / 32 * 32);
  const dim3 grid(static_cast<unsigned>(num_tokens));
  if (vec_ok) {
    PAGEDLLM_LAUNCH(grid, threads, 0, stream, reshape_and_cache_kernel<T, Vec16<T>, kN>)(
        key, value, key_cache, value_cache, slot_mapping, num_slots, num_kv_heads, head_size, block_size, k_ts,
        k_hs, v_ts, v_hs);
  } else {
    PAGEDLLM_LAUNCH(grid, threads, 0, stream, reshape_and_cache_kernel<T, T, 1>)(
        key, value, key_cache, value_cache, slot_mapping, num_slots, num_kv_heads, head_size, block_size, k_ts,
        k_hs, v_ts, v_hs);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_reshape_and_cache(DType dtype, const void* key, const void* value, void* key_cache,
                                     void* value_cache, const int64_t* slot_mapping, int64_t num_tokens,
                                     int64_t num_blocks, int64_t num_kv_heads, int64_t head_size,
                                     int64_t block_size, int64_t key_token_stride, int64_t key_head_stride,
                                     int64_t value_token_stride, int64_t value_head_stride,
                                     cudaStream_t stream) {
  if (num_tokens <= 0 || num_kv_heads <= 0 || head_size <= 0) return cudaSuccess;
  // One block per token (grid x holds 2^31 - 1); (head, chunk) indices are ints.
  if (num_tokens > INT32_MAX || num_kv_heads * head_size > INT32_MAX || block_size <= 0 ||
      block_size > INT32_MAX)
    return cudaErrorInvalidValue;
  return PAGEDLLM_CUDA_DISPATCH_DTYPE(dtype, [&] {
    return reshape_and_cache_typed<scalar_t>(
        static_cast<const scalar_t*>(key), static_cast<const scalar_t*>(value), static_cast<scalar_t*>(key_cache),
        static_cast<scalar_t*>(value_cache), slot_mapping, num_tokens, num_blocks * block_size,
        static_cast<int>(num_kv_heads), static_cast<int>(head_size), static_cast<int>(block_size),
        key_token_stride, key_head_stride, value_token_stride, value_head_stride, stream);
  });
}

}  // namespace pagedllm::cuda
