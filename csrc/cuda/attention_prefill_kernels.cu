// Paged prefill attention, CUDA kernels (torch-free; the host launcher is csrc/cuda/attention_prefill.cpp).
// Causal attention of each sequence's new query tokens over its cached + new KV in the paged cache
// (schema: paged_prefill_attention in csrc/torch_bindings.cpp).
//
// bf16 / fp16: a FlashAttention-2 style tensor-core kernel (prefill_mma_kernel). One CTA per
// (query tile of 128 rows, query head, sequence); each warp owns 16 or 32 query rows. The CTA walks
// the sequence's KV in tiles of 64 keys gathered from the paged cache into shared memory with
// cp.async; S = Q K^T and O += P V run on mma.sync.m16n8k16 (fp32 accumulators), the softmax is
// online in registers (base 2). Only tiles on the causal diagonal (or the sliding-window edge) are
// masked; tiles no row of a warp can see are skipped by that warp, tiles no row of the CTA can see
// are never loaded.
// fp32 (and fp16/bf16 caches that are not 16-byte aligned): a simple warp-per-query kernel
// (prefill_simple_kernel), correct but without tensor cores.
#include "cuda/attention_prefill_kernels.h"
#include "cuda/launch.cuh"
#include "cuda/ptx.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"

namespace pagedllm::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
struct PrefillParams {
  T* out;                          // [num_tokens, num_heads, D], strides (o_tok, o_head, 1)
  const T* q;                      // [num_tokens, num_heads, D], strides (q_tok, q_head, 1)
  const T* k_cache;                // [num_blocks, num_kv_heads, block_size, D]
  const T* v_cache;                // [num_blocks, num_kv_heads, block_size, D]
  const int32_t* block_tables;     // [num_seqs, bt_stride]
  const int32_t* query_start_loc;  // [num_seqs + 1]
  const int32_t* seq_lens;         // [num_seqs]
  int64_t q_tok, q_head, o_tok, o_head, bt_stride;
  int64_t kv_block_stride;  // num_kv_heads * block_size * D
  int64_t kv_head_stride;   // block_size * D
  int group;                // num_heads / num_kv_heads: query head h reads kv head h / group
  int block_size, block_shift;
  int window;               // <= 0: no sliding window
  int row_step;             // 1: causal (row r sits at pos_lo + r); 0: bidirectional (every row at seq_len - 1)
  float scale_log2;         // softmax scale * log2(e): the softmax runs in base 2
  bool q_vec, o_vec;        // query / out rows 16-byte aligned: vector loads / stores
};

// ---------------------------------------------------------------------------------------------
// PTX helpers
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Two floats -> one b32 of two b16 (lo in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &v, sizeof(r));
  return r;
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &v, sizeof(r));
  return r;
}

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel (bf16 / fp16)
// ---------------------------------------------------------------------------------------------
// Tile shapes per head size. BM = 16 * kWarpM * kWarps query rows per CTA, kBlockN keys per KV tile.
// Two m16 tiles per warp (32 rows) let every K / V fragment read from shared memory feed two mmas
// (shared-memory bandwidth, not the tensor cores, is the limit of mma.sync at one m16 per warp);
// head size 256 keeps one m16 tile per warp so that its O accumulators (128 floats per thread) fit
// the 255-register budget, and uses 8 warps to keep 128 rows per CTA.
// Shared memory: (BM + 2 * kBlockN) * (D + 8) * 2 bytes = 36 KB (D 64), 44 KB (80), 52 KB (96),
// 68 KB (128), 132 KB (256): two CTAs per SM up to D = 128 (H100: 227 KB per SM).
template <int D>
struct MmaConfig {
  static constexpr int kWarpM = 2, kWarps = 4, kBlockN = 64;
};
template <>
struct MmaConfig<256> {
  static constexpr int kWarpM = 1, kWarps = 8, kBlockN = 64;
};

template <typename T, int D>
constexpr size_t mma_smem_bytes() {
  using C = MmaConfig<D>;
  return size_t(16 * C::kWarpM * C::kWarps + 2 * C::kBlockN) * (D + 8) * sizeof(T);
}

