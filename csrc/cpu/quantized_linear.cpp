// quantized_linear on the CPU: y = x W^T (+ bias) in fp32, for the decode GEMMs of a model whose
// fp32 weights are GGUF-style block-quantized values (the default model: Q4_1 layers, a Q8_0 head).
//
// Why: a small decode step is bound by streaming the weights (538 MB a step in fp32 for the default
// model). Its weights are dequantized Q4_1 / Q8_0 blocks: within each run of 32 inputs of an output
// feature, w = d * q + m with d, m fp16 and q a 4-bit code (Q4_1), or w = d * q with q int8 (Q8_0).
// pack_quantized_linear_weight finds those d, m, q and checks that d * q + m gives back every fp32
// weight bit for bit (d * q is exact in fp32: 11 + 8 significant bits at most); a weight that is
// not exactly of that form is not packed (the caller keeps the fp32 path; Q4_0 is not taken: its
// dequantized zeros are -0.0 where d < 0, which fl(d * q + m) never gives). The kernel streams the
// codes (6 or 9 bits a weight) and expands them into the exact fp32 weights: for up to 12 rows in
// registers right before the FMAs, for more rows 64 inputs at a time into an L1-resident chunk that
// the fp32 packed_linear tile (panel_tile.h) reads. Each output is the same FMA chain over k as in
// packed_linear on the fp32 weights: the result is bit-identical, for every row count.
// (benchmarks/kernels/bench_packed_linear.py: one decode step of the default model, 2 cores, 6 ms
// at 1 row, 11 ms at 8, 29 ms at 32, against 24 / 28 / 42 ms for packed_linear on fp32 weights.)
//
// Packed layout, uint8 [ceil(N / 32), K / 32, block_bytes]: per panel of 32 output features and
// block of 32 inputs, d[32] float32, then (4 bits) m[32] float32 and 32 x 16 code bytes (byte j of
// input k: feature j in the low nibble, feature j + 16 in the high one) or (8 bits) 32 x 32 int8
// codes. Features past N have d = m = 0.
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "cpu_only_ops.h"

#include "panel_linear_io.h"
#include "panel_tile.h"

namespace pagedllm::cpu {
namespace {

using panel::kPanel;
using panel::kTileRows;
using panel::kTiles;

constexpr int64_t kBlock = 32;  // inputs per quantization block (GGUF's QK4_1 / QK8_0)
constexpr int64_t kChunkBlocks = 2;  // blocks expanded at a time for many rows: 8 KB of fp32 weights
                                     // (1 and 4 blocks measured slower at 32 rows)

int64_t block_bytes(int64_t bits) {
  return bits == 4 ? 2 * kPanel * 4 + kBlock * kPanel / 2 : kPanel * 4 + kBlock * kPanel;
}

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

// One block of 32 weights of one output feature: finds (d, m, codes) with fl(d * q + m) == w for
// all 32, or returns false. 4 bits: m is the block's minimum (its code is 0), q in [0, 15];
// 8 bits: m = 0, q in [-128, 127], the largest magnitude has |q| = 127.
bool quantize_block(const float* w, int64_t bits, float& d_out, float& m_out, int8_t* q_out) {
  float lo = w[0], hi = w[0], amax = 0.f;
  for (int64_t i = 0; i < kBlock; ++i) {
    if (!std::isfinite(w[i])) return false;
    lo = std::min(lo, w[i]);
    hi = std::max(hi, w[i]);
    amax = std::max(amax, std::fabs(w[i]));
  }
  const float m = bits == 4 ? lo : 0.f;
  if (!same_bits(to_half_and_back(m), m)) return false;
  const float guess = bits == 4 ? (hi - lo) / 15.f : amax / 127.f;
  const int qmin = bits == 4 ? 0 : -128, qmax = bits == 4 ? 15 : 127;
  for (const float d : half_neighbours(to_half_and_back(guess))) {
    bool ok = true;
    for (int64_t i = 0; i < kBlock && ok; ++i) {
      const float q = d == 0.f ? 0.f : std::nearbyint((w[i] - m) / d);
      ok = q >= qmin && q <= qmax && same_bits(std::fma(d, q, m), w[i]);
      q_out[i] = static_cast<int8_t>(q);
    }
    if (ok) {
      d_out = d;
      m_out = m;
      return true;
    }
  }
  return false;
}

#if defined(__AVX512F__)
// The fp32 weights of input k of a block: features 0-15 in w0, 16-31 in w1, exactly d * q + m.
template <int BITS>
inline void expand_row(const uint8_t* codes, int64_t k, __m512 d0, __m512 d1, __m512 m0, __m512 m1, __m512& w0,
                       __m512& w1) {
  if constexpr (BITS == 4) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k * 16)));
    w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xF))), d0, m0);
    w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), d1, m1);
  } else {
    const __m128i* c = reinterpret_cast<const __m128i*>(codes + k * kPanel);
    w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(c))), d0);
    w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(c + 1))), d1);
  }
}

