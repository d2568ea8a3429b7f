// Mask-aware generalised advantage estimation on CPU, one backward sweep per row.
// Semantics are those of rlhf_fast.reference.gae: masked tokens are skipped, never zeroed into the recursion.
#include <pybind11/numpy.h>

#include <cstdint>
#include <stdexcept>

#include "registry.h"

namespace py = pybind11;

namespace rlhf_fast {
namespace {

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using U8Array = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;

void gae_rows(const float* rewards, const float* values, const uint8_t* mask, float* advantages,
              float* returns, int64_t rows, int64_t cols, float gamma, float lam) {
    for (int64_t b = 0; b < rows; ++b) {
        const int64_t base = b * cols;
        float next_value = 0.0f;      // value of the next valid token, 0 past the end of the row
        float next_advantage = 0.0f;  // advantage of the next valid token
        for (int64_t t = cols - 1; t >= 0; --t) {
            const int64_t i = base + t;
            if (!mask[i]) {
                advantages[i] = 0.0f;
                returns[i] = 0.0f;
                continue;
            }
            const float delta = rewards[i] + gamma * next_value - values[i];
            next_advantage = delta + gamma * lam * next_advantage;
            next_value = values[i];
            advantages[i] = next_advantage;
            returns[i] = next_advantage + values[i];
        }
    }
}

py::tuple gae(F32Array rewards, F32Array values, U8Array mask, float gamma, float lam) {
    if (rewards.ndim() != 2) throw std::invalid_argument("rewards: expected a 2-d array [B, T]");
    if (values.ndim() != 2 || mask.ndim() != 2 || values.shape(0) != rewards.shape(0) ||
        values.shape(1) != rewards.shape(1) || mask.shape(0) != rewards.shape(0) ||
        mask.shape(1) != rewards.shape(1)) {
        throw std::invalid_argument("values, mask: expected the shape of rewards");
    }
    const int64_t rows = rewards.shape(0), cols = rewards.shape(1);
    F32Array advantages({rows, cols});
    F32Array returns({rows, cols});
    const float* r = rewards.data();
    const float* v = values.data();
    const uint8_t* m = mask.data();
    float* a = advantages.mutable_data();
    float* ret = returns.mutable_data();
    {
        py::gil_scoped_release release;
        gae_rows(r, v, m, a, ret, rows, cols, gamma, lam);
    }
    return py::make_tuple(advantages, returns);
}

}  // namespace

void register_gae(py::module_& m) {
    m.def("gae", &gae, py::arg("rewards"), py::arg("values"), py::arg("mask"), py::arg("gamma"),
          py::arg("lam"),
          "Mask-aware GAE over float32 [B, T] rewards / values and a uint8 mask; returns "
          "(advantages, returns) as float32 arrays.");
}

}  // namespace rlhf_fast
