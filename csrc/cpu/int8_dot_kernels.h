// The int8 mode's GEMM tiles (internal to csrc/cpu; int8_linear.cpp drives them): rows of x quantized
// per block of 32 to int8 (scale d = max|x| / 127, as llama.cpp's q8_0 / q8_1 with an fp32 scale and the
// block sums) against one 8-feature panel of GGUF codes (int8_codes_layout.h).
//
// Per output, block b and sub-block s: the integer dot product isum of the stored codes and x's int8,
// exact; then, in fp32, acc = fma(float(isum), d_w * d_x, acc) and (formats with corr)
// acc = fma(corr, d_x * float(sum of x's int8 over s), acc). Three twins: portable scalar (the reference),
// AVX2 (vpmaddubsw + vpmaddwd) and AVX-512 VNNI (vpdpbusd; two panels at a time in 16 lanes where there
// are two), chosen at run time by CPU features; they give the same bits (same integers, same fp32
// operations in the same order per output).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#include "fetch_ahead.h"
#include "int8_codes_layout.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define PAGEDLLM_INT8_X86 1
#include <immintrin.h>
#endif

namespace pagedllm::cpu::int8_codes {

// x [M, K] quantized: q [M, K] int8, d [M, K / 32] fp32 scales, sums [M, K / 32, 2] int32 (the int8 sums
// of inputs 0-15 and 16-31 of each block).
struct QuantizedRows {
  const int8_t* q;
  const float* d;
  const int32_t* sums;
  int64_t K, B;
  int32_t sum(int64_t row, int64_t b, int64_t s, int sub) const {
    const int32_t* p = sums + (row * B + b) * 2;
    return sub == 32 ? p[0] + p[1] : p[s];
  }
};

constexpr int kTileRows = 4;  // rows of x per tile (AVX2: 4 fp32 + 4 int16 + 4 int32 accumulators)
using TileFn = void (*)(const QuantizedRows&, int64_t, const uint8_t*, float*, int64_t, int64_t, const float*);

inline void store_row(const float* sums, const float* bias, float* y, int64_t n_valid) {
  for (int64_t f = 0; f < n_valid; ++f) y[f] = bias ? sums[f] + bias[f] : sums[f];
}

// The stored code of feature f at input k of a block (the scalar twin of load_group).
template <int QT>
inline int code_at(const uint8_t* codes, int64_t f, int64_t k) {
  constexpr Layout l = layout_of(QT);
  const int64_t g = k / 4, i = k % 4;
  if constexpr (l.codes == Codes::kNibble) {
    const uint8_t byte = codes[(g / 2) * 32 + 4 * f + i];
    return g % 2 == 0 ? (byte & 0xF) : (byte >> 4);
  } else if constexpr (l.codes == Codes::kSigned) {
    return static_cast<int8_t>(codes[g * 32 + 4 * f + i]);
  } else {
    return codes[g * 32 + 4 * f + i];
  }
}

namespace scalar {

template <int QT, int R>
void tile(const QuantizedRows& x, int64_t r0, const uint8_t* __restrict__ panel, float* __restrict__ y, int64_t ldy,
          int64_t n_valid, const float* __restrict__ bias) {
  constexpr Layout l = layout_of(QT);
  constexpr int64_t bb = block_bytes(l), nsub = subs(l);
  float acc[R][kFeatures] = {};
  for (int64_t b = 0; b < x.B; ++b) {
    const uint8_t* blk = panel + b * bb;
    const uint8_t* codes = blk + scale_bytes(l);
    for (int r = 0; r < R; ++r) {
      const int8_t* xq = x.q + (r0 + r) * x.K + b * kBlock;
      const float dx = x.d[(r0 + r) * x.B + b];
      for (int64_t s = 0; s < nsub; ++s) {
        const float sx = dx * static_cast<float>(x.sum(r0 + r, b, s, l.sub));
        for (int64_t f = 0; f < kFeatures; ++f) {
          int32_t isum = 0;
          for (int64_t k = s * l.sub; k < (s + 1) * l.sub; ++k) isum += code_at<QT>(codes, f, k) * xq[k];
          const float dw = scale_at<QT>(blk, s * kFeatures + f);
          acc[r][f] = std::fma(static_cast<float>(isum), dw * dx, acc[r][f]);
          if constexpr (l.has_corr) acc[r][f] = std::fma(corr_at<QT>(blk, s, f, dw), sx, acc[r][f]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) store_row(acc[r], bias, y + r * ldy, n_valid);
}

template <int QT>
constexpr std::array<TileFn, kTileRows> kTilesOf = {&tile<QT, 1>, &tile<QT, 2>, &tile<QT, 3>, &tile<QT, 4>};

// One row x [K] -> q [K] int8, d [K / 32], sums [K / 32][2]: per block d = max|x| / 127 and
// q = x * (1 / d) rounded to nearest even (0 for an all-zero block).
inline void quantize_row(const float* __restrict__ x, int64_t K, int8_t* __restrict__ q, float* __restrict__ d,
                         int32_t* __restrict__ sums) {
  for (int64_t b = 0; b < K / kBlock; ++b) {
    float m = 0.f;
    for (int64_t i = 0; i < kBlock; ++i) m = std::max(m, std::fabs(x[b * kBlock + i]));
    const float scale = m / 127.f;
    const float inv = scale != 0.f ? 1.f / scale : 0.f;
    d[b] = scale;
    int32_t half[2] = {0, 0};
    for (int64_t i = 0; i < kBlock; ++i) {
      const int c = static_cast<int>(std::nearbyint(x[b * kBlock + i] * inv));
      q[b * kBlock + i] = static_cast<int8_t>(c);
      half[i / 16] += c;
    }
    sums[2 * b] = half[0];
    sums[2 * b + 1] = half[1];
  }
}

}  // namespace scalar

#if defined(PAGEDLLM_INT8_X86)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#include "int8_tile_x86.inc"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
namespace vnni {
#define PAGEDLLM_INT8_VNNI 1
#include "int8_tile_x86.inc"
#undef PAGEDLLM_INT8_VNNI
#include "int8_pair_tile_avx512.inc"
}  // namespace vnni
#pragma GCC pop_options
#endif

}  // namespace pagedllm::cpu::int8_codes
