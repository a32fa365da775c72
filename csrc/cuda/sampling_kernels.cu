// sample_tokens on CUDA: one CTA of 1024 threads per row, no sort of the vocabulary.
// Semantics: python/pagedllm/layers/sampler.py (module docstring); Philox: csrc/common/philox.h.
//
// The kernel works on e = exp(x - M), x = logit / temperature, M = max x: unnormalized
// probabilities with max e = 1 exactly, so min_p is the threshold e >= min_p and every filter is a
// threshold on e. For e in [0, 1] the float bits ("key") order like the value and key >> 20 < 1024,
// so a 1024-bin histogram on the top key bits (8 exponent bits, 3 mantissa bits: bins 12.5% wide)
// locates any order statistic or mass quantile to one bin.
//
// Passes over the row (each one read of the logits, 16-byte loads; e is recomputed, never stored):
//   1. M, S = sum e (online softmax) and the first index of the max.
//   2. (any filter on) count and mass of e >= min_p, the histogram of their counts (32-bit
//      shared atomics only), and when min_p > 0 the candidates e >= min_p themselves into
//      shared memory (up to kCap).
//   3. when pass 2 could not keep every candidate: the bin of the k-th largest, or for top_p the
//      highest bin whose mass lower bound (count * bin's lower edge) at and above reaches the
//      target, bounds the kept set from below; if at most kCap elements lie above that bound,
//      one ordered compaction pass copies them to shared memory. Otherwise histogram passes
//      refine to the exact threshold key (a level-1 mass pass for top_p, then 12 + 8 more
//      bits), with masses in 32.32 fixed point: exact, run-to-run deterministic sums.
//   4. the draw: in shared memory (candidates in vocabulary order: a block-wide prefix sum) or,
//      for a large kept set, one more pass of block-wide prefix sums over tiles of 8192 logits
//      that stops at the tile holding u * W.
// In shared memory everything is exact: the candidates are sorted (bitonic, <= 4096 values), the
// k-th largest read off, the top_p prefix found by a block scan, the draw done by a block scan.
// Typical cost: 2 passes with min_p (the candidates come out of pass 2), 3 otherwise.
// An optional token bitmask (structured outputs) is applied inside Row::load, so every pass reads
// a forbidden token as a -inf logit (e = 0): no separate pass over the logits, and greedy, the
// degenerate fallback and every draw skip it.
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>

#include "common/philox.h"
#include "cuda/reduce.cuh"
#include "cuda/sampling_kernels.h"
#include "cuda/launch.cuh"
#include "cuda/vec.cuh"

namespace pagedllm::cuda {
namespace {

constexpr int kThreads = 1024;                // one CTA per row: enough loads in flight for one SM
constexpr int kWarps = kThreads / 32;
constexpr int kPerThread = 8;                 // logits per thread per tile: two 16-byte loads
constexpr int kTile = kThreads * kPerThread;  // 8192 logits per block-wide step
constexpr int kL1Bins = 1024;                 // key >> 20 (e <= 1: at most 0x3F8)
constexpr int kL2Bins = 4096;                 // (key >> 8) & 0xFFF
constexpr int kL3Bins = 256;                  // key & 0xFF
constexpr int kCap = 4096;                    // candidates held in shared memory
constexpr int kCapPerThread = kCap / kThreads;
constexpr float kGreedyTemperature = 1e-5f;
constexpr double kFixedScale = 4294967296.0;  // masses in 32.32 fixed point (e <= 1: < 2^33 each)

static_assert(kL1Bins == kThreads, "pass 2 zeroes one level-1 bin per thread");
static_assert(kCap % kThreads == 0 && kL2Bins % kThreads == 0, "per-thread chunks");

using u64 = unsigned long long;

// Dynamic shared memory (63 KiB: above the 48 KiB static limit, hence the attribute at launch).
struct SampleSmem {
  uint32_t h1_count[kL1Bins];  // level-1 histogram of e >= min_p (pass 2: 32-bit atomics only)
  union {
    struct {                   // candidates: e, vocabulary index, and e sorted descending
      float e[kCap];
      int32_t idx[kCap];
      float sorted[kCap];
    } cand;
    struct {                   // exact mass histograms of the large-kept-set path (no candidates then)
      u64 h1_mass[kL1Bins];
      uint32_t h2_count[kL2Bins];
      u64 h2_mass[kL2Bins];
      uint32_t h3_count[kL3Bins];
      u64 h3_mass[kL3Bins];
    } sel;
  };
};

struct Scratch {
  float f[kWarps];
  uint32_t u[kWarps];
  u64 q[kWarps];
  float m[kWarps], s[kWarps];
  int i[kWarps];
  int pick, pick_low, sel, last;
  uint32_t above_count, bin_count, ncand;
  u64 above_mass, bin_mass;
};

__device__ __forceinline__ u64 to_fixed(float e) { return __double2ull_rn(static_cast<double>(e) * kFixedScale); }
__device__ __forceinline__ double from_fixed(u64 m) { return static_cast<double>(m) / kFixedScale; }
__device__ __forceinline__ float key_float(uint32_t key) { return __uint_as_float(key); }

// One row of logits and what pass 1 learnt about it.
struct Row {
  const float* p;     // [vocab]
  int vocab;
  bool vec;           // 16-byte aligned: vector loads
  float temperature;
  float max_x;
  const int32_t* mask;  // [ceil(vocab / 32)] bit set = allowed; nullptr: no mask

