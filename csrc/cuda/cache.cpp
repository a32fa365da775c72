// Host launcher of reshape_and_cache (CUDA): check the tensors, then call the torch-free kernel
// launcher of cache_kernels.cu on the current stream. Shapes: torch_bindings.cpp.
#include <initializer_list>

#include "cuda/cache_kernels.h"
#include "cuda/torch_utils.h"
#include "op_checks.h"
#include "ops.h"

namespace pagedllm::cuda {

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(on_cuda_device(key), "reshape_and_cache: key must be a CUDA tensor, got ", key.device());
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&value, &key_cache, &value_cache, &slot_mapping}) {
    TORCH_CHECK(t->device() == key.device(), "reshape_and_cache: all tensors must be on ", key.device(), ", got ",
                t->device());
  }
  check_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping);
  const int64_t num_tokens = slot_mapping.size(0), num_kv_heads = key.size(1), head_size = key.size(2);
  const DType dtype = to_dtype(key.scalar_type());
  if (num_tokens == 0) return;
  const DeviceGuard guard(key.device());
  const at::Tensor slots = slot_mapping.contiguous();
  // Slots are not range-checked on the host (a device sync per call); the kernel skips slots
  // outside [0, num_blocks * block_size).
  PAGEDLLM_CUDA_CHECK(launch_reshape_and_cache(
      dtype, key.const_data_ptr(), value.const_data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
      slots.const_data_ptr<int64_t>(), num_tokens, key_cache.size(0), num_kv_heads, head_size, key_cache.size(2),
      key.stride(0), key.stride(1), value.stride(0), value.stride(1), current_stream()));
}

}  // namespace pagedllm::cuda
