// TORCH_LIBRARY(_C_emu): the CUDA host launchers of csrc/cuda (pagedllm::cuda::*) as the CPU
// implementations of ops with the same schemas as _C's, so that every kernel launch runs on the
// emulator. The schemas are read from _C (loaded first) so that the two never disagree.
// Also: configure (SM count, device id, fiber schedule, counters) and the counters themselves.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <c10/core/CPUAllocator.h>

#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "cuda/emu/emu_runtime.h"
#include "cuda/ptx_probe.h"
#include "cuda/emu/emu_selftest.h"
#include "ops.h"

namespace {

constexpr const char* kOps[] = {"rms_norm",        "fused_add_rms_norm", "rotary_embedding",       "reshape_and_cache",
                                "paged_attention", "sample_tokens",      "paged_prefill_attention"};

// The global memory of a launch: the storages of the op's tensors (16-byte copies outside them
// are errors). Other arguments add nothing.
void add_range(emu::RangeScope& s, const at::Tensor& t) {
  if (t.defined() && t.has_storage() && t.storage().nbytes() > 0) s.add(t.storage().data(), t.storage().nbytes());
}
void add_range(emu::RangeScope& s, const std::optional<at::Tensor>& t) {
  if (t.has_value()) add_range(s, *t);
}
template <typename X>
void add_range(emu::RangeScope&, const X&) {}

// Tensors the host launcher allocates itself (contiguous copies, the split-KV workspace) are
// global memory of the launch too: while an emulated op runs, CPU allocations are recorded.
struct RecordingAllocator final : at::Allocator {
  at::Allocator* inner = nullptr;
  emu::RangeScope* ranges = nullptr;
  at::DataPtr allocate(size_t n) override {
    at::DataPtr p = inner->allocate(n);
    if (n > 0 && p.get() != nullptr) ranges->add(p.get(), n);
    return p;
  }
  at::DeleterFnPtr raw_deleter() const override { return inner->raw_deleter(); }
  void copy_data(void* dest, const void* src, std::size_t count) const override { inner->copy_data(dest, src, count); }
  bool is_simple_data_ptr(const at::DataPtr& p) const override { return inner->is_simple_data_ptr(p); }
};

std::recursive_mutex g_op_mutex;  // one emulated op at a time: the ranges and the allocator are global

template <auto Fn, typename F = decltype(Fn)>
struct Emulated;
template <auto Fn, typename... A>
struct Emulated<Fn, void (*)(A...)> {
  static void call(A... a) {
    std::lock_guard<std::recursive_mutex> lock(g_op_mutex);
    emu::RangeScope ranges;
    (add_range(ranges, a), ...);
    static RecordingAllocator recorder;
    at::Allocator* const previous = c10::GetCPUAllocator();
    recorder.inner = previous;
    recorder.ranges = &ranges;
    c10::SetCPUAllocator(&recorder);
    struct Restore {
      at::Allocator* previous;
      ~Restore() { c10::SetCPUAllocator(previous); }
    } restore{previous};
    Fn(std::forward<A>(a)...);
  }
};

void configure(int64_t sm_count, int64_t device, bool reverse_schedule, bool count) {
  TORCH_CHECK(sm_count > 0 && device >= 0, "cuda_emu.configure: sm_count must be > 0 and device >= 0");
  emu::Config& c = emu::config();
  c.sm_count = static_cast<int>(sm_count);
  c.device = static_cast<int>(device);
  c.reverse_schedule = reverse_schedule;
  c.count = count;
}

// In the order of pagedllm._ops.CUDA_EMU_STATS.
std::vector<int64_t> stats() {
  const emu::Stats& s = emu::stats();
  return {s.blocks,      s.barriers,        s.collectives,  s.cp_requests, s.cp_sectors, s.cp_ideal,
          s.ldsm_phases, s.ldsm_wavefronts, s.vec_requests, s.vec_sectors, s.vec_ideal,
          s.smem_requests, s.smem_wavefronts, s.smem_ideal};
}

void reset_stats() { emu::stats() = emu::Stats{}; }

// Runs one of the broken kernels of emu_selftest_kernels.cu on buf (float, contiguous, >= 64).
void selftest(int64_t which, at::Tensor& buf) {
  TORCH_CHECK(which >= 0 && which <= static_cast<int64_t>(pagedllm::cuda::EmuSelftest::kZeroThreads),
              "selftest: unknown case ", which);
  TORCH_CHECK(buf.scalar_type() == at::kFloat && buf.is_contiguous() && buf.numel() >= 64, "selftest: float buf >= 64");
  const cudaError_t err =
      pagedllm::cuda::launch_emu_selftest(static_cast<pagedllm::cuda::EmuSelftest>(which), buf.data_ptr<float>(), buf.numel());
  TORCH_CHECK(err == cudaSuccess, "CUDA error: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY(_C_emu, m) {
  for (const char* name : kOps) {
    const auto op = c10::Dispatcher::singleton().findSchema({std::string("_C::") + name, ""});
    TORCH_CHECK(op.has_value(), "_C_emu: load pagedllm._C first (no schema for _C::", name, ")");
    m.def(op->schema().cloneWithName(name, ""));
  }
  m.def(pagedllm::cuda::kPtxProbeSchema);
  m.def("configure(int sm_count, int device, bool reverse_schedule, bool count) -> ()", &configure);
  m.def("stats() -> int[]", &stats);
  m.def("reset_stats() -> ()", &reset_stats);
  m.def("selftest(int which, Tensor(a!) buf) -> ()");
}

TORCH_LIBRARY_IMPL(_C_emu, CPU, m) {
  m.impl("rms_norm", &Emulated<&pagedllm::cuda::rms_norm>::call);
  m.impl("fused_add_rms_norm", &Emulated<&pagedllm::cuda::fused_add_rms_norm>::call);
  m.impl("rotary_embedding", &Emulated<&pagedllm::cuda::rotary_embedding>::call);
  m.impl("reshape_and_cache", &Emulated<&pagedllm::cuda::reshape_and_cache>::call);
  m.impl("paged_attention", &Emulated<&pagedllm::cuda::paged_attention>::call);
  m.impl("paged_prefill_attention", &Emulated<&pagedllm::cuda::paged_prefill_attention>::call);
  m.impl("sample_tokens", &Emulated<&pagedllm::cuda::sample_tokens>::call);
  m.impl("ptx_probe", &Emulated<&pagedllm::cuda::ptx_probe>::call);
  m.impl("selftest", &Emulated<&selftest>::call);
}
