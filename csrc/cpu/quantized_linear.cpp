// quantized_linear on the CPU: y = x W^T (+ bias) in fp32, for the decode GEMMs of a model whose
// fp32 weights are GGUF-style block-quantized values (the default model: Q4_1 layers, a Q8_0 head).
//
// Why: a small decode step is bound by streaming the weights (538 MB a step in fp32 for the default
// model). Its weights are dequantized GGUF blocks: within each run of 32 inputs of an output feature,
// every weight is d * (c - offset) or d * c + m, with d, m fp16 and c a 4, 5 or 8-bit code (the
// formats below, named by their GGML type id; the K-quants Q4_K and Q6_K have fp32 d, m products of
// fp16 and 6 / 8-bit scales, Q6_K one d per 16 inputs). pack_quantized_linear_weight finds those d, m, c and
// checks that the kernel's formula gives back every fp32 weight bit for bit (d * c is exact in fp32:
// 11 + 8 significant bits at most, so fma(d, c, m) is gguf's (d * c) + m); a weight that is not
// exactly of the asked form is not packed (the caller keeps the fp32 path; the formats and that
// search: gguf_block_codes.h). Q4_0 / Q5_0 dequantize
// to d * float(c - offset): their zeros are -0.0 where d < 0, which fl(d * q + m) never gives, so
// they are expanded with that product, not an offset. The kernel streams the codes (5-9 bits a
// weight) and expands them into the exact fp32 weights: for up to 12 rows in registers right before
// the FMAs (AVX-512), otherwise a whole panel at a time into an L2-resident fp32 buffer that the
// packed_linear tile (panel_tile.h) reads. Each output is the same FMA chain over k as in
// packed_linear on the fp32 weights: the result is bit-identical, for every row count.
// (benchmarks/kernels/bench_packed_linear.py: one decode step of the default model, 2 cores, 6 ms
// at 1 row, 11 ms at 8, 29 ms at 32, against 24 / 28 / 42 ms for packed_linear on fp32 weights.)
//
// Packed layout, uint8 [ceil(N / 32), K / 32, block_bytes]: per panel of 32 output features and
// block of 32 inputs, d[32] (Q6_K: d[2][32], inputs 0-15 and 16-31), then (affine formats) m[32], fp16
// for the formats whose scales are fp16 in GGUF, fp32 for the K-quants' (gguf_block_codes.h scale_at),
// then the codes:
//   4 and 5 bits: 32 x 16 bytes (byte j of input k: feature j's low 4 bits in the low nibble,
//                 feature j + 16's in the high one), then (5 bits) 32 uint32 (bit j of input k's
//                 word: feature j's bit 4);
//   8 bits:       32 x 32 int8 (Q8_0; Q6_K's 6-bit codes too).
// Features past N have d = m = 0 and code 0 (weight 0 in every format once d = 0).
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu_only_ops.h"

#include "gguf_block_codes.h"
#include "next_weight.h"
#include "panel_linear_io.h"
#include "panel_tile.h"

namespace pagedllm::cpu {
namespace {

using namespace gguf_codes;  // NOLINT: the formats and their search (gguf_block_codes.h)
using panel::kPanel;
using panel::kTileRows;


#if defined(__AVX512F__)
// Scales i .. i + 15 of a block's scale area as fp32 (scale_at, 16 at a time).
template <int QT>
inline __m512 load_scales(const uint8_t* blk, int64_t i) {
  if constexpr (format_of(QT).half_scales) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2 * i)));
  } else {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(blk) + i);
  }
}

