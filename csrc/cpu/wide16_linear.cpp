// wide16_linear on the CPU: y = x W^T (+ bias) in fp32 for the decode GEMMs of a model whose fp32
// weights are exactly bf16 or fp16 values (an HF checkpoint saved in bf16 / fp16, loaded as float32).
//
// Why: such a weight loses nothing when stored in its own 16-bit format, and widening it back is
// exact (bf16: the 16 bits shifted left by 16; fp16: F16C's vcvtph2ps, subnormals included). So the
// kernel streams 16-bit panels (half the bytes of fp32 panels: a small decode step is bound by that
// stream) and widens them in registers right before fp32 FMAs, or for more rows a whole panel at a
// time into an fp32 buffer that the packed_linear tile (panel_tile.h) reads. Each output is the same
// FMA chain over k in order as packed_linear on the fp32 weights: the result is packed_linear's, bit
// for bit, for every row count (the quantized_linear idea with a trivial code).
//
// pack_wide16_linear_weight(weight [N, K] float32, qtype) -> [ceil(N / 32), K, 32] of bfloat16
// (qtype 30, GGML's BF16) or float16 (qtype 1, GGML's F16): packed[p, k, j] = weight[32 p + j, k],
// zero past N; an empty tensor when some weight is not exactly of that format (the caller keeps
// fp32 panels). The ISA is chosen at build time by -march, as in the other panel kernels: AVX-512
// (12-row register tiles), AVX2 + FMA + F16C (1-2 rows in registers), portable.
#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_only_ops.h"

#include "panel_linear_io.h"
#include "panel_tile.h"

namespace pagedllm::cpu {
namespace {

using panel::kPanel;
using panel::kTileRows;

constexpr int64_t kF16 = 1;    // GGML type ids
constexpr int64_t kBF16 = 30;

// The exact fp32 value of one 16-bit weight (the portable widening; the SIMD ones below equal it).
template <int64_t QT>
inline float widen(uint16_t bits) {
  if constexpr (QT == kBF16) {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  } else {
    return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
  }
}

// The 16-bit bits of w when w is exactly of the format, else false.
template <int64_t QT>
inline bool narrow_exact(float w, uint16_t& bits) {
  uint32_t u;
  std::memcpy(&u, &w, sizeof u);
  if constexpr (QT == kBF16) {
    bits = static_cast<uint16_t>(u >> 16);
    return (u & 0xFFFF) == 0;
  } else {
    bits = c10::Half(w).x;  // round to nearest; exact iff widening gives back the same bits
    const float back = widen<kF16>(bits);
    uint32_t v;
    std::memcpy(&v, &back, sizeof v);
    return u == v;
  }
}

#if defined(__AVX512F__)
// 32 weights of input k (features 0-15 in w0, 16-31 in w1), exactly widen<QT>.
template <int64_t QT>
inline void widen_row(const uint16_t* row, __m512& w0, __m512& w1) {
  const __m256i h0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
  const __m256i h1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16));
  if constexpr (QT == kBF16) {
    w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h0), 16));
    w1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h1), 16));
  } else {
    w0 = _mm512_cvtph_ps(h0);
    w1 = _mm512_cvtph_ps(h1);
  }
}

// Up to a register tile of rows, each weight row widened right before its FMAs; the chains of panel_tile.
template <int M, int64_t QT>
void fused_tile(const float* __restrict__ x, int64_t ldx, const uint16_t* __restrict__ panel, int64_t K,
                const float* __restrict__ bias, float* __restrict__ y, int64_t ldy, int64_t n_valid,
                const uint16_t* next) {
  __m512 c0[M], c1[M];
  panel::zero_tile<M>(c0, c1);
  for (int64_t k = 0; k < K; ++k) {
    if (next != nullptr) _mm_prefetch(reinterpret_cast<const char*>(next + k * kPanel), _MM_HINT_T1);
    __m512 w0, w1;
    widen_row<QT>(panel + k * kPanel, w0, w1);
#pragma GCC unroll 12
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_set1_ps(x[m * ldx + k]);
      c0[m] = _mm512_fmadd_ps(w0, xv, c0[m]);
      c1[m] = _mm512_fmadd_ps(w1, xv, c1[m]);
    }
  }
  panel::store_tile<M>(c0, c1, bias, y, ldy, n_valid);
}
constexpr int kFusedRows = kTileRows;
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PAGEDLLM_W16_AVX2 1
// 32 weights of input k, 8 features a vector, exactly widen<QT>.
template <int64_t QT>
inline void widen_row(const uint16_t* row, __m256 (&w)[4]) {
  for (int v = 0; v < 4; ++v) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 8 * v));
    if constexpr (QT == kBF16) {
      w[v] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
      w[v] = _mm256_cvtph_ps(h);
    }
  }
}

