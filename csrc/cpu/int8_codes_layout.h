// The int8 mode's weight layout (int8_linear.cpp, int8_dot_kernels.h; internal to csrc/cpu): the GGUF
// codes of a weight rearranged for integer dot products with int8 activations.
//
// uint8 [ceil(N / 8), K / 32, block bytes]: per panel of 8 output features and block of 32 inputs,
//   d[subs][8]     the scale of each sub-block of `sub` inputs (Q6_K: 2 sub-blocks of 16): fp16 for the
//                  formats whose d is an fp16 value in GGUF (half_scales), fp32 for the K-quants' products,
//   corr[subs][8]  (affine formats only, same width as d) m: the weight is d * c + corr with c the stored
//                  unsigned code. The offset formats' corr is not stored: -offset * d, exact in fp32 (a
//                  power of two times d), computed in the tiles (corr_at / their vector twins),
//   codes          group g of inputs 4g .. 4g + 3 is one 32-byte vector: byte 4 f + i = feature f's code
//                  of input 4g + i. Nibble formats store groups 2q and 2q + 1 in one 32-byte run q
//                  (group 2q in the low nibbles), byte formats one run per group.
// (Q4_1: 160 bytes per 8 x 32 weights, GGUF's 20 per 32; Q4_0 144, GGUF's 18.)
// so x's 4 int8 of a group, broadcast to 8 lanes, meet every feature's 4 codes in one vpmaddubsw /
// vpdpbusd and the 8 lanes stay the 8 features (no horizontal sums).
// Features past N have d = corr = 0.
#pragma once

#include <cstdint>

#include "gguf_block_codes.h"

namespace pagedllm::cpu::int8_codes {

using gguf_codes::kBlock;
constexpr int64_t kFeatures = 8;  // output features per int8 panel (one AVX2 vector of fp32 sums)
constexpr int64_t kGroups = kBlock / 4;

enum class Codes { kNibble, kUnsigned, kSigned };  // 4-bit unsigned, 5 / 6-bit unsigned in a byte, int8

struct Layout {
  Codes codes;
  int sub;         // inputs per scale: 32 or 16
  bool has_corr;   // false for Q8_0 only
  int offset;      // what the stored unsigned code carries above the signed one (0 for affine and Q8_0)
  int max_code;    // the largest stored code (bounds the int16 partial sums of vpmaddubsw)
  bool half_scales;  // d and m are fp16 values (the legacy formats), stored as fp16
};

constexpr Layout layout_of(int qtype) {
  using namespace gguf_codes;
  return qtype == kQ4_0 ? Layout{Codes::kNibble, 32, true, 8, 15, true}
       : qtype == kQ4_1 ? Layout{Codes::kNibble, 32, true, 0, 15, true}
       : qtype == kQ4_K ? Layout{Codes::kNibble, 32, true, 0, 15, false}
       : qtype == kQ5_0 ? Layout{Codes::kUnsigned, 32, true, 16, 31, true}
       : qtype == kQ5_1 ? Layout{Codes::kUnsigned, 32, true, 0, 31, true}
       : qtype == kQ6_K ? Layout{Codes::kUnsigned, 16, true, 32, 63, false}
                        : Layout{Codes::kSigned, 32, false, 0, 128, true};
}

constexpr int64_t subs(Layout l) { return kBlock / l.sub; }
constexpr bool corr_stored(Layout l) { return l.has_corr && l.offset == 0; }  // the affine formats' m
constexpr int64_t scale_width(Layout l) { return l.half_scales ? 2 : 4; }
constexpr int64_t scale_bytes(Layout l) {
  return subs(l) * kFeatures * scale_width(l) * (corr_stored(l) ? 2 : 1);
}
constexpr int64_t code_bytes(Layout l) { return l.codes == Codes::kNibble ? kBlock * kFeatures / 2 : kBlock * kFeatures; }
constexpr int64_t block_bytes(Layout l) { return scale_bytes(l) + code_bytes(l); }

// vpmaddubsw adds two u8 x s8 products into a saturating int16; this many of those pair sums (one a
// group) can be added in int16 before widening without overflow: 2 * max_code * 128 per group.
constexpr int int16_groups(Layout l) {
  const int per_group = 2 * l.max_code * 128;
  const int n = 32767 / per_group;
  return l.codes == Codes::kSigned ? 1 : (n >= l.sub / 4 ? l.sub / 4 : n >= 4 ? 4 : n >= 2 ? 2 : 1);
}

// Scale i of a block's scale area (d[subs][8], then the stored corr[subs][8]) as fp32, and its store
// (repack: the values are fp16 ones where half_scales).
template <int QT>
inline float scale_at(const uint8_t* blk, int64_t i) {
  return gguf_codes::load_scale<layout_of(QT).half_scales>(blk, i);
}
template <int QT>
inline void store_scale(uint8_t* blk, int64_t i, float v) {
  gguf_codes::put_scale<layout_of(QT).half_scales>(blk, i, v);
}
// The corr of sub-block s, feature f, given its d: stored (affine) or -offset * d.
template <int QT>
inline float corr_at(const uint8_t* blk, int64_t s, int64_t f, float d) {
  constexpr Layout l = layout_of(QT);
  if constexpr (corr_stored(l)) return scale_at<QT>(blk, (subs(l) + s) * kFeatures + f);
  return -static_cast<float>(l.offset) * d;
}

}  // namespace pagedllm::cpu::int8_codes
