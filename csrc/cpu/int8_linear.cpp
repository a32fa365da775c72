// int8_linear on the CPU: the opt-in quantized mode (LLM(..., quantization="gguf_int8")). y = x W^T (+ bias)
// with x quantized per block of 32 inputs to int8 and W the GGUF codes of the weight, dot products in
// integer arithmetic (int8_dot_kernels.h), for every row count: decode steps and prefill alike.
//
// Why: the exact mode widens every code to fp32 and spends one fp32 FMA per weight and row; here 32
// products are one vpmaddubsw (AVX2) or vpdpbusd (VNNI) per 4 inputs x 8 features, and the fp32 work
// is one conversion and two FMAs per block of 32 inputs. The price is x's rounding to 8 bits per block
// (llama.cpp's q8 activations): results are no longer the fp32 model's (accuracy: benchmarks/RESULTS.md).
//
// pack_int8_linear_weight rearranges the codes that pack_quantized_linear_weight found (exact GGUF
// blocks, checked bit for bit there) into int8_codes_layout.h's panels of 8 features.
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "cpu_only_ops.h"
#include "gguf_block_codes.h"
#include "int8_codes_layout.h"
#include "int8_dot_kernels.h"
#include "panel_linear_io.h"

namespace pagedllm::cpu {
namespace {

using namespace int8_codes;  // NOLINT: the layout and the tiles
namespace gc = gguf_codes;

constexpr int64_t kRowChunk = 64;  // rows of int8 x kept in L2 while a thread's panels stream past them

void check_qtype(int64_t qtype, const char* op) {
  TORCH_CHECK(qtype == gc::kQ4_0 || qtype == gc::kQ4_1 || qtype == gc::kQ5_0 || qtype == gc::kQ5_1 ||
                  qtype == gc::kQ8_0 || qtype == gc::kQ4_K || qtype == gc::kQ6_K,
              op, ": qtype must be a GGML type id of Q4_0 (2), Q4_1 (3), Q5_0 (6), Q5_1 (7), Q8_0 (8), Q4_K (12) or ",
              "Q6_K (14), got ", qtype);
}

enum class Isa { kScalar, kAvx2, kVnni };

bool cpu_has(Isa isa) {
#if defined(PAGEDLLM_INT8_X86)
  if (isa == Isa::kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                 __builtin_cpu_supports("f16c");
  if (isa == Isa::kVnni) {
    return cpu_has(Isa::kAvx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }
#endif
  return isa == Isa::kScalar;
}

// The best twin this CPU runs; PAGEDLLM_CPU_INT8_ISA=scalar|avx2|vnni asks for one (tests compare them).
Isa chosen_isa() {
  const char* env = std::getenv("PAGEDLLM_CPU_INT8_ISA");
  const std::string want = env ? env : "";
  if (!want.empty()) {
    const Isa isa = want == "scalar" ? Isa::kScalar : want == "avx2" ? Isa::kAvx2 : want == "vnni" ? Isa::kVnni
                                                                                                  : Isa::kScalar;
    TORCH_CHECK(want == "scalar" || want == "avx2" || want == "vnni",
                "PAGEDLLM_CPU_INT8_ISA must be scalar, avx2 or vnni, got ", want);
    TORCH_CHECK(cpu_has(isa), "PAGEDLLM_CPU_INT8_ISA=", want, ": this CPU lacks the instructions");
    return isa;
  }
  static const Isa best = cpu_has(Isa::kVnni) ? Isa::kVnni : cpu_has(Isa::kAvx2) ? Isa::kAvx2 : Isa::kScalar;
  return best;
}

template <int QT>
const std::array<TileFn, kTileRows>& tiles_for(Isa isa) {
#if defined(PAGEDLLM_INT8_X86)
  if (isa == Isa::kVnni) return vnni::kTilesOf<QT>;
  if (isa == Isa::kAvx2) return avx2::kTilesOf<QT>;
#endif
  return scalar::kTilesOf<QT>;
}

using QuantizeFn = void (*)(const float*, int64_t, int8_t*, float*, int32_t*);
QuantizeFn quantizer_for(Isa isa) {
#if defined(PAGEDLLM_INT8_X86)
  if (isa == Isa::kVnni) return &vnni::quantize_row;
  if (isa == Isa::kAvx2) return &avx2::quantize_row;
#endif
  return &scalar::quantize_row;
}

// x2 [M, K] (last dim contiguous, row stride ldx) -> q [M, K] int8, d [M, K / 32], sums [M, K / 32, 2].
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize(const float* x, int64_t ldx, int64_t M, int64_t K, Isa isa,
                                                        const at::TensorOptions& opts) {
  const int64_t B = K / kBlock;
  at::Tensor q = at::empty({M, K}, opts.dtype(at::kChar));
  at::Tensor d = at::empty({M, B}, opts.dtype(at::kFloat));
  at::Tensor sums = at::empty({M, B, 2}, opts.dtype(at::kInt));
  int8_t* qp = q.data_ptr<int8_t>();
  float* dp = d.data_ptr<float>();
  int32_t* sp = sums.data_ptr<int32_t>();
  const QuantizeFn fn = quantizer_for(isa);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) fn(x + m * ldx, K, qp + m * K, dp + m * B, sp + m * B * 2);
  });
  return {q, d, sums};
}

template <int QT>
at::Tensor repack(const at::Tensor& codes, int64_t N) {
  constexpr gc::Format f = gc::format_of(QT);
  constexpr Layout l = layout_of(QT);
  const int64_t B = codes.size(1), src_bb = codes.size(2), dst_bb = block_bytes(l);
  const int64_t P = (N + kFeatures - 1) / kFeatures;
  at::Tensor out = at::zeros({P, B, dst_bb}, codes.options());
  const uint8_t* src = codes.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t fe = 0; fe < kFeatures && p * kFeatures + fe < N; ++fe) {
        const int64_t n = p * kFeatures + fe, j = n % gc::kPanel;
        for (int64_t b = 0; b < B; ++b) {
          const uint8_t* in = src + ((n / gc::kPanel) * B + b) * src_bb;
          uint8_t* blk = dst + (p * B + b) * dst_bb;
          for (int64_t s = 0; s < subs(l); ++s) {  // the codes' d[32 / sub][32], then (affine) m[32]
            store_scale<QT>(blk, s * kFeatures + fe, gc::scale_at<QT>(in, s * gc::kPanel + j));
            if (corr_stored(l)) {
              store_scale<QT>(blk, (subs(l) + s) * kFeatures + fe, gc::scale_at<QT>(in, gc::kPanel + j));
            }
          }
          uint8_t* c_out = blk + scale_bytes(l);
          for (int64_t k = 0; k < kBlock; ++k) {
            // gguf's code (signed for Q8_0 / Q6_K) moved up by the offset: the stored code of the layout
            const int c = gc::code_at<QT>(in + gc::scale_bytes(f), k, j) + (f.affine ? 0 : l.offset - f.offset);
            const int64_t g = k / 4, i = k % 4;
            if (l.codes == Codes::kNibble) {
              c_out[(g / 2) * 32 + 4 * fe + i] |= static_cast<uint8_t>(c << (g % 2 == 0 ? 0 : 4));
            } else {
              c_out[g * 32 + 4 * fe + i] = static_cast<uint8_t>(c);
            }
          }
        }
      }
    }
  });
  return out;
}