// The fp32 weights of input k of a block: features 0-15 in w0, 16-31 in w1, exactly weight_of.
template <int QT>
inline void expand_row(const uint8_t* codes, int64_t k, __m512 d0, __m512 d1, __m512 m0, __m512 m1, __m512& w0,
                       __m512& w1) {
  constexpr Format f = format_of(QT);
  __m512i c0, c1;
  if constexpr (f.code_bits == 8) {
    const __m128i* c = reinterpret_cast<const __m128i*>(codes + k * kPanel);
    c0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(c));
    c1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(c + 1));
  } else {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k * 16)));
    c0 = _mm512_and_si512(v, _mm512_set1_epi32(0xF));
    c1 = _mm512_srli_epi32(v, 4);
    if constexpr (f.code_bits == 5) {
      const uint32_t* high = reinterpret_cast<const uint32_t*>(codes + kBlock * kPanel / 2);
      const __m512i h = _mm512_set1_epi32(static_cast<int>(high[k]));
      const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      const __m512i one = _mm512_set1_epi32(1);
      c0 = _mm512_or_si512(c0, _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(h, lanes), one), 4));
      c1 = _mm512_or_si512(
          c1, _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(h, _mm512_add_epi32(lanes, _mm512_set1_epi32(16))), one), 4));
    }
  }
  if constexpr (f.affine) {
    w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c0), d0, m0);
    w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c1), d1, m1);
  } else {
    const __m512i off = _mm512_set1_epi32(f.offset);
    w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c0, off)), d0);
    w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c1, off)), d1);
  }
}

// Up to a register tile of rows against NP consecutive panels: each weight vector is expanded in
// registers right before its FMAs (with few rows the FMA chains leave the ports idle enough to hide
// it; at 8-12 rows it still beats a round trip through L1). Same chains as panel_tile: same bits.
// NP = 2 for 1-2 rows: one panel gives 2 * M FMA chains, and at M = 1 each k waits out the FMA
// latency (4 cycles a 24-byte Q4_1 row of 32 features: ~21 GB/s a core, under the DRAM rate); two
// panels side by side give twice the independent chains, each output's still in k order.
// ahead: the thread's share of what the caller reads next (fetch_ahead.h), a line every other k as in
// panel_tile, or nullptr (1-2 rows: panel::kCodesFetchAheadRows).
template <int M, int NP, int QT>
void fused_tile(const float* __restrict__ x, int64_t ldx, const uint8_t* __restrict__ codes_panel,
                int64_t panel_bytes, int64_t K, const float* __restrict__ bias, float* __restrict__ y, int64_t ldy,
                int64_t n_valid, const uint8_t* next, int64_t next_bytes, fetch_ahead::Cursor* ahead) {
  constexpr Format f = format_of(QT);
  constexpr int64_t bb = block_bytes(f);
  const int64_t B = K / kBlock, next_lines = (next_bytes + 63) / 64;
  fetch_ahead::Cursor later = ahead != nullptr ? *ahead : fetch_ahead::Cursor{};
  __m512 c0[NP][M], c1[NP][M];
#pragma GCC unroll 2
  for (int q = 0; q < NP; ++q) panel::zero_tile<M>(c0[q], c1[q]);
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* blk = codes_panel + b * bb;
    for (int64_t line = b * next_lines / B; line < (b + 1) * next_lines / B; ++line) {
      _mm_prefetch(reinterpret_cast<const char*>(next + 64 * line), _MM_HINT_T1);
    }
    __m512 m0[NP], m1[NP];
#pragma GCC unroll 2
    for (int q = 0; q < NP; ++q) {
      m0[q] = f.affine ? load_scales<QT>(blk + q * panel_bytes, kPanel) : _mm512_setzero_ps();
      m1[q] = f.affine ? load_scales<QT>(blk + q * panel_bytes, kPanel + 16) : _mm512_setzero_ps();
    }
    const float* xb = x + b * kBlock;
    for (int64_t s0 = 0; s0 < kBlock; s0 += f.sub) {
      __m512 d0[NP], d1[NP];
#pragma GCC unroll 2
      for (int q = 0; q < NP; ++q) {
        d0[q] = load_scales<QT>(blk + q * panel_bytes, s0 / f.sub * kPanel);
        d1[q] = load_scales<QT>(blk + q * panel_bytes, s0 / f.sub * kPanel + 16);
      }
      for (int64_t k = s0; k < s0 + f.sub; ++k) {
        if ((k & 1) == 0 && !later.done()) later.step();
#pragma GCC unroll 2
        for (int q = 0; q < NP; ++q) {
          __m512 w0, w1;
          expand_row<QT>(blk + q * panel_bytes + scale_bytes(f), k, d0[q], d1[q], m0[q], m1[q], w0, w1);
#pragma GCC unroll 12
          for (int m = 0; m < M; ++m) {
            const __m512 xv = _mm512_set1_ps(xb[m * ldx + k]);
            c0[q][m] = _mm512_fmadd_ps(w0, xv, c0[q][m]);
            c1[q][m] = _mm512_fmadd_ps(w1, xv, c1[q][m]);
          }
        }
      }
    }
  }
  if (ahead != nullptr) *ahead = later;