  // Logits [base, base + kPerThread) (base is a multiple of kPerThread); -inf past the vocab and
  // where the mask forbids the token.
  __device__ __forceinline__ void load(int base, float (&v)[kPerThread]) const {
    load_logits(base, v);
    if (mask != nullptr) {
      static_assert(32 % kPerThread == 0, "a thread's logits share one mask word");
      const uint32_t bits = base < vocab ? static_cast<uint32_t>(__ldg(mask + (base >> 5))) >> (base & 31) : 0u;
#pragma unroll
      for (int j = 0; j < kPerThread; ++j)
        if (!((bits >> j) & 1u)) v[j] = -INFINITY;
    }
  }

  __device__ __forceinline__ void load_logits(int base, float (&v)[kPerThread]) const {
    if (vec && base + kPerThread <= vocab) {
      const float4 a = __ldg(reinterpret_cast<const float4*>(p + base));
      const float4 b = __ldg(reinterpret_cast<const float4*>(p + base + 4));
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
      v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) v[j] = base + j < vocab ? __ldg(p + base + j) : -INFINITY;
    }
  }

  // e = exp(logit / temperature - M) in [0, 1]; bit-identical in every pass (same ops, IEEE div).
  __device__ __forceinline__ float e_of(float logit) const {
    const float e = expf(logit / temperature - max_x);
    return fminf(e >= 0.f ? e : 0.f, 1.f);  // NaN -> 0
  }
};

// ---- block-wide helpers (call from all threads; they contain __syncthreads) ----

// Exclusive prefix sum in thread order; `total` gets the block sum (identical in every thread).
template <typename T>
__device__ __forceinline__ T block_exclusive_scan(T v, T* warp_totals, T& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T y = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += y;
  }
  __syncthreads();  // warp_totals may still be read by the previous call
  if (lane == 31) warp_totals[warp] = inc;
  __syncthreads();
  const T w = warp_totals[lane];  // kWarps == 32
  T w_inc = w;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T y = __shfl_up_sync(0xffffffffu, w_inc, o);
    if (lane >= o) w_inc += y;
  }
  total = __shfl_sync(0xffffffffu, w_inc, 31);
  T w_excl = __shfl_up_sync(0xffffffffu, w_inc, 1);
  if (lane == 0) w_excl = T(0);
  const T warp_offset = __shfl_sync(0xffffffffu, w_excl, warp);
  T excl = __shfl_up_sync(0xffffffffu, inc, 1);
  if (lane == 0) excl = T(0);
  return warp_offset + excl;
}

__device__ __forceinline__ uint32_t block_sum_u32(uint32_t v, uint32_t* scratch) {
  uint32_t total;
  block_exclusive_scan<uint32_t>(v, scratch, total);
  return total;
}

// Keeps (m, i) with the larger m, the smaller index on ties.
__device__ __forceinline__ void argmax_merge(float& m, int& i, float om, int oi) {
  if (om > m || (om == m && oi < i)) {
    m = om;
    i = oi;
  }
}

__device__ __forceinline__ void block_argmax(float& m, int& i, Scratch& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) argmax_merge(m, i, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, i, o));
  __syncthreads();
  if (lane == 0) {
    sh.m[warp] = m;
    sh.i[warp] = i;
  }
  __syncthreads();
  m = sh.m[lane];
  i = sh.i[lane];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) argmax_merge(m, i, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, i, o));
}

// Online-softmax merge of (max, sum of exp(x - max), first index of the max). Symmetric, so the
// xor butterflies leave the same bits in every lane.
__device__ __forceinline__ void online_merge(float& m, float& s, int& i, float om, float os, int oi) {
  const float nm = fmaxf(m, om);
  float ns = 0.f;
  if (m != -INFINITY) ns += s * expf(m - nm);
  if (om != -INFINITY) ns += os * expf(om - nm);
  argmax_merge(m, i, om, oi);
  m = nm;
  s = ns;
}

