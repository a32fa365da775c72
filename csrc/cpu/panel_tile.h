// The register-tile microkernel shared by the CPU decode GEMMs (packed_linear.cpp, quantized_linear.cpp):
// rows of x against one panel of 32 output features stored [K, 32] in fp32, one FMA chain over k
// in order per output. Internal to csrc/cpu.
#pragma once

#include <array>
#include <cstdint>
#include <utility>

#include "fetch_ahead.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace pagedllm::cpu::panel {

constexpr int64_t kPanel = 32;  // output features per packed panel
constexpr int kTileRows = 12;   // rows of x per register tile (24 accumulators + 2 weight vectors)
constexpr int64_t kLine = 16;   // floats per 64-byte cache line

#if defined(__AVX512F__)
// Which of a panel's two 16-column halves exist: n_valid of its 32 output features are real.
inline __mmask16 half_mask(int64_t n_valid, int half) {
  const int64_t n = n_valid - 16 * half;
  return n >= 16 ? 0xFFFF : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}

// y[m, 0:n_valid] = c0[m] | c1[m] (+ bias).
template <int M>
inline void store_tile(const __m512 (&c0)[M], const __m512 (&c1)[M], const float* __restrict__ bias,
                       float* __restrict__ y, int64_t ldy, int64_t n_valid) {
  const __mmask16 mask0 = half_mask(n_valid, 0), mask1 = half_mask(n_valid, 1);
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(mask0, bias) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_maskz_loadu_ps(mask1, bias + 16) : _mm512_setzero_ps();
#pragma GCC unroll 12
  for (int m = 0; m < M; ++m) {
    _mm512_mask_storeu_ps(y + m * ldy, mask0, _mm512_add_ps(c0[m], b0));
    _mm512_mask_storeu_ps(y + m * ldy + 16, mask1, _mm512_add_ps(c1[m], b1));
  }
}

template <int M>
inline void zero_tile(__m512 (&c0)[M], __m512 (&c1)[M]) {
#pragma GCC unroll 12
  for (int m = 0; m < M; ++m) c0[m] = c1[m] = _mm512_setzero_ps();
}

// Rows [0, M) of x against one panel; writes y[:, 0:n_valid] (+ bias). M is a template
// constant so the accumulators stay in registers.
template <int M>
void panel_tile(const float* __restrict__ x, int64_t ldx, const float* __restrict__ panel, int64_t K,
                const float* __restrict__ bias, float* __restrict__ y, int64_t ldy, int64_t n_valid,
                const float* pf_next, int64_t pf_lines, int64_t pf_stride, fetch_ahead::Cursor* ahead) {
  __m512 c0[M], c1[M];
  zero_tile<M>(c0, c1);
  fetch_ahead::Cursor later = ahead != nullptr ? *ahead : fetch_ahead::Cursor{};  // in registers
  for (int64_t k = 0; k < K; ++k) {
    // The weight stream must overlap the FMAs (the hardware prefetcher alone leaves them in
    // series): while a panel is computed, the next one is fetched into L2, its 2K lines spread
    // evenly over the panel's tiles (pf_stride floats per k; front-loading them measured slower).
    if (k < pf_lines) {
      _mm_prefetch(reinterpret_cast<const char*>(pf_next + k * pf_stride), _MM_HINT_T1);
      if (pf_stride == 2 * kLine) _mm_prefetch(reinterpret_cast<const char*>(pf_next + k * pf_stride + kLine), _MM_HINT_T1);
    }
    // What the caller reads after this GEMM (fetch_ahead.h): a line every other k, ~10 GB/s a core at
    // 12 rows, well under the DRAM rate (a line every k would leave too many misses outstanding).
    if ((k & 1) == 0 && !later.done()) later.step();
    const __m512 w0 = _mm512_loadu_ps(panel + k * kPanel);
    const __m512 w1 = _mm512_loadu_ps(panel + k * kPanel + 16);
#pragma GCC unroll 12
    for (int m = 0; m < M; ++m) {
      const __m512 b = _mm512_set1_ps(x[m * ldx + k]);
      c0[m] = _mm512_fmadd_ps(w0, b, c0[m]);
      c1[m] = _mm512_fmadd_ps(w1, b, c1[m]);
    }
  }
  if (ahead != nullptr) *ahead = later;
  store_tile<M>(c0, c1, bias, y, ldy, n_valid);
}
#else
// Portable twin (same order of summation): the compiler vectorizes the j loop.
template <int M>
void panel_tile(const float* __restrict__ x, int64_t ldx, const float* __restrict__ panel, int64_t K,
                const float* __restrict__ bias, float* __restrict__ y, int64_t ldy, int64_t n_valid,
                const float* /*pf_next*/, int64_t /*pf_lines*/, int64_t /*pf_stride*/, fetch_ahead::Cursor* /*ahead*/) {
  float c[M][kPanel] = {};
  for (int64_t k = 0; k < K; ++k) {
    for (int m = 0; m < M; ++m) {
      const float b = x[m * ldx + k];
      for (int j = 0; j < kPanel; ++j) c[m][j] += panel[k * kPanel + j] * b;
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int64_t j = 0; j < n_valid; ++j) {
      y[m * ldy + j] = c[m][j] + (bias ? bias[j] : 0.f);
    }
  }
}
#endif

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, const float*, float*, int64_t, int64_t,
                       const float*, int64_t, int64_t, fetch_ahead::Cursor*);

template <int... Ms>
constexpr auto make_tiles(std::integer_sequence<int, Ms...>) {
  return std::array<TileFn, sizeof...(Ms)>{&panel_tile<Ms + 1>...};
}
// The M rows of x split into the fewest tiles of at most kTileRows, of balanced sizes: tile t covers
// rows [tile_start(M, t), tile_start(M, t + 1)). (12 + 1 rows would leave the last tile's lone FMA
// chain latency-bound; 7 + 6 keeps both throughput-bound. The sums are the same either way.)
inline int64_t num_tiles(int64_t M) { return (M + kTileRows - 1) / kTileRows; }
inline int64_t tile_start(int64_t M, int64_t t) { return t * M / num_tiles(M); }

// kTiles[r - 1] handles a tile of r rows.
constexpr auto kTiles = make_tiles(std::make_integer_sequence<int, kTileRows>{});

}  // namespace pagedllm::cpu::panel