#pragma GCC unroll 2
  for (int q = 0; q < NP; ++q) {
    panel::store_tile<M>(c0[q], c1[q], bias ? bias + q * kPanel : nullptr, y + q * kPanel, ldy, n_valid - q * kPanel);
  }
}

using FusedFn = void (*)(const float*, int64_t, const uint8_t*, int64_t, int64_t, const float*, float*, int64_t,
                         int64_t, const uint8_t*, int64_t, fetch_ahead::Cursor*);
constexpr int kFusedRows = kTileRows;
constexpr int kGroupedRows = 2;  // row counts that take two panels side by side
// Panels a fused tile of M rows takes side by side. Measured (one core, Q4_1 layer GEMVs, L3-resident):
// 1 row 20 GB/s with one panel, 30 with two, 28 with three, 27 with four; 2 rows 20 -> 25 with two; 3
// rows no gain. 8-bit codes (a 36-byte row of 32 features) stay single: the model's Q8_0 LM head read
// from memory was slower paired.
template <int QT>
constexpr int64_t group_panels(int64_t M) { return M <= kGroupedRows && format_of(QT).code_bits < 8 ? 2 : 1; }
template <int QT, int NP, int... Ms>
constexpr auto make_fused(std::integer_sequence<int, Ms...>) {
  return std::array<FusedFn, sizeof...(Ms)>{&fused_tile<Ms + 1, NP, QT>...};
}
template <int QT>
constexpr auto kFused = make_fused<QT, 1>(std::make_integer_sequence<int, kFusedRows>{});
template <int QT>
constexpr auto kPaired = make_fused<QT, 2>(std::make_integer_sequence<int, kGroupedRows>{});
template <int QT>
FusedFn fused_fn(int64_t M, int64_t np) {
  return np == 1 ? kFused<QT>[M - 1] : kPaired<QT>[M - 1];
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PAGEDLLM_QL_AVX2 1
// The AVX2 + FMA twins (x86-64-v3 CPUs without AVX-512, e.g. AMD Zen 2 / 3): 8 features a vector, a
// panel row of 32 is 4 vectors, the same formulas as weight_of, in the same order.

// Scales i .. i + 7 of a block's scale area as fp32 (scale_at, 8 at a time).
template <int QT>
inline __m256 load_scales8(const uint8_t* blk, int64_t i) {
  if constexpr (format_of(QT).half_scales) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2 * i)));
  } else {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(blk) + i);
  }
}

// The fp32 weights of input k of a block (blk: its scale area, then the codes): features 8v .. 8v + 7
// in w[v], with k's sub-block's scales and (affine formats) the offsets.
template <int QT>
inline void expand_row8(const uint8_t* blk, int64_t k, __m256 (&w)[4]) {
  constexpr Format f = format_of(QT);
  const uint8_t* codes = blk + scale_bytes(f);
  __m256i c[4];
  if constexpr (f.code_bits == 8) {
    for (int v = 0; v < 4; ++v) {
      c[v] = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + k * kPanel + 8 * v)));
    }
  } else {
    // byte j: feature j in the low nibble, j + 16 in the high one
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k * 16));
    const __m256i lo8 = _mm256_cvtepu8_epi32(bytes), hi8 = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
    const __m256i nibble = _mm256_set1_epi32(0xF);
    c[0] = _mm256_and_si256(lo8, nibble);
    c[1] = _mm256_and_si256(hi8, nibble);
    c[2] = _mm256_srli_epi32(lo8, 4);
    c[3] = _mm256_srli_epi32(hi8, 4);
    if constexpr (f.code_bits == 5) {
      const uint32_t* high = reinterpret_cast<const uint32_t*>(codes + kBlock * kPanel / 2);
      const __m256i h = _mm256_set1_epi32(static_cast<int>(high[k]));
      const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      for (int v = 0; v < 4; ++v) {
        const __m256i bit =
            _mm256_and_si256(_mm256_srlv_epi32(h, _mm256_add_epi32(lanes, _mm256_set1_epi32(8 * v))), _mm256_set1_epi32(1));
        c[v] = _mm256_or_si256(c[v], _mm256_slli_epi32(bit, 4));
      }
    }
  }
  for (int v = 0; v < 4; ++v) {
    const __m256 d = load_scales8<QT>(blk, k / f.sub * kPanel + 8 * v);
    if constexpr (f.affine) {
      w[v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c[v]), d, load_scales8<QT>(blk, kPanel + 8 * v));
    } else {
      w[v] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(c[v], _mm256_set1_epi32(f.offset))), d);
    }
  }
}

