// The GGUF block formats that quantized_linear.cpp streams (internal to csrc/cpu): how a stored code
// becomes its fp32 weight (weight_of), the packed block layout, and the search that recovers a
// block's scales and codes from its dequantized fp32 weights, bit for bit or not at all.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/Half.h>

#include "panel_tile.h"

namespace pagedllm::cpu::gguf_codes {

using panel::kPanel;

constexpr int64_t kBlock = 32;  // inputs per quantization block (GGUF's QK4_0 ... QK8_0)

// The block formats, by GGML type id. weight = affine ? fma(d, c, m) : d * float(c - offset).
struct Format {
  int code_bits;     // 4, 5 or 8 (8: c is a signed byte)
  bool affine;
  int offset;        // signed formats only
  int sub;           // inputs per scale d: 32, or 16 (Q6_K; signed formats only)
  bool half_scales;  // d (and m) are fp16 values, packed as fp16 (the K-quants' fp32 products are not)
};
// Q4_K's sub-blocks of 32 are Q4_1's form with fp32 d and m, Q6_K's sub-blocks of 16 are Q8_0's form
// with an fp32 d each (quantize_block_q4k, quantize_block_q6k).
constexpr int kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14;
constexpr Format format_of(int qtype) {
  return qtype == kQ4_0 ? Format{4, false, 8, 32, true}
       : qtype == kQ4_1 ? Format{4, true, 0, 32, true}
       : qtype == kQ4_K ? Format{4, true, 0, 32, false}
       : qtype == kQ5_0 ? Format{5, false, 16, 32, true}
       : qtype == kQ5_1 ? Format{5, true, 0, 32, true}
       : qtype == kQ6_K ? Format{8, false, 0, 16, false}
                        : Format{8, false, 0, 32, true};
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

// d[32 / sub][32], then (affine) m[32]: fp16 where half_scales (Q4_1: 20 bytes per 32 weights, GGUF's own
// size, instead of 24 with fp32 scales), else fp32.
constexpr int64_t scale_bytes(Format f) { return (f.affine ? 2 : kBlock / f.sub) * kPanel * (f.half_scales ? 2 : 4); }
constexpr int64_t code_bytes(Format f) {
  return f.code_bits == 8 ? kBlock * kPanel : kBlock * kPanel / 2 + (f.code_bits == 5 ? kBlock * 4 : 0);
}
constexpr int64_t block_bytes(Format f) { return scale_bytes(f) + code_bytes(f); }

inline bool same_bits(float a, float b) {  // -0.0 is not +0.0 here: "exact" means the same fp32 bits
  uint32_t ua, ub;
  std::memcpy(&ua, &a, 4);
  std::memcpy(&ub, &b, 4);
  return ua == ub;
}

inline float to_half_and_back(float v) { return static_cast<float>(c10::Half(v)); }

// Scale i of an array of fp16 (Half) or fp32 scales, as fp32 (exactly: fp16 widens without rounding), and
// its store (the value must be an fp16 one where Half). Shared by this layout and the int8 mode's.
template <bool Half>
inline float load_scale(const uint8_t* scales, int64_t i) {
  if constexpr (Half) {
    uint16_t h;
    std::memcpy(&h, scales + 2 * i, 2);
    return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
  } else {
    float v;
    std::memcpy(&v, scales + 4 * i, 4);
    return v;
  }
}
template <bool Half>
inline void put_scale(uint8_t* scales, int64_t i, float v) {
  if constexpr (Half) {
    const uint16_t h = c10::Half(v).x;
    std::memcpy(scales + 2 * i, &h, 2);
  } else {
    std::memcpy(scales + 4 * i, &v, 4);
  }
}

// Scale i of a packed block's scale area (d[32 / sub][32], then m[32]), and its store (pack: the values
// are fp16 ones where half_scales, quantize_block checked).
template <int QT>
inline float scale_at(const uint8_t* blk, int64_t i) {
  return load_scale<format_of(QT).half_scales>(blk, i);
}
template <int QT>
inline void store_scale(uint8_t* blk, int64_t i, float v) {
  put_scale<format_of(QT).half_scales>(blk, i, v);
}

// The fp16 values next to h (h itself first): the scale recovered from a block's extremes can be
// one fp16 step off after the fp32 rounding of d * q + m.
inline std::array<float, 3> half_neighbours(float h) {
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
inline double round_to_bits(double x, int bits, int steps) {
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
inline bool quantize_block_q4k(const float* w, float* d_out, float& m_out, int* c_out) {
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
inline bool quantize_sub_block_q6k(const float* w, float& d_out, int* c_out) {
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

}  // namespace pagedllm::cpu::gguf_codes
