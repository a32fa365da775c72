// ptx_probe: the micro-kernels of ptx_probe_kernels.cu as an op, registered in _C (CUDA builds) and
// in the emulator library _C_emu, so that tests/kernels/test_ptx_twins.py can compare the two.
#pragma once

#include <ATen/core/Tensor.h>

namespace pagedllm::cuda {

// out: int32 [>= 128], input: int32 [>= 384], contiguous, on the device; probe: a PtxProbe.
inline constexpr const char* kPtxProbeSchema = "ptx_probe(Tensor! out, Tensor input, int probe) -> ()";
void ptx_probe(at::Tensor& out, const at::Tensor& input, int64_t probe);

}  // namespace pagedllm::cuda