// Up to kFusedRows rows with the weights expanded in registers (4 accumulators a row: 2 rows keep the
// 16 registers free of spills). One FMA chain per output over k in order: the portable panel_tile's
// (its c += w * x contracts to the same FMA), so the same bits.
template <int M, int QT>
void fused_tile(const float* __restrict__ x, int64_t ldx, const uint8_t* __restrict__ codes_panel,
                int64_t /*panel_bytes*/, int64_t K, const float* __restrict__ bias, float* __restrict__ y, int64_t ldy,
                int64_t n_valid, const uint8_t* next, int64_t next_bytes,
                fetch_ahead::Cursor* /*ahead*/) {  // 1-2 rows: none (panel::kCodesFetchAheadRows)
  constexpr Format f = format_of(QT);
  constexpr int64_t bb = block_bytes(f);
  const int64_t B = K / kBlock, next_lines = (next_bytes + 63) / 64;
  __m256 acc[M][4];
  for (int m = 0; m < M; ++m) {
    for (int v = 0; v < 4; ++v) acc[m][v] = _mm256_setzero_ps();
  }
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* blk = codes_panel + b * bb;
    for (int64_t line = b * next_lines / B; line < (b + 1) * next_lines / B; ++line) {
      _mm_prefetch(reinterpret_cast<const char*>(next + 64 * line), _MM_HINT_T1);
    }
    const float* xb = x + b * kBlock;
    for (int64_t k = 0; k < kBlock; ++k) {
      __m256 w[4];
      expand_row8<QT>(blk, k, w);
      for (int m = 0; m < M; ++m) {
        const __m256 xv = _mm256_broadcast_ss(xb + m * ldx + k);
        for (int v = 0; v < 4; ++v) acc[m][v] = _mm256_fmadd_ps(w[v], xv, acc[m][v]);
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    alignas(32) float sums[kPanel];
    for (int v = 0; v < 4; ++v) _mm256_store_ps(sums + 8 * v, acc[m][v]);
    for (int64_t j = 0; j < std::min(n_valid, kPanel); ++j) y[m * ldy + j] = sums[j] + (bias ? bias[j] : 0.f);
  }
}

using FusedFn = void (*)(const float*, int64_t, const uint8_t*, int64_t, int64_t, const float*, float*, int64_t,
                         int64_t, const uint8_t*, int64_t, fetch_ahead::Cursor*);
constexpr int kFusedRows = 2;
template <int QT>
constexpr int64_t group_panels(int64_t) { return 1; }  // 16 registers: one panel's chains fill them
template <int QT>
constexpr std::array<FusedFn, kFusedRows> kFused = {&fused_tile<1, QT>, &fused_tile<2, QT>};
template <int QT>
FusedFn fused_fn(int64_t M, int64_t) { return kFused<QT>[M - 1]; }
#else
constexpr int kFusedRows = 0;  // the portable build always expands whole panels
#endif

// Expands the B blocks of one packed panel into fp32 weights [B * 32, 32] (the layout panel_tile
// reads), exactly weight_of per weight (the next panel is fetched during the row tiles: panel_tiles).
template <int QT>
void expand_blocks(const uint8_t* panel_codes, int64_t B, float* __restrict__ dst) {
  constexpr Format f = format_of(QT);
  constexpr int64_t bb = block_bytes(f);
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* src = panel_codes + b * bb;
    float* out = dst + b * kBlock * kPanel;
#if defined(__AVX512F__)
    const uint8_t* codes = src + scale_bytes(f);
    const __m512 m0 = f.affine ? load_scales<QT>(src, kPanel) : _mm512_setzero_ps();
    const __m512 m1 = f.affine ? load_scales<QT>(src, kPanel + 16) : _mm512_setzero_ps();
    for (int64_t k = 0; k < kBlock; ++k) {
      const int64_t ds = k / f.sub * kPanel;
      __m512 w0, w1;
      expand_row<QT>(codes, k, load_scales<QT>(src, ds), load_scales<QT>(src, ds + 16), m0, m1, w0, w1);
      _mm512_storeu_ps(out + k * kPanel, w0);
      _mm512_storeu_ps(out + k * kPanel + 16, w1);
    }
#elif defined(PAGEDLLM_QL_AVX2)
    for (int64_t k = 0; k < kBlock; ++k) {
      __m256 w[4];
      expand_row8<QT>(src, k, w);
      for (int v = 0; v < 4; ++v) _mm256_storeu_ps(out + k * kPanel + 8 * v, w[v]);
    }
#else
    const uint8_t* codes = src + scale_bytes(f);
    for (int64_t k = 0; k < kBlock; ++k) {
      for (int64_t j = 0; j < kPanel; ++j) {
        out[k * kPanel + j] = weight_of<QT>(scale_at<QT>(src, k / f.sub * kPanel + j), code_at<QT>(codes, k, j),
                                            f.affine ? scale_at<QT>(src, kPanel + j) : 0.f);
      }
    }
#endif
  }
}

