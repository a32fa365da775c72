// The CUDA emulator's scheduler: fibers, barriers, warp collectives, launches, memory checks.
// See emu_runtime.h for the model; emu_ptx.cpp has the PTX twins.
#include "cuda/emu/emu_runtime.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <tuple>

// Static __shared__ variables live in this section (cuda_emu.h); the linker defines its bounds.
extern "C" {
extern unsigned char __start_pagedllm_emu_smem[] __attribute__((weak, visibility("hidden")));
extern unsigned char __stop_pagedllm_emu_smem[] __attribute__((weak, visibility("hidden")));
void emu_switch(void** save_sp, void* to_sp);
}

namespace emu {

Block* g_block = nullptr;
Fiber* g_cur = nullptr;
const char* g_kernel = "";

Config& config() {
  static Config c;
  return c;
}
Stats& stats() {
  static Stats s;
  return s;
}

namespace {

std::mutex g_launch_mutex;
cudaError_t g_last_error = cudaSuccess;
std::string g_last_error_text;
std::string g_fiber_error;  // message of the exception a fiber raised
std::vector<std::pair<uintptr_t, uintptr_t>> g_ranges;  // [begin, end) of the launch's tensors
int g_range_scopes = 0;

// Warp-level grouping of per-lane memory instructions for the counters: the k-th access of each
// lane at one source line is one warp request.
struct Request {
  std::set<uintptr_t> sectors, words;  // 32-byte sectors and distinct 4-byte words touched
  void add(uintptr_t a, size_t n) {
    for (uintptr_t s = a >> 5; s <= (a + n - 1) >> 5; ++s) sectors.insert(s);
    for (uintptr_t w = a >> 2; w <= (a + n - 1) >> 2; ++w) words.insert(w);
  }
  int64_t ideal() const { return static_cast<int64_t>((words.size() * 4 + 31) / 32); }
};
std::map<std::tuple<int, const char*, int, int64_t>, Request> g_vec_requests;
std::map<std::tuple<int, const char*, int>, int64_t> g_vec_ordinal;
// Shared-memory requests: (lane, address, bytes) of each lane.
std::map<std::tuple<int, const char*, int, int64_t>, std::vector<std::tuple<int, uintptr_t, size_t>>> g_smem_requests;
std::map<std::pair<int, int64_t>, Request> g_cp_requests;

constexpr size_t kStack = 256 * 1024;

struct Stacks {
  std::vector<unsigned char*> s;
  unsigned char* get(int i) {
    while (static_cast<int>(s.size()) <= i) {
      void* p = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) throw Error("cuda-emu: cannot map a fiber stack");
      mprotect(p, 4096, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
      s.push_back(static_cast<unsigned char*>(p));
    }
    return s[i];
  }
};
Stacks g_stacks;

const std::function<void()>* g_body = nullptr;

// Dynamic shared memory: one mapping of kSmemMax bytes between two kSmemGuard-byte PROT_NONE
// guards, so that every address near the window is the emulator's own (an access there is a
// shared-memory overflow, never a tensor) and an unchecked access past it faults.
constexpr size_t kSmemMax = 228 * 1024, kSmemGuard = 64 * 1024;
unsigned char* smem_window() {
  static unsigned char* window = [] {
    void* p = mmap(nullptr, kSmemMax + 2 * kSmemGuard, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw Error("cuda-emu: cannot map the shared-memory window");
    unsigned char* w = static_cast<unsigned char*>(p) + kSmemGuard;
    if (mprotect(w, kSmemMax, PROT_READ | PROT_WRITE) != 0) throw Error("cuda-emu: cannot map the shared-memory window");
    return w;
  }();
  return window;
}

std::string where() {
  char buf[256];
  if (g_block == nullptr) return std::string(g_kernel);
  if (g_cur == nullptr) {
    std::snprintf(buf, sizeof(buf), "%s, block (%u,%u,%u)", g_kernel, g_block->bid.x, g_block->bid.y, g_block->bid.z);
  } else {
    std::snprintf(buf, sizeof(buf), "%s, block (%u,%u,%u), thread (%u,%u,%u)", g_kernel, g_block->bid.x,
                  g_block->bid.y, g_block->bid.z, g_cur->tid.x, g_cur->tid.y, g_cur->tid.z);
  }
  return buf;
}

[[noreturn]] void fiber_entry() {
  Fiber* me = g_cur;
  try {
    (*g_body)();
    for (auto& g : me->groups) {  // copies never waited for still land (the hardware completes them)
      for (auto& c : g) c.src_bytes ? std::memcpy(c.dst, c.src, 16) : std::memset(c.dst, 0, 16);
    }
    me->state = State::kDone;
  } catch (const std::exception& e) {
    g_fiber_error = e.what();
    me->state = State::kFailed;
  } catch (...) {
    g_fiber_error = "cuda-emu: unknown exception in kernel " + std::string(g_kernel);
    me->state = State::kFailed;
  }
  emu_switch(&me->sp, g_block->sched_sp);
  __builtin_trap();  // a finished fiber is never resumed
}

void yield_to_scheduler() { emu_switch(&g_cur->sp, g_block->sched_sp); }

void flush_counters() {
  Stats& st = stats();
  for (auto& kv : g_cp_requests) {
    ++st.cp_requests;
    st.cp_sectors += static_cast<int64_t>(kv.second.sectors.size());
    st.cp_ideal += kv.second.ideal();
  }
  for (auto& kv : g_vec_requests) {
    ++st.vec_requests;
    st.vec_sectors += static_cast<int64_t>(kv.second.sectors.size());
    st.vec_ideal += kv.second.ideal();
  }
  for (auto& kv : g_smem_requests) {
    ++st.smem_requests;
    // A phase serves the lanes whose accesses fit 128 bytes: 8 lanes of 16 bytes (32 of 4 bytes).
    std::map<int, std::map<int, std::set<uintptr_t>>> words;  // phase -> bank -> distinct words
    for (auto& [lane, addr, bytes] : kv.second) {
      const int per_phase = static_cast<int>(std::max<size_t>(1, 128 / std::max<size_t>(bytes, 4)));
      for (uintptr_t w = addr >> 2; w <= (addr + bytes - 1) >> 2; ++w) words[lane / per_phase][w & 31].insert(w);
    }
    for (auto& phase : words) {
      size_t worst = 1;
      for (auto& bank : phase.second) worst = std::max(worst, bank.second.size());
      st.smem_wavefronts += static_cast<int64_t>(worst);
      ++st.smem_ideal;
    }
  }
  g_cp_requests.clear();
  g_vec_requests.clear();
  g_smem_requests.clear();
  g_vec_ordinal.clear();
}

const char* state_name(State s) {
  switch (s) {
    case State::kBlockBarrier: return "__syncthreads";
    case State::kWarpCollective: return "warp collective";
    case State::kDone: return "exited";
    default: return "running";
  }
}

void run_block(Block& b) {
  const int n = b.n;
  b.fibers.assign(n, Fiber{});
  b.warps.assign(b.nwarps, Warp{});
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.lin = i;
    f.tid = uint3{i % b.bdim.x, (i / b.bdim.x) % b.bdim.y, i / (b.bdim.x * b.bdim.y)};
    void** sp = reinterpret_cast<void**>(g_stacks.get(i) + kStack);
    *--sp = nullptr;                                // fiber_entry's return address: ends unwinding
    *--sp = reinterpret_cast<void*>(&fiber_entry);  // emu_switch's ret lands here
    for (int r = 0; r < 6; ++r) *--sp = nullptr;    // rbp rbx r12-r15
    f.sp = sp;
  }
  // Poison shared memory at every block start: a read of what a previous block left (or of a
  // value never written) shows as NaN / garbage instead of passing by luck.
  if (b.smem_bytes) std::memset(b.smem, 0xFF, b.smem_bytes);
  if (__start_pagedllm_emu_smem != nullptr)
    std::memset(__start_pagedllm_emu_smem, 0xFF, __stop_pagedllm_emu_smem - __start_pagedllm_emu_smem);
  g_block = &b;
  const bool reverse = config().reverse_schedule;
  int done = 0;
  for (;;) {
    bool progress = false;
    for (int k = 0; k < n; ++k) {
      Fiber& f = b.fibers[reverse ? n - 1 - k : k];
      if (f.state != State::kReady) continue;
      g_cur = &f;
      emu_switch(&b.sched_sp, f.sp);
      g_cur = nullptr;
      progress = true;
      if (f.state == State::kFailed) throw Error(g_fiber_error);
      if (f.state == State::kDone) ++done;
    }
    if (done == n) break;
    if (b.bar_arrived > 0 && b.bar_arrived + done == n) {
      if (done > 0) {
        fail(b.bar_file, b.bar_line, "__syncthreads reached by %d threads while %d threads of the block have exited",
             b.bar_arrived, done);
      }
      for (auto& f : b.fibers) {
        if (f.state == State::kBlockBarrier) f.state = State::kReady;
      }
      b.bar_arrived = 0;
      ++stats().barriers;
      continue;
    }
    if (!progress) {  // every live thread waits, and no barrier can complete: report who waits where
      std::string msg = "cuda-emu: " + where() + ": deadlock (divergent __syncthreads or warp collective):";
      std::map<std::tuple<State, std::string, int>, std::pair<int, int>> sites;  // -> (first thread, count)
      for (auto& f : b.fibers) {
        if (f.state == State::kDone) continue;
        auto it = sites.try_emplace({f.state, f.file, f.line}, f.lin, 0).first;
        ++it->second.second;
      }
      for (auto& [site, who] : sites) {
        char buf[512];
        std::snprintf(buf, sizeof(buf), " [%d threads from %d in %s at %s:%d]", who.second, who.first,
                      state_name(std::get<0>(site)), std::get<1>(site).c_str(), std::get<2>(site));
        msg += buf;
      }
      throw Error(msg);
    }
  }
  g_block = nullptr;
  ++stats().blocks;
  flush_counters();  // a warp request belongs to one block
}

}  // namespace

void fail(const char* file, int line, const char* fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  throw Error("cuda-emu: " + where() + " at " + file + ":" + std::to_string(line) + ": " + msg);
}

size_t& max_dynamic_smem(const void* fn) {
  static std::map<const void*, size_t> limits;
  auto it = limits.find(fn);
  if (it == limits.end()) it = limits.emplace(fn, 48 * 1024).first;  // the default without the opt-in
  return it->second;
}

cudaError_t take_last_error() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}