__device__ __forceinline__ void block_online(float& m, float& s, int& i, Scratch& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    online_merge(m, s, i, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o),
                 __shfl_xor_sync(0xffffffffu, i, o));
  __syncthreads();
  if (lane == 0) {
    sh.m[warp] = m;
    sh.s[warp] = s;
    sh.i[warp] = i;
  }
  __syncthreads();
  m = sh.m[lane];
  s = sh.s[lane];
  i = sh.i[lane];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    online_merge(m, s, i, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o),
                 __shfl_xor_sync(0xffffffffu, i, o));
}

// Bitonic sort of a[0, n2) descending (n2 a power of two <= kCap). Ends synchronized.
__device__ void bitonic_sort_desc(float* a, int n2) {
  for (int size = 2; size <= n2; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < n2; i += kThreads) {
        const int j = i ^ stride;
        if (j > i) {  // each pair is handled by its lower index only
          const float x = a[i], y = a[j];
          const bool desc = (i & size) == 0;
          if (desc ? x < y : x > y) {
            a[i] = y;
            a[j] = x;
          }
        }
      }
      __syncthreads();
    }
  }
}

// Bitonic sort of (idx, e) pairs by idx ascending over [0, n2). Ends synchronized.
__device__ void bitonic_sort_by_index(int32_t* idx, float* e, int n2) {
  for (int size = 2; size <= n2; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < n2; i += kThreads) {
        const int j = i ^ stride;
        if (j > i) {
          const int32_t a = idx[i], b = idx[j];
          const bool asc = (i & size) == 0;
          if (asc ? a > b : a < b) {
            idx[i] = b;
            idx[j] = a;
            const float t = e[i];
            e[i] = e[j];
            e[j] = t;
          }
        }
      }
      __syncthreads();
    }
  }
}

