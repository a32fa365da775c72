// sample_tokens (CUDA): checks the inputs and launches csrc/cuda/sampling_kernels.cu.
// Parameter values (top_p in (0, 1], min_p in [0, 1]) are not read back here: that would cost a
// device sync per step. They are validated on the host where they are built
// (pagedllm.layers.sampler.SamplingTensors.build) and by the CPU op; the kernel clamps them.
#include <limits>

#include "cuda/sampling_kernels.h"
#include "cuda/torch_utils.h"
#include "op_checks.h"
#include "ops.h"

namespace pagedllm::cuda {

void sample_tokens(at::Tensor& out, const at::Tensor& logits, const at::Tensor& temperature,
                   const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p,
                   const at::Tensor& seeds, const at::Tensor& offsets,
                   const std::optional<at::Tensor>& token_bitmask) {
  TORCH_CHECK(on_cuda_device(logits), "sample_tokens (cuda): logits must be on a CUDA device, got ", logits.device());
  check_sample_tokens(out, logits, temperature, top_k, top_p, min_p, seeds, offsets, token_bitmask);
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  // int32 indices in the kernel, and tile starts (+ 8192) must not overflow.
  TORCH_CHECK(vocab <= (int64_t{1} << 30), "sample_tokens: vocab ", vocab, " too large (max 2^30)");
  TORCH_CHECK(batch <= std::numeric_limits<int32_t>::max(), "sample_tokens: batch too large");
  if (batch == 0) return;

  const DeviceGuard guard(logits.device());
  PAGEDLLM_CUDA_CHECK(launch_sample_tokens(
      out.data_ptr<int64_t>(), logits.data_ptr<float>(), temperature.data_ptr<float>(), top_k.data_ptr<int32_t>(),
      top_p.data_ptr<float>(), min_p.data_ptr<float>(), seeds.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
      static_cast<int>(batch), static_cast<int>(vocab), logits.stride(0),
      token_bitmask.has_value() ? token_bitmask->data_ptr<int32_t>() : nullptr,
      token_bitmask.has_value() ? token_bitmask->stride(0) : 0, current_stream()));
}

}  // namespace pagedllm::cuda