// ptxas -v (sm_90, CUDA 13.0), same for bf16 and fp16; dynamic smem as listed above:
//   D=64: 212 registers, no spills     D=80: 243, no spills     D=96: 255, no spills
//   D=128: 254 registers, 16 B spill stores / 32 B loads (one value kept on the stack)
//   D=256: 245 registers, no spills (8 warps x 245: one CTA per SM, as its 132 KB smem implies)
// Claims checked against the sm_90 cubin by tests/kernels/test_sass.py (format: tests/kernels/cubin_inspect.py):
// occupancy(sm_90) if D <= 128: >= 2 CTAs/SM of 128 threads with 69632 B dynamic smem
// occupancy(sm_90) if D == 256: >= 1 CTAs/SM of 256 threads with 135168 B dynamic smem
// sass(sm_90) if all: HMMA.16816.F32 LDSM.16.M88.4 LDSM.16.MT88.4 LDGSTS.E.BYPASS.128 STG.E.128
// spills(sm_90) if D == 128: <= 16 B
template <typename T, int D, int WM, int NW, int BN>
__global__ void __launch_bounds__(NW * 32) prefill_mma_kernel(const PrefillParams<T> p) {
  constexpr int kThreads = NW * 32;
  constexpr int BM = 16 * WM * NW;  // query rows per CTA
  // Shared-memory row stride in elements: 16 bytes of padding make it an odd number of 16-byte
  // chunks, so the 8 row addresses of every ldmatrix phase fall in 8 different bank groups.
  constexpr int LDS = D + 8;
  constexpr int CH = D / 8;   // 16-byte chunks per row
  constexpr int NT = BN / 8;  // n8 tiles of S per m16 tile
  constexpr int DT = D / 8;   // n8 tiles of O per m16 tile
  constexpr int KD = D / 16;  // k16 steps of Q K^T
  constexpr int KN = BN / 16; // k16 steps of P V
  static_assert(D % 16 == 0 && BN % 16 == 0, "tile shapes");

  PAGEDLLM_DYNAMIC_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][LDS]; reused for the output tile
  T* sK = sQ + BM * LDS;                   // [BN][LDS]
  T* sV = sK + BN * LDS;                   // [BN][LDS]

  const int seq = blockIdx.z, head = blockIdx.y;
  // The last query tiles of a sequence see the most keys: launch them first to shorten the tail.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int q_start = p.query_start_loc[seq];
  const int q_len = p.query_start_loc[seq + 1] - q_start;
  const int m0 = m_block * BM;
  if (m0 >= q_len) return;  // tile past this sequence's queries (whole CTA, before any barrier)
  const int seq_len = p.seq_lens[seq];
  const int rows = min(BM, q_len - m0);  // valid query rows of this tile
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

  // Query row r of the tile sits at position pos_lo + r * row_step and sees keys (pos - window, pos];
  // bidirectional: every row at seq_len - 1, so the same masking sees exactly the keys < seq_len.
  const int pos_lo = p.row_step ? seq_len - q_len + m0 : seq_len - 1;
  const int pos_hi = pos_lo + (rows - 1) * p.row_step;
  const int k_begin = p.window > 0 ? max(0, pos_lo - p.window + 1) : 0;
  const int t_first = k_begin / BN, t_last = pos_hi / BN;  // KV tiles some row of the CTA sees

  const int32_t* bt = p.block_tables + int64_t(seq) * p.bt_stride;
  const int64_t kv_head_off = int64_t(head / p.group) * p.kv_head_stride;

  // Q tile -> sQ (rows past q_len are zero).
  {
    const T* qg = p.q + int64_t(q_start + m0) * p.q_tok + int64_t(head) * p.q_head;
    for (int idx = tid; idx < BM * CH; idx += kThreads) {
      const int r = idx / CH, c = idx % CH;
      T* dst = sQ + r * LDS + c * 8;
      if (r < rows) {
        const T* src = qg + int64_t(r) * p.q_tok + c * 8;
        if (p.q_vec) {
          cp_async_16(smem_addr(dst), src);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) dst[e] = src[e];
        }
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
      }
    }
  }

  // KV tile of keys [n0, n0 + BN) -> s_dst, gathered through the block table. Keys at or past
  // seq_len are zero-filled and never read: the slots past seq_len may hold anything (NaN), and
  // block-table entries past the sequence's last block are not valid.
  auto load_kv = [&](T* s_dst, const T* cache, int n0) {
    for (int idx = tid; idx < BN * CH; idx += kThreads) {
      const int r = idx / CH, c = idx % CH;
      const int key = n0 + r;
      T* dst = s_dst + r * LDS + c * 8;
      if (key < seq_len) {
        const int64_t blk = __ldg(bt + (key >> p.block_shift));
        const T* src = cache + blk * p.kv_block_stride + kv_head_off +
                       int64_t(key & (p.block_size - 1)) * D + c * 8;
        cp_async_16(smem_addr(dst), src);
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
      }
    }
  };

  load_kv(sK, p.k_cache, t_first * BN);
  cp_async_commit();  // group: Q + first K tile

  float o[WM][DT][4];  // O accumulators (C fragments), rows of m16 tile mi
  float m_run[WM][2], l_run[WM][2];  // running max (base 2, scaled) and partial sum of rows g, g+8