// 1-2 rows with the weights widened in registers (4 accumulators a row: 2 rows keep the 16 registers
// free of spills). The portable panel_tile's chains (its c += w * x contracts to the same FMA).
template <int M, int64_t QT>
void fused_tile(const float* __restrict__ x, int64_t ldx, const uint16_t* __restrict__ panel, int64_t K,
                const float* __restrict__ bias, float* __restrict__ y, int64_t ldy, int64_t n_valid,
                const uint16_t* next) {
  __m256 acc[M][4];
  for (int m = 0; m < M; ++m) {
    for (int v = 0; v < 4; ++v) acc[m][v] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    if (next != nullptr) _mm_prefetch(reinterpret_cast<const char*>(next + k * kPanel), _MM_HINT_T1);
    __m256 w[4];
    widen_row<QT>(panel + k * kPanel, w);
    for (int m = 0; m < M; ++m) {
      const __m256 xv = _mm256_broadcast_ss(x + m * ldx + k);
      for (int v = 0; v < 4; ++v) acc[m][v] = _mm256_fmadd_ps(w[v], xv, acc[m][v]);
    }
  }
  for (int m = 0; m < M; ++m) {
    alignas(32) float sums[kPanel];
    for (int v = 0; v < 4; ++v) _mm256_store_ps(sums + 8 * v, acc[m][v]);
    for (int64_t j = 0; j < n_valid; ++j) y[m * ldy + j] = sums[j] + (bias ? bias[j] : 0.f);
  }
}
constexpr int kFusedRows = 2;
#else
constexpr int kFusedRows = 0;  // the portable build always widens whole panels
#endif

#if defined(__AVX512F__) || defined(PAGEDLLM_W16_AVX2)
using FusedFn = void (*)(const float*, int64_t, const uint16_t*, int64_t, const float*, float*, int64_t, int64_t,
                         const uint16_t*);
template <int64_t QT, int... Ms>
constexpr auto make_fused(std::integer_sequence<int, Ms...>) {
  return std::array<FusedFn, sizeof...(Ms)>{&fused_tile<Ms + 1, QT>...};
}
template <int64_t QT>
constexpr auto kFused = make_fused<QT>(std::make_integer_sequence<int, kFusedRows>{});
#endif

// Widens one packed panel into fp32 [K, 32] (the layout panel_tile reads; the next panel is fetched
// during the row tiles: panel_tiles).
template <int64_t QT>
void widen_panel(const uint16_t* panel, int64_t K, float* __restrict__ dst) {
  for (int64_t k = 0; k < K; ++k) {
    const uint16_t* row = panel + k * kPanel;
    float* out = dst + k * kPanel;
#if defined(__AVX512F__)
    __m512 w0, w1;
    widen_row<QT>(row, w0, w1);
    _mm512_storeu_ps(out, w0);
    _mm512_storeu_ps(out + 16, w1);
#elif defined(PAGEDLLM_W16_AVX2)
    __m256 w[4];
    widen_row<QT>(row, w);
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(out + 8 * v, w[v]);
#else
    for (int64_t j = 0; j < kPanel; ++j) out[j] = widen<QT>(row[j]);
#endif
  }
}

void check_qtype(int64_t qtype, const char* op) {
  TORCH_CHECK(qtype == kBF16 || qtype == kF16, op, ": qtype must be 30 (BF16) or 1 (F16), got ", qtype);
}

