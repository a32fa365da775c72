// Paged prefill attention on the CPU: causal attention of each sequence's new query tokens over
// its whole KV (cached prefix + new tokens, all already in the paged cache), or bidirectional
// (causal=false, encoders: every row sees all seq_len keys, as if it sat at position seq_len - 1).
// Shapes and semantics: the paged_prefill_attention schema in csrc/torch_bindings.cpp.
//
// Work item = (sequence, kv head, tile of TQ consecutive query tokens). Its rows are the TQ tokens x
// the G query heads that share the kv head (GQA group), row = token * G + head_in_group, ~64 rows,
// so one pass over the KV blocks serves the whole group. The item keeps its rows in SIMD lanes:
// Q^T [D, rows] and O^T [D, rows] (transposed once per item), scores S^T [keys, rows]. Then
//   S^T = K Q^T  : per key and dim, a broadcast K element times row vectors of Q^T,
//   softmax      : per-row max / sum / exp are elementwise over the row vectors,
//   O^T += V^T P^T: per key and dim, a broadcast V element times row vectors of P^T,
// so K and V are read in their cache layout (fp32: in place; bf16/fp16: converted to float once per
// block and item), nothing is transposed per block, and the softmax needs no horizontal reductions.
// Keys go in chunks of 64 (whole cache blocks) per online-softmax step. Items are handed out
// dynamically, largest first, because causal tiles differ a lot in cost.
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
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu/fast_math.h"
#include "dispatch_utils.h"
#include "op_checks.h"
#include "ops.h"

namespace pagedllm::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;

