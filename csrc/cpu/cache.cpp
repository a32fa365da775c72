// reshape_and_cache, CPU kernel: writes each new token's K and V head rows into the paged cache.
//
// key_cache, value_cache: [num_blocks, num_kv_heads, block_size, head_size] (contiguous);
// token t goes to slot s = slot_mapping[t] = block_id * block_size + offset, i.e. to
// cache[block_id, h, offset, :] for every kv head h. A negative slot is padding: nothing is written.
// Tokens are processed for t < slot_mapping.size(0); key/value may hold more rows (padding).
// Every slot is checked against the cache size before anything is written.
#include <algorithm>
#include <initializer_list>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "dispatch_utils.h"
#include "op_checks.h"
#include "ops.h"

namespace pagedllm::cpu {
namespace {

template <typename T>
void reshape_and_cache_impl(const T* key,        // [num_tokens, num_kv_heads, head_size], strides k_ts, k_hs, 1
                            const T* value,      // [num_tokens, num_kv_heads, head_size], strides v_ts, v_hs, 1
                            T* key_cache,        // [num_blocks, num_kv_heads, block_size, head_size]
                            T* value_cache,      // [num_blocks, num_kv_heads, block_size, head_size]
                            const int64_t* slot_mapping,  // [num_tokens]
                            int64_t num_tokens, int64_t num_kv_heads, int64_t head_size, int64_t block_size,
                            int64_t k_ts, int64_t k_hs, int64_t v_ts, int64_t v_hs) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, num_kv_heads * head_size));
  at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slot_mapping[t];
      if (slot < 0) continue;  // padding token
      const int64_t block = slot / block_size, offset = slot % block_size;
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        const int64_t dst = ((block * num_kv_heads + h) * block_size + offset) * head_size;
        std::copy_n(key + t * k_ts + h * k_hs, head_size, key_cache + dst);
        std::copy_n(value + t * v_ts + h * v_hs, head_size, value_cache + dst);
      }
    }
  });
}

}  // namespace

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&key, &value, &key_cache, &value_cache, &slot_mapping}) {
    TORCH_CHECK(t->device().is_cpu(), "reshape_and_cache: all tensors must be on the CPU, got ", t->device());
  }
  check_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping);
  const int64_t num_tokens = slot_mapping.size(0), num_kv_heads = key.size(1), head_size = key.size(2);
  const int64_t block_size = key_cache.size(2), num_slots = key_cache.size(0) * block_size;
  const at::Tensor slots = slot_mapping.contiguous();
  const int64_t* s = slots.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK(s[t] < num_slots, "reshape_and_cache: slot ", s[t], " of token ", t,
                " is outside the cache (num_blocks * block_size = ", num_slots, ")");
  }
  if (num_tokens == 0) return;
  PAGEDLLM_DISPATCH_FLOATING_TYPES(key.scalar_type(), "reshape_and_cache", [&] {
    reshape_and_cache_impl<scalar_t>(key.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(),
                                     key_cache.data_ptr<scalar_t>(), value_cache.data_ptr<scalar_t>(), s,
                                     num_tokens, num_kv_heads, head_size, block_size, key.stride(0),
                                     key.stride(1), value.stride(0), value.stride(1));
  });
}

}  // namespace pagedllm::cpu
