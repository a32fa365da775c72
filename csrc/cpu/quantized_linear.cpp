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
// exactly of the asked form is not packed (the caller keeps the fp32 path). Q4_0 / Q5_0 dequantize
// to d * float(c - offset): their zeros are -0.0 where d < 0, which fl(d * q + m) never gives, so
// they are expanded with that product, not an offset. The kernel streams the codes (5-9 bits a
// weight) and expands them into the exact fp32 weights: for up to 12 rows in registers right before
// the FMAs (AVX-512), otherwise 64 inputs at a time into an L1-resident chunk that the fp32
// packed_linear tile (panel_tile.h) reads. Each output is the same FMA chain over k as in
// packed_linear on the fp32 weights: the result is bit-identical, for every row count.
// (benchmarks/kernels/bench_packed_linear.py: one decode step of the default model, 2 cores, 6 ms
// at 1 row, 11 ms at 8, 29 ms at 32, against 24 / 28 / 42 ms for packed_linear on fp32 weights.)
//
// Packed layout, uint8 [ceil(N / 32), K / 32, block_bytes]: per panel of 32 output features and
// block of 32 inputs, d[32] float32 (Q6_K: d[2][32], inputs 0-15 and 16-31), then (affine formats)
// m[32] float32, then the codes:
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

#include "panel_linear_io.h"
#include "panel_tile.h"