#pragma unroll
  for (int mi = 0; mi < WM; ++mi) {
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mi][dt][e] = 0.f;
    m_run[mi][0] = m_run[mi][1] = -INFINITY;
    l_run[mi][0] = l_run[mi][1] = 0.f;
  }

  const int warp_row0 = warp * WM * 16;  // first tile row of this warp
  const bool warp_active = warp_row0 < rows;
  const int wpos_lo = pos_lo + warp_row0 * p.row_step;
  const int wpos_hi = pos_lo + (min(warp_row0 + WM * 16, rows) - 1) * p.row_step;
  const int g = lane >> 2, tq = lane & 3;

  // Per-lane ldmatrix addresses (lane -> matrix lj = lane / 8, row lr = lane % 8):
  //   Q (A operand, x4 = a0..a3): rows + (lj & 1) * 8, cols + (lj >> 1) * 8
  //   K (B operand of two n8 tiles, x4 = b0, b1 of keys +0..7, then of keys +8..15):
  //     keys + (lj >> 1) * 8, dims + (lj & 1) * 8
  //   V (B operand, .trans, x4 = b0, b1 of dims +0..7, then of dims +8..15):
  //     keys + (lj & 1) * 8, dims + (lj >> 1) * 8
  const int lr = lane & 7, lj = lane >> 3;
  const uint32_t q_addr = smem_addr(sQ + (warp_row0 + lr + (lj & 1) * 8) * LDS + (lj >> 1) * 8);
  const uint32_t k_addr = smem_addr(sK + (lr + (lj >> 1) * 8) * LDS + (lj & 1) * 8);
  const uint32_t v_addr = smem_addr(sV + (lr + (lj & 1) * 8) * LDS + (lj >> 1) * 8);
  constexpr uint32_t kRowBytes = LDS * sizeof(T);

  for (int t = t_first; t <= t_last; ++t) {
    const int n0 = t * BN;
    cp_async_wait<0>();
    __syncthreads();  // K tile t (and Q) landed for all threads; every warp is done with V tile t-1
    load_kv(sV, p.v_cache, n0);  // overlaps with S = Q K^T and the softmax
    cp_async_commit();

    // Does some row of this warp see some key of this tile?
    const bool compute = warp_active && n0 <= wpos_hi && !(p.window > 0 && n0 + BN - 1 <= wpos_lo - p.window);
    uint32_t pa[WM][KN][4];  // P as A fragments of the P V product
    if (compute) {
      float s[WM][NT][4];
#pragma unroll
      for (int mi = 0; mi < WM; ++mi)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mi][nt][e] = 0.f;

      // S = Q K^T
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        uint32_t a[WM][4];
#pragma unroll
        for (int mi = 0; mi < WM; ++mi) ldsm_x4(q_addr + mi * 16 * kRowBytes + kk * 16 * sizeof(T), a[mi]);
#pragma unroll
        for (int nj = 0; nj < BN / 16; ++nj) {
          uint32_t b[4];
          ldsm_x4(k_addr + nj * 16 * kRowBytes + kk * 16 * sizeof(T), b);
#pragma unroll
          for (int mi = 0; mi < WM; ++mi) {
            mma_16816<T>(s[mi][2 * nj], a[mi], b[0], b[1]);
            mma_16816<T>(s[mi][2 * nj + 1], a[mi], b[2], b[3]);
          }
        }
      }

      // Mask only where some key is invisible to some row of the warp: the causal diagonal, the
      // window's trailing edge, keys past seq_len (which lie past every valid row's position).
      const bool need_mask = n0 + BN - 1 > wpos_lo || (p.window > 0 && n0 <= wpos_hi - p.window);
      if (need_mask) {
#pragma unroll
        for (int mi = 0; mi < WM; ++mi)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int pos = pos_lo + (warp_row0 + mi * 16 + (e >> 1) * 8 + g) * p.row_step;
              const int key = n0 + nt * 8 + tq * 2 + (e & 1);
              const bool visible = key <= pos && (p.window <= 0 || pos - key < p.window);
              if (!visible) s[mi][nt][e] = -INFINITY;
            }
      }

      // Online softmax of rows g (h = 0) and g + 8 (h = 1) of each m16 tile; the 4 lanes of a quad
      // hold one row's columns.
