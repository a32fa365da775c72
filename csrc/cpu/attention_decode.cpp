// paged_attention (decode) on the CPU: one query token per sequence over its paged KV cache.
//
// Work item = (sequence, kv head, chunk of the visible key range). One item streams every KV
// block of its range once for all query heads of the GQA group (online softmax in fp32, one
// rescale per KV block). With few (sequence, kv head) pairs the key range is cut into chunks so
// that every thread has work even at batch 1; chunks write (max, sum, acc) partials that a
// second pass merges.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "cpu/fast_math.h"
#include "dispatch_utils.h"
#include "op_checks.h"
#include "ops.h"

namespace pagedllm::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Each item covers at least this many keys when the context is split: smaller chunks would
// spend more on the merge (num_group * (head_size + 2) floats) than on attention.
constexpr int64_t kMinChunkTokens = 512;

struct WorkItem {
  int seq;
  int kv_head;
  int k0, k1;       // keys [k0, k1) (positions in the sequence), empty for a padding row
  int64_t partial;  // index into the partials buffer, or -1: write the output directly
};

struct DecodeArgs {
  int num_heads, num_kv_heads, group, block_size;
  int64_t q_stride_seq, q_stride_head;      // query [num_seqs, num_heads, head_size]
  int64_t out_stride_seq, out_stride_head;  // out   [num_seqs, num_heads, head_size]
  int64_t bt_stride;                        // block_tables [num_seqs, max_blocks] row stride
  float scale;
};

// Dot product of two contiguous float rows of length D (a multiple of 16): 16 independent
// partial sums so that -O3 turns the inner loop into one vector FMA per 16 floats.
template <int D>
inline float dot(const float* __restrict__ a, const float* __restrict__ b) {
  static_assert(D % 16 == 0, "head sizes are multiples of 16");
  float part[16] = {};
  for (int d = 0; d < D; d += 16) {
    for (int j = 0; j < 16; ++j) part[j] += a[d + j] * b[d + j];
  }
  // Pairwise (tree) sum: a sequential sum would be a 16-add dependency chain per key, which
  // was the slowest part of the whole kernel.
  for (int j = 0; j < 8; ++j) part[j] += part[j + 8];
  for (int j = 0; j < 4; ++j) part[j] += part[j + 4];
  return (part[0] + part[2]) + (part[1] + part[3]);
}

