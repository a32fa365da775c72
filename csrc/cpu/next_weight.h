// The packed weight the caller multiplies next, so that a GEMM can fetch its first bytes into L2 while it
// finishes its own panels. Internal to csrc/cpu.
//
// Why: a one-row decode step of the default model is 120 layer GEMVs of ~0.5 MB of codes each. Every call
// started cold (each thread's first panel loaded on demand while the hardware prefetcher found the new
// stream): 120 calls ran at ~25 GB/s where one call over the same bytes ran at ~45 (benchmarks/RESULTS.md).
// decoder_layers.cpp names the next packed weight around each GEMM (Scope); quantized_linear's last panel
// group on each thread fetches that thread's first panels of it, spread over its blocks.
#pragma once

#include <algorithm>
#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

namespace pagedllm::cpu::next_weight {

struct Hint {
  const uint8_t* data = nullptr;  // panels of panel_bytes each, split over threads as at::parallel_for(0, panels, 1)
  int64_t panels = 0, panel_bytes = 0;
};

// Read on the calling thread before a GEMM's parallel region (set for that call only by Scope).
inline Hint& current() {
  thread_local Hint hint;
  return hint;
}

// Names packed (dim 0: its panels) as the weight of the next GEMM for the calls inside the scope.
class Scope {
 public:
  explicit Scope(const at::Tensor* packed) {
    if (packed != nullptr && packed->defined() && packed->dim() >= 1 && packed->size(0) > 0) {
      current() = Hint{static_cast<const uint8_t*>(packed->data_ptr()), packed->size(0),
                       packed->numel() * packed->element_size() / packed->size(0)};
    }
  }
  ~Scope() { current() = Hint{}; }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;
};

// Inside a parallel region: the first bytes (at most max_panels panels) of the range this thread gets
// when the next GEMM splits the hint's panels with at::parallel_for(0, panels, 1) (ATen's OpenMP split:
// ceil(panels / threads) a thread, in thread order); {nullptr, 0} for none.
inline std::pair<const uint8_t*, int64_t> this_thread_start(const Hint& h, int64_t max_panels) {
  if (h.data == nullptr) return {nullptr, 0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), h.panels);
  const int64_t chunk = (h.panels + threads - 1) / threads, p = at::get_thread_num() * chunk;
  if (p >= h.panels) return {nullptr, 0};
  return {h.data + p * h.panel_bytes, std::min({max_panels, chunk, h.panels - p}) * h.panel_bytes};
}

}  // namespace pagedllm::cpu::next_weight
