// The Python module pagedllm._C: build facts and the block manager. The ops themselves are
// registered with torch's dispatcher (torch.ops._C.*) by torch_bindings.cpp when the library loads.
#include <pybind11/pybind11.h>

namespace pagedllm {
void bind_block_manager(pybind11::module_& m);  // csrc/block_manager/bindings.cpp
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "pagedllm kernels (torch.ops._C) and the C++ block manager";
#ifdef PAGEDLLM_WITH_CUDA
  m.attr("cuda_compiled") = true;
  m.attr("cuda_arch_list") = PAGEDLLM_CUDA_ARCHS;
#else
  m.attr("cuda_compiled") = false;
  m.attr("cuda_arch_list") = "";
#endif
  pagedllm::bind_block_manager(m);
}
