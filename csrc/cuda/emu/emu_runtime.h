// The CUDA emulator's runtime: every CUDA thread of a block is a fiber (its own stack, switched
// cooperatively at barriers and warp collectives); the blocks of a grid run one after another on
// the calling CPU thread. Kernels compiled as host C++ (cuda_emu.h) call into this; so do the
// emulator twins of the PTX helpers (csrc/cuda/ptx.cuh).
//
// Errors of the emulated program (a divergent barrier or collective, shared memory past the
// launch's size, a copy outside the tensors of the launch, ...) throw emu::Error, whose message
// names the kernel, the block, the thread, and the source file and line; they never hang or abort.
#pragma once

#include <driver_types.h>
#include <vector_types.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace emu {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Raised from kernel code (a fiber) or the scheduler: adds the kernel, block and thread.
[[noreturn]] void fail(const char* file, int line, const char* fmt, ...) __attribute__((format(printf, 3, 4)));

enum class State : int { kReady, kBlockBarrier, kWarpCollective, kDone, kFailed };

struct Copy {  // one pending 16-byte cp.async: dst gets src (or zeros when src_bytes == 0) at its wait
  unsigned char* dst;
  const unsigned char* src;
  int src_bytes;
};

struct Fiber {
  void* sp = nullptr;
  State state = State::kReady;
  uint3 tid{};
  int lin = 0;  // linear thread index in the block
  const char* file = "";
  int line = 0;
  std::vector<std::vector<Copy>> groups;  // committed cp.async groups, oldest first
  std::vector<Copy> open;                 // issued, not yet committed
  int64_t cp_ordinal = 0;                 // per-thread count of cp.async (groups a warp request)
};

struct Warp {
  int arrived = 0;
  unsigned gen = 0;
  unsigned mask = 0;
  const char* file = nullptr;
  int line = 0;
  uint64_t slots[2][32][8];  // per-lane exchange values, double buffered by generation
};

struct Block {
  dim3 bid, bdim, gdim;
  int n = 0, nwarps = 0;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  void* sched_sp = nullptr;
  unsigned char* smem = nullptr;  // dynamic shared memory of the launch
  size_t smem_bytes = 0;
  int bar_arrived = 0;
  const char* bar_file = nullptr;
  int bar_line = 0;
};

// Counters for benchmarks/RESULTS.md: coalescing of cp.async and bank conflicts of ldmatrix.
struct Stats {
  int64_t blocks = 0, barriers = 0, collectives = 0;
  // Warp-level requests (the k-th execution of one instruction by the lanes of a warp), the 32-byte
  // sectors they touch, and the fewest sectors their distinct bytes could take (ceil(bytes / 32)).
  int64_t cp_requests = 0, cp_sectors = 0, cp_ideal = 0;     // cp.async (global side)
  int64_t ldsm_phases = 0, ldsm_wavefronts = 0;              // ldmatrix 8-row phases, shared-memory wavefronts
  int64_t vec_requests = 0, vec_sectors = 0, vec_ideal = 0;  // checked global loads / stores (Vec16, __ldg)
  // 16-byte shared-memory loads / stores (Vec16): wavefronts (per phase of 8 lanes, the worst bank's
  // distinct 4-byte words) and the ideal (one per phase).
  int64_t smem_requests = 0, smem_wavefronts = 0, smem_ideal = 0;
};

struct Config {
  int sm_count = 132;  // H100 SXM
  int device = 0;
  bool reverse_schedule = false;  // run ready fibers last-to-first (a race smoke test)
  bool count = false;             // collect the memory counters of Stats (slower)
};

// The state of the block being run (valid only inside a launch; launches are serialized).
extern Block* g_block;
extern Fiber* g_cur;
extern const char* g_kernel;
Config& config();
Stats& stats();

struct LaunchInfo {
  const char* kernel;
  const char* file;
  int line;
  dim3 grid, block;
  size_t smem;
  const void* fn;
};

// Validates the launch (a bad configuration sets the error cudaGetLastError returns, as on a GPU),
// then runs every block. Thread-safe: launches from several CPU threads run one at a time.
void run_grid(const LaunchInfo& info, const std::function<void()>& body);

// cudaGetLastError / cudaGetErrorString of the emulated device.
cudaError_t take_last_error();
const char* last_error_string(cudaError_t err);
size_t& max_dynamic_smem(const void* fn);  // cudaFuncAttributeMaxDynamicSharedMemorySize

// Global memory the current launch may touch (the storages of the op's tensors); empty: unknown.
struct RangeScope {
  RangeScope();
  ~RangeScope();
  void add(const void* p, size_t bytes);
};
void check_global(const void* p, size_t bytes, const char* what, const char* file, int line);
// Shared memory (dynamic window or a static __shared__ variable) or global memory of the launch.
void check_access(const void* p, size_t bytes, bool write, const char* file, int line);

// Synchronization and warp collectives.
void syncthreads(const char* file, int line);
unsigned warp_collective(unsigned mask, const char* file, int line);  // returns the generation
inline int lane_id() { return g_cur->lin & 31; }
uint64_t* exchange_slot(unsigned gen, int lane);

// PTX twins (see csrc/cuda/ptx.cuh for the instructions they stand in for).
void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes, const char* file, int line);
void cp_async_commit();
void cp_async_wait(int newest_pending);
void cp_async_wait_all();
uint32_t cvta_shared(const void* p, const char* file, int line);
void ldmatrix_x4(uint32_t addr, uint32_t (&r)[4], bool trans, const char* file, int line);
template <typename T>
void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, const char* file, int line);
float ex2_approx(float x);

}  // namespace emu
