// Paged decode attention on CUDA (torch-free: raw pointers, sizes, a launcher).
//
// Design
// - One CTA per (sequence, kv head, group chunk, partition). The CTA's query heads are the GQA
//   group of its kv head (up to G = 1/2/4/8 of them, the template bucket; groups larger than 8 take
//   several group chunks), so every K/V row is read from memory once for all of them.
// - The KV cache is [num_blocks, num_kv_heads, block_size, head_size]: the rows of one
//   (block, kv head) are one contiguous chunk, so a tile of R rows is R * head_size contiguous
//   elements, copied with 16-byte cp.async into shared memory (lanes take consecutive 16-byte
//   pieces: fully coalesced, no register cost for the bytes in flight).
// - Each of the 4 warps owns a 2-stage cp.async pipeline and the tiles k = warp, warp + 4, ... of
//   the CTA's key range; warps keep their own online-softmax state (no CTA barrier in the main
//   loop) and are merged through shared memory at the end.
// - Inside a warp, L lanes share a row (L = head_size / 8 for 16-bit types, rounded up to a power
//   of two); each lane holds its 8 dims of every query head in registers, so a row's dot products
//   are 8 FMAs per head per lane plus a log2(L)-step shuffle reduction.
// - Online softmax in fp32 in the log2 domain: queries are prescaled by scale * log2(e) and every
//   exponential is one ex2.approx.
// - Split-KV (flash-decoding) when (sequence, kv head) pairs alone cannot fill the GPU: each
//   partition writes an unnormalized fp32 partial output, its max and its sum to a workspace and
//   paged_attention_reduce_kernel merges them. Otherwise one pass writes `out` directly.
// - Keys outside [window start, seq_len) are never read: their 16-byte copies are zero-fills
//   (cp.async src-size 0) and their scores are -inf.
#include "cuda/attention_decode_kernels.h"
#include "cuda/launch.cuh"
#include "cuda/ptx.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"

namespace pagedllm::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kStages = 2;          // per-warp cp.async pipeline depth
constexpr int kMaxTileBytes = 4096;  // per K (and per V) tile and stage
constexpr int kMaxTileRows = 16;     // <= the smallest block size: a tile never crosses a block
// A partition covers at least this many keys: shorter ones would spend more on the pipeline fill
// and on the workspace round trip (G * (head_size + 2) floats) than on streaming KV.
constexpr int kMinPartitionTokens = 256;
constexpr int kReduceThreads = 256;
constexpr int kMaxDevices = 64;
constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFullMask = 0xffffffffu;

constexpr int pow2_ceil(int x) { int p = 1; while (p < x) p *= 2; return p; }
constexpr int pow2_floor(int x) { int p = 1; while (p * 2 <= x) p *= 2; return p; }
constexpr int cmin(int a, int b) { return a < b ? a : b; }
constexpr int cmax(int a, int b) { return a > b ? a : b; }

// Compile-time geometry of one (dtype, head size, group bucket) instantiation.
template <typename T, int D, int G>
struct Traits {
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));      // elements per 16-byte vector
  static constexpr int kVecsPerRow = D / kElems;                        // 16-byte vectors in a row
  static constexpr int kLanesPerRow = cmin(32, pow2_ceil(kVecsPerRow));  // lanes sharing a row
  static constexpr int kVecsPerLane = (kVecsPerRow + kLanesPerRow - 1) / kLanesPerRow;
  static constexpr int kRowsPerStep = 32 / kLanesPerRow;  // rows a warp works on at once
  static constexpr int kTileRows =
      cmin(kMaxTileRows, pow2_floor(kMaxTileBytes / (D * static_cast<int>(sizeof(T)))));
  static constexpr int kSteps = kTileRows / kRowsPerStep;  // row steps per tile
  // Row steps between two online-softmax updates (each update rescales the accumulators): the
  // buffered scores take kStepsPerUpdate * G registers, 16 up to G = 4 (keeps G = 4 within the
  // 168 registers of 3 CTAs per SM), 32 for G = 8.
  static constexpr int kStepsPerUpdate = cmin(kSteps, cmax(4, 16 / G));
  static constexpr int kTileElems = kTileRows * D;
  static constexpr int kTileChunks = kTileRows * kVecsPerRow;  // 16-byte pieces per tile
  static constexpr int kChunksPerLane = (kTileChunks + 31) / 32;
  static constexpr int kPipelineBytes = kWarps * kStages * 2 * kTileElems * static_cast<int>(sizeof(T));
  static constexpr int kMergeBytes = kWarps * G * (D + 2) * static_cast<int>(sizeof(float));
  static constexpr int kSmemBytes = cmax(kPipelineBytes, kMergeBytes);

  static_assert(D % kElems == 0, "head size must be a multiple of the vector width");
  static_assert(kVecsPerRow <= 32 || kVecsPerRow % 32 == 0, "row must split evenly over 32 lanes");
  static_assert(kTileRows >= kRowsPerStep && kTileRows % kRowsPerStep == 0, "tile rows");
  static_assert(kSteps % kStepsPerUpdate == 0, "update granularity");
  static_assert((kTileElems * sizeof(T)) % 16 == 0, "stage buffers stay 16-byte aligned");
};