// The inner kernels use GCC/Clang vector extensions: VF is one register of kW floats (AVX-512 or
// AVX2; split into several registers on narrower targets). Plain loops were vectorized along the
// wrong dimension by the compiler. kAcc accumulator registers per register-blocked kernel hide the
// FMA latency (4 cycles x 2 ports) and leave room for operands (32 / 16 architectural registers).
#if defined(__AVX512F__)
constexpr int kW = 16;
constexpr int kAcc = 16;
constexpr int kMaxRowVecs = 4;  // row vectors per register block
#else
constexpr int kW = 8;
constexpr int kAcc = 12;
constexpr int kMaxRowVecs = 3;
#endif
typedef float VF __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t VI __attribute__((vector_size(kW * sizeof(int32_t))));
inline VF loadv(const float* p) { VF v; std::memcpy(&v, p, sizeof(v)); return v; }
inline VI loadvi(const int32_t* p) { VI v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void storev(float* p, VF v) { std::memcpy(p, &v, sizeof(v)); }
inline VF splat(float x) { return VF{} + x; }

// Rows per work item (query tokens x group heads): enough to amortize converting each KV block and
// to fill 4 AVX-512 / 8 AVX2 row vectors; Q^T, O^T (2 x D x 64 floats) stay in L1/L2.
constexpr int kRowsPerItem = 64;
// Keys per online-softmax step (whole cache blocks): amortizes the rescale of O^T.
constexpr int kChunk = 64;

// Keys (QK) or dims (PV) per register block of RVB row vectors: the largest power of two <= 16
// with RVB * that <= kAcc.
constexpr int cols_for(int rvb) {
  int c = 16;
  while (c * rvb > kAcc) c /= 2;
  return c;
}

// 2^x elementwise for x <= 0 (x = -inf gives 0), relative error ~2e-7: round to the nearest integer
// n with the 1.5 * 2^23 trick, 2^(x - n) by the Cephes expf polynomial of r = (x - n) ln 2 in
// [-0.35, 0.35], 2^n built in the exponent bits. 2^-125 and below flush to 0.
inline VF exp2_vec(VF x) {
  const VI underflow = x < -125.f;  // also -inf
  x = underflow ? splat(-125.f) : x;
  const VF n = (x + 12582912.f) - 12582912.f;
  const VF p = exp_reduced((x - n) * 0.6931471805599453f);
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  const VF y = p * (VF)bits;  // same-size vector cast = bit reinterpretation
  return underflow ? splat(0.f) : y;
}

// sT[j][rows] = sum_d k[j][d] * qT[d][rows] for J keys and RVB row vectors.
// k: [J, D] (row stride D); qT: [D, RP] (at the block's first row); sT: [J, RP].
template <int J, int RVB>
inline void qk_tile(const float* __restrict k, const float* __restrict qT, int D, int RP, float* __restrict sT) {
  VF acc[J][RVB] = {};
  for (int d = 0; d < D; ++d) {
    VF q[RVB];
    for (int b = 0; b < RVB; ++b) q[b] = loadv(qT + size_t(d) * RP + b * kW);
    for (int j = 0; j < J; ++j) {
      const float kv = k[size_t(j) * D + d];
      for (int b = 0; b < RVB; ++b) acc[j][b] += kv * q[b];
    }
  }
  for (int j = 0; j < J; ++j)
    for (int b = 0; b < RVB; ++b) storev(sT + size_t(j) * RP + b * kW, acc[j][b]);
}

// oT[d0 + dd][rows] += sum over the chunk's keys j of v_j[dd] * pT[j][rows], for DD dims and RVB row
// vectors. vblk: the chunk's nb blocks ([BS, D] each); pT: [nb * BS, RP]; oT: [D, RP] (both at the
// block's first row).
template <int DD, int RVB>
inline void pv_tile(const float* const* vblk, int nb, int BS, int d0, const float* __restrict pT, int D, int RP,
                    float* __restrict oT) {
  VF acc[DD][RVB];
  for (int dd = 0; dd < DD; ++dd)
    for (int b = 0; b < RVB; ++b) acc[dd][b] = loadv(oT + size_t(d0 + dd) * RP + b * kW);
  for (int blk = 0; blk < nb; ++blk) {
    const float* __restrict v = vblk[blk] + d0;
    const float* __restrict pb = pT + size_t(blk) * BS * RP;
    for (int j = 0; j < BS; ++j) {
      VF pv[RVB];
      for (int b = 0; b < RVB; ++b) pv[b] = loadv(pb + size_t(j) * RP + b * kW);
      for (int dd = 0; dd < DD; ++dd) {
        const float vv = v[size_t(j) * D + dd];
        for (int b = 0; b < RVB; ++b) acc[dd][b] += vv * pv[b];
      }
    }
  }
  for (int dd = 0; dd < DD; ++dd)
    for (int b = 0; b < RVB; ++b) storev(oT + size_t(d0 + dd) * RP + b * kW, acc[dd][b]);
}

// S^T[0:BS, rows of rvb vectors] for one block: keys in groups of cols_for(RVB).
template <int RVB>
inline void qk_block(const float* k, int BS, const float* qT, int D, int RP, float* sT) {
  constexpr int J = cols_for(RVB);
  for (int j = 0; j < BS; j += J) qk_tile<J, RVB>(k + size_t(j) * D, qT, D, RP, sT + size_t(j) * RP);
}
template <int RVB>
inline void pv_chunk(const float* const* vblk, int nb, int BS, const float* pT, int D, int RP, float* oT) {
  constexpr int DD = cols_for(RVB);
  for (int d0 = 0; d0 < D; d0 += DD) pv_tile<DD, RVB>(vblk, nb, BS, d0, pT, D, RP, oT);
}
// Runtime row-vector count (1..kMaxRowVecs) -> template.
template <typename F>
inline void with_rvb(int rvb, F&& f) {
  switch (rvb) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default:
      if constexpr (kMaxRowVecs >= 4) f(std::integral_constant<int, 4>{});
      break;
  }
}