template <int64_t QT>
at::Tensor pack(const at::Tensor& w) {
  const int64_t N = w.size(0), K = w.size(1);
  const auto dtype = QT == kBF16 ? at::kBFloat16 : at::kHalf;
  const at::Tensor none = at::empty({0}, w.options().dtype(dtype));
  const float* src = w.data_ptr<float>();
  uint16_t bits;
  for (int64_t k = 0; k < K && N > 0; ++k) {  // most weights that are not 16-bit fail on their first row
    if (!narrow_exact<QT>(src[k], bits)) return none;
  }
  const int64_t P = (N + kPanel - 1) / kPanel;
  at::Tensor packed = at::zeros({P, K, kPanel}, w.options().dtype(dtype));
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed.data_ptr());
  std::atomic<bool> exact{true};
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    uint16_t b;
    for (int64_t p = p0; p < p1 && exact.load(std::memory_order_relaxed); ++p) {
      for (int64_t j = 0; j < kPanel && p * kPanel + j < N; ++j) {
        const float* row = src + (p * kPanel + j) * K;
        uint16_t* out = dst + p * K * kPanel + j;
        for (int64_t k = 0; k < K; ++k) {
          if (!narrow_exact<QT>(row[k], b)) {
            exact.store(false, std::memory_order_relaxed);
            return;
          }
          out[k * kPanel] = b;
        }
      }
    }
  });
  return exact.load() ? packed : none;
}

template <int64_t QT>
void run(const panel::LinearIO& io, const uint16_t* wp, int64_t P, int64_t K, int64_t N) {
  // Threads split the panels: each weight byte is read by one thread, once per call.
  fetch_ahead::Plan* later = fetch_ahead::current();  // what the caller reads next (decoder_layers)
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> widened(io.M > kFusedRows ? K * kPanel : 0);
    fetch_ahead::Cursor* ahead = panel::ahead_for(later, io.M);
    for (int64_t p = p0; p < p1; ++p) {
      const uint16_t* bits = wp + p * K * kPanel;
      const uint16_t* next = p + 1 < p1 ? bits + K * kPanel : nullptr;
      const int64_t n0 = p * kPanel, n_valid = std::min(kPanel, N - n0);
#if defined(__AVX512F__) || defined(PAGEDLLM_W16_AVX2)
      const float* bp = io.bias ? io.bias + n0 : nullptr;
      if (io.M <= kFusedRows) {
        kFused<QT>[io.M - 1](io.xp, io.ldx, bits, K, bp, io.yp + n0, N, n_valid, next);
        continue;
      }
#endif
      // More rows: the panel widened whole (panel::panel_tiles) into a buffer that every row tile reads.
      widen_panel<QT>(bits, K, widened.data());
      panel::panel_tiles(io, widened.data(), K, N, n0, n_valid, next, K * kPanel * 2, ahead);
    }
  });
}

}  // namespace

at::Tensor pack_wide16_linear_weight(const at::Tensor& weight, int64_t qtype) {
  check_qtype(qtype, "pack_wide16_linear_weight");
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 2,
              "pack_wide16_linear_weight: the weight must be a float32 CPU tensor [out_features, in_features]");
  const at::Tensor w = weight.contiguous();
  return qtype == kBF16 ? pack<kBF16>(w) : pack<kF16>(w);
}

// x [..., K] float32; packed from pack_wide16_linear_weight(weight [N, K], qtype); bias [N] or None.
// Returns y [..., N], bit-identical to packed_linear(x, pack_linear_weight(weight), bias, N).
at::Tensor wide16_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                         int64_t out_features) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "wide16_linear: x and the packed weight must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "wide16_linear: x must be float32, got ", x.scalar_type());
  TORCH_CHECK((packed.scalar_type() == at::kBFloat16 || packed.scalar_type() == at::kHalf) && packed.dim() == 3 &&
                  packed.size(2) == kPanel && packed.is_contiguous(),
              "wide16_linear: the weight must come from pack_wide16_linear_weight ([panels, K, 32] bfloat16 or float16)");
  const int64_t N = out_features, K = packed.size(1), P = packed.size(0);
  const panel::LinearIO io = panel::linear_io("wide16_linear", x, K, N, P, bias);
  if (io.M == 0) return io.y;
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  if (packed.scalar_type() == at::kBFloat16) {
    run<kBF16>(io, wp, P, K, N);
  } else {
    run<kF16>(io, wp, P, K, N);
  }
  return io.y;
}

}  // namespace pagedllm::cpu