// Up to a register tile of rows: each weight vector is expanded in registers right before its FMAs
// (with few rows the FMA chains leave the ports idle enough to hide it; at 8-12 rows it still beats a
// round trip through L1). Same chains as panel_tile: same bits.
template <int M, int BITS>
void fused_tile(const float* __restrict__ x, int64_t ldx, const uint8_t* __restrict__ codes_panel, int64_t K,
                const float* __restrict__ bias, float* __restrict__ y, int64_t ldy, int64_t n_valid,
                const uint8_t* next) {
  const int64_t bb = block_bytes(BITS);
  __m512 c0[M], c1[M];
  panel::load_tile<M>(c0, c1, y, ldy, n_valid, 0);
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const uint8_t* blk = codes_panel + b * bb;
    for (int64_t line = 0; next != nullptr && line < bb; line += 64) _mm_prefetch(reinterpret_cast<const char*>(next + b * bb + line), _MM_HINT_T1);
    const float* d = reinterpret_cast<const float*>(blk);
    const __m512 d0 = _mm512_loadu_ps(d), d1 = _mm512_loadu_ps(d + 16);
    const __m512 m0 = BITS == 4 ? _mm512_loadu_ps(d + kPanel) : _mm512_setzero_ps();
    const __m512 m1 = BITS == 4 ? _mm512_loadu_ps(d + kPanel + 16) : _mm512_setzero_ps();
    const uint8_t* codes = blk + (BITS == 4 ? 2 : 1) * kPanel * 4;
    const float* xb = x + b * kBlock;
    for (int64_t k = 0; k < kBlock; ++k) {
      __m512 w0, w1;
      expand_row<BITS>(codes, k, d0, d1, m0, m1, w0, w1);
#pragma GCC unroll 12
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_set1_ps(xb[m * ldx + k]);
        c0[m] = _mm512_fmadd_ps(w0, xv, c0[m]);
        c1[m] = _mm512_fmadd_ps(w1, xv, c1[m]);
      }
    }
  }
  panel::store_tile<M>(c0, c1, bias, y, ldy, n_valid, 0);
}

using FusedFn = void (*)(const float*, int64_t, const uint8_t*, int64_t, const float*, float*, int64_t, int64_t,
                         const uint8_t*);
constexpr int kFusedRows = kTileRows;
template <int BITS, int... Ms>
constexpr auto make_fused(std::integer_sequence<int, Ms...>) {
  return std::array<FusedFn, sizeof...(Ms)>{&fused_tile<Ms + 1, BITS>...};
}
constexpr auto kFused4 = make_fused<4>(std::make_integer_sequence<int, kFusedRows>{});
constexpr auto kFused8 = make_fused<8>(std::make_integer_sequence<int, kFusedRows>{});
#else
constexpr int kFusedRows = 0;  // the portable build always expands chunks
#endif

// Expands blocks [b0, b1) of one packed panel into fp32 weights [(b1 - b0) * 32, 32] (the layout
// panel_tile reads), exactly d * q + m per weight; prefetches the same bytes of the next panel into
// L2 as it goes.
void expand_chunk(const uint8_t* panel_codes, int64_t b0, int64_t b1, int64_t bits, float* __restrict__ dst,
                  const uint8_t* next) {
  const int64_t bb = block_bytes(bits);
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* src = panel_codes + b * bb;
    for (int64_t line = 0; next != nullptr && line < bb; line += 64) __builtin_prefetch(next + b * bb + line, 0, 2);
    const float* d = reinterpret_cast<const float*>(src);
    const uint8_t* codes = src + (bits == 4 ? 2 : 1) * kPanel * 4;
    float* out = dst + (b - b0) * kBlock * kPanel;
#if defined(__AVX512F__)
    const __m512 d0 = _mm512_loadu_ps(d), d1 = _mm512_loadu_ps(d + 16);
    const __m512 m0 = bits == 4 ? _mm512_loadu_ps(d + kPanel) : _mm512_setzero_ps();
    const __m512 m1 = bits == 4 ? _mm512_loadu_ps(d + kPanel + 16) : _mm512_setzero_ps();
    for (int64_t k = 0; k < kBlock; ++k) {
      __m512 w0, w1;
      if (bits == 4) expand_row<4>(codes, k, d0, d1, m0, m1, w0, w1);
      else expand_row<8>(codes, k, d0, d1, m0, m1, w0, w1);
      _mm512_storeu_ps(out + k * kPanel, w0);
      _mm512_storeu_ps(out + k * kPanel + 16, w1);
    }
#else
    const float* m = d + kPanel;  // 4 bits only
    for (int64_t k = 0; k < kBlock; ++k) {
      for (int64_t j = 0; j < kPanel; ++j) {
        const float q = bits == 4 ? static_cast<float>((codes[k * 16 + j % 16] >> (j < 16 ? 0 : 4)) & 0xF)
                                  : static_cast<float>(static_cast<int8_t>(codes[k * kPanel + j]));
        out[k * kPanel + j] = std::fma(d[j], q, bits == 4 ? m[j] : 0.f);
      }
    }
#endif
  }
}