// Kernel arguments that are not pointers (passed by value).
struct KernelArgs {
  int num_heads, num_kv_heads, group, group_chunks;
  int block_size;
  int max_len;  // max_blocks_per_seq * block_size: seq_lens are clamped to it (never read past the table)
  int partition_size, num_partitions, sliding_window;
  int64_t q_stride_seq, q_stride_head, out_stride_seq, out_stride_head, bt_stride_seq;
  float q_scale;  // softmax scale * log2(e)
};

// This lane's part of one row in shared memory, as floats: vectors lane_in_row + j * L.
template <typename Tr, typename T>
__device__ __forceinline__ void load_row(const T* row, int lane_in_row,
                                         float (&f)[Tr::kVecsPerLane][Tr::kElems]) {
#pragma unroll
  for (int j = 0; j < Tr::kVecsPerLane; ++j) {
    const int v = lane_in_row + j * Tr::kLanesPerRow;
    if (Tr::kVecsPerRow % Tr::kLanesPerRow == 0 || v < Tr::kVecsPerRow) {
      Vec16<T>::load(row + v * Tr::kElems).to_floats(f[j]);
    } else {
#pragma unroll
      for (int e = 0; e < Tr::kElems; ++e) f[j][e] = 0.f;  // padding lane (head size 80, 96)
    }
  }
}

// Resident CTAs per SM the register allocation must allow: 3 (12 warps, 3 x 64 KiB of pipeline
// shared memory) up to G = 4; G = 8 needs ~255 registers per thread, so 2.
template <int G>
constexpr int min_ctas_per_sm() { return G <= 4 ? 3 : 2; }