const char* last_error_string(cudaError_t err) {
  if (err == cudaSuccess) return "no error";
  if (!g_last_error_text.empty()) return g_last_error_text.c_str();
  return err == cudaErrorInvalidConfiguration ? "invalid configuration argument" : "invalid argument";
}

void run_grid(const LaunchInfo& info, const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  auto bad = [&](cudaError_t err, const std::string& why) {
    g_last_error = err;
    g_last_error_text = "cuda-emu: launch of " + std::string(info.kernel) + " at " + info.file + ":" +
                        std::to_string(info.line) + ": " + why;
  };
  const int64_t n = int64_t(info.block.x) * info.block.y * info.block.z;
  if (n <= 0 || n > 1024) return bad(cudaErrorInvalidConfiguration, "block of " + std::to_string(n) + " threads");
  if (info.grid.x == 0 || info.grid.y == 0 || info.grid.z == 0 || info.grid.y > 65535 || info.grid.z > 65535)
    return bad(cudaErrorInvalidConfiguration, "grid (" + std::to_string(info.grid.x) + "," +
                                                  std::to_string(info.grid.y) + "," + std::to_string(info.grid.z) + ")");
  if (info.smem > max_dynamic_smem(info.fn))
    return bad(cudaErrorInvalidValue, std::to_string(info.smem) + " bytes of dynamic shared memory above the " +
                                          std::to_string(max_dynamic_smem(info.fn)) +
                                          "-byte limit (cudaFuncSetAttribute missing)");
  g_kernel = info.kernel;
  g_body = &body;
  unsigned char* base = smem_window();
  struct Reset {
    ~Reset() {
      g_block = nullptr;
      g_cur = nullptr;
      g_body = nullptr;
      flush_counters();
    }
  } reset;
  for (unsigned z = 0; z < info.grid.z; ++z)
    for (unsigned y = 0; y < info.grid.y; ++y)
      for (unsigned x = 0; x < info.grid.x; ++x) {
        Block b;
        b.bid = dim3(x, y, z);
        b.bdim = info.block;
        b.gdim = info.grid;
        b.n = static_cast<int>(n);
        b.nwarps = static_cast<int>((n + 31) / 32);
        b.smem = base;
        b.smem_bytes = info.smem;
        run_block(b);
      }
}

