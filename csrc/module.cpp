// rlhf_fast._C: native helpers with no torch headers (NumPy buffers in, NumPy buffers out).
#include "registry.h"

#ifndef RLHF_FAST_VERSION
#define RLHF_FAST_VERSION "0.1.0"
#endif

PYBIND11_MODULE(_C, m) {
    m.doc() = "rlhf_fast native helpers: CPU GAE and the rollout batcher";
    m.def("version", []() { return std::string(RLHF_FAST_VERSION); },
          "Version string the extension was built with.");
    rlhf_fast::register_gae(m);
    rlhf_fast::register_batcher(m);
}