// grid (num_seqs, num_kv_heads * group_chunks, num_partitions), block kThreads,
// dynamic shared memory Traits::kSmemBytes.
// ptxas (sm_90, CUDA 13.0): registers per thread; 0 spills and 1 barrier in every instantiation.
//   dtype      D      G=1    G=2      G=4      G=8      dynamic smem (4 warps x 2 stages x K+V tile)
//   bf16/fp16  64     86     101-105  152      239      32 KiB
//   bf16/fp16  80     94     120      154-162  255      40 KiB
//   bf16/fp16  96     94     115-126  155-162  255      48 KiB
//   bf16/fp16  128    80     128      163-168  255      64 KiB
//   bf16/fp16  256    85     108-110  167-168  252-254  64 KiB
//   fp32       64     93     115      153      233      64 KiB
//   fp32       80/96  94-96  95-96    149      232-233  40/48 KiB
//   fp32       128    86     109      146      231      64 KiB
//   fp32       256    95     111      164      254      64 KiB
// Claims checked against the sm_90 cubin by tests/kernels/test_sass.py (format: tests/kernels/cubin_inspect.py):
// occupancy(sm_90) if G <= 4: >= 3 CTAs/SM of 128 threads with 65536 B dynamic smem
// occupancy(sm_90) if G == 8: >= 2 CTAs/SM of 128 threads with 65536 B dynamic smem
// sass(sm_90) if all: LDGSTS.E.BYPASS.128
template <typename T, int D, int G>
__global__ void __launch_bounds__(kThreads, min_ctas_per_sm<G>()) paged_attention_decode_kernel(
    T* __restrict__ out,                       // [num_seqs, num_heads, D] (strided); one pass only
    float* __restrict__ tmp_out,               // [num_seqs, num_heads, num_partitions, D]; split only
    float* __restrict__ max_logits,            // [num_seqs, num_heads, num_partitions]; split only
    float* __restrict__ exp_sums,              // [num_seqs, num_heads, num_partitions]; split only
    const T* __restrict__ query,               // [num_seqs, num_heads, D] (strided)
    const T* __restrict__ key_cache,           // [num_blocks, num_kv_heads, block_size, D]
    const T* __restrict__ value_cache,         // [num_blocks, num_kv_heads, block_size, D]
    const int32_t* __restrict__ block_tables,  // [num_seqs, max_blocks_per_seq] (row stride)
    const int32_t* __restrict__ seq_lens,      // [num_seqs]
    const KernelArgs a) {
  using Tr = Traits<T, D, G>;
  constexpr int E = Tr::kElems, VPR = Tr::kVecsPerRow, L = Tr::kLanesPerRow, NV = Tr::kVecsPerLane;
  constexpr int RPS = Tr::kRowsPerStep, R = Tr::kTileRows, STEPS = Tr::kSteps, SPU = Tr::kStepsPerUpdate;

  PAGEDLLM_DYNAMIC_SMEM(smem);

  const int seq = blockIdx.x;
  const int kv_head = blockIdx.y / a.group_chunks;
  const int chunk = blockIdx.y - kv_head * a.group_chunks;
  const int z = blockIdx.z;
  const int h0 = kv_head * a.group + chunk * G;      // first query head of this CTA
  const int gcount = min(G, a.group - chunk * G);    // query heads this CTA computes (<= G)
  const bool split = a.num_partitions > 1;

  // Visible keys [start, end): the query sits at end - 1.
  const int end = min(max(seq_lens[seq], 0), a.max_len);
  const int start = a.sliding_window > 0 ? max(0, end - a.sliding_window) : 0;
  if (end <= start) {  // padding row (seq_len 0): zeros; with split-KV the reduction writes them
    if (!split) {
      for (int i = threadIdx.x; i < gcount * D; i += kThreads) {
        const int g = i / D, d = i - g * D;
        out[seq * a.out_stride_seq + (h0 + g) * a.out_stride_head + d] = from_float<T>(0.f);
      }
    }
    return;
  }
  // Partition z of this sequence counts from the partition holding `start` (the reduction
  // kernel counts the same way). One pass: partition_size >= max_len, so part = 0.
  const int part = start / a.partition_size + z;
  const int t0 = max(part * a.partition_size, start);
  const int t1 = min(part * a.partition_size + a.partition_size, end);
  if (t0 >= t1) return;  // the sequence has fewer partitions than the grid: slot never read back

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row_in_step = lane / L;  // which of the step's RPS rows this lane works on
  const int lane_in_row = lane % L;

  // The group's queries, this lane's dims only, prescaled into the log2 domain.
  float q[G][NV][E];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const T* qg = query + seq * a.q_stride_seq + (h0 + g) * a.q_stride_head;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int v = lane_in_row + j * L;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        q[g][j][e] = (g < gcount && v < VPR) ? to_float(qg[v * E + e]) * a.q_scale : 0.f;
      }
    }
  }

  // Per-warp online-softmax state: max (log2 domain, warp-uniform), this lane's share of the sum
  // (its row of each step) and of the unnormalized output (its row, its dims).
  float m[G], l[G], acc[G][NV][E];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