int64_t packed_block_bytes(int64_t qtype) {
  return gc::with_qtype(qtype, [](auto qt) { return block_bytes(layout_of(decltype(qt)::value)); });
}

}  // namespace

// codes from pack_quantized_linear_weight(weight [N, K], qtype) -> uint8 [ceil(N / 8), K / 32, block bytes]
// (int8_codes_layout.h).
at::Tensor pack_int8_linear_weight(const at::Tensor& codes, int64_t qtype, int64_t out_features) {
  check_qtype(qtype, "pack_int8_linear_weight");
  const int64_t src_bb = gc::with_qtype(qtype, [](auto qt) { return gc::block_bytes(gc::format_of(decltype(qt)::value)); });
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.dim() == 3 && codes.size(2) == src_bb &&
                  codes.is_contiguous(),
              "pack_int8_linear_weight: the codes must come from pack_quantized_linear_weight with qtype=", qtype);
  TORCH_CHECK(out_features > 0 && (out_features + gc::kPanel - 1) / gc::kPanel == codes.size(0),
              "pack_int8_linear_weight: out_features ", out_features, " does not match the codes' ", codes.size(0),
              " panels");
  return gc::with_qtype(qtype, [&](auto qt) { return repack<decltype(qt)::value>(codes, out_features); });
}

