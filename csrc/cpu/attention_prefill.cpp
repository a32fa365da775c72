// Paged prefill attention on the CPU: causal attention of each sequence's new query tokens over
// its whole KV (cached prefix + new tokens, all already in the paged cache). Shapes and semantics:
// the paged_prefill_attention schema in csrc/torch_bindings.cpp.
//
// Work item = (sequence, kv head, tile of TQ consecutive query tokens). Its rows are the TQ tokens x
// the G query heads that share the kv head (GQA group), row = token * G + head_in_group, so one pass
// over the KV blocks serves the whole group. Per KV block the item converts K (transposed) and V to
// float buffers once, computes the [rows, block] scores with a register-blocked kernel, does the
// online-softmax update in fp32 and accumulates P V. Items are handed out dynamically (largest first)
// because causal tiles differ a lot in cost.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "dispatch_utils.h"
#include "ops.h"

namespace pagedllm::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;
// Rows (query tokens x group heads) per work item: enough to amortize converting each KV block to
// float over many rows, small enough that Q and O (2 x 64 x head_size floats) stay in L1/L2.
constexpr int kRowsPerItem = 64;

// The inner kernels are written with GCC/Clang vector extensions: plain loops here got vectorized
// along the wrong dimension (across rows, with shuffles) and ran 6x slower. VF is one register of
// kW floats (AVX-512 or AVX2; split into two or four registers on narrower targets). Loads and
// stores are unaligned (memcpy).
#if defined(__AVX512F__)
constexpr int kW = 16;
#else
constexpr int kW = 8;
#endif
typedef float VF __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t VI __attribute__((vector_size(kW * sizeof(int32_t))));
inline VF loadv(const float* p) { VF v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void storev(float* p, VF v) { std::memcpy(p, &v, sizeof(v)); }
inline VF splat(float x) { return VF{} + x; }
// Accumulator registers per register-blocked call: 12 independent FMA chains cover the FMA latency
// (4 cycles x 2 ports) and leave registers for the operands even with 16 vector registers.
constexpr int kAcc = 12;
// Keys per softmax step: the per-row work of a step (max, rescale of the output row, reductions)
// is amortized over this many keys. A chunk is 64 / block_size whole cache blocks.
constexpr int kChunk = 64;

// 2^x elementwise for x <= 0 (x = -inf gives 0), relative error ~2e-7: round to the nearest integer
// n with the 1.5 * 2^23 trick, 2^(x - n) by the Cephes expf polynomial of r = (x - n) ln 2 in
// [-0.35, 0.35], 2^n built in the exponent bits. 2^-125 and below flush to 0 (far below what a
// softmax weight needs).
inline VF exp2_vec(VF x) {
  const VI underflow = x < -125.f;  // also -inf
  x = underflow ? splat(-125.f) : x;
  const VF n = (x + 12582912.f) - 12582912.f;
  const VF r = (x - n) * 0.6931471805599453f;
  VF p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  const VF y = p * (VF)bits;  // same-size vector cast = bit reinterpretation
  return underflow ? splat(0.f) : y;
}
inline float exp2_scalar(float x) { return exp2_vec(splat(x))[0]; }

// Horizontal max / sum of one register by halving (log2(kW) dependent steps).
inline float hmax(VF v) {
  float t[kW];
  std::memcpy(t, &v, sizeof(t));
  for (int w = kW / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] = std::max(t[i], t[i + w]);
  return t[0];
}
inline float hsum(VF v) {
  float t[kW];
  std::memcpy(t, &v, sizeof(t));
  for (int w = kW / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}

// s[r][j] = sum_d q[r][d] * kt[d][j] for R rows and the BS keys of one block. q: [R, D] (row
// stride D), kt: [D, BS] (K^T), s: [R, ls] (first BS columns written). Per d: BS / kW loads of K^T,
// R broadcasts of q, R * BS / kW FMAs.
template <int R, int BS>
inline void qk_rows(const float* __restrict q, int D, const float* __restrict kt, float* __restrict s, int ls) {
  constexpr int NV = BS / kW;
  VF acc[R][NV] = {};
  for (int d = 0; d < D; ++d) {
    VF k[NV];
    for (int c = 0; c < NV; ++c) k[c] = loadv(kt + d * BS + kW * c);
    for (int r = 0; r < R; ++r) {
      const float qv = q[r * D + d];
      for (int c = 0; c < NV; ++c) acc[r][c] += qv * k[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) storev(s + r * ls + kW * c, acc[r][c]);
}

// o[r][:] += sum_j p[r][j] * v[j][:] for R rows and nk keys. p: [R, lp], v: [nk, D], o: [R, D];
// D is a multiple of 16 (all supported head sizes). Columns in chunks of 16 whose R x 16
// accumulators stay in registers; per key: 16 / kW loads of V, R broadcasts of p.
template <int R>
inline void pv_rows(const float* __restrict p, int lp, const float* __restrict v, int nk, int D,
                    float* __restrict o) {
  constexpr int NC = 16 / kW;
  for (int d0 = 0; d0 < D; d0 += 16) {
    VF acc[R][NC];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < NC; ++c) acc[r][c] = loadv(o + r * D + d0 + kW * c);
    for (int j = 0; j < nk; ++j) {
      VF vv[NC];
      for (int c = 0; c < NC; ++c) vv[c] = loadv(v + j * D + d0 + kW * c);
      for (int r = 0; r < R; ++r) {
        const float pj = p[r * lp + j];
        for (int c = 0; c < NC; ++c) acc[r][c] += pj * vv[c];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < NC; ++c) storev(o + r * D + d0 + kW * c, acc[r][c]);
  }
}

// s[rows, 0:BS] (row stride ls) = q[rows, D] @ kt[D, BS]: register blocks of RB rows, then one call
// for the remainder (dispatched to the matching R < RB).
template <int BS, int R = kAcc / (BS / kW)>
inline void qk_all(int rows, const float* q, int D, const float* kt, float* s, int ls) {
  if constexpr (R > 0) {
    constexpr int RB = kAcc / (BS / kW);
    if constexpr (R == RB) {
      int r = 0;
      for (; r + RB <= rows; r += RB) qk_rows<RB, BS>(q + size_t(r) * D, D, kt, s + size_t(r) * ls, ls);
      qk_all<BS, RB - 1>(rows - r, q + size_t(r) * D, D, kt, s + size_t(r) * ls, ls);
    } else if (rows == R) {
      qk_rows<R, BS>(q, D, kt, s, ls);
    } else {
      qk_all<BS, R - 1>(rows, q, D, kt, s, ls);
    }
  }
}

// o[rows, D] += p[rows, 0:nk] (row stride lp) @ v[nk, D], blocked like qk_all.
template <int R = kAcc / (16 / kW)>
inline void pv_all(int rows, const float* p, int lp, const float* v, int nk, int D, float* o) {
  if constexpr (R > 0) {
    constexpr int RB = kAcc / (16 / kW);
    if constexpr (R == RB) {
      int r = 0;
      for (; r + RB <= rows; r += RB) pv_rows<RB>(p + size_t(r) * lp, lp, v, nk, D, o + size_t(r) * D);
      pv_all<RB - 1>(rows - r, p + size_t(r) * lp, lp, v, nk, D, o + size_t(r) * D);
    } else if (rows == R) {
      pv_rows<R>(p, lp, v, nk, D, o);
    } else {
      pv_all<R - 1>(rows, p, lp, v, nk, D, o);
    }
  }
}

struct WorkItem {
  int seq, kv_head, q_begin, q_end;  // query tokens [q_begin, q_end) of the sequence
  int64_t cost;                      // rows x keys, to hand out the big items first
};

template <typename scalar_t, int BS>
void prefill_impl(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                  const at::Tensor& value_cache, const at::Tensor& block_tables,
                  const int32_t* q_starts, const int32_t* seq_lens, float scale, int window) {
  constexpr int NB = kChunk / BS;  // cache blocks per chunk
  const int num_seqs = static_cast<int>(block_tables.size(0));
  const int H = static_cast<int>(query.size(1));
  const int D = static_cast<int>(query.size(2));
  const int KVH = static_cast<int>(key_cache.size(1));
  const int G = H / KVH;
  const int TQ = std::max(1, kRowsPerItem / G);  // query tokens per item
  const int max_rows = TQ * G;

  // [total_tokens, H, D] with any token / head strides, head_size contiguous
  const scalar_t* q_ptr = query.data_ptr<scalar_t>();
  const int64_t q_tok = query.stride(0), q_head = query.stride(1);
  scalar_t* o_ptr = out.data_ptr<scalar_t>();
  const int64_t o_tok = out.stride(0), o_head = out.stride(1);
  // [num_blocks, KVH, BS, D] contiguous
  const scalar_t* k_ptr = key_cache.data_ptr<scalar_t>();
  const scalar_t* v_ptr = value_cache.data_ptr<scalar_t>();
  // [num_seqs, max_blocks] int32
  const int32_t* bt_ptr = block_tables.data_ptr<int32_t>();
  const int64_t bt_stride = block_tables.stride(0);
  const float scale_log2 = scale * kLog2e;  // softmax in base 2: exp(x) = 2^(x log2 e)

  std::vector<WorkItem> items;
  for (int s = 0; s < num_seqs; ++s) {
    const int q_len = q_starts[s + 1] - q_starts[s];
    const int ctx = seq_lens[s] - q_len;
    for (int q0 = 0; q0 < q_len; q0 += TQ) {
      const int q1 = std::min(q_len, q0 + TQ);
      const int k_lo = window > 0 ? std::max(0, ctx + q0 - window + 1) : 0;
      const int64_t cost = int64_t(q1 - q0) * G * (ctx + q1 - k_lo);
      for (int kvh = 0; kvh < KVH; ++kvh) items.push_back({s, kvh, q0, q1, cost});
    }
  }
  if (items.empty()) return;
  std::stable_sort(items.begin(), items.end(),
                   [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });

  std::atomic<int64_t> next{0};
  const int64_t num_items = static_cast<int64_t>(items.size());
  const int64_t num_workers = std::min<int64_t>(at::get_num_threads(), num_items);

  // One call per worker thread; each pulls items until none is left (dynamic scheduling).
  at::parallel_for(0, num_workers, 1, [&](int64_t, int64_t) {
    const size_t rows_d = static_cast<size_t>(max_rows) * D, chunk_d = static_cast<size_t>(kChunk) * D;
    std::vector<float> qbuf(rows_d);                                  // [rows, D] q * scale * log2 e
    std::vector<float> obuf(rows_d);                                  // [rows, D] unnormalized output
    std::vector<float> sbuf(static_cast<size_t>(max_rows) * kChunk);  // [rows, kChunk] scores, probs
    std::vector<float> kt(chunk_d);  // [NB, D, BS]: K^T of each block of the chunk
    std::vector<float> vb(chunk_d);  // [kChunk, D]: V of the chunk's keys
    std::vector<float> m_run(max_rows), l_run(max_rows);  // running max and sum per row

    for (int64_t i = next.fetch_add(1); i < num_items; i = next.fetch_add(1)) {
      const WorkItem& it = items[i];
      const int q_start = q_starts[it.seq];
      const int q_len = q_starts[it.seq + 1] - q_start;
      const int seq_len = seq_lens[it.seq];
      const int ctx = seq_len - q_len;
      const int nq = it.q_end - it.q_begin;
      const int rows = nq * G;

      for (int qi = 0; qi < nq; ++qi) {
        const int64_t tok = q_start + it.q_begin + qi;
        for (int g = 0; g < G; ++g) {
          const scalar_t* src = q_ptr + tok * q_tok + int64_t(it.kv_head * G + g) * q_head;
          float* dst = qbuf.data() + size_t(qi * G + g) * D;
          for (int d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]) * scale_log2;
        }
      }
      std::fill_n(obuf.data(), size_t(rows) * D, 0.f);
      std::fill_n(m_run.data(), rows, kNegInf);
      std::fill_n(l_run.data(), rows, 0.f);

      // Query token qi sits at pos_lo + qi and sees keys (pos - window, pos].
      const int pos_lo = ctx + it.q_begin, pos_hi = ctx + it.q_end - 1;
      const int k_lo = window > 0 ? std::max(0, pos_lo - window + 1) : 0;
      const int32_t* bt = bt_ptr + int64_t(it.seq) * bt_stride;
      const int b_last = pos_hi / BS;

      for (int b0 = k_lo / BS; b0 <= b_last; b0 += NB) {
        const int nb = std::min(NB, b_last - b0 + 1);
        const int kb = b0 * BS, nk = nb * BS;  // chunk keys [kb, kb + nk)
        for (int bi = 0; bi < nb; ++bi) {
          const int kblk0 = kb + bi * BS;
          const int nvalid = std::min(BS, seq_len - kblk0);  // slots past seq_len are never read
          const int64_t base = (int64_t(bt[b0 + bi]) * KVH + it.kv_head) * BS * D;
          const scalar_t* kblk = k_ptr + base;  // [BS, D]
          const scalar_t* vblk = v_ptr + base;  // [BS, D]
          float* ktb = kt.data() + size_t(bi) * BS * D;
          float* vbb = vb.data() + size_t(bi) * BS * D;
          for (int j = 0; j < nvalid; ++j) {
            for (int d = 0; d < D; ++d) ktb[size_t(d) * BS + j] = static_cast<float>(kblk[j * D + d]);
            for (int d = 0; d < D; ++d) vbb[size_t(j) * D + d] = static_cast<float>(vblk[j * D + d]);
          }
          for (int j = nvalid; j < BS; ++j) {
            for (int d = 0; d < D; ++d) ktb[size_t(d) * BS + j] = 0.f;
            std::fill_n(vbb + size_t(j) * D, D, 0.f);
          }
          qk_all<BS>(rows, qbuf.data(), D, ktb, sbuf.data() + bi * BS, kChunk);
        }

        // Every key of the chunk visible to every row of the item: no masking needed.
        const bool all_visible = kb + nk - 1 <= pos_lo && (window <= 0 || kb > pos_hi - window);
        for (int qi = 0; qi < nq; ++qi) {
          const int pos = pos_lo + qi;
          int jlo = 0, jhi = nk - 1;  // visible keys kb + [jlo, jhi]
          if (!all_visible) {
            jhi = std::min(nk - 1, pos - kb);
            if (window > 0) jlo = std::max(0, pos - window + 1 - kb);
          }
          for (int g = 0; g < G; ++g) {
            const int row = qi * G + g;
            float* s = sbuf.data() + size_t(row) * kChunk;
            if (jlo > jhi) {  // this token sees no key of this chunk
              std::fill_n(s, nk, 0.f);
              continue;
            }
            for (int j = 0; j < jlo; ++j) s[j] = kNegInf;
            for (int j = jhi + 1; j < nk; ++j) s[j] = kNegInf;
            VF vmax = loadv(s);
            for (int j = kW; j < nk; j += kW) {
              const VF x = loadv(s + j);
              vmax = vmax > x ? vmax : x;
            }
            const float m_new = std::max(m_run[row], hmax(vmax));  // finite: key kb + jhi is visible
            const float alpha = exp2_scalar(m_run[row] - m_new);  // 0 on the first chunk
            m_run[row] = m_new;
            VF vsum = splat(0.f);
            for (int j = 0; j < nk; j += kW) {
              const VF e = exp2_vec(loadv(s + j) - m_new);
              storev(s + j, e);
              vsum += e;
            }
            l_run[row] = l_run[row] * alpha + hsum(vsum);
            if (alpha != 1.f) {
              float* o = obuf.data() + size_t(row) * D;
              for (int d = 0; d < D; ++d) o[d] *= alpha;
            }
          }
        }

        pv_all(rows, sbuf.data(), kChunk, vb.data(), nk, D, obuf.data());
      }

      for (int qi = 0; qi < nq; ++qi) {
        const int64_t tok = q_start + it.q_begin + qi;
        for (int g = 0; g < G; ++g) {
          const int row = qi * G + g;
          const float inv = 1.f / l_run[row];  // > 0: every token sees at least itself
          const float* o = obuf.data() + size_t(row) * D;
          scalar_t* dst = o_ptr + tok * o_tok + int64_t(it.kv_head * G + g) * o_head;
          for (int d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(o[d] * inv);
        }
      }
    }
  });
}

}  // namespace

void paged_prefill_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, const at::Tensor& block_tables,
                             const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                             int64_t max_query_len, double scale, int64_t sliding_window) {
  // ---- tensor checks (the same list as the CUDA launcher) ----
  TORCH_CHECK(query.dim() == 3, "paged_prefill_attention: query must be [num_tokens, num_heads, head_size], got ",
              query.sizes());
  TORCH_CHECK(out.sizes() == query.sizes(), "paged_prefill_attention: out shape ", out.sizes(),
              " must equal query shape ", query.sizes());
  const auto dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "paged_prefill_attention: query must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(out.scalar_type() == dtype && key_cache.scalar_type() == dtype && value_cache.scalar_type() == dtype,
              "paged_prefill_attention: out, key_cache and value_cache must have query's dtype ", dtype);
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1,
              "paged_prefill_attention: the head_size dim of query and out must be contiguous");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes(),
              "paged_prefill_attention: key_cache and value_cache must both be [num_blocks, num_kv_heads, "
              "block_size, head_size], got ", key_cache.sizes(), " and ", value_cache.sizes());
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(),
              "paged_prefill_attention: key_cache and value_cache must be contiguous");
  const int64_t num_heads = query.size(1), head_size = query.size(2);
  const int64_t num_kv_heads = key_cache.size(1), block_size = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == head_size, "paged_prefill_attention: cache head_size ", key_cache.size(3),
              " != query head_size ", head_size);
  TORCH_CHECK(head_size == 64 || head_size == 80 || head_size == 96 || head_size == 128 || head_size == 256,
              "Unsupported head size: ", head_size);
  TORCH_CHECK(block_size == 16 || block_size == 32, "Unsupported block size: ", block_size);
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "paged_prefill_attention: num_heads (", num_heads,
              ") must be a multiple of num_kv_heads (", num_kv_heads, ")");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == at::kInt && block_tables.stride(1) == 1,
              "paged_prefill_attention: block_tables must be [num_seqs, max_blocks] int32 with contiguous rows");
  const int64_t num_seqs = block_tables.size(0);
  TORCH_CHECK(query_start_loc.dim() == 1 && query_start_loc.scalar_type() == at::kInt &&
                  query_start_loc.is_contiguous() && query_start_loc.size(0) == num_seqs + 1,
              "paged_prefill_attention: query_start_loc must be a contiguous int32 [num_seqs + 1] = [", num_seqs + 1,
              "], got ", query_start_loc.scalar_type(), " ", query_start_loc.sizes());
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.scalar_type() == at::kInt && seq_lens.is_contiguous() &&
                  seq_lens.size(0) == num_seqs,
              "paged_prefill_attention: seq_lens must be a contiguous int32 [num_seqs] = [", num_seqs, "], got ",
              seq_lens.scalar_type(), " ", seq_lens.sizes());
  for (const at::Tensor* t : {static_cast<const at::Tensor*>(&out), &key_cache, &value_cache, &block_tables,
                              &query_start_loc, &seq_lens})
    TORCH_CHECK(t->device() == query.device(), "paged_prefill_attention: all tensors must be on ", query.device(),
                ", got one on ", t->device());
  TORCH_CHECK(scale > 0, "paged_prefill_attention: scale must be positive, got ", scale);
  TORCH_CHECK(max_query_len >= 0, "paged_prefill_attention: max_query_len must be >= 0");

  // ---- value checks (cheap on the CPU; the CUDA op trusts them) ----
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int64_t num_blocks = key_cache.size(0), max_blocks = block_tables.size(1);
  TORCH_CHECK(num_seqs == 0 || (starts[0] >= 0 && starts[num_seqs] <= query.size(0)),
              "paged_prefill_attention: query_start_loc must lie within [0, num_tokens = ", query.size(0), "]");
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = int64_t(starts[s + 1]) - starts[s];
    TORCH_CHECK(q_len >= 0, "paged_prefill_attention: query_start_loc must be non-decreasing (sequence ", s, ")");
    TORCH_CHECK(q_len <= max_query_len, "paged_prefill_attention: sequence ", s, " has ", q_len,
                " query tokens > max_query_len ", max_query_len);
    TORCH_CHECK(lens[s] >= q_len, "paged_prefill_attention: seq_lens[", s, "] = ", lens[s],
                " is smaller than its query length ", q_len);
    if (q_len == 0) continue;
    const int64_t used = (int64_t(lens[s]) + block_size - 1) / block_size;
    TORCH_CHECK(used <= max_blocks, "paged_prefill_attention: sequence ", s, " needs ", used,
                " blocks but block_tables has ", max_blocks, " columns");
    for (int64_t b = 0; b < used; ++b) {
      const int32_t id = bt[s * block_tables.stride(0) + b];
      TORCH_CHECK(id >= 0 && id < num_blocks, "paged_prefill_attention: block_tables[", s, ", ", b, "] = ", id,
                  " is outside [0, ", num_blocks, ")");
    }
  }

  const float fscale = static_cast<float>(scale);
  // <= 0: no window; a window longer than any sequence is no window either.
  const int window = static_cast<int>(std::clamp<int64_t>(sliding_window, 0, 1 << 30));
  PAGEDLLM_DISPATCH_FLOATING_TYPES(dtype, "paged_prefill_attention", [&] {
    PAGEDLLM_DISPATCH_BLOCK_SIZE(block_size, BS, [&] {
      prefill_impl<scalar_t, BS>(out, query, key_cache, value_cache, block_tables, starts, lens, fscale, window);
    });
  });
}

}  // namespace pagedllm::cpu