void check_qtype(int64_t qtype, const char* op) {
  TORCH_CHECK(qtype == kQ4_0 || qtype == kQ4_1 || qtype == kQ5_0 || qtype == kQ5_1 || qtype == kQ8_0 || qtype == kQ4_K ||
                  qtype == kQ6_K,
              op, ": qtype must be a GGML type id of Q4_0 (2), Q4_1 (3), Q5_0 (6), Q5_1 (7), Q8_0 (8), Q4_K (12) or ",
              "Q6_K (14), got ", qtype);
}

template <int QT>
at::Tensor pack(const at::Tensor& w) {
  constexpr Format f = format_of(QT);
  constexpr int64_t bb = block_bytes(f);
  const int64_t N = w.size(0), K = w.size(1);
  const at::Tensor none = at::empty({0}, w.options().dtype(at::kByte));
  if (N == 0 || K == 0 || K % kBlock != 0) return none;
  const int64_t P = (N + kPanel - 1) / kPanel, B = K / kBlock;
  const float* src = w.data_ptr<float>();
  {  // most weights that are not codes fail on their first row: no allocation for them
    float d[2], m;
    int c[kBlock];
    for (int64_t b = 0; b < B; ++b) {
      if (!quantize_block<QT>(src + b * kBlock, d, m, c)) return none;
    }
  }
  at::Tensor packed = at::zeros({P, B, bb}, w.options().dtype(at::kByte));
  uint8_t* dst = packed.data_ptr<uint8_t>();
  std::atomic<bool> exact{true};
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    int c[kBlock];
    float ds[2], m;
    for (int64_t p = p0; p < p1 && exact.load(std::memory_order_relaxed); ++p) {
      for (int64_t j = 0; j < kPanel && p * kPanel + j < N; ++j) {
        for (int64_t b = 0; b < B; ++b) {
          uint8_t* blk = dst + (p * B + b) * bb;  // d[32 / sub][32], then (affine) m[32]
          if (!quantize_block<QT>(src + (p * kPanel + j) * K + b * kBlock, ds, m, c)) {
            exact.store(false, std::memory_order_relaxed);
            return;
          }
          for (int64_t s = 0; s < kBlock / f.sub; ++s) store_scale<QT>(blk, s * kPanel + j, ds[s]);
          if (f.affine) store_scale<QT>(blk, kPanel + j, m);
          store_codes<QT>(blk + scale_bytes(f), j, c);
        }
      }
    }
  });
  return exact.load() ? packed : none;
}

}  // namespace

