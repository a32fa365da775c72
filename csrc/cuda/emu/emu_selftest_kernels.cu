// Deliberately broken kernels (emulator build only): each must stop with an error that names the
// kernel, the file and the line, never hang (tests/kernels/test_cuda_emu_errors.py).
#include "cuda/emu/emu_selftest.h"
#include "cuda/launch.cuh"
#include "cuda/ptx.cuh"
#include "cuda/vec.cuh"

namespace pagedllm::cuda {
namespace {

__global__ void barrier_after_exit_kernel(float* buf) {
  if (threadIdx.x >= 32) return;  // warp 1 leaves
  __syncthreads();                // warp 0 waits for threads that have exited
  buf[threadIdx.x] = 1.f;
}

__global__ void deadlock_kernel(float* buf) {
  if (threadIdx.x < 16) {
    __syncthreads();  // half of warp 0 waits for the block ...
  } else {
    buf[threadIdx.x] = __shfl_sync(0xffffffffu, buf[threadIdx.x], 0);  // ... the other half for the whole warp
  }
}

__global__ void divergent_shuffle_kernel(float* buf) {
  float v = buf[threadIdx.x];
  if (threadIdx.x % 2 == 0) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 2);
  }
  buf[threadIdx.x] = v;
}

__global__ void smem_overflow_kernel(float* buf) {
  PAGEDLLM_DYNAMIC_SMEM(smem);
  Vec16<float> v = Vec16<float>::load(buf);
  v.store(reinterpret_cast<float*>(smem) + 4 * threadIdx.x);  // 16 bytes per thread: past 256 bytes at thread 16
}

__global__ void cp_async_outside_kernel(float* buf, int64_t n) {
  PAGEDLLM_DYNAMIC_SMEM(smem);
  cp_async_16(smem + 16 * threadIdx.x, buf + n + 4 * threadIdx.x, true);  // past the end of buf
  cp_async_wait_all();
}

}  // namespace

cudaError_t launch_emu_selftest(EmuSelftest which, float* buf, int64_t n) {
  switch (which) {
    case EmuSelftest::kBarrierAfterExit: PAGEDLLM_LAUNCH(1, 64, 0, nullptr, barrier_after_exit_kernel)(buf); break;
    case EmuSelftest::kDeadlock: PAGEDLLM_LAUNCH(1, 32, 0, nullptr, deadlock_kernel)(buf); break;
    case EmuSelftest::kDivergentShuffle: PAGEDLLM_LAUNCH(1, 32, 0, nullptr, divergent_shuffle_kernel)(buf); break;
    case EmuSelftest::kSmemOverflow: PAGEDLLM_LAUNCH(1, 32, 256, nullptr, smem_overflow_kernel)(buf); break;
    case EmuSelftest::kCpAsyncOutside: PAGEDLLM_LAUNCH(1, 32, 512, nullptr, cp_async_outside_kernel)(buf, n); break;
    case EmuSelftest::kZeroThreads: PAGEDLLM_LAUNCH(1, 0, 0, nullptr, barrier_after_exit_kernel)(buf); break;
  }
  return cudaGetLastError();
}

}  // namespace pagedllm::cuda