__device__ __forceinline__ int next_pow2(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Result of choosing one histogram bin: the highest bin b >= min_bin, non-empty, such that
// base + (count or mass of the bins >= b) >= target.
struct Pick {
  int bin;               // -1: none qualifies (and no fallback asked)
  uint32_t above_count;  // base + bins > bin (>= min_bin); for bin -1: base + all bins >= min_bin
  u64 above_mass;
  uint32_t bin_count;
  u64 bin_mass;
};

// by_mass: compare fixed-point masses with target_mass, else counts with target_count. With
// fallback, a histogram where no bin qualifies (rounding) gives its lowest non-empty bin.
// mass == nullptr (level-1 bins only): a lower bound per bin, count * the bin's lower edge.
__device__ __forceinline__ u64 bin_mass(const uint32_t* cnt, const u64* mass, int b) {
  return mass != nullptr ? mass[b] : static_cast<u64>(cnt[b]) * to_fixed(key_float(static_cast<uint32_t>(b) << 20));
}

__device__ Pick pick_bin(const uint32_t* cnt, const u64* mass, int nbins, int min_bin, bool by_mass,
                         uint32_t target_count, u64 target_mass, uint32_t base_count, u64 base_mass,
                         bool fallback, Scratch& sh) {
  // Thread t owns bins hi, hi - 1, ..., hi - per + 1: thread order is descending bin order, so an
  // exclusive scan over threads gives the mass of all higher bins.
  const int per = nbins >= kThreads ? nbins / kThreads : 1;
  const int hi = nbins - 1 - static_cast<int>(threadIdx.x) * per;
  uint32_t c_sum = 0;
  u64 m_sum = 0;
  for (int q = 0; q < per; ++q) {
    const int b = hi - q;
    if (b >= min_bin && b >= 0) {
      c_sum += cnt[b];
      m_sum += bin_mass(cnt, mass, b);
    }
  }
  uint32_t c_total;
  u64 m_total;
  const uint32_t c_excl = block_exclusive_scan<uint32_t>(c_sum, sh.u, c_total);
  const u64 m_excl = block_exclusive_scan<u64>(m_sum, sh.q, m_total);
  if (threadIdx.x == 0) {
    sh.pick = -1;
    sh.pick_low = INT_MAX;
  }
  __syncthreads();
  uint32_t cc = base_count + c_excl;
  u64 mm = base_mass + m_excl;
  for (int q = 0; q < per; ++q) {
    const int b = hi - q;
    if (b < min_bin || b < 0) break;
    const uint32_t c = cnt[b];
    const u64 m = bin_mass(cnt, mass, b);
    if (c > 0) {
      if (by_mass ? mm + m >= target_mass : cc + c >= target_count) {
        atomicMax(&sh.pick, b);  // this thread's highest qualifying bin; the block keeps the highest
        break;
      }
      atomicMin(&sh.pick_low, b);
    }
    cc += c;
    mm += m;
  }
  __syncthreads();
  int pick = sh.pick;
  if (pick < 0 && fallback && sh.pick_low != INT_MAX) pick = sh.pick_low;
  if (pick >= 0 && (nbins - 1 - pick) / per == static_cast<int>(threadIdx.x)) {  // the owner
    uint32_t c2 = base_count + c_excl;
    u64 m2 = base_mass + m_excl;
    for (int b = hi; b > pick; --b) {
      c2 += cnt[b];
      m2 += bin_mass(cnt, mass, b);
    }
    sh.above_count = c2;
    sh.above_mass = m2;
    sh.bin_count = cnt[pick];
    sh.bin_mass = bin_mass(cnt, mass, pick);
  }
  __syncthreads();
  Pick r;
  r.bin = pick;
  if (pick >= 0) {
    r.above_count = sh.above_count;
    r.above_mass = sh.above_mass;
    r.bin_count = sh.bin_count;
    r.bin_mass = sh.bin_mass;
  } else {
    r.above_count = base_count + c_total;
    r.above_mass = base_mass + m_total;
    r.bin_count = 0;
    r.bin_mass = 0;
  }
  return r;
}

struct Selected {
  uint32_t key;       // exact threshold key: keep e >= key_float(key)
  uint32_t count_ge;  // number and fixed-point mass of the e >= the threshold
  u64 mass_ge;
};

// Refines level-1 bin b1 (the bin holding the threshold) to an exact key with two more histogram
// passes over the row: level 2 on key bits 19..8 (also counting what lies above bin b1: the base
// of the comparisons), level 3 on bits 7..0. Only elements with key >= floor_key count (the kept
// set of an earlier filter).
__device__ Selected select_refine(const Row& row, SampleSmem& sm, Scratch& sh, int b1, uint32_t floor_key,
                                  bool by_mass, uint32_t target_count, u64 target_mass) {
  // Level 2.
  __syncthreads();  // the union may hold candidates still being read
  for (int b = threadIdx.x; b < kL2Bins; b += kThreads) {
    sm.sel.h2_count[b] = 0;
    sm.sel.h2_mass[b] = 0;
  }
  __syncthreads();
  uint32_t above_count = 0;
  u64 above_mass = 0;
  for (int tile = 0; tile < row.vocab; tile += kTile) {
    const int base = tile + threadIdx.x * kPerThread;
    float v[kPerThread];
    row.load(base, v);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const float e = row.e_of(v[j]);
      const uint32_t key = __float_as_uint(e);
      if (base + j < row.vocab && key >= floor_key) {
        if ((key >> 20) == static_cast<uint32_t>(b1)) {
          const uint32_t b = (key >> 8) & 0xFFFu;
          atomicAdd(&sm.sel.h2_count[b], 1u);
          atomicAdd(&sm.sel.h2_mass[b], to_fixed(e));
        } else if ((key >> 20) > static_cast<uint32_t>(b1)) {
          ++above_count;
          above_mass += to_fixed(e);
        }
      }
    }
  }
  uint32_t base_count;
  u64 base_mass;
  block_exclusive_scan<uint32_t>(above_count, sh.u, base_count);  // barriers: the atomics are done
  block_exclusive_scan<u64>(above_mass, sh.q, base_mass);
  const Pick p2 = pick_bin(sm.sel.h2_count, sm.sel.h2_mass, kL2Bins, 0, by_mass, target_count, target_mass,
                           base_count, base_mass, true, sh);
  const uint32_t prefix = (static_cast<uint32_t>(b1) << 12) | static_cast<uint32_t>(p2.bin < 0 ? 0 : p2.bin);
  // Level 3.
  for (int b = threadIdx.x; b < kL3Bins; b += kThreads) {
    sm.sel.h3_count[b] = 0;
    sm.sel.h3_mass[b] = 0;
  }
  __syncthreads();
  for (int tile = 0; tile < row.vocab; tile += kTile) {
    const int base = tile + threadIdx.x * kPerThread;
    float v[kPerThread];
    row.load(base, v);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const float e = row.e_of(v[j]);
      const uint32_t key = __float_as_uint(e);
      if (base + j < row.vocab && (key >> 8) == prefix && key >= floor_key) {
        atomicAdd(&sm.sel.h3_count[key & 0xFFu], 1u);
        atomicAdd(&sm.sel.h3_mass[key & 0xFFu], to_fixed(e));
      }
    }
  }
  __syncthreads();
  const Pick p3 = pick_bin(sm.sel.h3_count, sm.sel.h3_mass, kL3Bins, 0, by_mass, target_count, target_mass,
                           p2.above_count, p2.above_mass, true, sh);
  Selected r;
  r.key = (prefix << 8) | static_cast<uint32_t>(p3.bin < 0 ? 0 : p3.bin);
  r.count_ge = p3.above_count + p3.bin_count;
  r.mass_ge = p3.above_mass + p3.bin_mass;
  return r;
}

