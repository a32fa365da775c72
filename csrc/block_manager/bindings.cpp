// PLACEHOLDER (skeleton): the block manager's pybind11 class goes here.
#include <pybind11/pybind11.h>

namespace pagedllm {
void bind_block_manager(pybind11::module_& m) {}
}  // namespace pagedllm