// ---- memory ranges -------------------------------------------------------------------------

RangeScope::RangeScope() {
  if (g_range_scopes++ == 0) g_ranges.clear();
}
RangeScope::~RangeScope() {
  if (--g_range_scopes == 0) g_ranges.clear();
}
void RangeScope::add(const void* p, size_t bytes) {
  const auto b = reinterpret_cast<uintptr_t>(p);
  g_ranges.emplace_back(b, b + bytes);
}

namespace {
bool in_ranges(uintptr_t a, size_t bytes) {
  for (auto& r : g_ranges) {
    if (a >= r.first && a + bytes <= r.second) return true;
  }
  return false;
}
bool in_static_smem(uintptr_t a, size_t bytes) {
  return __start_pagedllm_emu_smem != nullptr && a >= reinterpret_cast<uintptr_t>(__start_pagedllm_emu_smem) &&
         a + bytes <= reinterpret_cast<uintptr_t>(__stop_pagedllm_emu_smem);
}
bool in_dynamic_smem(uintptr_t a, size_t bytes) {
  const auto s = reinterpret_cast<uintptr_t>(g_block->smem);
  return a >= s && a + bytes <= s + g_block->smem_bytes;
}
// Inside the shared-memory mapping (guards included) but outside the launch's window: an overflow.
bool near_dynamic_smem(uintptr_t a) {
  const auto s = reinterpret_cast<uintptr_t>(g_block->smem);
  return a + kSmemGuard >= s && a < s + kSmemMax + kSmemGuard;
}
}  // namespace

