// Memory the caller reads after the current GEMMs, fetched into cache while they compute. Internal to
// csrc/cpu.
//
// Why: at 13+ rows a decode step's GEMMs are bound by the FMAs (the weights stream at a few GB/s), and the
// decode attention after them is bound by reading the KV cache from memory (fp32: 32 sequences of ~100
// tokens are 5 MB a layer of scattered 12 KB blocks). decoder_layers.cpp names the next layer's decode KV
// blocks around the MLP GEMMs (Scope); the row tiles of the panel GEMMs (panel_tile.h) fetch a line of
// them every other k, each thread its share, so the attention finds them in L2 / L3.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/Parallel.h>

namespace pagedllm::cpu::fetch_ahead {

// A thread's position in its share of the runs: `left` lines from p, then the runs [run, end).
struct alignas(64) Cursor {  // one cache line each: the threads write theirs in their tiles
  const char* p = nullptr;
  int64_t left = 0;
  const int64_t* run = nullptr;  // (address, lines) pairs
  const int64_t* end = nullptr;

  bool done() const { return left == 0; }
  // Fetches the next line (callers check done() first).
  void step() {
    __builtin_prefetch(p);
    p += 64;
    if (--left == 0 && run != end) {
      p = reinterpret_cast<const char*>(run[0]);
      left = run[1];
      run += 2;
    }
  }
};

class Plan {
 public:
  // Adds a run of `bytes` bytes from p (whole cache lines).
  void add(const void* p, int64_t bytes) {
    const auto a = reinterpret_cast<int64_t>(p);
    const int64_t first = a & ~int64_t{63}, end = (a + bytes + 63) & ~int64_t{63};
    if (end <= first) return;
    runs_.push_back(first);
    runs_.push_back((end - first) / 64);
  }
  bool empty() const { return runs_.empty(); }
  void clear() { runs_.clear(); }
  // Splits the runs over `threads` threads in order (thread t: runs [t n / T, (t + 1) n / T)).
  void split(int64_t threads) {
    const int64_t n = static_cast<int64_t>(runs_.size()) / 2;
    cursors_.assign(threads, Cursor{});
    for (int64_t t = 0; t < threads; ++t) {
      const int64_t r0 = t * n / threads, r1 = (t + 1) * n / threads;
      if (r0 == r1) continue;
      Cursor& c = cursors_[t];
      c.p = reinterpret_cast<const char*>(runs_[2 * r0]);
      c.left = runs_[2 * r0 + 1];
      c.run = runs_.data() + 2 * (r0 + 1);
      c.end = runs_.data() + 2 * r1;
    }
  }
  // The calling thread's cursor inside a parallel region, nullptr when it has none or is done.
  Cursor* this_thread() {
    const int64_t t = at::get_thread_num();
    return t < static_cast<int64_t>(cursors_.size()) && !cursors_[t].done() ? &cursors_[t] : nullptr;
  }

 private:
  std::vector<int64_t> runs_;  // (address, lines) pairs
  std::vector<Cursor> cursors_;
};

// Read on the calling thread before a GEMM's parallel region (set for the calls inside a Scope).
inline Plan*& current() {
  thread_local Plan* plan = nullptr;
  return plan;
}

class Scope {
 public:
  explicit Scope(Plan* plan) : saved_(current()) {
    if (plan != nullptr && !plan->empty()) current() = plan;
  }
  ~Scope() { current() = saved_; }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  Plan* saved_;
};

}  // namespace pagedllm::cpu::fetch_ahead