#pragma unroll
      for (int mi = 0; mi < WM; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float mx = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[mi][nt][2 * h], s[mi][nt][2 * h + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float m_new = fmaxf(m_run[mi][h], mx * p.scale_log2);
          // A row that has seen no key yet keeps m = -inf; subtract 0 instead (its p are all 0).
          const float m_use = m_new == -INFINITY ? 0.f : m_new;
          const float alpha = fast_exp2(m_run[mi][h] - m_use);  // 0 while the row saw nothing
          m_run[mi][h] = m_new;
          float sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float v = fast_exp2(fmaf(s[mi][nt][2 * h + e], p.scale_log2, -m_use));
              s[mi][nt][2 * h + e] = v;
              sum += v;
            }
          l_run[mi][h] = l_run[mi][h] * alpha + sum;  // per-lane partial; quad-summed at the end
#pragma unroll
          for (int dt = 0; dt < DT; ++dt) {
            o[mi][dt][2 * h] *= alpha;
            o[mi][dt][2 * h + 1] *= alpha;
          }
        }

      // The S accumulators of n8 tiles 2kk and 2kk+1 are exactly the A fragment of k16 step kk.
#pragma unroll
      for (int mi = 0; mi < WM; ++mi)
#pragma unroll
        for (int kk = 0; kk < KN; ++kk) {
          pa[mi][kk][0] = pack2<T>(s[mi][2 * kk][0], s[mi][2 * kk][1]);
          pa[mi][kk][1] = pack2<T>(s[mi][2 * kk][2], s[mi][2 * kk][3]);
          pa[mi][kk][2] = pack2<T>(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
          pa[mi][kk][3] = pack2<T>(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
        }
    }

    cp_async_wait<0>();
    __syncthreads();  // V tile t landed for all threads; every warp is done reading K tile t
    if (t < t_last) {
      load_kv(sK, p.k_cache, n0 + BN);  // overlaps with O += P V
      cp_async_commit();
    }

    if (compute) {
      // O += P V
#pragma unroll
      for (int kk = 0; kk < KN; ++kk)
#pragma unroll
        for (int dj = 0; dj < D / 16; ++dj) {
          uint32_t b[4];
          ldsm_x4_trans(v_addr + kk * 16 * kRowBytes + dj * 16 * sizeof(T), b);
#pragma unroll
          for (int mi = 0; mi < WM; ++mi) {
            mma_16816<T>(o[mi][2 * dj], pa[mi][kk], b[0], b[1]);
            mma_16816<T>(o[mi][2 * dj + 1], pa[mi][kk], b[2], b[3]);
          }
        }
    }
  }

  // Epilogue: normalize, stage this warp's rows in its own rows of sQ (only this warp ever read
  // them), then 16-byte stores of whole rows. No barrier below: inactive warps may leave.
  if (!warp_active) return;
