// Python bindings of the rollout batcher (rlhf_fast._C.batcher_*). The public API and the argument checks
// live in rlhf_fast/batching/; the checks here only keep direct calls from crashing or reading out of bounds.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "batcher.h"
#include "registry.h"

namespace py = pybind11;

namespace rlhf_fast {
namespace {

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using F64Array = py::array_t<double, py::array::c_style | py::array::forcecast>;
using batcher::Groups;

// (order, offsets): every group's indices end to end, and where each group starts.
py::tuple flatten(const std::vector<const Groups*>& parts) {
    int64_t groups = 0, items = 0;
    for (const Groups* p : parts) {
        groups += p->size();
        for (const auto& g : *p) items += g.size();
    }
    I64Array order(items), offsets(groups + 1);
    int64_t* o = order.mutable_data();
    int64_t* off = offsets.mutable_data();
    int64_t at = 0, j = 0;
    off[0] = 0;
    for (const Groups* p : parts) {
        for (const auto& g : *p) {
            std::memcpy(o + at, g.data(), g.size() * sizeof(int64_t));
            at += g.size();
            off[++j] = at;
        }
    }
    return py::make_tuple(order, offsets);
}

// Sums of user-supplied int64 sizes stay at or below 2**62 (the limit rlhf_fast/batching/_checks.py enforces),
// which leaves room for the doubled values the refinement compares; float64 sums stay below 2**1010 (the
// Python checks stop at 2**1000, so rounding in the sum never makes this check the stricter one).
constexpr int64_t kIntSumLimit = int64_t(1) << 62;
const double kFloatSumLimit = std::ldexp(1.0, 1010);
constexpr int64_t kMaxGroups = std::numeric_limits<int32_t>::max();

// Sum of values >= 0, or a ValueError naming the argument when it passes kIntSumLimit (checked before adding).
int64_t checked_sum(const int64_t* values, int64_t n, const char* name) {
    int64_t total = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (values[i] > kIntSumLimit - total) {
            throw std::invalid_argument(std::string(name) + ": expected values whose sum is at most 2**62, got " +
                                        "a larger sum at index " + std::to_string(i));
        }
        total += values[i];
    }
    return total;
}

void check_group_count(const char* name, int64_t value) {
    if (value < 1) {
        throw std::invalid_argument(std::string(name) + ": expected an integer >= 1, got " + std::to_string(value));
    }
    if (value > kMaxGroups) {
        throw std::invalid_argument(std::string(name) + ": expected an integer <= " + std::to_string(kMaxGroups) +
                                    ", got " + std::to_string(value));
    }
}

void check_weights_1d(const py::array& weights) {
    if (weights.ndim() != 1) {
        throw std::invalid_argument("weights: expected a 1-D array, got " + std::to_string(weights.ndim()) +
                                    " dimensions");
    }
    if (weights.shape(0) >= std::numeric_limits<int32_t>::max()) {
        throw std::invalid_argument("weights: expected fewer than 2**31 items");
    }
}

template <typename W>
Groups partition_checked(const W* w, int64_t n, int64_t k, bool equal_size) {
    check_group_count("k", k);
    if (equal_size && n % k != 0) {
        throw std::invalid_argument("weights: equal_size=True expects a length divisible by k=" +
                                    std::to_string(k) + ", got " + std::to_string(n));
    }
    for (int64_t i = 0; i < n; ++i) {
        if (!(w[i] >= W(0)) || !std::isfinite(static_cast<double>(w[i]))) {
            throw std::invalid_argument("weights: expected finite values >= 0, got " + std::to_string(w[i]) +
                                        " at index " + std::to_string(i));
        }
    }
    if constexpr (std::is_same<W, int64_t>::value) {
        checked_sum(w, n, "weights");
    } else {
        double total = 0.0;
        for (int64_t i = 0; i < n; ++i) total += w[i];
        if (!(total < kFloatSumLimit)) {
            throw std::invalid_argument("weights: expected values whose sum is below 2**1010, got " +
                                        std::to_string(total));
        }
    }
    py::gil_scoped_release release;
    return batcher::kk_partition<W>(w, n, k, equal_size);
}

// Rank groups from int64 or float64 weights; any other dtype is a TypeError.
Groups partition_any(const py::array& weights, int64_t k, bool equal_size) {
    check_weights_1d(weights);
    const py::dtype dt = weights.dtype();
    if (dt.kind() == 'i' && dt.itemsize() == 8) {
        I64Array w = I64Array::ensure(weights);
        return partition_checked<int64_t>(w.data(), w.shape(0), k, equal_size);
    }
    if (dt.kind() == 'f' && dt.itemsize() == 8) {
        F64Array w = F64Array::ensure(weights);
        return partition_checked<double>(w.data(), w.shape(0), k, equal_size);
    }
    throw py::type_error("weights: expected dtype int64 or float64, got " + std::string(py::str(dt)));
}

py::tuple partition(const py::array& weights, int64_t k, bool equal_size) {
    const Groups groups = partition_any(weights, k, equal_size);
    return flatten({&groups});
}

py::tuple plan(const I64Array& lengths, const py::array& weights, int64_t max_tokens, int64_t num_ranks,
               bool equal_size, int64_t min_micro_batches) {
    if (lengths.ndim() != 1) throw std::invalid_argument("lengths: expected a 1-D array");
    if (weights.ndim() != 1 || weights.shape(0) != lengths.shape(0)) {
        throw std::invalid_argument("weights: expected one weight per length");
    }
    if (max_tokens < 1) throw std::invalid_argument("max_tokens: expected an integer >= 1");
    check_group_count("num_ranks", num_ranks);
    check_group_count("min_micro_batches", min_micro_batches);
    const int64_t* len = lengths.data();
    for (int64_t i = 0; i < lengths.shape(0); ++i) {
        if (len[i] < 1 || len[i] > max_tokens) {
            throw std::invalid_argument("lengths: expected values in [1, max_tokens=" + std::to_string(max_tokens) +
                                        "], got " + std::to_string(len[i]) + " at index " + std::to_string(i));
        }
    }
    checked_sum(len, lengths.shape(0), "lengths");
    const Groups ranks = partition_any(weights, num_ranks, equal_size);
    std::vector<Groups> micro_batches;
    {
        py::gil_scoped_release release;
        micro_batches = batcher::plan_ranks(len, ranks, max_tokens, min_micro_batches);
    }
    std::vector<const Groups*> parts;
    for (const Groups& r : micro_batches) parts.push_back(&r);
    py::tuple flat = flatten(parts);
    const int64_t count = micro_batches.empty() ? 0 : micro_batches[0].size();
    return py::make_tuple(flat[0], flat[1], count);
}

// Source pointers and byte counts of 1-D, C-contiguous arrays of one dtype (checked, with the GIL held).
struct Sources {
    std::vector<py::array> keep_alive;
    std::vector<const char*> data;
    std::vector<int64_t> count;
    int64_t total = 0;
};

// The copies below are raw memcpy: only plain-data dtypes (bool, integers, floats, complex) in native byte
// order are safe. An object array holds PyObject* pointers, which a memcpy copies without a reference, so the
// result would point at freed objects once the sources die; strings, datetimes and structs are refused too.
void check_plain_dtype(const py::dtype& dtype) {
    const char kind = dtype.kind();
    const bool plain = kind == 'b' || kind == 'i' || kind == 'u' || kind == 'f' || kind == 'c';
    if (!plain || dtype.attr("hasobject").cast<bool>() || !dtype.attr("isnative").cast<bool>()) {
        throw py::type_error("dtype: expected a bool, integer, float or complex dtype in native byte order, got " +
                             std::string(py::str(dtype)));
    }
}

Sources gather_sources(const py::list& arrays, const py::dtype& dtype) {
    check_plain_dtype(dtype);
    Sources s;
    for (size_t i = 0; i < arrays.size(); ++i) {
        if (!py::isinstance<py::array>(arrays[i])) {
            throw py::type_error("arrays[" + std::to_string(i) + "]: expected a NumPy array");
        }
        py::array a = py::reinterpret_borrow<py::array>(arrays[i]);
        if (a.dtype().not_equal(dtype) || a.itemsize() != dtype.itemsize()) {
            throw py::type_error("arrays[" + std::to_string(i) + "]: expected dtype " + std::string(py::str(dtype)) +
                                 ", got " + std::string(py::str(a.dtype())));
        }
        if (a.ndim() != 1 || !(a.flags() & py::array::c_style)) {
            throw std::invalid_argument("arrays[" + std::to_string(i) + "]: expected a 1-D contiguous array");
        }
        s.data.push_back(static_cast<const char*>(a.data()));
        s.count.push_back(a.shape(0));
        s.total += a.shape(0);
        s.keep_alive.push_back(std::move(a));
    }
    return s;
}

py::array concat(const py::list& arrays, const py::dtype& dtype) {
    const Sources s = gather_sources(arrays, dtype);
    py::array out(dtype, std::vector<py::ssize_t>{s.total});
    char* dst = static_cast<char*>(out.mutable_data());
    const size_t item = dtype.itemsize();
    {
        py::gil_scoped_release release;
        for (size_t i = 0; i < s.data.size(); ++i) {
            std::memcpy(dst, s.data[i], s.count[i] * item);
            dst += s.count[i] * item;
        }
    }
    return out;
}

template <typename T>
void fill_typed(char* dst, int64_t count, const char* value) {
    T v;
    std::memcpy(&v, value, sizeof(T));
    std::fill(reinterpret_cast<T*>(dst), reinterpret_cast<T*>(dst) + count, v);
}

// count copies of one item of the given size (typed fills for the common sizes: they vectorise).
void fill_items(char* dst, int64_t count, const char* value, size_t item) {
    switch (item) {
        case 1: std::memset(dst, *value, count); return;
        case 2: fill_typed<uint16_t>(dst, count, value); return;
        case 4: fill_typed<uint32_t>(dst, count, value); return;
        case 8: fill_typed<uint64_t>(dst, count, value); return;
        default:
            for (int64_t t = 0; t < count; ++t) std::memcpy(dst + t * item, value, item);
    }
}

py::array pad_rows(const py::list& arrays, const py::dtype& dtype, int64_t width, const py::array& fill,
                   bool left) {
    if (width < 0) throw std::invalid_argument("width: expected an integer >= 0, got " + std::to_string(width));
    const Sources s = gather_sources(arrays, dtype);
    if (fill.size() != 1 || fill.dtype().not_equal(dtype)) {
        throw py::type_error("fill: expected one value of dtype " + std::string(py::str(dtype)));
    }
    for (size_t i = 0; i < s.count.size(); ++i) {
        if (s.count[i] > width) {
            throw std::invalid_argument("arrays[" + std::to_string(i) + "]: expected at most width=" +
                                        std::to_string(width) + " items, got " + std::to_string(s.count[i]));
        }
    }
    const int64_t rows = s.data.size();
    py::array out(dtype, std::vector<py::ssize_t>{rows, width});
    char* dst = static_cast<char*>(out.mutable_data());
    const char* pad = static_cast<const char*>(fill.data());
    const size_t item = dtype.itemsize();
    {
        py::gil_scoped_release release;
        const size_t row_bytes = width * item;
        for (int64_t r = 0; r < rows; ++r) {
            char* row = dst + r * row_bytes;
            const int64_t used = s.count[r];
            const int64_t start = left ? width - used : 0;
            fill_items(row + (left ? 0 : used * item), width - used, pad, item);
            std::memcpy(row + start * item, s.data[r], used * item);
        }
    }
    return out;
}

void check_seq_lens(const I64Array& seq_lens, int64_t width) {
    if (seq_lens.ndim() != 1) throw std::invalid_argument("seq_lens: expected a 1-D array");
    for (int64_t i = 0; i < seq_lens.shape(0); ++i) {
        if (seq_lens.data()[i] < 0 || seq_lens.data()[i] > width) {
            throw std::invalid_argument("seq_lens: expected values in [0, " + std::to_string(width) + "], got " +
                                        std::to_string(seq_lens.data()[i]) + " at index " + std::to_string(i));
        }
    }
}

I64Array packed_positions(const I64Array& seq_lens) {
    check_seq_lens(seq_lens, std::numeric_limits<int64_t>::max() / 2);
    const int64_t total = checked_sum(seq_lens.data(), seq_lens.shape(0), "seq_lens");
    I64Array out(total);
    const int64_t* lens = seq_lens.data();
    int64_t* dst = out.mutable_data();
    const int64_t n = seq_lens.shape(0);
    {
        py::gil_scoped_release release;
        batcher::packed_positions(lens, n, dst);
    }
    return out;
}

py::tuple padded_layout(const I64Array& seq_lens, int64_t width, bool left) {
    if (width < 0) throw std::invalid_argument("width: expected an integer >= 0");
    check_seq_lens(seq_lens, width);
    const int64_t n = seq_lens.shape(0);
    I64Array mask({n, width}), positions({n, width});
    const int64_t* lens = seq_lens.data();
    int64_t* m = mask.mutable_data();
    int64_t* p = positions.mutable_data();
    {
        py::gil_scoped_release release;
        batcher::padded_layout(lens, n, width, left, m, p);
    }
    return py::make_tuple(mask, positions);
}

}  // namespace

