// bf16_dot_linear on the CPU: y = x W^T (+ bias) for a model kept in bfloat16 on a CPU with bf16 dot-product
// instructions (AVX512_BF16: vdpbf16ps), the GEMMs torch would run through oneDNN.
//
// Why: at decode sizes torch's bf16 GEMMs are far from the bf16 peak (the default model's 120 layer GEMMs,
// 2 Zen 5 cores: 224 GFLOP/s at 16 rows, 324 at 32, 484 at 64, 779 at 2048; the fp32 FMA peak is ~460, the
// bf16 dot-product peak twice that; benchmarks/RESULTS.md "Ninth session"). This is the packed_linear tile
// (12 rows x 32 features in registers, one pass over a panel per row tile) with the inputs taken in pairs:
// one vdpbf16ps adds two products per fp32 lane, so a tile does twice an FMA tile's work per instruction
// (443 / 545 / 597 GFLOP/s at 16 / 32 / 64 rows there, 1.8-2.2x oneDNN; 1.1-1.4x it at 512-2048 rows).
//
// Arithmetic (the same class as oneDNN's bf16 GEMM: bf16 products, fp32 sums, bf16 result): per output,
// acc = 0, then for each input pair (2i, 2i + 1) in order, acc += x[2i + 1] w[2i + 1], then acc += x[2i] w[2i]
// (the instruction's order: each product is exact in fp32, each sum rounded to nearest even; denormal inputs
// and results are flushed to zero), then y = bf16(acc + bias) rounded to nearest even. Tested bit for bit
// against that formula in plain torch.
//
// pack_bf16_dot_linear_weight(weight [N, K] bfloat16, K even) -> bfloat16 [ceil(N / 32), K / 2, 64]:
// packed[p, i, 2 j + e] = weight[32 p + j, 2 i + e], zero past N; an empty tensor when K is odd or the
// running CPU has no AVX512_BF16 (or the compiler cannot target it), so callers keep their other path.
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <utility>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include "cpu_only_ops.h"
#include "panel_tile.h"

#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 11 || defined(__clang__))
#define PAGEDLLM_BF16_DOT 1
#include <immintrin.h>
#endif

namespace pagedllm::cpu {
namespace {

using panel::kPanel;
using panel::kTileRows;
// Rows a thread takes through all its panels before the next ones (2 Zen 5 cores, the default model's layer GEMMs
// at 512 / 2048 rows: 667-676 / 631-733 GFLOP/s median against 563-655 / 608-690 with all rows per panel).
constexpr int64_t kRowBlock = 192;

bool cpu_has_bf16_dot() {
#if defined(PAGEDLLM_BF16_DOT)
  static const bool has = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  return has;
#else
  return false;
#endif
}

#if defined(PAGEDLLM_BF16_DOT)
#define PAGEDLLM_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Rows [0, M) of x against one panel [Kp, 32 features x 2 inputs]; writes y[:, 0:n_valid] as bf16.
// bias: fp32 [n_valid] or nullptr. next: the thread's next panel, fetched into L2 during the first row tile.
template <int M>
PAGEDLLM_BF16_TARGET void dot_tile(const uint16_t* __restrict__ x, int64_t ldx, int64_t K,
                                   const uint16_t* __restrict__ panel, const float* __restrict__ bias,
                                   uint16_t* __restrict__ y, int64_t ldy, int64_t n_valid, const uint16_t* next,
                                   int64_t next_lines) {
  const int64_t Kp = K / 2;
  __m512 c0[M], c1[M];
  for (int m = 0; m < M; ++m) c0[m] = c1[m] = _mm512_setzero_ps();
  for (int64_t i = 0; i < Kp; ++i) {
    if (i < next_lines) {  // an input pair of a panel is 128 bytes: two lines
      _mm_prefetch(reinterpret_cast<const char*>(next + i * 2 * kPanel), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(next + i * 2 * kPanel + kPanel), _MM_HINT_T1);
    }
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + i * 2 * kPanel);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + i * 2 * kPanel + kPanel);
#pragma GCC unroll 12
    for (int m = 0; m < M; ++m) {
      uint32_t pair;  // inputs 2 i and 2 i + 1 of row m
      std::memcpy(&pair, x + m * ldx + 2 * i, sizeof pair);
      const __m512i xb = _mm512_set1_epi32(static_cast<int>(pair));
      c0[m] = _mm512_dpbf16_ps(c0[m], w0, (__m512bh)xb);
      c1[m] = _mm512_dpbf16_ps(c1[m], w1, (__m512bh)xb);
    }
  }
  const int64_t n0 = std::min<int64_t>(n_valid, 16), n1 = std::max<int64_t>(0, n_valid - 16);
  const __mmask16 mask0 = n0 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n0) - 1);
  const __mmask16 mask1 = n1 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n1) - 1);
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(mask0, bias) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_maskz_loadu_ps(mask1, bias + 16) : _mm512_setzero_ps();
  for (int m = 0; m < M; ++m) {
    const __m256bh r0 = _mm512_cvtneps_pbh(bias ? _mm512_add_ps(c0[m], b0) : c0[m]);
    const __m256bh r1 = _mm512_cvtneps_pbh(bias ? _mm512_add_ps(c1[m], b1) : c1[m]);
    _mm256_mask_storeu_epi16(y + m * ldy, mask0, (__m256i)r0);
    _mm256_mask_storeu_epi16(y + m * ldy + 16, mask1, (__m256i)r1);
  }
}