#pragma unroll
  for (int mi = 0; mi < WM; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float l = l_run[mi][h];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;  // l = 0 only for rows past q_len
      T* srow = sQ + (warp_row0 + mi * 16 + h * 8 + g) * LDS + tq * 2;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
        *reinterpret_cast<uint32_t*>(srow + dt * 8) = pack2<T>(o[mi][dt][2 * h] * inv, o[mi][dt][2 * h + 1] * inv);
    }
  __syncwarp();
  T* og = p.out + int64_t(q_start + m0) * p.o_tok + int64_t(head) * p.o_head;
  for (int idx = lane; idx < WM * 16 * CH; idx += 32) {
    const int r = warp_row0 + idx / CH, c = idx % CH;
    if (r >= rows) continue;
    const T* src = sQ + r * LDS + c * 8;
    T* dst = og + int64_t(r) * p.o_tok + c * 8;
    if (p.o_vec) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = src[e];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Simple kernel (fp32; fp16 / bf16 with unaligned caches)
// ---------------------------------------------------------------------------------------------
// One warp per (query token, head), 4 warps per CTA. Keys in chunks of 32: a lane per key for the
// scores, then a lane per dimension (D / 32 each) for P V; online softmax per chunk.
// ptxas -v (sm_90): 40-48 registers, 1-4 KB static smem, no spills except fp16 D=128
// (32 B spill stores / 48 B loads).
constexpr int kSimpleWarps = 4;

// Claims checked against the sm_90 cubin by tests/kernels/test_sass.py (format: tests/kernels/cubin_inspect.py):
// occupancy(sm_90) if all: >= 10 CTAs/SM of 128 threads with 0 B dynamic smem
// spills(sm_90) if T == 'fp16' and D == 128: <= 24 B
template <typename T, int D>
__global__ void __launch_bounds__(kSimpleWarps * 32) prefill_simple_kernel(const PrefillParams<T> p) {
  constexpr int DPL = (D + 31) / 32;  // dims per lane
  __shared__ float sq[kSimpleWarps][D];
  const int seq = blockIdx.z, head = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int q_start = p.query_start_loc[seq];
  const int q_len = p.query_start_loc[seq + 1] - q_start;
  const int qi = blockIdx.x * kSimpleWarps + warp;
  if (qi >= q_len) return;  // whole warp; the kernel has no block barrier
  const int seq_len = p.seq_lens[seq];
  const int pos = p.row_step ? seq_len - q_len + qi : seq_len - 1;  // bidirectional: sees all keys

  const T* qrow = p.q + int64_t(q_start + qi) * p.q_tok + int64_t(head) * p.q_head;
  for (int d = lane; d < D; d += 32) sq[warp][d] = to_float(qrow[d]) * p.scale_log2;
  __syncwarp();

  const int32_t* bt = p.block_tables + int64_t(seq) * p.bt_stride;
  const int64_t kv_head_off = int64_t(head / p.group) * p.kv_head_stride;
  auto slot = [&](int key) {  // element offset of key's row in the caches
    return int64_t(__ldg(bt + (key >> p.block_shift))) * p.kv_block_stride + kv_head_off +
           int64_t(key & (p.block_size - 1)) * D;
  };

  float acc[DPL];
#pragma unroll
  for (int i = 0; i < DPL; ++i) acc[i] = 0.f;
  float m = -INFINITY, l = 0.f;
  const int k_begin = p.window > 0 ? max(0, pos - p.window + 1) : 0;
  for (int k0 = k_begin; k0 <= pos; k0 += 32) {
    const int key = k0 + lane;
    float s = -INFINITY;
    if (key <= pos) {
      const T* kr = p.k_cache + slot(key);
      float dot = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) dot = fmaf(sq[warp][d], to_float(kr[d]), dot);
      s = dot;
    }
    const float m_new = fmaxf(m, warp_max(s));  // finite: key k0 <= pos is visible
    const float alpha = exp2f(m - m_new);       // 0 on the first chunk
    const float pr = exp2f(s - m_new);          // 0 for invisible keys
    l = l * alpha + warp_sum(pr);
#pragma unroll
    for (int i = 0; i < DPL; ++i) acc[i] *= alpha;
    const int nk = min(32, pos - k0 + 1);
    for (int j = 0; j < nk; ++j) {
      const float pj = __shfl_sync(0xffffffffu, pr, j);
      const T* vr = p.v_cache + slot(k0 + j);
#pragma unroll
      for (int i = 0; i < DPL; ++i) {
        const int d = lane + 32 * i;
        if (d < D) acc[i] = fmaf(pj, to_float(vr[d]), acc[i]);
      }
    }
    m = m_new;
  }

  T* orow = p.out + int64_t(q_start + qi) * p.o_tok + int64_t(head) * p.o_head;
  const float inv = 1.f / l;  // l >= 1: the row's max contributes 2^0
#pragma unroll
  for (int i = 0; i < DPL; ++i) {
    const int d = lane + 32 * i;
    if (d < D) orow[d] = from_float<T>(acc[i] * inv);
  }
}

// ---------------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------------
constexpr int kMaxDevices = 64;