#if defined(__AVX512F__)
// GCC 12 warns inside its own unmasked AVX-512 intrinsics (their pass-through operand is
// _mm512_undefined_ps(): GCC bug 105593), a false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// r[t] = sum of the 16 lanes of v[t], for 16 vectors at once (a transpose-and-add tree:
// ~3 shuffles/adds per key instead of a full horizontal reduction per key).
inline __m512 transpose_sum16(const __m512 (&v)[16]) {
  __m512 u[8], w[4], x[2];
  // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] for a = v[2i], b = v[2i+1].
  for (int i = 0; i < 8; ++i)
    u[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  // Per lane: the lane sums of keys 4i .. 4i+3.
  for (int i = 0; i < 4; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // Across lanes: x[j] = [w0.l0+l1, w0.l2+l3, w1.l0+l1, w1.l2+l3] for w0 = w[2j], w1 = w[2j+1].
  for (int j = 0; j < 2; ++j)
    x[j] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * j], w[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w[2 * j], w[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// scores[t] = q . k[t] for the n <= 16 key rows k ([n, D], contiguous). Full: 16 rows may be read
// (n of them are keys in range, the rest rows of the same cache block whose products are dropped):
// no per-row branch.
template <int D, bool Full>
inline void qk16(const float* __restrict__ q, const float* __restrict__ k, int n, float* __restrict__ scores) {
  __m512 acc[16];
  for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
  for (int c = 0; c < D; c += 16) {
    const __m512 qv = _mm512_loadu_ps(q + c);
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t) {
      if (Full || t < n) acc[t] = _mm512_fmadd_ps(_mm512_loadu_ps(k + t * D + c), qv, acc[t]);
    }
  }
  _mm512_mask_storeu_ps(scores, static_cast<__mmask16>((1u << n) - 1), transpose_sum16(acc));
}

// One online-softmax step of a head over the n scores of a block: turns them into e^(s - m_new) in
// place, updates the running max m and sum l, returns the rescale e^(m_old - m_new) of the accumulator.
inline float softmax_step(float* __restrict__ sg, int n, float& m, float& l) {
  typedef int32_t v16si __attribute__((vector_size(64)));
  __m512 mx = _mm512_set1_ps(kNegInf);
  for (int t = 0; t < n; t += 16) {
    const __mmask16 live = static_cast<__mmask16>((1u << std::min(16, n - t)) - 1);
    mx = _mm512_mask_max_ps(mx, live, mx, _mm512_maskz_loadu_ps(live, sg + t));
  }
  const float m_new = std::max(m, _mm512_reduce_max_ps(mx));
  // 0 on the first block (m = -inf); exactly 1 when the max holds (exp_nonpositive(0) = 1)
  const float corr = m_new == m ? 1.f : exp_nonpositive(m - m_new);
  __m512 sum = _mm512_setzero_ps();
  const __m512 shift = _mm512_set1_ps(m_new);
  for (int t = 0; t < n; t += 16) {
    const __mmask16 live = static_cast<__mmask16>((1u << std::min(16, n - t)) - 1);
    const __m512 e = exp_nonpositive_lanes<__m512, v16si>(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, sg + t), shift));
    _mm512_mask_storeu_ps(sg + t, live, e);
    sum = _mm512_mask_add_ps(sum, live, sum, e);
  }
  l = l * corr + _mm512_reduce_add_ps(sum);
  m = m_new;
  return corr;
}

// acc = acc * corr + sum_t p[t] v[t] over n value rows v ([n, D], contiguous); the accumulator
// row stays in registers, in two interleaved sets when D is small (more independent FMA chains).
template <int D>
inline void pv_update(float* __restrict__ acc, const float* __restrict__ p, const float* __restrict__ v, int n,
                      float corr) {
  constexpr int C = D / 16;
  constexpr int S = C <= 8 ? 2 : 1;
  __m512 a[S][C];
  const __m512 cv = _mm512_set1_ps(corr);
  for (int c = 0; c < C; ++c) {
    a[0][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * c), cv);
    if constexpr (S == 2) a[1][c] = _mm512_setzero_ps();
  }
  int t = 0;
  for (; t + S <= n; t += S) {
#pragma GCC unroll 2
    for (int s = 0; s < S; ++s) {
      const __m512 pb = _mm512_set1_ps(p[t + s]);
      for (int c = 0; c < C; ++c) a[s][c] = _mm512_fmadd_ps(pb, _mm512_loadu_ps(v + (t + s) * D + 16 * c), a[s][c]);
    }
  }
  for (; t < n; ++t) {
    const __m512 pb = _mm512_set1_ps(p[t]);
    for (int c = 0; c < C; ++c) a[0][c] = _mm512_fmadd_ps(pb, _mm512_loadu_ps(v + t * D + 16 * c), a[0][c]);
  }
  for (int c = 0; c < C; ++c) {
    if constexpr (S == 2) a[0][c] = _mm512_add_ps(a[0][c], a[1][c]);
    _mm512_storeu_ps(acc + 16 * c, a[0][c]);
  }
}
#pragma GCC diagnostic pop
#endif

// Brings `count` contiguous elements into the cache ahead of use.
template <typename scalar_t>
inline void prefetch_rows(const scalar_t* p, int64_t count) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < count * static_cast<int64_t>(sizeof(scalar_t)); b += 64) __builtin_prefetch(c + b);
}

