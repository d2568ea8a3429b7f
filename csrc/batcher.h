// The rollout batcher's core, free of Python: Karmarkar-Karp partitions, micro-batch plans, packing loops.
// rlhf_fast/batching/_kk.py and _plan.py are the specification: every step here mirrors one there, in the
// same order and with the same arithmetic, so both paths return identical groups.
#pragma once

#include <cstdint>
#include <vector>

namespace rlhf_fast {
namespace batcher {

using Group = std::vector<int64_t>;
using Groups = std::vector<Group>;

// k groups of indices into weights[0..n), each sorted ascending (W is int64_t or double).
template <typename W>
Groups kk_partition(const W* weights, int64_t n, int64_t k, bool equal_size);

// Move/swap items (indices into weights) from the heaviest to the lightest group while that narrows their gap.
template <typename W>
void refine_groups(const W* weights, Groups& groups, bool allow_moves, int64_t max_rounds);

// One list of micro-batches per rank: every rank gets the same count, none exceeds max_tokens.
std::vector<Groups> plan_ranks(const int64_t* lengths, const Groups& ranks, int64_t max_tokens,
                               int64_t min_micro_batches);

// position_ids of a packed batch: 0..len-1 for each sequence, end to end.
void packed_positions(const int64_t* seq_lens, int64_t n, int64_t* out);

// attention_mask and position_ids of a [n, width] padded batch.
void padded_layout(const int64_t* seq_lens, int64_t n, int64_t width, bool left, int64_t* mask,
                   int64_t* positions);

}  // namespace batcher
}  // namespace rlhf_fast