// Ordered compaction: the e >= floor (and their indices) in vocabulary order into sm.cand.
// Returns how many there are (the caller made sure they fit; extra ones are dropped).
__device__ int compact(const Row& row, SampleSmem& sm, Scratch& sh, float floor) {
  __syncthreads();  // the union may hold refinement histograms still being read
  uint32_t written = 0;  // identical in every thread
  for (int tile = 0; tile < row.vocab; tile += kTile) {
    const int base = tile + threadIdx.x * kPerThread;
    float v[kPerThread];
    row.load(base, v);
    float e[kPerThread];
    uint32_t n = 0;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      e[j] = row.e_of(v[j]);
      n += (base + j < row.vocab && e[j] >= floor) ? 1u : 0u;
    }
    uint32_t tile_total;
    uint32_t pos = written + block_exclusive_scan<uint32_t>(n, sh.u, tile_total);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      if (base + j < row.vocab && e[j] >= floor) {
        if (pos < static_cast<uint32_t>(kCap)) {
          sm.cand.e[pos] = e[j];
          sm.cand.idx[pos] = base + j;
        }
        ++pos;
      }
    }
    written += tile_total;
  }
  __syncthreads();
  return written < static_cast<uint32_t>(kCap) ? static_cast<int>(written) : kCap;
}

// Draw over the whole row: keep e >= t, total kept mass W (as computed by the caller). The first
// index whose running kept mass exceeds u * W, one block-wide prefix sum per tile, stopping at the
// tile that holds it; rounding fallback: the last kept index of non-zero mass.
__device__ int draw_global(const Row& row, Scratch& sh, float t, float total, float u, int fallback) {
  const float target = u * total;
  if (threadIdx.x == 0) {
    sh.sel = INT_MAX;
    sh.last = -1;
  }
  __syncthreads();
  float running = 0.f;  // identical in every thread
  int last = -1;
  for (int tile = 0; tile < row.vocab; tile += kTile) {
    const int base = tile + threadIdx.x * kPerThread;
    float v[kPerThread];
    row.load(base, v);
    float m[kPerThread];
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const float e = row.e_of(v[j]);
      m[j] = (base + j < row.vocab && e >= t) ? e : 0.f;
      sum += m[j];
      if (m[j] > 0.f) last = base + j;
    }
    float tile_total;
    const float excl = block_exclusive_scan<float>(sum, sh.f, tile_total);
    if (running + tile_total > target) {  // uniform
      float r = running + excl;
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        r += m[j];
        if (m[j] > 0.f && r > target) {
          atomicMin(&sh.sel, base + j);
          break;
        }
      }
      __syncthreads();
      if (sh.sel != INT_MAX) break;  // uniform: read after the barrier
    }
    running += tile_total;
  }
  if (sh.sel != INT_MAX) return sh.sel;
  atomicMax(&sh.last, last);
  __syncthreads();
  return sh.last >= 0 ? sh.last : fallback;
}