// n rows of D elements (contiguous) as floats: the rows themselves for fp32, else converted
// into buf ([block_size, D] floats).
template <typename scalar_t, int D>
inline const float* rows_as_float(const scalar_t* __restrict__ src, int n, float* __restrict__ buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    for (int i = 0; i < n * D; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

// Per-thread scratch for one item: queries, accumulators, scores and converted K/V rows.
struct Scratch {
  std::vector<float> q, acc, m, l, scores, kbuf, vbuf;
  Scratch(int group, int head_size, int block_size)
      : q(group * head_size), acc(group * head_size), m(group), l(group),
        scores(group * block_size), kbuf(block_size * head_size), vbuf(block_size * head_size) {}
};

// Attention of the group's query heads over keys [item.k0, item.k1): leaves the running max m
// (natural-log domain), sum l and unnormalized accumulator acc ([group, D]) in s.
template <typename scalar_t, int D>
void attend_range(const DecodeArgs& a, const WorkItem& item,
                  const scalar_t* __restrict__ query,        // [num_seqs, num_heads, D] (strided)
                  const scalar_t* __restrict__ key_cache,    // [num_blocks, num_kv_heads, block_size, D]
                  const scalar_t* __restrict__ value_cache,  // [num_blocks, num_kv_heads, block_size, D]
                  const int32_t* __restrict__ block_tables,  // [num_seqs, max_blocks]
                  Scratch& s) {
  const int G = a.group, BS = a.block_size;
  float* __restrict__ q = s.q.data();
  float* __restrict__ acc = s.acc.data();
  float* __restrict__ scores = s.scores.data();
  for (int g = 0; g < G; ++g) {
    const scalar_t* qs = query + item.seq * a.q_stride_seq + (item.kv_head * G + g) * a.q_stride_head;
    for (int d = 0; d < D; ++d) q[g * D + d] = static_cast<float>(qs[d]) * a.scale;
  }
  std::fill(s.acc.begin(), s.acc.end(), 0.f);
  std::fill(s.m.begin(), s.m.end(), kNegInf);
  std::fill(s.l.begin(), s.l.end(), 0.f);

  const int32_t* bt = block_tables + item.seq * a.bt_stride;
  const int64_t head_offset = static_cast<int64_t>(item.kv_head) * BS * D;
  const int64_t block_stride = static_cast<int64_t>(a.num_kv_heads) * BS * D;
  for (int pos = item.k0; pos < item.k1;) {
    const int off = pos % BS;
    const int n = std::min(BS - off, item.k1 - pos);  // keys of this block in range
    const int64_t base = bt[pos / BS] * block_stride + head_offset + static_cast<int64_t>(off) * D;
    if (pos + n < item.k1) {
      // Blocks are scattered in memory (one page each at head size 64), so the hardware
      // prefetcher starts over at every block: fetch the next block's K and V rows now.
      const int64_t next = bt[(pos + n) / BS] * block_stride + head_offset;
      prefetch_rows(key_cache + next, BS * D);
      prefetch_rows(value_cache + next, BS * D);
    }
    const float* kf = rows_as_float<scalar_t, D>(key_cache + base, n, s.kbuf.data());
#if defined(__AVX512F__)
    for (int g = 0; g < G; ++g) {
      for (int t = 0; t < n; t += 16) {
        // Rows off + t .. off + t + 15 lie in this block (fp32: read in place; kbuf holds only n rows).
        if (std::is_same_v<scalar_t, float> && off + t + 16 <= BS) {
          qk16<D, true>(q + g * D, kf + t * D, std::min(16, n - t), scores + g * BS + t);
        } else {
          qk16<D, false>(q + g * D, kf + t * D, std::min(16, n - t), scores + g * BS + t);
        }
      }
    }
    const float* vf = rows_as_float<scalar_t, D>(value_cache + base, n, s.vbuf.data());
    for (int g = 0; g < G; ++g) {
      float* sg = scores + g * BS;
      const float corr = softmax_step(sg, n, s.m[g], s.l[g]);
      pv_update<D>(acc + g * D, sg, vf, n, corr);
    }
#else
    for (int g = 0; g < G; ++g) {
      for (int t = 0; t < n; ++t) scores[g * BS + t] = dot<D>(q + g * D, kf + t * D);
    }
    const float* vf = rows_as_float<scalar_t, D>(value_cache + base, n, s.vbuf.data());
    for (int g = 0; g < G; ++g) {
      float* sg = scores + g * BS;
      float mb = kNegInf;
      for (int t = 0; t < n; ++t) mb = std::max(mb, sg[t]);
      const float m_new = std::max(s.m[g], mb);
      const float corr = exp_nonpositive(s.m[g] - m_new);  // 0 on the first block (m = -inf)
      for (int t = 0; t < n; ++t) sg[t] = exp_nonpositive(sg[t] - m_new);
      float sum = 0.f;
      for (int t = 0; t < n; ++t) sum += sg[t];
      s.l[g] = s.l[g] * corr + sum;
      s.m[g] = m_new;
      float* __restrict__ ag = acc + g * D;
      if (corr != 1.f) {
        for (int d = 0; d < D; ++d) ag[d] *= corr;
      }
      for (int t = 0; t < n; ++t) {
        const float p = sg[t];
        const float* __restrict__ vt = vf + t * D;
        for (int d = 0; d < D; ++d) ag[d] += p * vt[d];
      }
    }
#endif
    pos += n;
  }
}

template <typename scalar_t>
inline void write_row(scalar_t* __restrict__ dst, const float* __restrict__ src, float inv, int D) {
  for (int d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(src[d] * inv);
}

template <typename scalar_t, int D>
void paged_attention_impl(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                          const at::Tensor& value_cache, const at::Tensor& block_tables,
                          const at::Tensor& seq_lens, double scale, int64_t sliding_window) {
  const int num_seqs = query.size(0);
  DecodeArgs a;
  a.num_heads = query.size(1);
  a.num_kv_heads = key_cache.size(1);
  a.group = a.num_heads / a.num_kv_heads;
  a.block_size = key_cache.size(2);
  a.q_stride_seq = query.stride(0);
  a.q_stride_head = query.stride(1);
  a.out_stride_seq = out.stride(0);
  a.out_stride_head = out.stride(1);
  a.bt_stride = block_tables.stride(0);
  a.scale = static_cast<float>(scale);
  const int G = a.group;

  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int64_t max_blocks = block_tables.size(1);
  const int64_t num_blocks = key_cache.size(0);

  // Validate the metadata once (cheap next to the attention itself): every block the kernel
  // will read must exist.
  std::vector<int> start(num_seqs), end(num_seqs);
  int64_t total_keys = 0;
  for (int i = 0; i < num_seqs; ++i) {
    const int len = lens[i];
    TORCH_CHECK(len >= 0 && len <= max_blocks * a.block_size, "paged_attention: seq_lens[", i,
                "] = ", len, " is outside [0, max_blocks_per_seq * block_size = ",
                max_blocks * a.block_size, "]");
    end[i] = len;
    start[i] = sliding_window > 0 ? static_cast<int>(std::max<int64_t>(0, len - sliding_window)) : 0;
    if (len > 0) {
      for (int64_t b = start[i] / a.block_size; b <= (len - 1) / a.block_size; ++b) {
        const int32_t id = bt[i * a.bt_stride + b];
        TORCH_CHECK(id >= 0 && id < num_blocks, "paged_attention: block_tables[", i, ", ", b,
                    "] = ", id, " is not a block of the cache (num_blocks = ", num_blocks, ")");
      }
    }
    total_keys += end[i] - start[i];
  }

  // Split heuristic: aim at ~4 items per thread so that batch 1 with a long context keeps every
  // core busy; items of at least kMinChunkTokens keys (a multiple of the block size, so that a
  // chunk boundary never cuts a block in two).
  const int64_t pairs = static_cast<int64_t>(num_seqs) * a.num_kv_heads;
  const int64_t target_items = 4 * static_cast<int64_t>(at::get_num_threads());
  int64_t chunk = std::numeric_limits<int>::max();
  if (pairs < target_items && total_keys > 0) {
    const int64_t per_item = (total_keys * a.num_kv_heads + target_items - 1) / target_items;
    chunk = std::max(kMinChunkTokens, per_item);
    chunk = (chunk + a.block_size - 1) / a.block_size * a.block_size;
  }

  std::vector<WorkItem> items;
  std::vector<int64_t> first_item(pairs + 1);  // items of pair p: [first_item[p], first_item[p+1])
  int64_t num_partials = 0;
  for (int i = 0; i < num_seqs; ++i) {
    for (int h = 0; h < a.num_kv_heads; ++h) {
      first_item[static_cast<int64_t>(i) * a.num_kv_heads + h] = items.size();
      const int len = end[i] - start[i];
      if (len <= chunk) {
        items.push_back({i, h, start[i], end[i], -1});
      } else {
        // Chunk boundaries at multiples of `chunk` (block aligned) in absolute positions.
        for (int64_t k0 = start[i]; k0 < end[i];) {
          const int64_t k1 = std::min<int64_t>(end[i], (k0 / chunk + 1) * chunk);
          items.push_back({i, h, static_cast<int>(k0), static_cast<int>(k1), num_partials++});
          k0 = k1;
        }
      }
    }
  }
  first_item[pairs] = items.size();

  const scalar_t* q_ptr = query.data_ptr<scalar_t>();
  const scalar_t* k_ptr = key_cache.data_ptr<scalar_t>();
  const scalar_t* v_ptr = value_cache.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  // Partials of split items: [num_partials][m: G | l: G | acc: G * D] floats.
  const int64_t partial_floats = 2 * G + static_cast<int64_t>(G) * D;
  std::vector<float> partials(num_partials * partial_floats);

  // Threads take contiguous runs of items of equal total work (keys, plus a block's worth for each
  // item's set-up): split by item count, a batch whose long sequences sit in one half left the other
  // thread waiting at the barrier.
  const int64_t num_items = static_cast<int64_t>(items.size());
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_items));
  std::vector<int64_t> cost(num_items + 1, 0);
  for (int64_t w = 0; w < num_items; ++w) cost[w + 1] = cost[w] + (items[w].k1 - items[w].k0) + a.block_size;
  std::vector<int64_t> bounds(threads + 1, num_items);
  for (int64_t t = 0; t < threads; ++t) {
    bounds[t] = std::lower_bound(cost.begin(), cost.end(), cost[num_items] * t / threads) - cost.begin();
  }
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    Scratch s(G, D, a.block_size);
    for (int64_t w = bounds[t0]; w < bounds[t1]; ++w) {
      const WorkItem& item = items[w];
      attend_range<scalar_t, D>(a, item, q_ptr, k_ptr, v_ptr, bt, s);
      if (item.partial < 0) {
        for (int g = 0; g < G; ++g) {
          const float inv = s.l[g] > 0.f ? 1.f / s.l[g] : 0.f;  // l = 0: padding row -> zeros
          scalar_t* dst = out_ptr + item.seq * a.out_stride_seq +
                          (item.kv_head * G + g) * a.out_stride_head;
          write_row(dst, s.acc.data() + g * D, inv, D);
        }
      } else {
        float* p = partials.data() + item.partial * partial_floats;
        std::copy(s.m.begin(), s.m.end(), p);
        std::copy(s.l.begin(), s.l.end(), p + G);
        std::copy(s.acc.begin(), s.acc.end(), p + 2 * G);
      }
    }
  });

  if (num_partials == 0) return;
  // Merge the chunks of each split (sequence, kv head): out = sum_c acc_c e^(m_c - M) / sum_c l_c e^(m_c - M).
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t stop) {
    std::vector<float> acc(D);
    for (int64_t pr = begin; pr < stop; ++pr) {
      const int64_t i0 = first_item[pr], i1 = first_item[pr + 1];
      if (items[i0].partial < 0) continue;  // written directly
      const WorkItem& item = items[i0];
      for (int g = 0; g < G; ++g) {
        float M = kNegInf;
        for (int64_t w = i0; w < i1; ++w) M = std::max(M, partials[items[w].partial * partial_floats + g]);
        std::fill(acc.begin(), acc.end(), 0.f);
        float L = 0.f;
        for (int64_t w = i0; w < i1; ++w) {
          const float* p = partials.data() + items[w].partial * partial_floats;
          const float f = std::exp(p[g] - M);
          L += p[G + g] * f;
          const float* __restrict__ pa = p + 2 * G + g * D;
          for (int d = 0; d < D; ++d) acc[d] += pa[d] * f;
        }
        scalar_t* dst = out_ptr + item.seq * a.out_stride_seq + (item.kv_head * G + g) * a.out_stride_head;
        write_row(dst, acc.data(), L > 0.f ? 1.f / L : 0.f, D);
      }
    }
  });
}

}  // namespace

void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                     const at::Tensor& value_cache, const at::Tensor& block_tables,
                     const at::Tensor& seq_lens, double scale, int64_t sliding_window) {
  check_paged_attention(out, query, key_cache, value_cache, block_tables, seq_lens);
  for (const at::Tensor* t : {static_cast<const at::Tensor*>(&out), &query, &key_cache, &value_cache, &block_tables, &seq_lens}) {
    TORCH_CHECK(t->device().is_cpu(), "paged_attention (cpu): every tensor must be on the CPU, got ",
                t->device());
  }
  if (query.size(0) == 0) return;
  PAGEDLLM_DISPATCH_FLOATING_TYPES(query.scalar_type(), "paged_attention", [&] {
    PAGEDLLM_DISPATCH_HEAD_SIZE(query.size(2), D, [&] {
      paged_attention_impl<scalar_t, D>(out, query, key_cache, value_cache, block_tables, seq_lens,
                                        scale, sliding_window);
    });
  });
}

}  // namespace pagedllm::cpu
