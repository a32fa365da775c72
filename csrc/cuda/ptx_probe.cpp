// Host launcher of the PTX-helper micro-kernels (ptx_probe_kernels.cu).
#include "cuda/ptx_probe.h"

#include <torch/library.h>

#include "cuda/ptx_probe_kernels.h"
#include "cuda/torch_utils.h"

namespace pagedllm::cuda {

void ptx_probe(at::Tensor& out, const at::Tensor& input, int64_t probe) {
  TORCH_CHECK(on_cuda_device(input) && out.device() == input.device(), "ptx_probe: out and input on one device");
  TORCH_CHECK(input.scalar_type() == at::kInt && out.scalar_type() == at::kInt && input.is_contiguous() &&
                  out.is_contiguous() && input.numel() >= 384 && out.numel() >= 128,
              "ptx_probe: contiguous int32 input [>= 384] and out [>= 128]");
  TORCH_CHECK(probe >= 0 && probe <= static_cast<int64_t>(PtxProbe::kMmaFp16), "ptx_probe: unknown probe ", probe);
  const DeviceGuard guard(input.device());
  PAGEDLLM_CUDA_CHECK(launch_ptx_probe(static_cast<PtxProbe>(probe), out.data_ptr<int32_t>(),
                                       input.data_ptr<int32_t>(), current_stream()));
}

}  // namespace pagedllm::cuda

#ifndef PAGEDLLM_CUDA_EMU  // _C_emu registers it under its own namespace (emu_bindings.cpp)
TORCH_LIBRARY_FRAGMENT(_C, m) { m.def(pagedllm::cuda::kPtxProbeSchema); }
TORCH_LIBRARY_IMPL(_C, CUDA, m) { m.impl("ptx_probe", &pagedllm::cuda::ptx_probe); }
#endif