#pragma unroll
      for (int e = 0; e < E; ++e) acc[g][j][e] = 0.f;
    }
  }

  // Tiles of R rows at absolute positions k * R, k in [k_first, k_last]; warp w takes
  // k_first + w, k_first + w + kWarps, ... Every tile intersects [t0, t1).
  const int k_first = t0 / R, k_last = (t1 - 1) / R;
  const int my_tiles = (k_last - k_first >= warp) ? (k_last - k_first - warp) / kWarps + 1 : 0;
  T* const stages = reinterpret_cast<T*>(smem) + warp * (kStages * 2 * Tr::kTileElems);
  const int32_t* bt = block_tables + seq * a.bt_stride_seq;
  const int64_t head_offset = static_cast<int64_t>(kv_head) * a.block_size * D;
  const int64_t block_stride = static_cast<int64_t>(a.num_kv_heads) * a.block_size * D;

  // Block ids of this warp's tiles cache_base .. cache_base + 31, one per lane.
  int blk_cache = 0, cache_base = -32;

  auto issue = [&](int i) {  // warp-uniform: start copying the warp's i-th tile into stage i % kStages
    if (i >= cache_base + 32) {
      cache_base = i;
      const int t = i + lane;
      blk_cache = t < my_tiles ? bt[((k_first + warp + t * kWarps) * R) / a.block_size] : 0;
    }
    const int blk = __shfl_sync(kFullMask, blk_cache, i - cache_base);
    const int pos0 = (k_first + warp + i * kWarps) * R;
    const int64_t off = blk * block_stride + head_offset + static_cast<int64_t>(pos0 % a.block_size) * D;
    const T* ksrc = key_cache + off;
    const T* vsrc = value_cache + off;
    T* kdst = stages + (2 * (i % kStages)) * Tr::kTileElems;
    T* vdst = kdst + Tr::kTileElems;
#pragma unroll
    for (int c0 = 0; c0 < Tr::kChunksPerLane; ++c0) {
      const int c = c0 * 32 + lane;
      if (Tr::kTileChunks % 32 == 0 || c < Tr::kTileChunks) {
        const int pos = pos0 + c / VPR;
        const bool valid = pos >= t0 && pos < t1;
        cp_async_16(kdst + c * E, ksrc + c * E, valid);
        cp_async_16(vdst + c * E, vsrc + c * E, valid);
      }
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < my_tiles) issue(s);
    cp_async_commit();  // (possibly empty) group s
  }
  for (int i = 0; i < my_tiles; ++i) {
    if (i + kStages - 1 < my_tiles) issue(i + kStages - 1);
    cp_async_commit();               // group i + kStages - 1
    cp_async_wait<kStages - 1>();    // groups 0..i have landed (this lane's copies)
    __syncwarp();                    // ... and every lane's copies are visible to the warp

    const T* ks = stages + (2 * (i % kStages)) * Tr::kTileElems;
    const T* vs = ks + Tr::kTileElems;
    const int pos0 = (k_first + warp + i * kWarps) * R;
#pragma unroll
    for (int s0 = 0; s0 < STEPS; s0 += SPU) {
      // Scores of SPU row steps (this lane's row in each), log2 domain, -inf outside [t0, t1).
      float sc[SPU][G];
#pragma unroll
      for (int it = 0; it < SPU; ++it) {
        const int r = (s0 + it) * RPS + row_in_step;
        float kf[NV][E];
        load_row<Tr>(ks + r * D, lane_in_row, kf);
        const bool valid = pos0 + r >= t0 && pos0 + r < t1;
#pragma unroll
        for (int g = 0; g < G; ++g) {
          float d = 0.f;
#pragma unroll
          for (int j = 0; j < NV; ++j) {
#pragma unroll
            for (int e = 0; e < E; ++e) d = fmaf(q[g][j][e], kf[j][e], d);
          }
          d = group_sum<L>(d);  // all L lanes of the row get the full dot product
          sc[it][g] = valid ? d : -INFINITY;
        }
      }
      // Online softmax update over these SPU * RPS rows.
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float mt = sc[0][g];
#pragma unroll
        for (int it = 1; it < SPU; ++it) mt = fmaxf(mt, sc[it][g]);
#pragma unroll
        for (int off = L; off < 32; off <<= 1) mt = fmaxf(mt, __shfl_xor_sync(kFullMask, mt, off));
        const float m_new = fmaxf(m[g], mt);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;  // all rows so far masked: avoid inf - inf
        const float corr = fast_exp2(m[g] - m_use);
        m[g] = m_new;
        float psum = 0.f;
#pragma unroll
        for (int it = 0; it < SPU; ++it) {
          sc[it][g] = fast_exp2(sc[it][g] - m_use);
          psum += sc[it][g];
        }
        l[g] = l[g] * corr + psum;
#pragma unroll
        for (int j = 0; j < NV; ++j) {
#pragma unroll
          for (int e = 0; e < E; ++e) acc[g][j][e] *= corr;
        }
      }
#pragma unroll
      for (int it = 0; it < SPU; ++it) {
        const int r = (s0 + it) * RPS + row_in_step;
        float vf[NV][E];
        load_row<Tr>(vs + r * D, lane_in_row, vf);  // masked rows were zero-filled
#pragma unroll
        for (int g = 0; g < G; ++g) {
#pragma unroll
          for (int j = 0; j < NV; ++j) {
#pragma unroll
            for (int e = 0; e < E; ++e) acc[g][j][e] = fmaf(sc[it][g], vf[j][e], acc[g][j][e]);
          }
        }
      }
    }
    __syncwarp();  // every lane is done with this stage before the next iteration refills it
  }

  // Sum the warp's rows (lanes with the same lane_in_row); m is already warp-uniform.