// x [..., K] float32 -> (q [M, K] int8, d [M, K / 32] float32, sums [M, K / 32, 2] int32): the activation
// quantization int8_linear applies (exposed for tests and references).
std::vector<at::Tensor> quantize_rows_int8(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1 && x.size(-1) % kBlock == 0,
              "quantize_rows_int8: x must be a float32 CPU tensor whose last dim is a multiple of 32");
  const int64_t K = x.size(-1);
  at::Tensor x2 = x.reshape({-1, K});
  if (K > 0 && x2.stride(1) != 1) x2 = x2.contiguous();
  const int64_t M = x2.size(0);
  if (M == 0 || K == 0) {
    return {at::empty({M, K}, x.options().dtype(at::kChar)), at::empty({M, K / kBlock}, x.options()),
            at::empty({M, K / kBlock, 2}, x.options().dtype(at::kInt))};
  }
  auto [q, d, sums] = quantize(x2.data_ptr<float>(), x2.stride(0), M, K, chosen_isa(), x.options());
  return {q, d, sums};
}

// x [..., K] float32; packed from pack_int8_linear_weight(codes, qtype, N); bias [N] or None -> y [..., N].
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, int64_t qtype,
                       const std::optional<at::Tensor>& bias, int64_t out_features) {
  check_qtype(qtype, "int8_linear");
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "int8_linear: x and the packed weight must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "int8_linear: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.size(2) == packed_block_bytes(qtype) &&
                  packed.is_contiguous(),
              "int8_linear: the weight must come from pack_int8_linear_weight with qtype=", qtype);
  const int64_t K = packed.size(1) * kBlock, N = out_features, P = packed.size(0);
  TORCH_CHECK(N > 0 && (N + kFeatures - 1) / kFeatures == P, "int8_linear: out_features ", N,
              " does not match the packed weight's ", P, " panels");
  // linear_io's panel check is for 32-feature panels: hand it those, the check above is the real one
  const panel::LinearIO io = panel::linear_io("int8_linear", x, K, N, (N + gc::kPanel - 1) / gc::kPanel, bias);
  if (io.M == 0) return io.y;
  const Isa isa = chosen_isa();
  auto [q, d, sums] = quantize(io.xp, io.ldx, io.M, K, isa, x.options());
  const QuantizedRows rows{q.data_ptr<int8_t>(), d.data_ptr<float>(), sums.data_ptr<int32_t>(), K, K / kBlock};
  gc::with_qtype(qtype, [&](auto qt) {
    constexpr int QT = decltype(qt)::value;
    const std::array<TileFn, kTileRows>& tiles = tiles_for<QT>(isa);
    const int64_t panel_bytes = packed.size(1) * packed.size(2);
    const uint8_t* wp = packed.data_ptr<uint8_t>();
    // The VNNI twin takes panels two at a time (16 lanes): threads split pairs of panels.
    const int64_t per_unit = isa == Isa::kVnni ? 2 : 1;
    fetch_ahead::Plan* later = fetch_ahead::current();  // what the caller reads next (decoder_layers)
    at::parallel_for(0, (P + per_unit - 1) / per_unit, 1, [&](int64_t u0, int64_t u1) {
      const int64_t p0 = u0 * per_unit, p1 = std::min(P, u1 * per_unit);
      fetch_ahead::Cursor* ahead = panel::ahead_for(later, io.M, panel::kCodesFetchAheadRows);  // VNNI pair tiles
      for (int64_t m0 = 0; m0 < io.M; m0 += kRowChunk) {
        const int64_t m1 = std::min(io.M, m0 + kRowChunk);
        for (int64_t p = p0; p < p1;) {
          const int64_t n0 = p * kFeatures;
          const float* bp = io.bias ? io.bias + n0 : nullptr;
#if defined(PAGEDLLM_INT8_X86)
          if (per_unit == 2 && p + 1 < p1) {
            const auto& pair_tiles = vnni::kPairTilesOf<QT>;
            const uint8_t* panel = wp + p * panel_bytes;
            // the first row tile fetches the thread's next pair (of this row chunk or the next one)
            const int64_t p_next = p + 3 < p1 ? p + 2 : m1 < io.M ? p0 : -1;
            for (int64_t r = m0; r < m1; r += vnni::kPairRows) {
              const int64_t rows_here = std::min<int64_t>(vnni::kPairRows, m1 - r);
              pair_tiles[rows_here - 1](rows, r, panel, panel + panel_bytes, io.yp + r * N + n0, N,
                                        std::min(2 * kFeatures, N - n0), bp,
                                        r == m0 && p_next >= 0 ? wp + p_next * panel_bytes : nullptr, ahead);
            }
            p += 2;
            continue;
          }
#endif
          for (int64_t r = m0; r < m1; r += kTileRows) {
            const int64_t rows_here = std::min<int64_t>(kTileRows, m1 - r);
            tiles[rows_here - 1](rows, r, wp + p * panel_bytes, io.yp + r * N + n0, N, std::min(kFeatures, N - n0), bp);
          }
          ++p;
        }
      }
    });
  });
  return io.y;
}

}  // namespace pagedllm::cpu