#if defined(__AVX512F__)
// GCC 12 warns inside its own unmasked AVX-512 intrinsics (their pass-through operand is
// _mm512_undefined_ps(): GCC bug 105593), a false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// In place: v[j] lane i <- v[i] lane j (a 16 x 16 float transpose in registers).
inline void transpose16(VF (&v)[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  // u[4a + b] holds, per 128-bit lane c, row 4a + (0..3) at column 4c + b.
  for (int i = 0; i < 8; ++i) {
    const int a = i / 4 * 8 + i % 4;  // u[a], u[a + 4]: rows 4(a/4)..+3 and +4..+7
    t[a] = _mm512_shuffle_f32x4(u[a], u[a + 4], _MM_SHUFFLE(2, 0, 2, 0));
    t[a + 4] = _mm512_shuffle_f32x4(u[a], u[a + 4], _MM_SHUFFLE(3, 1, 3, 1));
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], _MM_SHUFFLE(2, 0, 2, 0));
    v[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], _MM_SHUFFLE(3, 1, 3, 1));
    v[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], _MM_SHUFFLE(2, 0, 2, 0));
    v[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], _MM_SHUFFLE(3, 1, 3, 1));
  }
}
#pragma GCC diagnostic pop
#endif

struct WorkItem {
  int seq, kv_head, q_begin, q_end;  // query tokens [q_begin, q_end) of the sequence
  int64_t cost;                      // rows x keys, to hand out the big items first
};