// weight [N, K] float32 -> packed uint8 [ceil(N / 32), K / 32, block bytes of qtype], or an empty
// tensor when the weight is not exactly made of such blocks (K not a multiple of 32 included).
at::Tensor pack_quantized_linear_weight(const at::Tensor& weight, int64_t qtype) {
  check_qtype(qtype, "pack_quantized_linear_weight");
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 2,
              "pack_quantized_linear_weight: the weight must be a float32 CPU tensor [out_features, in_features]");
  const at::Tensor w = weight.contiguous();
  return with_qtype(qtype, [&](auto qt) { return pack<decltype(qt)::value>(w); });
}

// x [..., K] float32; packed from pack_quantized_linear_weight(weight [N, K], qtype); bias [N] or None.
// Returns y [..., N], bit-identical to packed_linear(x, pack_linear_weight(weight), bias, N).
at::Tensor quantized_linear(const at::Tensor& x, const at::Tensor& packed, int64_t qtype,
                            const std::optional<at::Tensor>& bias, int64_t out_features) {
  check_qtype(qtype, "quantized_linear");
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "quantized_linear: x and the packed weight must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "quantized_linear: x must be float32, got ", x.scalar_type());
  const int64_t bb = with_qtype(qtype, [](auto qt) { return block_bytes(format_of(decltype(qt)::value)); });
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.size(2) == bb && packed.is_contiguous(),
              "quantized_linear: the weight must come from pack_quantized_linear_weight with qtype=", qtype);
  const int64_t K = packed.size(1) * kBlock, N = out_features;
  const panel::LinearIO io = panel::linear_io("quantized_linear", x, K, N, packed.size(0), bias);
  if (io.M == 0) return io.y;
  with_qtype(qtype, [&](auto qt) {
    constexpr int QT = decltype(qt)::value;
    const int64_t P = packed.size(0), panel_bytes = packed.size(1) * packed.size(2);
    const uint8_t* wp = packed.data_ptr<uint8_t>();
    const int64_t B = packed.size(1);
    const next_weight::Hint after = next_weight::current();  // the next GEMM's weight (decoder_layers)
    fetch_ahead::Plan* later = fetch_ahead::current();       // what the caller reads next (decoder_layers)
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      fetch_ahead::Cursor* ahead = panel::ahead_for(later, io.M, panel::kCodesFetchAheadRows);
#if defined(__AVX512F__) || defined(PAGEDLLM_QL_AVX2)
      if (io.M <= kFusedRows) {
        // The thread's panels in the fewest groups of at most group_panels(M), of balanced sizes.
        const int64_t n = p1 - p0, groups = (n + group_panels<QT>(io.M) - 1) / group_panels<QT>(io.M);
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t p = p0 + g * n / groups, np = p0 + (g + 1) * n / groups - p;
          const uint8_t* codes = wp + p * panel_bytes;
          // Fetched meanwhile: as many panels of the next group, or the next GEMM's first ones.
          const auto [next, next_bytes] = g + 1 < groups ? std::pair(codes + np * panel_bytes, np * panel_bytes)
                                                         : next_weight::this_thread_start(after, 2);
          const int64_t n0 = p * kPanel;
          fused_fn<QT>(io.M, np)(io.xp, io.ldx, codes, panel_bytes, K, io.bias ? io.bias + n0 : nullptr, io.yp + n0,
                                 N, N - n0, next, next_bytes, ahead);
        }
        return;
      }
#endif
      // More rows: each panel expanded whole (panel::panel_tiles) into a buffer that every row tile reads.
      std::vector<float> expanded(K * kPanel);
      for (int64_t p = p0; p < p1; ++p) {
        const uint8_t* codes = wp + p * panel_bytes;
        const auto [next, next_bytes] = p + 1 < p1 ? std::pair(codes + panel_bytes, panel_bytes)
                                                   : next_weight::this_thread_start(after, 1);
        const int64_t n0 = p * kPanel;
        expand_blocks<QT>(codes, B, expanded.data());
        panel::panel_tiles(io, expanded.data(), K, N, n0, std::min(kPanel, N - n0), next, next_bytes, ahead);
      }
    });
  });
  return io.y;
}

}  // namespace pagedllm::cpu