#pragma unroll
  for (int off = L; off < 32; off <<= 1) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      l[g] += __shfl_xor_sync(kFullMask, l[g], off);
#pragma unroll
      for (int j = 0; j < NV; ++j) {
#pragma unroll
        for (int e = 0; e < E; ++e) acc[g][j][e] += __shfl_xor_sync(kFullMask, acc[g][j][e], off);
      }
    }
  }

  // Merge the warps through shared memory (reusing the pipeline buffers).
  cp_async_wait_all();
  __syncthreads();
  float* red_acc = reinterpret_cast<float*>(smem);  // [kWarps][G][D]
  float* red_m = red_acc + kWarps * G * D;         // [kWarps][G]
  float* red_l = red_m + kWarps * G;               // [kWarps][G]
  if (row_in_step == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int v = lane_in_row + j * L;
        if (v < VPR) {
#pragma unroll
          for (int e = 0; e < E; ++e) red_acc[(warp * G + g) * D + v * E + e] = acc[g][j][e];
        }
      }
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      red_m[warp * G + g] = m[g];
      red_l[warp * G + g] = l[g];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < gcount * D; i += kThreads) {
    const int g = i / D, d = i - g * D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, red_m[w * G + g]);
    const float M_use = M == -INFINITY ? 0.f : M;
    float sum = 0.f, o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = fast_exp2(red_m[w * G + g] - M_use);  // 0 for a warp without tiles
      sum += red_l[w * G + g] * f;
      o += red_acc[(w * G + g) * D + d] * f;
    }
    if (!split) {
      out[seq * a.out_stride_seq + (h0 + g) * a.out_stride_head + d] = from_float<T>(sum > 0.f ? o / sum : 0.f);
    } else {
      const int64_t slot = (static_cast<int64_t>(seq) * a.num_heads + h0 + g) * a.num_partitions + z;
      tmp_out[slot * D + d] = o;
      if (d == 0) {
        max_logits[slot] = M;
        exp_sums[slot] = sum;
      }
    }
  }
}

