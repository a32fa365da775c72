// Broken kernels that the emulator must report (emu_selftest_kernels.cu), torch-free.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace pagedllm::cuda {

enum class EmuSelftest : int32_t {
  kBarrierAfterExit = 0,   // __syncthreads that exited threads never reach
  kDeadlock = 1,           // half a warp at __syncthreads, half at a full-warp shuffle
  kDivergentShuffle = 2,   // lanes of one warp at two different shuffles
  kSmemOverflow = 3,       // a 16-byte store past the launch's dynamic shared memory
  kCpAsyncOutside = 4,     // a cp.async source outside every tensor of the launch
  kZeroThreads = 5,        // a launch of 0 threads (a launch error, as on a GPU)
};

// buf: float [n], n >= 64 (host memory of the emulated device).
cudaError_t launch_emu_selftest(EmuSelftest which, float* buf, int64_t n);

}  // namespace pagedllm::cuda