void check_bits(int64_t bits, const char* op) {
  TORCH_CHECK(bits == 4 || bits == 8, op, ": bits must be 4 (Q4_1 blocks) or 8 (Q8_0 blocks), got ", bits);
}

}  // namespace

// weight [N, K] float32 -> packed uint8 [ceil(N / 32), K / 32, block_bytes(bits)], or an empty
// tensor when the weight is not exactly made of such blocks (K not a multiple of 32 included).
at::Tensor pack_quantized_linear_weight(const at::Tensor& weight, int64_t bits) {
  check_bits(bits, "pack_quantized_linear_weight");
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 2,
              "pack_quantized_linear_weight: the weight must be a float32 CPU tensor [out_features, in_features]");
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  const at::Tensor none = at::empty({0}, w.options().dtype(at::kByte));
  if (N == 0 || K == 0 || K % kBlock != 0) return none;
  const int64_t P = (N + kPanel - 1) / kPanel, B = K / kBlock, bb = block_bytes(bits);
  const float* src = w.data_ptr<float>();
  {  // most weights that are not codes fail on their first row: no allocation for them
    float d, m;
    int8_t q[kBlock];
    for (int64_t b = 0; b < B; ++b) {
      if (!quantize_block(src + b * kBlock, bits, d, m, q)) return none;
    }
  }
  at::Tensor packed = at::zeros({P, B, bb}, w.options().dtype(at::kByte));
  uint8_t* dst = packed.data_ptr<uint8_t>();
  std::atomic<bool> exact{true};
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    int8_t q[kBlock];
    float no_offset = 0.f;  // 8 bits: m is not stored
    for (int64_t p = p0; p < p1 && exact.load(std::memory_order_relaxed); ++p) {
      for (int64_t j = 0; j < kPanel && p * kPanel + j < N; ++j) {
        for (int64_t b = 0; b < B; ++b) {
          uint8_t* blk = dst + (p * B + b) * bb;
          float* d = reinterpret_cast<float*>(blk);
          float* m = d + kPanel;
          uint8_t* codes = blk + (bits == 4 ? 2 : 1) * kPanel * 4;
          if (!quantize_block(src + (p * kPanel + j) * K + b * kBlock, bits, d[j], bits == 4 ? m[j] : no_offset, q)) {
            exact.store(false, std::memory_order_relaxed);
            return;
          }
          for (int64_t k = 0; k < kBlock; ++k) {
            if (bits == 8) codes[k * kPanel + j] = static_cast<uint8_t>(q[k]);
            else codes[k * 16 + j % 16] |= static_cast<uint8_t>(q[k] << (j < 16 ? 0 : 4));
          }
        }
      }
    }
  });
  return exact.load() ? packed : none;
}

// x [..., K] float32; packed from pack_quantized_linear_weight(weight [N, K], bits); bias [N] or None.
// Returns y [..., N], bit-identical to packed_linear(x, pack_linear_weight(weight), bias, N).
at::Tensor quantized_linear(const at::Tensor& x, const at::Tensor& packed, int64_t bits,
                            const std::optional<at::Tensor>& bias, int64_t out_features) {
  check_bits(bits, "quantized_linear");
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "quantized_linear: x and the packed weight must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "quantized_linear: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.size(2) == block_bytes(bits) &&
                  packed.is_contiguous(),
              "quantized_linear: the weight must come from pack_quantized_linear_weight with bits=", bits);
  const int64_t K = packed.size(1) * kBlock, N = out_features;
  const panel::LinearIO io = panel::linear_io("quantized_linear", x, K, N, packed.size(0), bias);
  if (io.M == 0) return io.y;
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
#if defined(__AVX512F__)
      if (io.M <= kFusedRows) {
        (bits == 4 ? kFused4 : kFused8)[io.M - 1](io.xp, io.ldx, codes, K, bp, io.yp + n0, N, n_valid, next);
        continue;
      }
#endif
      for (int64_t b0 = 0; b0 < B; b0 += kChunkBlocks) {
        const int64_t b1 = std::min(B, b0 + kChunkBlocks);
        expand_chunk(codes, b0, b1, bits, chunk, next);
        const int flags = (b0 > 0 ? panel::kResume : 0) | (b1 < B ? panel::kPartial : 0);
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t m0 = panel::tile_start(io.M, t), rows = panel::tile_start(io.M, t + 1) - m0;
          kTiles[rows - 1](io.xp + m0 * io.ldx + b0 * kBlock, io.ldx, chunk, (b1 - b0) * kBlock, bp, io.yp + m0 * N + n0, N,
                           n_valid, nullptr, 0, 0, flags);
        }
      }
    }
  });
  return io.y;
}

}  // namespace pagedllm::cpu
