// Philox4x32-10 (Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3", SC11), the
// counter-based generator of Random123 and curand, shared by the host C++ (csrc/cpu) and the
// CUDA device code (csrc/cuda) so that both draw the same numbers. No torch, no CUDA headers.
//
// Sampling convention (also implemented in python/pagedllm/layers/sampler.py, philox4x32):
//   key     = (seed & 0xffffffff, seed >> 32)              (the 64 bits of the int64 seed)
//   counter = (offset & 0xffffffff, offset >> 32, 0, 0)   (the 64 bits of the int64 offset)
//   u       = (x0 >> 8) * 2^-24                            (x0 = first output word; 24 bits,
//                                                           exact in float32, u in [0, 1 - 2^-24])
// Known answers (Random123 kat_vectors) are checked in tests/kernels/test_sampling.py.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define PAGEDLLM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PAGEDLLM_HOST_DEVICE inline
#endif

namespace pagedllm {

struct Philox4x32Out {
  uint32_t x[4];
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // round multipliers
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key schedule (Weyl) increments
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

PAGEDLLM_HOST_DEVICE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// 10 rounds; the key is bumped between rounds (9 bumps), as in Random123's philox4x32_R(10, ...).
PAGEDLLM_HOST_DEVICE Philox4x32Out philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                 uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kPhiloxM0, c0, hi0, lo0);
    philox_mulhilo(kPhiloxM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4x32Out{{c0, c1, c2, c3}};
}

// The uniform draw of a row: u in [0, 1 - 2^-24], a multiple of 2^-24 (exact in float32).
PAGEDLLM_HOST_DEVICE float philox_uniform(int64_t seed, int64_t offset) {
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  const Philox4x32Out r = philox4x32_10(static_cast<uint32_t>(o), static_cast<uint32_t>(o >> 32), 0u, 0u,
                                        static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
  return static_cast<float>(r.x[0] >> 8) * 5.9604644775390625e-08f;  // 2^-24
}

}  // namespace pagedllm
