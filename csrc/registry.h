// Each C++ source registers its functions on the one module rlhf_fast._C.
#pragma once
#include <pybind11/pybind11.h>

namespace rlhf_fast {
void register_gae(pybind11::module_& m);
void register_batcher(pybind11::module_& m);
}  // namespace rlhf_fast