// Split-KV merge: out = sum_p tmp_out_p 2^(m_p - M) / sum_p exp_sums_p 2^(m_p - M).
// grid (num_seqs, num_heads), block kReduceThreads: threads = (partition lane, float4 column);
// the partitions are weighted in chunks of kReduceThreads staged in shared memory.
// ptxas (sm_90): 54 registers, no spills, 5248 bytes static shared memory (all dtypes).
// Claims checked against the sm_90 cubin by tests/kernels/test_sass.py (format: tests/kernels/cubin_inspect.py):
// occupancy(sm_90) if all: >= 4 CTAs/SM of 256 threads with 0 B dynamic smem
// sass(sm_90) if all: LDG.E.128
template <typename T>
__global__ void __launch_bounds__(kReduceThreads) paged_attention_reduce_kernel(
    T* __restrict__ out,                  // [num_seqs, num_heads, head_size] (strided)
    const float* __restrict__ tmp_out,    // [num_seqs, num_heads, num_partitions, head_size]
    const float* __restrict__ max_logits, // [num_seqs, num_heads, num_partitions]
    const float* __restrict__ exp_sums,   // [num_seqs, num_heads, num_partitions]
    const int32_t* __restrict__ seq_lens, // [num_seqs]
    const int head_size, const KernelArgs a) {
  __shared__ float scratch[32];
  __shared__ float weight[kReduceThreads];
  __shared__ float4 partial[kReduceThreads];
  const int seq = blockIdx.x, head = blockIdx.y, tid = threadIdx.x;
  T* o = out + seq * a.out_stride_seq + head * a.out_stride_head;

  const int end = min(max(seq_lens[seq], 0), a.max_len);
  const int start = a.sliding_window > 0 ? max(0, end - a.sliding_window) : 0;
  if (end <= start) {  // padding row
    for (int d = tid; d < head_size; d += kReduceThreads) o[d] = from_float<T>(0.f);
    return;
  }
  // The partitions the main kernel wrote for this sequence (same counting as there).
  const int n = min((end - 1) / a.partition_size - start / a.partition_size + 1, a.num_partitions);
  const int64_t base = (static_cast<int64_t>(seq) * a.num_heads + head) * a.num_partitions;

  float mloc = -INFINITY;
  for (int p = tid; p < n; p += kReduceThreads) mloc = fmaxf(mloc, max_logits[base + p]);
  const float M = block_max(mloc, scratch);
  const float M_use = M == -INFINITY ? 0.f : M;

  const int cols = head_size / 4;            // float4 columns of a row
  const int rows = kReduceThreads / cols;    // partitions summed in parallel
  const int col = tid % cols, row = tid / cols;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  float lsum = 0.f;
  for (int p0 = 0; p0 < n; p0 += kReduceThreads) {
    const int cnt = min(kReduceThreads, n - p0);
    __syncthreads();  // the previous chunk's weights are consumed
    if (tid < cnt) {
      const float f = fast_exp2(max_logits[base + p0 + tid] - M_use);
      weight[tid] = f;
      lsum += f * exp_sums[base + p0 + tid];
    }
    __syncthreads();
    if (row < rows) {
#pragma unroll 4
      for (int p = row; p < cnt; p += rows) {
        const float f = weight[p];
        const float4 v = reinterpret_cast<const float4*>(tmp_out + (base + p0 + p) * head_size)[col];
        acc.x = fmaf(f, v.x, acc.x);
        acc.y = fmaf(f, v.y, acc.y);
        acc.z = fmaf(f, v.z, acc.z);
        acc.w = fmaf(f, v.w, acc.w);
      }
    }
  }
  const float total = block_sum(lsum, scratch);
  if (row < rows) partial[row * cols + col] = acc;
  __syncthreads();
  if (tid < cols) {
    float4 s = partial[tid];
    for (int r = 1; r < rows; ++r) {
      const float4 v = partial[r * cols + tid];
      s.x += v.x;
      s.y += v.y;
      s.z += v.z;
      s.w += v.w;
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
    o[4 * tid + 0] = from_float<T>(s.x * inv);
    o[4 * tid + 1] = from_float<T>(s.y * inv);
    o[4 * tid + 2] = from_float<T>(s.z * inv);
    o[4 * tid + 3] = from_float<T>(s.w * inv);
  }
}

int group_bucket(int group) { return group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8; }

cudaError_t sm_count(int device, int* count) {
  static std::atomic<int> cache[kMaxDevices];
  if (device < kMaxDevices && (*count = cache[device].load(std::memory_order_relaxed)) > 0) return cudaSuccess;
  const cudaError_t err = cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess && device < kMaxDevices) cache[device].store(*count, std::memory_order_relaxed);
  return err;
}

template <typename T, int D, int G>
struct DecodeKernel {
  using Tr = Traits<T, D, G>;
  static constexpr auto kernel = paged_attention_decode_kernel<T, D, G>;

  // Dynamic shared memory above 48 KiB must be opted into, once per device.
  static cudaError_t configure(int device) {
    static std::atomic<uint64_t> done{0};
    const uint64_t bit = device < kMaxDevices ? (uint64_t{1} << device) : 0;
    if (bit != 0 && (done.load(std::memory_order_relaxed) & bit) != 0) return cudaSuccess;
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
    if (err == cudaSuccess) done.fetch_or(bit, std::memory_order_relaxed);
    return err;
  }

  // Resident CTAs per SM (registers and shared memory decide it), once per device.
  static cudaError_t ctas_per_sm(int device, int* n) {
    static std::atomic<int> cache[kMaxDevices];
    if (device < kMaxDevices && (*n = cache[device].load(std::memory_order_relaxed)) > 0) return cudaSuccess;
    cudaError_t err = configure(device);
    if (err != cudaSuccess) return err;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, kernel, kThreads, Tr::kSmemBytes);
    if (err != cudaSuccess) return err;
    if (*n < 1) *n = 1;
    if (device < kMaxDevices) cache[device].store(*n, std::memory_order_relaxed);
    return cudaSuccess;
  }
};