namespace pagedllm::cpu {
namespace {

using panel::kPanel;
using panel::kTileRows;
using panel::kTiles;

constexpr int64_t kBlock = 32;  // inputs per quantization block (GGUF's QK4_0 ... QK8_0)
constexpr int64_t kChunkBlocks = 2;  // blocks expanded at a time for many rows: 8 KB of fp32 weights
                                     // (1 and 4 blocks measured slower at 32 rows)

// The block formats, by GGML type id. weight = affine ? fma(d, c, m) : d * float(c - offset).
struct Format {
  int code_bits;  // 4, 5 or 8 (8: c is a signed byte)
  bool affine;
  int offset;     // signed formats only
  int sub;        // inputs per scale d: 32, or 16 (Q6_K; signed formats only)
};
// Q4_K's sub-blocks of 32 are Q4_1's form with fp32 d and m, Q6_K's sub-blocks of 16 are Q8_0's form
// with an fp32 d each (quantize_block_q4k, quantize_block_q6k).
constexpr int kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14;
constexpr Format format_of(int qtype) {
  return qtype == kQ4_0 ? Format{4, false, 8, 32}
       : qtype == kQ4_1 || qtype == kQ4_K ? Format{4, true, 0, 32}
       : qtype == kQ5_0 ? Format{5, false, 16, 32}
       : qtype == kQ5_1 ? Format{5, true, 0, 32}
       : qtype == kQ6_K ? Format{8, false, 0, 16}
                        : Format{8, false, 0, 32};
}

// Calls fn(std::integral_constant<int, QT>) for the format qtype names.
template <typename Fn>
decltype(auto) with_qtype(int64_t qtype, Fn&& fn) {
  switch (qtype) {
    case kQ4_0: return fn(std::integral_constant<int, kQ4_0>{});
    case kQ4_1: return fn(std::integral_constant<int, kQ4_1>{});
    case kQ5_0: return fn(std::integral_constant<int, kQ5_0>{});
    case kQ5_1: return fn(std::integral_constant<int, kQ5_1>{});
    case kQ4_K: return fn(std::integral_constant<int, kQ4_K>{});
    case kQ6_K: return fn(std::integral_constant<int, kQ6_K>{});
    default: return fn(std::integral_constant<int, kQ8_0>{});
  }
}

// d[32 / sub][32], then (affine) m[32]
constexpr int64_t scale_bytes(Format f) { return (f.affine ? 2 : kBlock / f.sub) * kPanel * 4; }
constexpr int64_t code_bytes(Format f) {
  return f.code_bits == 8 ? kBlock * kPanel : kBlock * kPanel / 2 + (f.code_bits == 5 ? kBlock * 4 : 0);
}
constexpr int64_t block_bytes(Format f) { return scale_bytes(f) + code_bytes(f); }

bool same_bits(float a, float b) {  // -0.0 is not +0.0 here: "exact" means the same fp32 bits
  uint32_t ua, ub;
  std::memcpy(&ua, &a, 4);
  std::memcpy(&ub, &b, 4);
  return ua == ub;
}

float to_half_and_back(float v) { return static_cast<float>(c10::Half(v)); }

// The fp16 values next to h (h itself first): the scale recovered from a block's extremes can be
// one fp16 step off after the fp32 rounding of d * q + m.
std::array<float, 3> half_neighbours(float h) {
  const uint16_t bits = c10::Half(h).x;
  std::array<float, 3> out = {h, h, h};
  if ((bits & 0x7FFF) < 0x7BFF) out[1] = static_cast<float>(c10::Half(static_cast<uint16_t>(bits + 1), c10::Half::from_bits()));
  if ((bits & 0x7FFF) > 0) out[2] = static_cast<float>(c10::Half(static_cast<uint16_t>(bits - 1), c10::Half::from_bits()));
  return out;
}

// The weight of code c, as the kernels compute it.
template <int QT>
inline float weight_of(float d, int c, float m) {
  constexpr Format f = format_of(QT);
  if constexpr (f.affine) return std::fma(d, static_cast<float>(c), m);
  else return d * static_cast<float>(c - f.offset);
}

// x rounded to `bits` significant bits, then moved by `steps` units of its last bit.
double round_to_bits(double x, int bits, int steps) {
  int e;
  const double f = std::frexp(x, &e);  // x = f * 2^e, 0.5 <= |f| < 1 (f = 0 for x = 0)
  return std::ldexp(std::nearbyint(std::ldexp(f, bits)) + steps, e - bits);
}

// One Q4_K sub-block of 32 weights: gguf dequantizes it as (d * sc) * q - (dmin * mn) with d, dmin
// fp16, sc, mn 6-bit and q 4-bit: D = d * sc and M = dmin * mn are exact fp32 values of at most
// 17 significant bits, D * q is exact, so each weight is fl(D * q - M) = fma(D, q, -M), Q4_1's
// formula with m = -M. D and M are not fp16 and the codes need not reach 0 or 15: for each span
// s = c(max) - c(min) and code c(min) of the block's minimum, D is (max - min) / s and M is
// D * c(min) - min up to the rounding of the weights, which moves them at most a unit or two of
// their 17th bit; each candidate is checked on all 32 weights.
bool quantize_block_q4k(const float* w, float* d_out, float& m_out, int* c_out) {
  float lo = w[0], hi = w[0];
  for (int64_t i = 0; i < kBlock; ++i) {
    if (!std::isfinite(w[i])) return false;
    lo = std::min(lo, w[i]);
    hi = std::max(hi, w[i]);
  }
  auto fits = [&](float d, float m) {
    for (int64_t i = 0; i < kBlock; ++i) {
      const int c = d == 0.f ? 0 : static_cast<int>(std::nearbyint((static_cast<double>(w[i]) - m) / d));
      if (c < 0 || c > 15 || !same_bits(std::fma(d, static_cast<float>(c), m), w[i])) return false;
      c_out[i] = c;
    }
    d_out[0] = d;
    m_out = m;
    return true;
  };
  if (lo == hi) return fits(0.f, lo) || fits(-0.f, lo);  // -0.f: fma(-0, 0, -0) gives a -0.0 block back
  for (int s = 15; s >= 1; --s) {
    const double d_est = (static_cast<double>(hi) - lo) / s;
    for (const int d_step : {0, -1, 1, -2, 2}) {
      const float d = static_cast<float>(round_to_bits(d_est, 17, d_step));
      if (!(d > 0.f) || !std::isfinite(d)) continue;
      for (int c_lo = 0; c_lo + s <= 15; ++c_lo) {
        const double m_est = static_cast<double>(lo) - static_cast<double>(d) * c_lo;  // -M
        for (const int m_step : {0, -1, 1}) {
          if (fits(d, static_cast<float>(round_to_bits(m_est, 17, m_step)))) return true;
        }
      }
    }
  }
  return false;
}

// One Q6_K sub-block of 16 weights: gguf dequantizes it as (d * sc) * q with d fp16, sc int8 and
// q in [-32, 31]: D = d * sc has at most 18 significant bits, so D * q (at most 23) is exact and
// the weight of largest magnitude is exactly D times an integer of at most 32: D is that weight
// over one of those integers, of either sign (D < 0 gives -0.0 zeros, as d * 0.0 in gguf).
bool quantize_sub_block_q6k(const float* w, float& d_out, int* c_out) {
  float amax = 0.f;
  for (int64_t i = 0; i < 16; ++i) {
    if (!std::isfinite(w[i])) return false;
    amax = std::max(amax, std::fabs(w[i]));
  }
  if (amax == 0.f) {  // sc = 0: zeros whose signs are d's times q's; 0 * -1 and 0 * 0 give them back
    for (int64_t i = 0; i < 16; ++i) c_out[i] = std::signbit(w[i]) ? -1 : 0;
    d_out = 0.f;
    return true;
  }
  for (int q = 32; q >= 1; --q) {
    for (const float sign : {1.f, -1.f}) {
      const float d = sign * amax / static_cast<float>(q);
      bool ok = true;
      for (int64_t i = 0; i < 16 && ok; ++i) {
        const int c = d == 0.f ? 0 : static_cast<int>(std::nearbyint(w[i] / d));
        ok = c >= -32 && c <= 31 && same_bits(d * static_cast<float>(c), w[i]);
        c_out[i] = c;
      }
      if (ok) {
        d_out = d;
        return true;
      }
    }
  }
  return false;
}

// One block of 32 weights of one output feature: finds (d per sub-block, m, codes) with
// weight_of(d, c, m) == w bit for bit for all 32, or returns false. Affine: m is the block's minimum (its code is 0) and
// d = (max - min) / (2^bits - 1), as llama.cpp's Q4_1 / Q5_1; Q8_0: d = amax / 127; Q4_0 / Q5_0:
// d = max / -offset with max the weight of largest magnitude (either sign of d is tried, d < 0
// gives the -0.0 zeros).
template <int QT>
bool quantize_block(const float* w, float* d_out, float& m_out, int* c_out) {
  if constexpr (QT == kQ4_K) return quantize_block_q4k(w, d_out, m_out, c_out);
  if constexpr (QT == kQ6_K) {
    m_out = 0.f;
    return quantize_sub_block_q6k(w, d_out[0], c_out) && quantize_sub_block_q6k(w + 16, d_out[1], c_out + 16);
  }
  constexpr Format f = format_of(QT);
  float lo = w[0], hi = w[0], amax = 0.f;
  for (int64_t i = 0; i < kBlock; ++i) {
    if (!std::isfinite(w[i])) return false;
    lo = std::min(lo, w[i]);
    hi = std::max(hi, w[i]);
    amax = std::max(amax, std::fabs(w[i]));
  }
  const float m = f.affine ? lo : 0.f;
  if (!same_bits(to_half_and_back(m), m)) return false;
  const int cmin = f.code_bits == 8 ? -128 : 0, cmax = f.code_bits == 8 ? 127 : (1 << f.code_bits) - 1;
  const float guess = f.affine ? (hi - lo) / static_cast<float>(cmax) : f.code_bits == 8 ? amax / 127.f : amax / f.offset;
  for (const float sign : {1.f, -1.f}) {
    if (sign < 0 && (f.affine || f.code_bits == 8)) break;  // d >= 0 in those formats
    for (const float d : half_neighbours(to_half_and_back(sign * guess))) {
      bool ok = true;
      for (int64_t i = 0; i < kBlock && ok; ++i) {
        const int c = d == 0.f ? f.offset : static_cast<int>(std::nearbyint((w[i] - m) / d)) + f.offset;
        ok = c >= cmin && c <= cmax && same_bits(weight_of<QT>(d, c, m), w[i]);
        c_out[i] = c;
      }
      if (ok) {
        d_out[0] = d;
        m_out = m;
        return true;
      }
    }
  }
  return false;
}

// Stores feature j's codes of one block (c[k] for its 32 inputs) into the block's code bytes.
template <int QT>
void store_codes(uint8_t* codes, int64_t j, const int* c) {
  constexpr Format f = format_of(QT);
  for (int64_t k = 0; k < kBlock; ++k) {
    if constexpr (f.code_bits == 8) {
      codes[k * kPanel + j] = static_cast<uint8_t>(static_cast<int8_t>(c[k]));
    } else {
      codes[k * 16 + j % 16] |= static_cast<uint8_t>((c[k] & 0xF) << (j < 16 ? 0 : 4));
      if constexpr (f.code_bits == 5) {
        uint32_t* high = reinterpret_cast<uint32_t*>(codes + kBlock * kPanel / 2);
        high[k] |= static_cast<uint32_t>((c[k] >> 4) & 1) << j;
      }
    }
  }
}

// The code of feature j at input k of a block (the scalar twin of expand_row).
template <int QT>
inline int code_at(const uint8_t* codes, int64_t k, int64_t j) {
  constexpr Format f = format_of(QT);
  if constexpr (f.code_bits == 8) {
    return static_cast<int8_t>(codes[k * kPanel + j]);
  } else {
    int c = (codes[k * 16 + j % 16] >> (j < 16 ? 0 : 4)) & 0xF;
    if constexpr (f.code_bits == 5) {
      const uint32_t* high = reinterpret_cast<const uint32_t*>(codes + kBlock * kPanel / 2);
      c |= static_cast<int>((high[k] >> j) & 1) << 4;
    }
    return c;
  }
}

#if defined(__AVX512F__)
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

// Up to a register tile of rows: each weight vector is expanded in registers right before its FMAs
// (with few rows the FMA chains leave the ports idle enough to hide it; at 8-12 rows it still beats a
// round trip through L1). Same chains as panel_tile: same bits.
template <int M, int QT>
void fused_tile(const float* __restrict__ x, int64_t ldx, const uint8_t* __restrict__ codes_panel, int64_t K,
                const float* __restrict__ bias, float* __restrict__ y, int64_t ldy, int64_t n_valid,
                const uint8_t* next) {
  constexpr Format f = format_of(QT);
  constexpr int64_t bb = block_bytes(f);
  __m512 c0[M], c1[M];
  panel::load_tile<M>(c0, c1, y, ldy, n_valid, 0);
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const uint8_t* blk = codes_panel + b * bb;
    for (int64_t line = 0; next != nullptr && line < bb; line += 64) _mm_prefetch(reinterpret_cast<const char*>(next + b * bb + line), _MM_HINT_T1);
    const float* d = reinterpret_cast<const float*>(blk);
    const __m512 m0 = f.affine ? _mm512_loadu_ps(d + kPanel) : _mm512_setzero_ps();
    const __m512 m1 = f.affine ? _mm512_loadu_ps(d + kPanel + 16) : _mm512_setzero_ps();
    const uint8_t* codes = blk + scale_bytes(f);
    const float* xb = x + b * kBlock;
    for (int64_t s0 = 0; s0 < kBlock; s0 += f.sub) {
      const float* ds = d + s0 / f.sub * kPanel;
      const __m512 d0 = _mm512_loadu_ps(ds), d1 = _mm512_loadu_ps(ds + 16);
      for (int64_t k = s0; k < s0 + f.sub; ++k) {
        __m512 w0, w1;
        expand_row<QT>(codes, k, d0, d1, m0, m1, w0, w1);
#pragma GCC unroll 12
        for (int m = 0; m < M; ++m) {
          const __m512 xv = _mm512_set1_ps(xb[m * ldx + k]);
          c0[m] = _mm512_fmadd_ps(w0, xv, c0[m]);
          c1[m] = _mm512_fmadd_ps(w1, xv, c1[m]);
        }
      }
    }
  }
  panel::store_tile<M>(c0, c1, bias, y, ldy, n_valid, 0);
}

using FusedFn = void (*)(const float*, int64_t, const uint8_t*, int64_t, const float*, float*, int64_t, int64_t,
                         const uint8_t*);
constexpr int kFusedRows = kTileRows;
template <int QT, int... Ms>
constexpr auto make_fused(std::integer_sequence<int, Ms...>) {
  return std::array<FusedFn, sizeof...(Ms)>{&fused_tile<Ms + 1, QT>...};
}
template <int QT>
constexpr auto kFused = make_fused<QT>(std::make_integer_sequence<int, kFusedRows>{});
#elif defined(__AVX2__) && defined(__FMA__)
#define PAGEDLLM_QL_AVX2 1
// The AVX2 + FMA twins (x86-64-v3 CPUs without AVX-512, e.g. AMD Zen 2 / 3): 8 features a vector, a
// panel row of 32 is 4 vectors, the same formulas as weight_of, in the same order.

// The fp32 weights of input k of a block: features 8v .. 8v + 7 in w[v]. ds: the 32 scales of k's
// sub-block; ms: the 32 offsets (affine formats).
template <int QT>
inline void expand_row8(const uint8_t* codes, int64_t k, const float* ds, const float* ms, __m256 (&w)[4]) {
  constexpr Format f = format_of(QT);
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
    const __m256 d = _mm256_loadu_ps(ds + 8 * v);
    if constexpr (f.affine) {
      w[v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c[v]), d, _mm256_loadu_ps(ms + 8 * v));
    } else {
      w[v] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(c[v], _mm256_set1_epi32(f.offset))), d);
    }
  }
}

