// Host launcher of reshape_and_cache (CUDA): check the tensors, then call the torch-free kernel
// launcher of cache_kernels.cu on the current stream. Shapes: torch_bindings.cpp.
#include <initializer_list>

#include "cuda/cache_kernels.h"
#include "cuda/torch_utils.h"
#include "ops.h"

namespace pagedllm::cuda {

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.is_cuda(), "reshape_and_cache: key must be a CUDA tensor, got ", key.device());
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&value, &key_cache, &value_cache, &slot_mapping}) {
    TORCH_CHECK(t->device() == key.device(), "reshape_and_cache: all tensors must be on ", key.device(), ", got ",
                t->device());
  }
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes(),
              "reshape_and_cache: key and value must both be [num_tokens, num_kv_heads, head_size], got ",
              key.sizes(), " and ", value.sizes());
  TORCH_CHECK(value.scalar_type() == key.scalar_type(), "reshape_and_cache: value dtype ", value.scalar_type(),
              " must equal the key dtype ", key.scalar_type());
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1,
              "reshape_and_cache: key and value need a contiguous head_size dim, got strides ", key.strides(),
              " and ", value.strides());
  const int64_t num_kv_heads = key.size(1), head_size = key.size(2);
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.size(1) == num_kv_heads && key_cache.size(3) == head_size,
              "reshape_and_cache: key_cache must be [num_blocks, ", num_kv_heads, ", block_size, ", head_size,
              "], got ", key_cache.sizes());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "reshape_and_cache: value_cache shape ",
              value_cache.sizes(), " must equal the key_cache shape ", key_cache.sizes());
  TORCH_CHECK(key_cache.scalar_type() == key.scalar_type() && value_cache.scalar_type() == key.scalar_type(),
              "reshape_and_cache: cache dtypes (", key_cache.scalar_type(), ", ", value_cache.scalar_type(),
              ") must equal the key dtype ", key.scalar_type());
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(),
              "reshape_and_cache: key_cache and value_cache must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1,
              "reshape_and_cache: slot_mapping must be a 1-D int64 tensor, got ", slot_mapping.scalar_type(), " ",
              slot_mapping.sizes());
  const int64_t num_tokens = slot_mapping.size(0);
  TORCH_CHECK(num_tokens <= key.size(0), "reshape_and_cache: slot_mapping has ", num_tokens,
              " entries but key has only ", key.size(0), " tokens");
  const DType dtype = to_dtype(key.scalar_type());
  if (num_tokens == 0) return;
  const c10::cuda::CUDAGuard guard(key.device());
  const at::Tensor slots = slot_mapping.contiguous();
  // Slots are not range-checked on the host (a device sync per call); the kernel skips slots
  // outside [0, num_blocks * block_size).
  PAGEDLLM_CUDA_CHECK(launch_reshape_and_cache(
      dtype, key.const_data_ptr(), value.const_data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
      slots.const_data_ptr<int64_t>(), num_tokens, key_cache.size(0), num_kv_heads, head_size, key_cache.size(2),
      key.stride(0), key.stride(1), value.stride(0), value.stride(1), current_stream()));
}

}  // namespace pagedllm::cuda
