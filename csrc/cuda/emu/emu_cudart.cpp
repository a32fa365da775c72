// The CUDA runtime API calls the kernel launchers make, implemented for the emulated device
// (declared by the toolkit's cuda_runtime_api.h). Hidden in _C_emu: they never interpose on the
// libcudart that a CUDA build of torch loads into the same process.
#include <cuda_runtime_api.h>

#include <algorithm>

#include "cuda/emu/emu_runtime.h"

extern "C" {

cudaError_t cudaGetLastError(void) { return emu::take_last_error(); }

const char* cudaGetErrorString(cudaError_t error) { return emu::last_error_string(error); }

cudaError_t cudaGetDevice(int* device) {
  *device = emu::config().device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = emu::config().sm_count;
  return cudaSuccess;
}

// Only the dynamic shared memory opt-in is used; the H100's per-block maximum is 227 KiB.
cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > 227 * 1024)
    return cudaErrorInvalidValue;
  emu::max_dynamic_smem(func) = static_cast<size_t>(value);
  return cudaSuccess;
}

// From the H100's per-SM limits on threads (2048), blocks (32) and shared memory (228 KiB, 1 KiB
// reserved per block). Registers are not known here: the cubin checks compare them with the claims.
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, const void* func, int block_size,
                                                          size_t dynamic_smem) {
  if (block_size <= 0 || block_size > 1024 || dynamic_smem > emu::max_dynamic_smem(func)) return cudaErrorInvalidValue;
  const int by_threads = 2048 / block_size;
  const int by_smem = static_cast<int>((228 * 1024) / (dynamic_smem + 1024));
  *num_blocks = std::min(32, std::min(by_threads, by_smem));
  return cudaSuccess;
}

}  // extern "C"