// The rest of the row in shared memory: n candidates (e, idx) in vocabulary order that hold every
// element with e >= the final threshold. top_k (binding: the k-th largest is among them), top_p
// (K: kept mass when not binding; else summed here) and the draw, all exact.
__device__ int finish_in_smem(SampleSmem& sm, Scratch& sh, int n, bool binding, int k, float t1, float kept_mass,
                              bool top_p_on, float top_p, float u, int fallback) {
  if (n <= 0) return fallback;
  float t = t1;
  if (binding || top_p_on) {
    const int n2 = next_pow2(n);
    for (int i = threadIdx.x; i < n2; i += kThreads) sm.cand.sorted[i] = i < n ? sm.cand.e[i] : -1.f;
    __syncthreads();
    bitonic_sort_desc(sm.cand.sorted, n2);
    if (binding) t1 = fmaxf(t1, sm.cand.sorted[min(k, n) - 1]);
    t = t1;
    if (top_p_on) {
      float m[kCapPerThread];
      float sum = 0.f;
#pragma unroll
      for (int q = 0; q < kCapPerThread; ++q) {
        const int j = threadIdx.x * kCapPerThread + q;
        const float e = j < n ? sm.cand.sorted[j] : -1.f;
        m[q] = e >= t1 ? e : 0.f;
        sum += m[q];
      }
      float total;
      const float excl = block_exclusive_scan<float>(sum, sh.f, total);
      const float target = top_p * (binding ? total : kept_mass);
      if (threadIdx.x == 0) {
        sh.sel = INT_MAX;
        sh.last = -1;
      }
      __syncthreads();
      float r = excl;
#pragma unroll
      for (int q = 0; q < kCapPerThread; ++q) {
        const int j = threadIdx.x * kCapPerThread + q;
        r += m[q];
        if (m[q] > 0.f) {
          atomicMax(&sh.last, j);
          if (r >= target) {
            atomicMin(&sh.sel, j);
            break;
          }
        }
      }
      __syncthreads();
      int j = sh.sel != INT_MAX ? sh.sel : sh.last;
      t = sm.cand.sorted[j < 0 ? 0 : j];
    }
  }
  // Draw over the candidates in vocabulary order.
  float m[kCapPerThread];
  float sum = 0.f;
#pragma unroll
  for (int q = 0; q < kCapPerThread; ++q) {
    const int j = threadIdx.x * kCapPerThread + q;
    const float e = j < n ? sm.cand.e[j] : 0.f;
    m[q] = e >= t ? e : 0.f;
    sum += m[q];
  }
  float total;
  const float excl = block_exclusive_scan<float>(sum, sh.f, total);  // its barriers order the reads of sh.sel above
  const float target = u * total;
  if (threadIdx.x == 0) {
    sh.sel = INT_MAX;
    sh.last = -1;
  }
  __syncthreads();
  float r = excl;
#pragma unroll
  for (int q = 0; q < kCapPerThread; ++q) {
    const int j = threadIdx.x * kCapPerThread + q;
    r += m[q];
    if (m[q] > 0.f) {
      atomicMax(&sh.last, j);
      if (r > target) {
        atomicMin(&sh.sel, j);
        break;
      }
    }
  }
  __syncthreads();
  const int j = sh.sel != INT_MAX ? sh.sel : sh.last;
  return j >= 0 ? sm.cand.idx[j] : fallback;
}

