// Every inline-PTX helper of the CUDA kernels, each with its emulator twin beside it: nvcc compiles
// the asm, the emulator build (PAGEDLLM_CUDA_EMU, csrc/cuda/emu) calls the twin, which follows the
// PTX ISA's definition of the instruction (data movement, fragment layouts, rounding).
// tests/kernels/test_ptx_twins.py runs one micro-kernel per twin on a GPU when one is present.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/launch.cuh"


namespace pagedllm::cuda {

// 2^x, one MUFU op (ftz: subnormal results are +0); 2^-inf = +0.
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef PAGEDLLM_CUDA_EMU
  return ::emu::ex2_approx(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// 16-byte global -> shared copy, cached in L2 only; valid == false writes 16 zero bytes and reads
// nothing (src-size 0).
#ifdef PAGEDLLM_CUDA_EMU
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid PAGEDLLM_EMU_SITE_PARAMS) {
  ::emu::cp_async_16(smem_dst, gmem_src, valid ? 16 : 0, emu_file, emu_line);
}
#else
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes)
               : "memory");
}
#endif

// The same copy to a shared-window address (from __cvta_generic_to_shared), always valid.
#ifdef PAGEDLLM_CUDA_EMU
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src PAGEDLLM_EMU_SITE_PARAMS) {
  ::emu::cp_async_16(::emu::g_block->smem + dst, src, 16, emu_file, emu_line);
}
#else
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
#endif

// Closes the group of the cp.async issued since the last commit (possibly empty).
__device__ __forceinline__ void cp_async_commit() {
#ifdef PAGEDLLM_CUDA_EMU
  ::emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are pending (the newest N).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef PAGEDLLM_CUDA_EMU
  ::emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Waits for every cp.async of this thread, committed or not.
__device__ __forceinline__ void cp_async_wait_all() {
#ifdef PAGEDLLM_CUDA_EMU
  ::emu::cp_async_wait_all();
#else
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// Four 8x8 b16 matrices; lane i gives the address of row (i % 8) of matrix (i / 8). Without .trans
// lane l receives row l / 4, columns 2 (l % 4) + {0, 1} of each matrix; with .trans it receives
// rows 2 (l % 4) + {0, 1} of column l / 4 (the transposed matrix).
#ifdef PAGEDLLM_CUDA_EMU
__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4] PAGEDLLM_EMU_SITE_PARAMS) {
  ::emu::ldmatrix_x4(addr, r, false, emu_file, emu_line);
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t addr, uint32_t (&r)[4] PAGEDLLM_EMU_SITE_PARAMS) {
  ::emu::ldmatrix_x4(addr, r, true, emu_file, emu_line);
}
#else
__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
#endif

// D[16x8] += A[16x16] B[16x8], fp32 accumulators. Fragments (PTX ISA, mma.m16n8k16, g = lane / 4,
// t = lane % 4; each b32 register holds two b16, the lower column / k index in the low half):
//   A: a0 = (row g,   cols 2t, 2t+1)   a1 = (row g+8, cols 2t, 2t+1)
//      a2 = (row g,   cols 2t+8, +9)   a3 = (row g+8, cols 2t+8, +9)
//   B: b0 = (k 2t, 2t+1, col g)        b1 = (k 2t+8, 2t+9, col g)
//   C: c0, c1 = (row g, cols 2t, 2t+1) c2, c3 = (row g+8, cols 2t, 2t+1)
#ifdef PAGEDLLM_CUDA_EMU
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1
                                          PAGEDLLM_EMU_SITE_PARAMS) {
  ::emu::mma_16816<T>(c, a, b0, b1, emu_file, emu_line);
}
#else
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

}  // namespace pagedllm::cuda