// Split heuristic. ctas = (sequence, kv head, group chunk) CTAs of one pass; slots = CTAs the GPU
// holds at once (SMs x occupancy). When ctas >= slots every SM is already busy and one pass is
// best (no workspace round trip, no second kernel). Otherwise cut each sequence's context into
// at most slots / ctas partitions, so that the grid is at most one full wave (a wave and a bit
// would leave a nearly idle tail): batch 1 with a long context then streams on every SM. Each
// partition is at least kMinPartitionTokens long and a multiple of `unit` (block aligned, and a
// whole number of tile rounds of the CTA's warps). The host does not know the sequence lengths
// (that would need a device sync), so it sizes by the block table width.
PagedAttentionPlan make_plan(const PagedAttentionParams& p, int group_chunks, int unit, int64_t slots) {
  auto round_up = [](int64_t x, int64_t m) { return (x + m - 1) / m * m; };
  const int64_t max_len = std::max<int64_t>(static_cast<int64_t>(p.max_blocks_per_seq) * p.block_size, 1);
  const PagedAttentionPlan one_pass{static_cast<int>(round_up(max_len, unit)), 1};
  const int64_t ctas = static_cast<int64_t>(p.num_seqs) * p.num_kv_heads * group_chunks;
  const int64_t span = p.sliding_window > 0 ? std::min<int64_t>(max_len, p.sliding_window) : max_len;
  if (ctas >= slots || span <= kMinPartitionTokens) return one_pass;
  const int64_t splits = std::min(slots / ctas, (span + kMinPartitionTokens - 1) / kMinPartitionTokens);
  if (splits <= 1) return one_pass;
  int64_t size = round_up((span + splits - 1) / splits, unit);
  for (;;) {
    int64_t parts = (max_len + size - 1) / size;
    // A window of W keys touches at most ceil((W - 1) / size) + 1 partitions.
    if (p.sliding_window > 0) parts = std::min<int64_t>(parts, (p.sliding_window - 1 + size - 1) / size + 1);
    if (parts <= 1) return one_pass;
    if (parts <= 65535) return {static_cast<int>(size), static_cast<int>(parts)};  // grid z limit
    size *= 2;
  }
}

KernelArgs kernel_args(const PagedAttentionParams& p, const PagedAttentionPlan& plan, int group_chunks) {
  KernelArgs a;
  a.num_heads = p.num_heads;
  a.num_kv_heads = p.num_kv_heads;
  a.group = p.num_heads / p.num_kv_heads;
  a.group_chunks = group_chunks;
  a.block_size = p.block_size;
  a.max_len = p.max_blocks_per_seq * p.block_size;
  a.partition_size = plan.partition_size;
  a.num_partitions = plan.num_partitions;
  a.sliding_window = p.sliding_window;
  a.q_stride_seq = p.q_stride_seq;
  a.q_stride_head = p.q_stride_head;
  a.out_stride_seq = p.out_stride_seq;
  a.out_stride_head = p.out_stride_head;
  a.bt_stride_seq = p.bt_stride_seq;
  a.q_scale = p.scale * kLog2e;
  return a;
}

struct PlanFn {
  const PagedAttentionParams& p;
  PagedAttentionPlan* plan;

  template <typename T, int D, int G>
  cudaError_t run() const {
    using Tr = Traits<T, D, G>;
    int device = 0, sms = 0, occupancy = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = sm_count(device, &sms);
    if (err == cudaSuccess) err = DecodeKernel<T, D, G>::ctas_per_sm(device, &occupancy);
    if (err != cudaSuccess) return err;
    const int group = p.num_heads / p.num_kv_heads;
    const int group_chunks = (group + G - 1) / G;
    const int unit = std::max(p.block_size, kWarps * Tr::kTileRows);
    *plan = make_plan(p, group_chunks, unit, static_cast<int64_t>(sms) * occupancy);
    return cudaSuccess;
  }
};

