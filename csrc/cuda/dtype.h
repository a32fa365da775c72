// Torch-free dtype tag passed from the host launchers (csrc/cuda/*.cpp) to the kernel
// launchers (csrc/cuda/*_kernels.cu), so that nvcc never parses torch headers.
#pragma once

#include <cstdint>

namespace pagedllm::cuda {
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
}  // namespace pagedllm::cuda