using DotTileFn = void (*)(const uint16_t*, int64_t, int64_t, const uint16_t*, const float*, uint16_t*, int64_t,
                           int64_t, const uint16_t*, int64_t);
template <int... Ms>
constexpr auto make_dot_tiles(std::integer_sequence<int, Ms...>) {
  return std::array<DotTileFn, sizeof...(Ms)>{&dot_tile<Ms + 1>...};
}
constexpr auto kDotTiles = make_dot_tiles(std::make_integer_sequence<int, kTileRows>{});
#endif

}  // namespace

at::Tensor pack_bf16_dot_linear_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kBFloat16 && weight.dim() == 2,
              "pack_bf16_dot_linear_weight: the weight must be a bfloat16 CPU tensor [out_features, in_features]");
  const int64_t N = weight.size(0), K = weight.size(1);
  if (!cpu_has_bf16_dot() || N == 0 || K == 0 || K % 2 != 0) return at::empty({0}, weight.options());
  const int64_t P = (N + kPanel - 1) / kPanel, Kp = K / 2;
  const at::Tensor w = weight.contiguous();
  at::Tensor packed = at::zeros({P, Kp, 2 * kPanel}, weight.options());
  const auto* src = reinterpret_cast<const uint16_t*>(w.data_ptr<c10::BFloat16>());
  auto* dst = reinterpret_cast<uint16_t*>(packed.data_ptr<c10::BFloat16>());
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t j = 0; j < kPanel && p * kPanel + j < N; ++j) {
        const uint16_t* row = src + (p * kPanel + j) * K;
        for (int64_t k = 0; k < K; ++k) dst[(p * Kp + k / 2) * 2 * kPanel + 2 * j + k % 2] = row[k];
      }
    }
  });
  return packed;
}

// x [..., K] bfloat16; packed from pack_bf16_dot_linear_weight(weight [N, K]); bias [N] bfloat16 or None.
at::Tensor bf16_dot_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                           int64_t out_features) {
  TORCH_CHECK(cpu_has_bf16_dot(), "bf16_dot_linear: this CPU has no AVX512_BF16 dot-product instructions");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() >= 1,
              "bf16_dot_linear: x must be a bfloat16 CPU tensor [..., in_features]");
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kBFloat16 && packed.dim() == 3 &&
                  packed.size(2) == 2 * kPanel && packed.is_contiguous(),
              "bf16_dot_linear: the weight must come from pack_bf16_dot_linear_weight");
  const int64_t K = x.size(-1), N = out_features, P = packed.size(0), Kp = packed.size(1);
  TORCH_CHECK(K == 2 * Kp, "bf16_dot_linear: x has ", K, " features, the weight expects ", 2 * Kp);
  TORCH_CHECK(N > 0 && (N + kPanel - 1) / kPanel == P, "bf16_dot_linear: out_features ", N,
              " does not match the packed weight's ", P, " panels");
  at::Tensor bias32;
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == N &&
                    (bias->scalar_type() == at::kBFloat16 || bias->scalar_type() == at::kFloat),
                "bf16_dot_linear: bias must be a bfloat16 or float32 CPU tensor of ", N, " elements");
    bias32 = bias->to(at::kFloat).contiguous();
  }
  at::Tensor x2 = x.reshape({-1, K});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  const int64_t M = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  if (M == 0) return y;
#if defined(PAGEDLLM_BF16_DOT)
  const auto* xp = reinterpret_cast<const uint16_t*>(x2.data_ptr<c10::BFloat16>());
  const int64_t ldx = x2.stride(0);
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<c10::BFloat16>());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>());
  const float* bp = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  const int64_t panel_elems = Kp * 2 * kPanel;
  // Rows in blocks of kRowBlock, each against all of the thread's panels: a block's x rows (192 x 1536 bf16:
  // 576 KB at most here) stay in L2 across the panels instead of coming from L3 once a panel.
  const int64_t rb = std::min(M, kRowBlock);
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t r0 = 0; r0 < M; r0 += rb) {
      const int64_t mr = std::min(rb, M - r0);
      for (int64_t p = p0; p < p1; ++p) {
        const uint16_t* panel = wp + p * panel_elems;
        const int64_t n0 = p * kPanel, n_valid = std::min(kPanel, N - n0);
        for (int64_t t = 0, tiles = panel::num_tiles(mr); t < tiles; ++t) {
          const int64_t m0 = r0 + panel::tile_start(mr, t), rows = panel::tile_start(mr, t + 1) - (m0 - r0);
          // the first row tile fetches the thread's next panel
          kDotTiles[rows - 1](xp + m0 * ldx, ldx, K, panel, bp ? bp + n0 : nullptr, yp + m0 * N + n0, N, n_valid,
                              p + 1 < p1 ? panel + panel_elems : nullptr, t == 0 && p + 1 < p1 ? Kp : 0);
        }
      }
    }
  });
#endif
  return y;
}

}  // namespace pagedllm::cpu
