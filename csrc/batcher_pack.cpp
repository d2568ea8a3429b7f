// Index layouts of packed and padded batches (the data copies live in batcher.cpp, next to the buffers).
#include "batcher.h"

namespace rlhf_fast {
namespace batcher {

void packed_positions(const int64_t* seq_lens, int64_t n, int64_t* out) {
    for (int64_t s = 0; s < n; ++s) {
        for (int64_t t = 0; t < seq_lens[s]; ++t) *out++ = t;
    }
}

void padded_layout(const int64_t* seq_lens, int64_t n, int64_t width, bool left, int64_t* mask,
                   int64_t* positions) {
    for (int64_t s = 0; s < n; ++s) {
        const int64_t start = left ? width - seq_lens[s] : 0;
        const int64_t end = start + seq_lens[s];
        int64_t* m = mask + s * width;
        int64_t* p = positions + s * width;
        for (int64_t t = 0; t < width; ++t) {
            const bool token = t >= start && t < end;
            m[t] = token ? 1 : 0;
            p[t] = token ? t - start : 0;
        }
    }
}

}  // namespace batcher
}  // namespace rlhf_fast