struct LaunchFn {
  void* out;
  const void* query;
  const void* key_cache;
  const void* value_cache;
  const int32_t* block_tables;
  const int32_t* seq_lens;
  float* tmp_out;
  float* max_logits;
  float* exp_sums;
  const PagedAttentionParams& p;
  const PagedAttentionPlan& plan;
  cudaStream_t stream;

  template <typename T, int D, int G>
  cudaError_t run() const {
    using Tr = Traits<T, D, G>;
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = DecodeKernel<T, D, G>::configure(device);
    if (err != cudaSuccess) return err;
    const int group = p.num_heads / p.num_kv_heads;
    const int group_chunks = (group + G - 1) / G;
    const KernelArgs a = kernel_args(p, plan, group_chunks);
    const bool split = plan.num_partitions > 1;
    if (split && (tmp_out == nullptr || max_logits == nullptr || exp_sums == nullptr)) return cudaErrorInvalidValue;
    const dim3 grid(p.num_seqs, p.num_kv_heads * group_chunks, plan.num_partitions);
    PAGEDLLM_LAUNCH(grid, kThreads, Tr::kSmemBytes, stream, paged_attention_decode_kernel<T, D, G>)(
        static_cast<T*>(out), tmp_out, max_logits, exp_sums, static_cast<const T*>(query),
        static_cast<const T*>(key_cache), static_cast<const T*>(value_cache), block_tables, seq_lens, a);
    err = cudaGetLastError();
    if (err != cudaSuccess || !split) return err;
    PAGEDLLM_LAUNCH(dim3(p.num_seqs, p.num_heads), kReduceThreads, 0, stream, paged_attention_reduce_kernel<T>)(
        static_cast<T*>(out), tmp_out, max_logits, exp_sums, seq_lens, D, a);
    return cudaGetLastError();
  }
};

template <typename T, int D, typename F>
cudaError_t dispatch_group(int bucket, const F& f) {
  switch (bucket) {
    case 1: return f.template run<T, D, 1>();
    case 2: return f.template run<T, D, 2>();
    case 4: return f.template run<T, D, 4>();
    default: return f.template run<T, D, 8>();
  }
}

template <typename F>
cudaError_t dispatch(DType dtype, int head_size, int group, const F& f) {
  const int bucket = group_bucket(group);
  return PAGEDLLM_CUDA_DISPATCH_DTYPE(dtype, [&]() -> cudaError_t {
    switch (head_size) {
      case 64: return dispatch_group<scalar_t, 64>(bucket, f);
      case 80: return dispatch_group<scalar_t, 80>(bucket, f);
      case 96: return dispatch_group<scalar_t, 96>(bucket, f);
      case 128: return dispatch_group<scalar_t, 128>(bucket, f);
      case 256: return dispatch_group<scalar_t, 256>(bucket, f);
      default: return cudaErrorInvalidValue;  // the host launcher reports "Unsupported head size"
    }
  });
}

bool valid_params(const PagedAttentionParams& p) {
  return p.num_seqs > 0 && p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0 &&
         (p.block_size == 16 || p.block_size == 32) && p.max_blocks_per_seq >= 0;
}

}  // namespace

cudaError_t plan_paged_attention(DType dtype, const PagedAttentionParams& p, PagedAttentionPlan* plan) {
  if (!valid_params(p)) return cudaErrorInvalidValue;
  return dispatch(dtype, p.head_size, p.num_heads / p.num_kv_heads, PlanFn{p, plan});
}

cudaError_t launch_paged_attention(DType dtype, void* out, const void* query, const void* key_cache,
                                   const void* value_cache, const int32_t* block_tables,
                                   const int32_t* seq_lens, float* tmp_out, float* max_logits,
                                   float* exp_sums, const PagedAttentionParams& p,
                                   const PagedAttentionPlan& plan, cudaStream_t stream) {
  if (!valid_params(p) || plan.partition_size <= 0 || plan.num_partitions < 1) return cudaErrorInvalidValue;
  return dispatch(dtype, p.head_size, p.num_heads / p.num_kv_heads,
                  LaunchFn{out, query, key_cache, value_cache, block_tables, seq_lens, tmp_out, max_logits,
                           exp_sums, p, plan, stream});
}

}  // namespace pagedllm::cuda