void register_batcher(py::module_& m) {
    m.def("batcher_partition", &partition, py::arg("weights"), py::arg("k"), py::arg("equal_size"),
          "Karmarkar-Karp k-way partition of int64 or float64 weights; returns (order, offsets): group g is "
          "order[offsets[g]:offsets[g+1]].");
    m.def("batcher_plan", &plan, py::arg("lengths"), py::arg("weights"), py::arg("max_tokens"),
          py::arg("num_ranks"), py::arg("equal_size"), py::arg("min_micro_batches"),
          "Micro-batch plan; returns (order, offsets, count): micro-batch m of rank r is "
          "order[offsets[r*count+m]:offsets[r*count+m+1]].");
    m.def("batcher_concat", &concat, py::arg("arrays"), py::arg("dtype"),
          "1-D arrays of one dtype laid end to end.");
    m.def("batcher_pad_rows", &pad_rows, py::arg("arrays"), py::arg("dtype"), py::arg("width"), py::arg("fill"),
          py::arg("left"), "1-D arrays of one dtype as the rows of a [B, width] array, padded with fill.");
    m.def("batcher_packed_positions", &packed_positions, py::arg("seq_lens"),
          "position_ids of a packed batch: 0..len-1 per sequence.");
    m.def("batcher_padded_layout", &padded_layout, py::arg("seq_lens"), py::arg("width"), py::arg("left"),
          "(attention_mask, position_ids) int64 [B, width] of a padded batch.");
}

}  // namespace rlhf_fast