// Up to kFusedRows rows with the weights expanded in registers (4 accumulators a row: 2 rows keep the
// 16 registers free of spills). One FMA chain per output over k in order: the portable panel_tile's
// (its c += w * x contracts to the same FMA), so the same bits.
template <int M, int QT>
void fused_tile(const float* __restrict__ x, int64_t ldx, const uint8_t* __restrict__ codes_panel, int64_t K,
                const float* __restrict__ bias, float* __restrict__ y, int64_t ldy, int64_t n_valid,
                const uint8_t* next) {
  constexpr Format f = format_of(QT);
  constexpr int64_t bb = block_bytes(f);
  __m256 acc[M][4];
  for (int m = 0; m < M; ++m) {
    for (int v = 0; v < 4; ++v) acc[m][v] = _mm256_setzero_ps();
  }
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const uint8_t* blk = codes_panel + b * bb;
    for (int64_t line = 0; next != nullptr && line < bb; line += 64) _mm_prefetch(reinterpret_cast<const char*>(next + b * bb + line), _MM_HINT_T1);
    const float* d = reinterpret_cast<const float*>(blk);
    const uint8_t* codes = blk + scale_bytes(f);
    const float* xb = x + b * kBlock;
    for (int64_t k = 0; k < kBlock; ++k) {
      __m256 w[4];
      expand_row8<QT>(codes, k, d + k / f.sub * kPanel, d + kPanel, w);
      for (int m = 0; m < M; ++m) {
        const __m256 xv = _mm256_broadcast_ss(xb + m * ldx + k);
        for (int v = 0; v < 4; ++v) acc[m][v] = _mm256_fmadd_ps(w[v], xv, acc[m][v]);
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    alignas(32) float sums[kPanel];
    for (int v = 0; v < 4; ++v) _mm256_store_ps(sums + 8 * v, acc[m][v]);
    for (int64_t j = 0; j < n_valid; ++j) y[m * ldy + j] = sums[j] + (bias ? bias[j] : 0.f);
  }
}

using FusedFn = void (*)(const float*, int64_t, const uint8_t*, int64_t, const float*, float*, int64_t, int64_t,
                         const uint8_t*);
constexpr int kFusedRows = 2;
template <int QT>
constexpr std::array<FusedFn, kFusedRows> kFused = {&fused_tile<1, QT>, &fused_tile<2, QT>};
#else
constexpr int kFusedRows = 0;  // the portable build always expands chunks
#endif

// Expands blocks [b0, b1) of one packed panel into fp32 weights [(b1 - b0) * 32, 32] (the layout
// panel_tile reads), exactly weight_of per weight; prefetches the same bytes of the next panel into
// L2 as it goes.
template <int QT>
void expand_chunk(const uint8_t* panel_codes, int64_t b0, int64_t b1, float* __restrict__ dst, const uint8_t* next) {
  constexpr Format f = format_of(QT);
  constexpr int64_t bb = block_bytes(f);
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* src = panel_codes + b * bb;
    for (int64_t line = 0; next != nullptr && line < bb; line += 64) __builtin_prefetch(next + b * bb + line, 0, 2);
    const float* d = reinterpret_cast<const float*>(src);
    const uint8_t* codes = src + scale_bytes(f);
    float* out = dst + (b - b0) * kBlock * kPanel;
#if defined(__AVX512F__)
    const __m512 m0 = f.affine ? _mm512_loadu_ps(d + kPanel) : _mm512_setzero_ps();
    const __m512 m1 = f.affine ? _mm512_loadu_ps(d + kPanel + 16) : _mm512_setzero_ps();
    for (int64_t k = 0; k < kBlock; ++k) {
      const float* ds = d + k / f.sub * kPanel;
      __m512 w0, w1;
      expand_row<QT>(codes, k, _mm512_loadu_ps(ds), _mm512_loadu_ps(ds + 16), m0, m1, w0, w1);
      _mm512_storeu_ps(out + k * kPanel, w0);
      _mm512_storeu_ps(out + k * kPanel + 16, w1);
    }
#elif defined(PAGEDLLM_QL_AVX2)
    for (int64_t k = 0; k < kBlock; ++k) {
      __m256 w[4];
      expand_row8<QT>(codes, k, d + k / f.sub * kPanel, d + kPanel, w);
      for (int v = 0; v < 4; ++v) _mm256_storeu_ps(out + k * kPanel + 8 * v, w[v]);
    }
#else
    const float* m = d + kPanel;  // affine formats only
    for (int64_t k = 0; k < kBlock; ++k) {
      const float* ds = d + k / f.sub * kPanel;
      for (int64_t j = 0; j < kPanel; ++j) {
        out[k * kPanel + j] = weight_of<QT>(ds[j], code_at<QT>(codes, k, j), f.affine ? m[j] : 0.f);
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
          uint8_t* blk = dst + (p * B + b) * bb;
          float* d = reinterpret_cast<float*>(blk);  // [32 / sub][32], then (affine) m[32]
          if (!quantize_block<QT>(src + (p * kPanel + j) * K + b * kBlock, ds, m, c)) {
            exact.store(false, std::memory_order_relaxed);
            return;
          }
          for (int64_t s = 0; s < kBlock / f.sub; ++s) d[s * kPanel + j] = ds[s];
          if (f.affine) d[kPanel + j] = m;
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
  with_qtype(qtype == kQ4_K ? kQ4_1 : qtype, [&](auto qt) {  // one kernel per layout
    constexpr int QT = decltype(qt)::value;
    const int64_t P = packed.size(0), panel_bytes = packed.size(1) * packed.size(2);
    const uint8_t* wp = packed.data_ptr<uint8_t>();
    const int64_t B = packed.size(1), tiles = panel::num_tiles(io.M);
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      // More rows: the panel is expanded kChunkBlocks blocks at a time into an L1-sized buffer that
      // every row tile reads; the tiles carry their sums across chunks through y (kResume / kPartial).
      alignas(64) float chunk[kChunkBlocks * kBlock * kPanel];
      for (int64_t p = p0; p < p1; ++p) {
        const uint8_t* codes = wp + p * panel_bytes;
        const uint8_t* next = p + 1 < p1 ? codes + panel_bytes : nullptr;
        const int64_t n0 = p * kPanel, n_valid = std::min(kPanel, N - n0);
        const float* bp = io.bias ? io.bias + n0 : nullptr;
#if defined(__AVX512F__) || defined(PAGEDLLM_QL_AVX2)
        if (io.M <= kFusedRows) {
          kFused<QT>[io.M - 1](io.xp, io.ldx, codes, K, bp, io.yp + n0, N, n_valid, next);
          continue;
        }
#endif
        for (int64_t b0 = 0; b0 < B; b0 += kChunkBlocks) {
          const int64_t b1 = std::min(B, b0 + kChunkBlocks);
          expand_chunk<QT>(codes, b0, b1, chunk, next);
          const int flags = (b0 > 0 ? panel::kResume : 0) | (b1 < B ? panel::kPartial : 0);
          for (int64_t t = 0; t < tiles; ++t) {
            const int64_t m0 = panel::tile_start(io.M, t), rows = panel::tile_start(io.M, t + 1) - m0;
            kTiles[rows - 1](io.xp + m0 * io.ldx + b0 * kBlock, io.ldx, chunk, (b1 - b0) * kBlock, bp,
                             io.yp + m0 * N + n0, N, n_valid, nullptr, 0, 0, flags);
          }
        }
      }
    });
  });
  return io.y;
}

}  // namespace pagedllm::cpu
