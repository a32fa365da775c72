// The int8 mode's weight layout (int8_linear.cpp, int8_dot_kernels.h; internal to csrc/cpu): the GGUF
// codes of a weight rearranged for integer dot products with int8 activations.
//
// uint8 [ceil(N / 8), K / 32, block bytes]: per panel of 8 output features and block of 32 inputs,
//   d[subs][8]     float32, the scale of each sub-block of `sub` inputs (Q6_K: 2 sub-blocks of 16),
//   corr[subs][8]  float32 (formats with an offset or a minimum): the weight is d * c + corr with c
//                  the stored unsigned code (affine: corr = m; offset formats: corr = -offset * d),
//   codes          group g of inputs 4g .. 4g + 3 is one 32-byte vector: byte 4 f + i = feature f's code
//                  of input 4g + i. Nibble formats store groups 2q and 2q + 1 in one 32-byte run q
//                  (group 2q in the low nibbles), byte formats one run per group.
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
};

constexpr Layout layout_of(int qtype) {
  using namespace gguf_codes;
  return qtype == kQ4_0 ? Layout{Codes::kNibble, 32, true, 8, 15}
       : qtype == kQ4_1 || qtype == kQ4_K ? Layout{Codes::kNibble, 32, true, 0, 15}
       : qtype == kQ5_0 ? Layout{Codes::kUnsigned, 32, true, 16, 31}
       : qtype == kQ5_1 ? Layout{Codes::kUnsigned, 32, true, 0, 31}
       : qtype == kQ6_K ? Layout{Codes::kUnsigned, 16, true, 32, 63}
                        : Layout{Codes::kSigned, 32, false, 0, 128};
}

constexpr int64_t subs(Layout l) { return kBlock / l.sub; }
constexpr int64_t scale_bytes(Layout l) { return subs(l) * kFeatures * 4 * (l.has_corr ? 2 : 1); }
constexpr int64_t code_bytes(Layout l) { return l.codes == Codes::kNibble ? kBlock * kFeatures / 2 : kBlock * kFeatures; }
constexpr int64_t block_bytes(Layout l) { return scale_bytes(l) + code_bytes(l); }

// vpmaddubsw adds two u8 x s8 products into a saturating int16; this many of those pair sums (one a
// group) can be added in int16 before widening without overflow: 2 * max_code * 128 per group.
constexpr int int16_groups(Layout l) {
  const int per_group = 2 * l.max_code * 128;
  const int n = 32767 / per_group;
  return l.codes == Codes::kSigned ? 1 : (n >= l.sub / 4 ? l.sub / 4 : n >= 4 ? 4 : n >= 2 ? 2 : 1);
}

}  // namespace pagedllm::cpu::int8_codes
