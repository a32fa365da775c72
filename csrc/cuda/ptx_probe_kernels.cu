// Micro-kernels of the PTX helpers (see ptx_probe_kernels.h). One warp, one block.
#include "cuda/ptx_probe_kernels.h"
#include "cuda/launch.cuh"
#include "cuda/ptx.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace pagedllm::cuda {
namespace {

// in layout for the mma probes: words [0, 128) A as 16 x 16 b16 row-major (two per word),
// [128, 192) B as 16 (k) x 8 (n) b16 row-major, [192, 320) C as 16 x 8 fp32 row-major.
__device__ __forceinline__ uint16_t b16_at(const int32_t* words, int index) {
  const uint32_t w = static_cast<uint32_t>(words[index / 2]);
  return static_cast<uint16_t>(index % 2 ? w >> 16 : w & 0xFFFFu);
}
__device__ __forceinline__ uint32_t pair(const int32_t* words, int lo, int hi) {
  return uint32_t(b16_at(words, lo)) | (uint32_t(b16_at(words, hi)) << 16);
}

template <typename T>
__device__ void mma_probe(int32_t* out, const int32_t* in, int lane) {
  const int g = lane / 4, t = lane % 4;
  const int32_t* A = in;          // [16][16]
  const int32_t* B = in + 128;    // [16][8]
  const float* C = reinterpret_cast<const float*>(in + 192);  // [16][8]
  uint32_t a[4] = {pair(A, g * 16 + 2 * t, g * 16 + 2 * t + 1), pair(A, (g + 8) * 16 + 2 * t, (g + 8) * 16 + 2 * t + 1),
                   pair(A, g * 16 + 2 * t + 8, g * 16 + 2 * t + 9),
                   pair(A, (g + 8) * 16 + 2 * t + 8, (g + 8) * 16 + 2 * t + 9)};
  const uint32_t b0 = pair(B, (2 * t) * 8 + g, (2 * t + 1) * 8 + g);
  const uint32_t b1 = pair(B, (2 * t + 8) * 8 + g, (2 * t + 9) * 8 + g);
  float c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]};
  mma_16816<T>(c, a, b0, b1);
  for (int e = 0; e < 4; ++e) out[lane * 4 + e] = __float_as_int(c[e]);
}

// A test kernel (tests/kernels/test_ptx_twins.py), not on any hot path; its claim only keeps it honest:
// Claims checked against the sm_90 cubin by tests/kernels/test_sass.py (format: tests/kernels/cubin_inspect.py):
// occupancy(sm_90) if all: >= 1 CTAs/SM of 32 threads with 512 B dynamic smem
__global__ void ptx_probe_kernel(int32_t* out,       // [>= 128]
                                 const int32_t* in,  // [>= 384]
                                 int probe) {
  PAGEDLLM_DYNAMIC_SMEM(smem);
  const int lane = threadIdx.x;
  switch (static_cast<PtxProbe>(probe)) {
    case PtxProbe::kEx2:
      out[lane] = __float_as_int(fast_exp2(__int_as_float(in[lane])));
      break;
    case PtxProbe::kCpAsync: {
      // Lane l copies words [4 l, 4 l + 4) into smem piece 31 - l; odd lanes zero-fill instead.
      cp_async_16(smem + 16 * (31 - lane), in + 4 * lane, lane % 2 == 0);
      cp_async_commit();
      cp_async_wait<0>();
      __syncwarp();
      for (int i = 0; i < 4; ++i) out[lane * 4 + i] = reinterpret_cast<const int32_t*>(smem)[lane * 4 + i];
      break;
    }
    case PtxProbe::kLdsm:
    case PtxProbe::kLdsmTrans: {
      // The 32 x 8 b16 tile (rows of 16 bytes) into smem, row r at 16 r: matrix m is rows 8 m .. 8 m + 7.
      for (int i = 0; i < 4; ++i) reinterpret_cast<int32_t*>(smem)[lane * 4 + i] = in[lane * 4 + i];
      __syncwarp();
      uint32_t r[4];
      const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem + 16 * lane));
      if (static_cast<PtxProbe>(probe) == PtxProbe::kLdsm) {
        ldsm_x4(addr, r);
      } else {
        ldsm_x4_trans(addr, r);
      }
      for (int i = 0; i < 4; ++i) out[lane * 4 + i] = static_cast<int32_t>(r[i]);
      break;
    }
    case PtxProbe::kMmaBf16:
      mma_probe<__nv_bfloat16>(out, in, lane);
      break;
    case PtxProbe::kMmaFp16:
      mma_probe<__half>(out, in, lane);
      break;
  }
}

}  // namespace

cudaError_t launch_ptx_probe(PtxProbe probe, int32_t* out, const int32_t* in, cudaStream_t stream) {
  PAGEDLLM_LAUNCH(1, 32, 512, stream, ptx_probe_kernel)(out, in, static_cast<int>(probe));
  return cudaGetLastError();
}

}  // namespace pagedllm::cuda