// ptxas (sm_90, CUDA 13.0): 64 registers with the token bitmask (limit 64 for 1024 threads), 0 bytes spilled,
// 944 B static shared memory + sizeof(SampleSmem) = 63 KiB dynamic: one CTA per SM.
// Claims checked against the sm_90 cubin by tests/kernels/test_sass.py (format: tests/kernels/cubin_inspect.py):
// occupancy(sm_90) if all: >= 1 CTAs/SM of 1024 threads with 65536 B dynamic smem
// sass(sm_90) if all: LDG.E.128
__global__ void __launch_bounds__(kThreads, 1)
sample_tokens_kernel(int64_t* __restrict__ out,              // [batch]
                     const float* __restrict__ logits,       // [batch, vocab], row stride row_stride
                     const float* __restrict__ temperature,  // [batch]
                     const int32_t* __restrict__ top_k,      // [batch]
                     const float* __restrict__ top_p,        // [batch]
                     const float* __restrict__ min_p,        // [batch]
                     const int64_t* __restrict__ seeds,      // [batch]
                     const int64_t* __restrict__ offsets,    // [batch]
                     int vocab, int64_t row_stride,
                     const int32_t* __restrict__ token_bitmask,  // [batch, ceil(vocab / 32)] or nullptr
                     int64_t mask_row_stride) {
  PAGEDLLM_DYNAMIC_SMEM(smem_raw);
  SampleSmem& sm = *reinterpret_cast<SampleSmem*>(smem_raw);
  __shared__ Scratch sh;
  const int b = blockIdx.x;

  Row row;
  row.p = logits + static_cast<int64_t>(b) * row_stride;
  row.vocab = vocab;
  row.vec = aligned16(row.p);
  row.temperature = temperature[b];
  row.max_x = 0.f;
  row.mask = token_bitmask != nullptr ? token_bitmask + static_cast<int64_t>(b) * mask_row_stride : nullptr;

  // Greedy (NaN temperature too: its scaled logits would all be NaN): first index of the max.
  if (!(row.temperature >= kGreedyTemperature)) {
    float m = -INFINITY;
    int arg = INT_MAX;
    for (int tile = 0; tile < vocab; tile += kTile) {
      const int base = tile + threadIdx.x * kPerThread;
      float v[kPerThread];
      row.load(base, v);
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        if (v[j] > m) {  // strict: the first index per thread; NaN never wins
          m = v[j];
          arg = base + j;
        }
      }
    }
    block_argmax(m, arg, sh);
    if (threadIdx.x == 0) out[b] = arg == INT_MAX ? 0 : arg;
    return;
  }

  // Pass 1: M, S and the first index of the max of x = logit / temperature.
  float m = -INFINITY, s = 0.f;
  int arg = INT_MAX;
  for (int tile = 0; tile < vocab; tile += kTile) {
    const int base = tile + threadIdx.x * kPerThread;
    float v[kPerThread];
    row.load(base, v);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      float x = v[j] / row.temperature;
      if (!(x == x)) x = -INFINITY;  // NaN logits never win (padding is -inf already)
      if (x > m) {
        s = s * expf(m - x) + 1.f;
        m = x;
        arg = base + j;
      } else if (x != -INFINITY) {
        s += expf(x - m);
      }
    }
  }
  block_online(m, s, arg, sh);
  const int greedy_token = arg == INT_MAX ? 0 : arg;
  if (!(fabsf(m) <= FLT_MAX)) {  // all -inf, or +inf: degenerate, greedy
    if (threadIdx.x == 0) out[b] = greedy_token;
    return;
  }
  row.max_x = m;

  const int k = top_k[b];
  const bool top_k_on = k > 0 && k < vocab;
  float p = top_p[b];
  if (!(p > 0.f)) p = 0.f;  // clamp (the host validates; NaN keeps only the max)
  const bool top_p_on = p < 1.f;
  const float mp = fminf(fmaxf(min_p[b], 0.f), 1.f);  // NaN -> 0
  const float u = philox_uniform(seeds[b], offsets[b]);

  if (!top_k_on && !top_p_on && mp == 0.f) {  // plain temperature sampling: W = S
    const int token = draw_global(row, sh, 0.f, s, u, greedy_token);
    if (threadIdx.x == 0) out[b] = token;
    return;
  }

  // Pass 2: count and mass of e >= min_p, their histogram, and (min_p > 0) the candidates.
  const bool need_hist = top_k_on || top_p_on;
  const bool collect = mp > 0.f;
  sm.h1_count[threadIdx.x] = 0;  // kL1Bins == kThreads
  if (threadIdx.x == 0) sh.ncand = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31;
  uint32_t cnt = 0;
  float mass = 0.f;
  for (int tile = 0; tile < vocab; tile += kTile) {
    const int base = tile + threadIdx.x * kPerThread;
    float v[kPerThread];
    row.load(base, v);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const float e = row.e_of(v[j]);
      const bool keep = base + j < vocab && e >= mp;
      if (keep) {
        ++cnt;
        mass += e;
        if (need_hist) atomicAdd(&sm.h1_count[__float_as_uint(e) >> 20], 1u);
      }
      if (collect) {  // block-uniform; the whole warp reaches the ballot
        const unsigned ballot = __ballot_sync(0xffffffffu, keep);
        if (ballot != 0u) {
          const int leader = __ffs(ballot) - 1;
          uint32_t first = 0;
          if (lane == leader) first = atomicAdd(&sh.ncand, static_cast<uint32_t>(__popc(ballot)));
          first = __shfl_sync(0xffffffffu, first, leader);
          const uint32_t slot = first + static_cast<uint32_t>(__popc(ballot & ((1u << lane) - 1u)));
          if (keep && slot < static_cast<uint32_t>(kCap)) {
            sm.cand.e[slot] = e;
            sm.cand.idx[slot] = base + j;
          }
        }
      }
    }
  }
  const uint32_t cnt_ge = block_sum_u32(cnt, sh.u);  // its barriers also complete the atomics above
  const float mass_ge = block_sum(mass, sh.f);
  __syncthreads();

  const bool binding = top_k_on && cnt_ge > static_cast<uint32_t>(k);  // the k-th largest is >= min_p
  int token;
  if (collect && cnt_ge <= static_cast<uint32_t>(kCap)) {
    // Every element that can be kept is in shared memory (unordered): order it by index, finish.
    const int n = static_cast<int>(cnt_ge);
    const int n2 = next_pow2(n);
    for (int i = threadIdx.x; i < n2; i += kThreads) {
      if (i >= n) {
        sm.cand.idx[i] = INT_MAX;
        sm.cand.e[i] = 0.f;
      }
    }
    __syncthreads();
    bitonic_sort_by_index(sm.cand.idx, sm.cand.e, n2);
    token = finish_in_smem(sm, sh, n, binding, k, mp, mass_ge, top_p_on, p, u, greedy_token);
  } else if (!top_p_on && !binding) {
    token = draw_global(row, sh, mp, mass_ge, u, greedy_token);  // min_p alone (or top_k not binding)
  } else {
    float t1 = mp;
    float kept_mass = mass_ge;
    uint32_t kept_count = cnt_ge;
    bool done = false;
    if (binding) {
      // Level 1 of the k-th largest: the highest bin with >= k elements at or above it.
      const Pick pk = pick_bin(sm.h1_count, nullptr, kL1Bins, 0, false, static_cast<uint32_t>(k), 0, 0, 0, true, sh);
      const uint32_t above_bound = pk.above_count + pk.bin_count;
      if (above_bound <= static_cast<uint32_t>(kCap)) {
        const int n = compact(row, sm, sh, fmaxf(key_float(static_cast<uint32_t>(pk.bin) << 20), mp));
        token = finish_in_smem(sm, sh, n, true, k, mp, 0.f, top_p_on, p, u, greedy_token);
        done = true;
      } else {
        const Selected sk = select_refine(row, sm, sh, pk.bin, __float_as_uint(mp), false, static_cast<uint32_t>(k), 0);
        t1 = key_float(sk.key);
        kept_count = sk.count_ge;
        kept_mass = static_cast<float>(from_fixed(sk.mass_ge));
      }
    }
    if (!done && !top_p_on) {
      token = draw_global(row, sh, t1, kept_mass, u, greedy_token);
      done = true;
    }
    if (!done) {
      // top_p: the threshold is >= t1; bins above t1's bin hold only kept elements. A bin whose
      // mass lower bound at and above reaches the target bounds the threshold from below.
      const float target = p * kept_mass;
      const u64 target_fx = __double2ull_ru(static_cast<double>(target) * kFixedScale);
      const uint32_t t1_key = __float_as_uint(t1);
      const int b1 = static_cast<int>(t1_key >> 20);
      const Pick pp = pick_bin(sm.h1_count, nullptr, kL1Bins, b1 + 1, true, 0, target_fx, 0, 0, false, sh);
      const uint32_t bound_count = pp.bin >= 0 ? pp.above_count + pp.bin_count : kept_count;
      if (bound_count <= static_cast<uint32_t>(kCap)) {
        const float floor = pp.bin >= 0 ? key_float(static_cast<uint32_t>(pp.bin) << 20) : t1;
        const int n = compact(row, sm, sh, fmaxf(floor, t1));
        token = finish_in_smem(sm, sh, n, false, k, t1, kept_mass, true, p, u, greedy_token);
      } else {
        // Exact level-1 masses of the kept e >= t1, then the refinement.
        __syncthreads();  // the union may hold candidates still being read
        sm.sel.h1_mass[threadIdx.x] = 0;  // kL1Bins == kThreads
        __syncthreads();
        for (int tile = 0; tile < vocab; tile += kTile) {
          const int base = tile + threadIdx.x * kPerThread;
          float v[kPerThread];
          row.load(base, v);
#pragma unroll
          for (int j = 0; j < kPerThread; ++j) {
            const float e = row.e_of(v[j]);
            const uint32_t key = __float_as_uint(e);
            if (base + j < vocab && key >= t1_key) atomicAdd(&sm.sel.h1_mass[key >> 20], to_fixed(e));
          }
        }
        __syncthreads();
        const Pick px = pick_bin(sm.h1_count, sm.sel.h1_mass, kL1Bins, b1, true, 0, target_fx, 0, 0, true, sh);
        const Selected sp = select_refine(row, sm, sh, px.bin < 0 ? b1 : px.bin, t1_key, true, 0, target_fx);
        token = draw_global(row, sh, key_float(sp.key), static_cast<float>(from_fixed(sp.mass_ge)), u, greedy_token);
      }
    }
  }
  if (threadIdx.x == 0) out[b] = token;
}

}  // namespace

cudaError_t launch_sample_tokens(int64_t* out, const float* logits, const float* temperature, const int32_t* top_k,
                                 const float* top_p, const float* min_p, const int64_t* seeds, const int64_t* offsets,
                                 int batch, int vocab, int64_t logits_row_stride, const int32_t* token_bitmask,
                                 int64_t mask_row_stride, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  // 63 KiB of dynamic shared memory (histograms + candidates): above the default 48 KiB limit.
  const int smem = static_cast<int>(sizeof(SampleSmem));
  cudaError_t err = cudaFuncSetAttribute(sample_tokens_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  // One CTA per row: rows are independent and a 1024-thread CTA keeps enough 16-byte loads in
  // flight to stream a row at the SM's share of the bandwidth; batch >= #SMs fills the GPU.
  PAGEDLLM_LAUNCH(batch, kThreads, smem, stream, sample_tokens_kernel)(out, logits, temperature, top_k, top_p, min_p, seeds,
                                                          offsets, vocab, logits_row_stride, token_bitmask,
                                                          mask_row_stride);
  return cudaGetLastError();
}

}  // namespace pagedllm::cuda