template <typename scalar_t, int BS>
void prefill_impl(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                  const at::Tensor& value_cache, const at::Tensor& block_tables,
                  const int32_t* q_starts, const int32_t* seq_lens, float scale, int window, bool causal) {
  constexpr int NB = kChunk / BS;  // cache blocks per chunk
  const int num_seqs = static_cast<int>(block_tables.size(0));
  const int H = static_cast<int>(query.size(1));
  const int D = static_cast<int>(query.size(2));
  const int KVH = static_cast<int>(key_cache.size(1));
  const int G = H / KVH;
  const int TQ = std::max(1, kRowsPerItem / G);  // query tokens per item
  const int max_rp = (TQ * G + kW - 1) / kW * kW;  // rows padded to whole vectors

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
      const int64_t cost = int64_t(q1 - q0) * G * (causal ? ctx + q1 - k_lo : seq_lens[s]);
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
    const size_t dr = static_cast<size_t>(D) * max_rp, chunk_d = static_cast<size_t>(kChunk) * D;
    std::vector<float> qT(dr);                                       // [D, RP] q * scale * log2 e
    std::vector<float> oT(dr);                                       // [D, RP] unnormalized output
    std::vector<float> sT(static_cast<size_t>(kChunk) * max_rp);     // [kChunk, RP] scores, then P
    std::vector<float> kbuf(chunk_d), vbuf(chunk_d);                 // [kChunk, D] converted K, V
    std::vector<float> m_run(max_rp), l_run(max_rp);                 // running max / sum per row
    std::vector<int32_t> row_pos(max_rp);                            // position of each row's token
    const float* kblk[NB];
    const float* vblk[NB];

    for (int64_t i = next.fetch_add(1); i < num_items; i = next.fetch_add(1)) {
      const WorkItem& it = items[i];
      const int q_start = q_starts[it.seq];
      const int q_len = q_starts[it.seq + 1] - q_start;
      const int seq_len = seq_lens[it.seq];
      const int ctx = seq_len - q_len;
      const int nq = it.q_end - it.q_begin;
      const int rows = nq * G;
      const int RP = (rows + kW - 1) / kW * kW, RV = RP / kW;
      // Query token qi sits at pos_lo + qi and sees keys (pos - window, pos]. Non-causal: every row
      // takes position seq_len - 1 (no window), so the same masking sees exactly the keys < seq_len.
      const int pos_lo = causal ? ctx + it.q_begin : seq_len - 1;
      const int pos_hi = causal ? ctx + it.q_end - 1 : seq_len - 1;

      // Row r's query: token q_start + q_begin + r / G, head kv_head * G + r % G.
      const auto q_row = [&](int r) {
        return q_ptr + (q_start + it.q_begin + r / G) * q_tok + int64_t(it.kv_head * G + r % G) * q_head;
      };
      bool q_filled = false;
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (D % kW == 0) {  // 16 rows x 16 dims at a time, transposed in registers (padding rows: 0)
          for (int r0 = 0; r0 < RP; r0 += kW) {
            for (int d0 = 0; d0 < D; d0 += kW) {
              VF v[kW];
              for (int i = 0; i < kW; ++i) v[i] = r0 + i < rows ? loadv(q_row(r0 + i) + d0) * scale_log2 : splat(0.f);
              transpose16(v);
              for (int j = 0; j < kW; ++j) storev(qT.data() + size_t(d0 + j) * RP + r0, v[j]);
            }
          }
          q_filled = true;
        }
      }
#endif
      if (!q_filled) {
        std::fill_n(qT.data(), size_t(D) * RP, 0.f);  // padding rows stay 0 (finite, never written out)
        for (int r = 0; r < rows; ++r) {
          const scalar_t* src = q_row(r);
          for (int d = 0; d < D; ++d) qT[size_t(d) * RP + r] = static_cast<float>(src[d]) * scale_log2;
        }
      }
      for (int r = 0; r < RP; ++r) row_pos[r] = causal ? pos_lo + std::min(r, rows - 1) / G : pos_lo;
      std::fill_n(oT.data(), size_t(D) * RP, 0.f);
      std::fill_n(m_run.data(), RP, kNegInf);
      std::fill_n(l_run.data(), RP, 0.f);

      const int k_lo = window > 0 ? std::max(0, pos_lo - window + 1) : 0;
      const int32_t* bt = bt_ptr + int64_t(it.seq) * bt_stride;
      const int b_last = pos_hi / BS;

      for (int b0 = k_lo / BS; b0 <= b_last; b0 += NB) {
        const int nb = std::min(NB, b_last - b0 + 1);
        const int kb = b0 * BS, nk = nb * BS;  // chunk keys [kb, kb + nk)
        for (int bi = 0; bi < nb; ++bi) {
          const int nvalid = std::min(BS, seq_len - (kb + bi * BS));  // slots past seq_len: never read
          const int64_t base = (int64_t(bt[b0 + bi]) * KVH + it.kv_head) * BS * D;
          if (std::is_same_v<scalar_t, float> && nvalid == BS) {  // fp32, full block: use it in place
            kblk[bi] = reinterpret_cast<const float*>(k_ptr + base);
            vblk[bi] = reinterpret_cast<const float*>(v_ptr + base);
            continue;
          }
          float* kf = kbuf.data() + size_t(bi) * BS * D;
          float* vf = vbuf.data() + size_t(bi) * BS * D;
          for (size_t e = 0; e < size_t(nvalid) * D; ++e) {
            kf[e] = static_cast<float>(k_ptr[base + e]);
            vf[e] = static_cast<float>(v_ptr[base + e]);
          }
          std::fill(kf + size_t(nvalid) * D, kf + size_t(BS) * D, 0.f);
          std::fill(vf + size_t(nvalid) * D, vf + size_t(BS) * D, 0.f);
          kblk[bi] = kf;
          vblk[bi] = vf;
        }

        // S^T = K Q^T, register blocks of up to kMaxRowVecs row vectors
        for (int rv = 0; rv < RV; rv += kMaxRowVecs) {
          with_rvb(std::min(kMaxRowVecs, RV - rv), [&](auto rvb) {
            for (int bi = 0; bi < nb; ++bi)
              qk_block<rvb()>(kblk[bi], BS, qT.data() + rv * kW, D, RP, sT.data() + size_t(bi) * BS * RP + rv * kW);
          });
        }

        // Online softmax, elementwise over row vectors. Masking only when some key of the chunk is
        // invisible to some row (the causal diagonal, the window's trailing edge, keys past
        // seq_len, which lie past every row's position).
        const bool all_visible = kb + nk - 1 <= pos_lo && (window <= 0 || kb > pos_hi - window);
        for (int rv = 0; rv < RV; ++rv) {
          float* s = sT.data() + rv * kW;
          if (!all_visible) {
            const VI pos = loadvi(row_pos.data() + rv * kW);
            for (int j = 0; j < nk; ++j) {
              const VI key = VI{} + (kb + j);
              VI visible = key <= pos;
              if (window > 0) visible &= (pos - key) < window;
              storev(s + size_t(j) * RP, visible ? loadv(s + size_t(j) * RP) : splat(kNegInf));
            }
          }
          VF mx = splat(kNegInf);
          for (int j = 0; j < nk; ++j) {
            const VF x = loadv(s + size_t(j) * RP);
            mx = mx > x ? mx : x;
          }
          const VF m_old = loadv(m_run.data() + rv * kW);
          const VF m_new = m_old > mx ? m_old : mx;
          // A row that has seen no key yet keeps m = -inf; subtract 0 instead (its p are all 0).
          const VF m_use = m_new == kNegInf ? splat(0.f) : m_new;
          const VF alpha = exp2_vec(m_old - m_use);  // 0 while the row had seen nothing
          storev(m_run.data() + rv * kW, m_new);
          VF sum = splat(0.f);
          for (int j = 0; j < nk; ++j) {
            const VF p = exp2_vec(loadv(s + size_t(j) * RP) - m_use);
            storev(s + size_t(j) * RP, p);
            sum += p;
          }
          storev(l_run.data() + rv * kW, loadv(l_run.data() + rv * kW) * alpha + sum);
          float* o = oT.data() + rv * kW;
          for (int d = 0; d < D; ++d) storev(o + size_t(d) * RP, loadv(o + size_t(d) * RP) * alpha);
        }

        // O^T += V^T P^T
        for (int rv = 0; rv < RV; rv += kMaxRowVecs) {
          with_rvb(std::min(kMaxRowVecs, RV - rv), [&](auto rvb) {
            pv_chunk<rvb()>(vblk, nb, BS, sT.data() + rv * kW, D, RP, oT.data() + rv * kW);
          });
        }
      }

      // Row r's output: as q_row. l_run > 0: every token sees at least itself.
      const auto o_row = [&](int r) {
        return o_ptr + (q_start + it.q_begin + r / G) * o_tok + int64_t(it.kv_head * G + r % G) * o_head;
      };
      bool written = false;
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (D % kW == 0) {
          for (int r0 = 0; r0 < rows; r0 += kW) {
            for (int d0 = 0; d0 < D; d0 += kW) {
              VF v[kW];
              for (int j = 0; j < kW; ++j) v[j] = loadv(oT.data() + size_t(d0 + j) * RP + r0);
              transpose16(v);
              for (int i = 0; i < kW && r0 + i < rows; ++i) storev(o_row(r0 + i) + d0, v[i] * (1.f / l_run[r0 + i]));
            }
          }
          written = true;
        }
      }
#endif
      if (!written) {
        for (int r = 0; r < rows; ++r) {
          const float inv = 1.f / l_run[r];
          scalar_t* dst = o_row(r);
          for (int d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(oT[size_t(d) * RP + r] * inv);
        }
      }
    }
  });
}

}  // namespace

void paged_prefill_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, const at::Tensor& block_tables,
                             const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                             int64_t max_query_len, double scale, int64_t sliding_window, bool causal) {
  // Tensor checks shared with the CUDA launcher (op_checks.cpp): shapes, dtypes, strides, one device.
  check_paged_prefill_attention(out, query, key_cache, value_cache, block_tables, query_start_loc, seq_lens,
                                max_query_len, scale);
  TORCH_CHECK(causal || sliding_window <= 0, "paged_prefill_attention: a sliding window needs causal attention");
  const auto dtype = query.scalar_type();
  const int64_t block_size = key_cache.size(2), num_seqs = block_tables.size(0);

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
      prefill_impl<scalar_t, BS>(out, query, key_cache, value_cache, block_tables, starts, lens, fscale, window,
                                 causal);
    });
  });
}

}  // namespace pagedllm::cpu
