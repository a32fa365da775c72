// One launch macro for every kernel launch of csrc/cuda/*_kernels.cu:
//   PAGEDLLM_LAUNCH(grid, block, dynamic_smem, stream, kernel<T, ...>)(args...);
// nvcc: kernel<<<grid, block, dynamic_smem, stream>>>(args...). The emulator build
// (PAGEDLLM_CUDA_EMU, csrc/cuda/emu) runs the same kernel on CPU fibers instead.
// The kernel goes last so that template arguments with commas need no parentheses.
#pragma once

#ifdef PAGEDLLM_CUDA_EMU
#define PAGEDLLM_LAUNCH(grid, block, smem, stream, ...) \
  ::emu::launch(__VA_ARGS__, #__VA_ARGS__, __FILE__, __LINE__, grid, block, smem, stream)
// Dynamic shared memory of the launch: a pointer to the emulated block's buffer.
#define PAGEDLLM_DYNAMIC_SMEM(name) unsigned char* const name = ::emu::g_block->smem
#else
#define PAGEDLLM_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define PAGEDLLM_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// Call-site parameters for device helpers that the emulator checks (Vec16 loads and stores, the
// PTX twins): the emulator's errors then name the kernel line that called the helper.
#ifdef PAGEDLLM_CUDA_EMU
#define PAGEDLLM_EMU_SITE_PARAMS , const char *emu_file = __builtin_FILE(), int emu_line = __builtin_LINE()
#define PAGEDLLM_EMU_CHECK(ptr, bytes, write) ::emu::check_access(ptr, bytes, write, emu_file, emu_line)
#else
#define PAGEDLLM_EMU_SITE_PARAMS
#define PAGEDLLM_EMU_CHECK(ptr, bytes, write) ((void)0)
#endif
