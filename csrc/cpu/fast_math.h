// Elementwise math shared by the CPU kernels, written so that GCC vectorizes the loops that
// call it (no libm call, no branch).
#pragma once

#include <cstdint>
#include <cstring>

namespace pagedllm::cpu {

// exp(x) for x <= 0 (Cephes expf polynomial after reduction by ln 2; <= 1.4 ulp); 0 below -87.3
// (where exp leaves the normal floats), for -inf and for NaN. Branch-free, no floor() and no
// float->int conversion (either blocks GCC's vectorizer): n = round(x / ln 2) by the
// 1.5 * 2^23 trick, whose bits also give 2^n.
// e^r for r in [-0.35, 0.35] (|r| <= ln(2) / 2): the Cephes expf polynomial, for a float or a
// GCC vector of floats (scalar constants broadcast).
template <typename T>
inline T exp_reduced(T r) {
  T p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

inline float exp_nonpositive(float x) {
  const float xc = x < -87.3f ? -87.3f : x;
  const float shifted = xc * 1.44269504088896341f + 12582912.0f;  // integer-valued
  const float n = shifted - 12582912.0f;                           // in [-126, 0]
  int32_t n_bits;
  std::memcpy(&n_bits, &shifted, sizeof(n_bits));
  const int32_t scale_bits = (n_bits - 0x4B400000 + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  return x >= -87.3f ? exp_reduced(r) * scale : 0.0f;  // false for NaN
}

// exp_nonpositive lane by lane on a GCC vector of floats VF (e.g. __m512), VI its int32 twin: the same
// operations, for loops the vectorizer leaves scalar (a short, masked trip count).
template <typename VF, typename VI>
inline VF exp_nonpositive_lanes(VF x) {
  const VF lowest = VF{} - 87.3f;
  const VF xc = x < lowest ? lowest : x;
  const VF shifted = xc * 1.44269504088896341f + 12582912.0f;
  const VF n = shifted - 12582912.0f;
  const VI scale_bits = ((VI)shifted - 0x4B400000 + 127) << 23;  // same-size casts reinterpret the bits
  VF r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  return x >= lowest ? exp_reduced(r) * (VF)scale_bits : VF{};  // false for NaN
}

}  // namespace pagedllm::cpu