template <typename T, int D>
cudaError_t launch_for(const PrefillParams<T>& p, bool use_mma, int num_seqs, int num_heads, int max_query_len,
                       cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    if (use_mma) {
      using C = MmaConfig<D>;
      constexpr int BM = 16 * C::kWarpM * C::kWarps;
      constexpr size_t smem = mma_smem_bytes<T, D>();
      void (*kernel)(PrefillParams<T>) = prefill_mma_kernel<T, D, C::kWarpM, C::kWarps, C::kBlockN>;
      // Over 48 KB of dynamic shared memory needs the opt-in, once per device (a benign race: two
      // threads may both set it).
      static bool smem_set[kMaxDevices] = {};
      int device = 0;
      cudaError_t err = cudaGetDevice(&device);
      if (err != cudaSuccess) return err;
      if (device >= kMaxDevices || !smem_set[device]) {
        err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
        if (err != cudaSuccess) return err;
        if (device < kMaxDevices) smem_set[device] = true;
      }
      // x: query tiles (tiles past a sequence's q_len exit at once), y: heads, z: sequences.
      const dim3 grid((max_query_len + BM - 1) / BM, num_heads, num_seqs);
      PAGEDLLM_LAUNCH(grid, C::kWarps * 32, smem, stream, kernel)(p);
      return cudaGetLastError();
    }
  }
  const dim3 grid((max_query_len + kSimpleWarps - 1) / kSimpleWarps, num_heads, num_seqs);
  PAGEDLLM_LAUNCH(grid, kSimpleWarps * 32, 0, stream, prefill_simple_kernel<T, D>)(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_paged_prefill_attention(DType dtype, void* out, const void* query, const void* key_cache,
                                           const void* value_cache, const int32_t* block_tables,
                                           const int32_t* query_start_loc, const int32_t* seq_lens, int num_seqs,
                                           int num_heads, int num_kv_heads, int head_size, int block_size,
                                           int max_query_len, int64_t block_table_stride, int64_t q_token_stride,
                                           int64_t q_head_stride, int64_t out_token_stride, int64_t out_head_stride,
                                           float scale, int sliding_window, bool causal, cudaStream_t stream) {
  if (block_size != 16 && block_size != 32) return cudaErrorInvalidValue;
  if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0) return cudaErrorInvalidValue;
  if (num_seqs == 0 || num_heads == 0 || max_query_len <= 0) return cudaSuccess;
  return PAGEDLLM_CUDA_DISPATCH_DTYPE(dtype, [&]() -> cudaError_t {
    constexpr int64_t kVec = 16 / sizeof(scalar_t);  // elements per 16 bytes
    PrefillParams<scalar_t> p;
    p.out = static_cast<scalar_t*>(out);
    p.q = static_cast<const scalar_t*>(query);
    p.k_cache = static_cast<const scalar_t*>(key_cache);
    p.v_cache = static_cast<const scalar_t*>(value_cache);
    p.block_tables = block_tables;
    p.query_start_loc = query_start_loc;
    p.seq_lens = seq_lens;
    p.q_tok = q_token_stride;
    p.q_head = q_head_stride;
    p.o_tok = out_token_stride;
    p.o_head = out_head_stride;
    p.bt_stride = block_table_stride;
    p.kv_head_stride = int64_t(block_size) * head_size;
    p.kv_block_stride = int64_t(num_kv_heads) * p.kv_head_stride;
    p.group = num_heads / num_kv_heads;
    p.block_size = block_size;
    p.block_shift = block_size == 16 ? 4 : 5;
    p.window = sliding_window > 0 ? sliding_window : 0;
    p.row_step = causal ? 1 : 0;
    p.scale_log2 = scale * kLog2e;
    p.q_vec = aligned16(query) && q_token_stride % kVec == 0 && q_head_stride % kVec == 0;
    p.o_vec = aligned16(out) && out_token_stride % kVec == 0 && out_head_stride % kVec == 0;
    // cp.async needs 16-byte aligned cache rows (every row is when the base is: D * 2 % 16 == 0).
    const bool use_mma = aligned16(key_cache) && aligned16(value_cache);
    switch (head_size) {
      case 64: return launch_for<scalar_t, 64>(p, use_mma, num_seqs, num_heads, max_query_len, stream);
      case 80: return launch_for<scalar_t, 80>(p, use_mma, num_seqs, num_heads, max_query_len, stream);
      case 96: return launch_for<scalar_t, 96>(p, use_mma, num_seqs, num_heads, max_query_len, stream);
      case 128: return launch_for<scalar_t, 128>(p, use_mma, num_seqs, num_heads, max_query_len, stream);
      case 256: return launch_for<scalar_t, 256>(p, use_mma, num_seqs, num_heads, max_query_len, stream);
      default: return cudaErrorInvalidValue;
    }
  });
}

}  // namespace pagedllm::cuda