void check_global(const void* p, size_t bytes, const char* what, const char* file, int line) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  if (g_ranges.empty() || in_ranges(a, bytes)) return;
  fail(file, line, "%s: global address %p (%zu bytes) outside every tensor of the launch", what, p, bytes);
}

void check_access(const void* p, size_t bytes, bool write, const char* file, int line) {
  if (g_block == nullptr) return;  // host code (the launcher) using the same helpers
  const auto a = reinterpret_cast<uintptr_t>(p);
  if (in_dynamic_smem(a, bytes) || in_static_smem(a, bytes)) {
    if (config().count) {
      const int64_t k = g_vec_ordinal[{g_cur->lin, file, line}]++;
      g_smem_requests[{g_cur->lin >> 5, file, line, k}].emplace_back(g_cur->lin & 31, a, bytes);
    }
    return;
  }
  // The thread's own stack (registers reinterpreted as vectors) is always fine.
  const auto stack = reinterpret_cast<uintptr_t>(g_stacks.get(g_cur->lin));
  if (a >= stack && a + bytes <= stack + kStack) return;
  if (near_dynamic_smem(a)) {
    fail(file, line, "%s of %zu bytes at shared offset %ld, outside the launch's %zu bytes of dynamic shared memory",
         write ? "store" : "load", bytes, static_cast<long>(a - reinterpret_cast<uintptr_t>(g_block->smem)),
         g_block->smem_bytes);
  }
  check_global(p, bytes, write ? "store" : "load", file, line);
  if (!config().count) return;
  const int warp = g_cur->lin >> 5;
  const int64_t k = g_vec_ordinal[{g_cur->lin, file, line}]++;
  g_vec_requests[{warp, file, line, k}].add(a, bytes);
}

// ---- synchronization -----------------------------------------------------------------------

void syncthreads(const char* file, int line) {
  Block& b = *g_block;
  if (b.bar_arrived == 0) {
    b.bar_file = file;
    b.bar_line = line;
  }
  ++b.bar_arrived;
  g_cur->state = State::kBlockBarrier;
  g_cur->file = file;
  g_cur->line = line;
  yield_to_scheduler();
}

