// Rotary position embedding, CUDA kernel (torch-free; see pos_encoding_kernels.h).
//
// For pair i (0 <= i < rot_dim / 2) of a head h, with cos_i, sin_i from cos_sin_cache[pos]:
//   neox:  (x, y) = (h[i], h[i + rot_dim / 2])     GPT-J: (x, y) = (h[2i], h[2i + 1])
//   x' = x cos_i - y sin_i,  y' = y cos_i + x sin_i   (fp32 math, one rounding to T)
// One thread block per token; its threads stride over the (head, pair) items of the query, then
// of the key. Consecutive threads take consecutive pairs of a head, so neox accesses are
// contiguous runs of rot_dim / 2 elements and GPT-J ones contiguous runs of rot_dim elements.
// The op moves ~2 x (q + k) bytes per token and is launch/latency bound at decode sizes; scalar
// loads keep it simple and work for every stride (q and k are often slices of a fused qkv).
#include "cuda/pos_encoding_kernels.h"
#include "cuda/launch.cuh"
#include "cuda/vec.cuh"

namespace pagedllm::cuda {
namespace {

template <typename T, bool kNeox>
__device__ __forceinline__ void rotate_pair(T* head,        // [head_size]
                                            const T* cos_row,  // [rot_dim / 2]
                                            const T* sin_row,  // [rot_dim / 2]
                                            int pair, int embed) {
  const int xi = kNeox ? pair : 2 * pair;
  const int yi = kNeox ? pair + embed : 2 * pair + 1;
  const float c = to_float(cos_row[pair]), s = to_float(sin_row[pair]);
  const float x = to_float(head[xi]), y = to_float(head[yi]);
  head[xi] = from_float<T>(x * c - y * s);
  head[yi] = from_float<T>(y * c + x * s);
}

// ptxas sm_90: 30-32 registers (every dtype, both styles), no spills, no smem.
// Claims checked against the sm_90 cubin by tests/kernels/test_sass.py (format: tests/kernels/cubin_inspect.py):
// occupancy(sm_90) if all: >= 4 CTAs/SM of 512 threads with 0 B dynamic smem
template <typename T, bool kNeox>
__global__ void rotary_embedding_kernel(const int64_t* __restrict__ positions,  // [num_tokens]
                                        T* __restrict__ query,  // token stride q_ts, head stride q_hs
                                        T* __restrict__ key,    // token stride k_ts, head stride k_hs, or nullptr
                                        const T* __restrict__ cos_sin_cache,  // [max_position, rot_dim]
                                        int64_t max_position, int rot_dim, int num_heads, int num_kv_heads,
                                        int64_t q_ts, int64_t q_hs, int64_t k_ts, int64_t k_hs) {
  const int64_t token = blockIdx.x;
  const int64_t pos = positions[token];
  // An out-of-range position is a caller bug (the CPU op raises; checking here on the host would
  // cost a device sync). Leave the token unrotated rather than read outside the cache.
  if (pos < 0 || pos >= max_position) return;
  const int embed = rot_dim / 2;
  const T* cos_row = cos_sin_cache + pos * rot_dim;
  const T* sin_row = cos_row + embed;

  T* q = query + token * q_ts;
  const int nq = num_heads * embed;
  for (int i = threadIdx.x; i < nq; i += blockDim.x) {
    const int h = i / embed;
    rotate_pair<T, kNeox>(q + h * q_hs, cos_row, sin_row, i - h * embed, embed);
  }
  if (key != nullptr) {
    T* k = key + token * k_ts;
    const int nk = num_kv_heads * embed;
    for (int i = threadIdx.x; i < nk; i += blockDim.x) {
      const int h = i / embed;
      rotate_pair<T, kNeox>(k + h * k_hs, cos_row, sin_row, i - h * embed, embed);
    }
  }
}

}  // namespace

cudaError_t launch_rotary_embedding(DType dtype, const int64_t* positions, void* query, void* key,
                                    const void* cos_sin_cache, int64_t num_tokens, int64_t max_position,
                                    int64_t rot_dim, int64_t num_heads, int64_t num_kv_heads,
                                    int64_t q_token_stride, int64_t q_head_stride, int64_t k_token_stride,
                                    int64_t k_head_stride, bool is_neox, cudaStream_t stream) {
  if (num_tokens <= 0) return cudaSuccess;
  // One block per token (grid x holds 2^31 - 1); (head, pair) indices are ints.
  const int64_t embed = rot_dim / 2;
  const int64_t items = (num_heads > num_kv_heads ? num_heads : num_kv_heads) * embed;
  if (num_tokens > INT32_MAX || embed <= 0 || items > INT32_MAX) return cudaErrorInvalidValue;
  if (items == 0) return cudaSuccess;  // no heads ([num_tokens, 0]): nothing to rotate, and no 0-thread launch
  // One thread per (query head, pair) up to 512: e.g. 32 heads x 64 pairs = 2048 items -> 512
  // threads, 4 items each; a multiple of 32 so no warp is partly empty for no reason.
  const int threads = static_cast<int>(items >= 512 ? 512 : (items + 31) / 32 * 32);
  return PAGEDLLM_CUDA_DISPATCH_DTYPE(dtype, [&] {
    auto* q = static_cast<scalar_t*>(query);
    auto* k = static_cast<scalar_t*>(key);
    const auto* cache = static_cast<const scalar_t*>(cos_sin_cache);
    if (is_neox) {
      PAGEDLLM_LAUNCH(static_cast<unsigned>(num_tokens), threads, 0, stream, rotary_embedding_kernel<scalar_t, true>)(
          positions, q, k, cache, max_position, static_cast<int>(rot_dim), static_cast<int>(num_heads),
          static_cast<int>(num_kv_heads), q_token_stride, q_head_stride, k_token_stride, k_head_stride);
    } else {
      PAGEDLLM_LAUNCH(static_cast<unsigned>(num_tokens), threads, 0, stream, rotary_embedding_kernel<scalar_t, false>)(
          positions, q, k, cache, max_position, static_cast<int>(rot_dim), static_cast<int>(num_heads),
          static_cast<int>(num_kv_heads), q_token_stride, q_head_stride, k_token_stride, k_head_stride);
    }
    return cudaGetLastError();
  });
}

}  // namespace pagedllm::cuda