unsigned warp_collective(unsigned mask, const char* file, int line) {
  Block& b = *g_block;
  const int lane = lane_id(), wi = g_cur->lin >> 5;
  Warp& w = b.warps[wi];
  if (!(mask >> lane & 1u)) fail(file, line, "warp collective with mask 0x%08x that excludes the calling lane %d", mask, lane);
  const int warp_lanes = std::min(32, b.n - wi * 32);
  const unsigned existing = warp_lanes == 32 ? 0xffffffffu : ((1u << warp_lanes) - 1u);
  if (mask & ~existing) fail(file, line, "warp collective mask 0x%08x names lanes that do not exist", mask);
  if (w.arrived == 0) {
    w.mask = mask;
    w.file = file;
    w.line = line;
  } else if (w.mask != mask || w.line != line || std::strcmp(w.file, file) != 0) {
    fail(file, line, "divergent warp collective: lanes of warp %d meet with mask 0x%08x here and mask 0x%08x at %s:%d",
         wi, mask, w.mask, w.file, w.line);
  }
  for (int l = 0; l < 32; ++l) {
    if ((mask >> l & 1u) && b.fibers[wi * 32 + l].state == State::kDone)
      fail(file, line, "warp collective with mask 0x%08x: lane %d has exited", mask, l);
  }
  ++stats().collectives;
  const unsigned gen = w.gen;
  if (++w.arrived == __builtin_popcount(mask)) {
    w.arrived = 0;
    ++w.gen;
    for (int l = 0; l < 32; ++l) {
      if ((mask >> l & 1u) && l != lane) b.fibers[wi * 32 + l].state = State::kReady;
    }
    return gen;
  }
  g_cur->state = State::kWarpCollective;
  g_cur->file = file;
  g_cur->line = line;
  yield_to_scheduler();
  return gen;
}

uint64_t* exchange_slot(unsigned gen, int lane) { return g_block->warps[g_cur->lin >> 5].slots[gen & 1][lane]; }

// ---- cp.async ------------------------------------------------------------------------------

void cp_async_16(void* dst, const void* src, int src_bytes, const char* file, int line) {
  const auto d = reinterpret_cast<uintptr_t>(dst);
  if (!in_dynamic_smem(d, 16)) {
    fail(file, line, "cp.async destination at shared offset %ld outside the launch's %zu bytes of dynamic shared memory",
         static_cast<long>(d - reinterpret_cast<uintptr_t>(g_block->smem)), g_block->smem_bytes);
  }
  if ((d | reinterpret_cast<uintptr_t>(src)) & 15) fail(file, line, "cp.async: misaligned 16-byte copy (%p -> %p)", src, dst);
  if (src_bytes != 0 && src_bytes != 16) fail(file, line, "cp.async src-size %d (only 0 and 16 are used)", src_bytes);
  if (src_bytes) {
    check_global(src, 16, "cp.async source", file, line);
    if (config().count) g_cp_requests[{g_cur->lin >> 5, g_cur->cp_ordinal}].add(reinterpret_cast<uintptr_t>(src), 16);
  }
  ++g_cur->cp_ordinal;
  std::memset(dst, 0xFF, 16);  // NaN until the wait that covers this copy's group
  g_cur->open.push_back({static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), src_bytes});
}

namespace {
void land(const std::vector<Copy>& group) {
  for (const Copy& c : group) c.src_bytes ? std::memcpy(c.dst, c.src, 16) : std::memset(c.dst, 0, 16);
}
}  // namespace

void cp_async_commit() {
  g_cur->groups.push_back(std::move(g_cur->open));
  g_cur->open.clear();
}

void cp_async_wait(int newest_pending) {
  auto& gs = g_cur->groups;
  while (static_cast<int>(gs.size()) > newest_pending) {
    land(gs.front());
    gs.erase(gs.begin());
  }
}

void cp_async_wait_all() {
  cp_async_commit();
  cp_async_wait(0);
}

uint32_t cvta_shared(const void* p, const char* file, int line) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  if (!in_dynamic_smem(a, 1)) fail(file, line, "__cvta_generic_to_shared of %p, not in the launch's dynamic shared memory", p);
  return static_cast<uint32_t>(a - reinterpret_cast<uintptr_t>(g_block->smem));
}

}  // namespace emu
