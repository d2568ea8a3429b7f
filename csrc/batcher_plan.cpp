// Micro-batch planning for one set of rank groups; see rlhf_fast/batching/_plan.py for the steps and why, and
// why every step is near-linear in the number of sequences.
#include <algorithm>
#include <functional>
#include <stdexcept>
#include <string>

#include "batcher.h"

namespace rlhf_fast {
namespace batcher {
namespace {

int64_t tokens(const Group& items, const int64_t* lengths) {
    int64_t total = 0;
    for (int64_t i : items) total += lengths[i];
    return total;
}

int64_t heaviest_group(const Groups& groups, const int64_t* lengths) {
    int64_t best = 0;
    for (const Group& g : groups) best = std::max(best, tokens(g, lengths));
    return best;
}

// KK split of a sorted index list into k groups by tokens (none empty when there are >= k items).
Groups split(const Group& items, int64_t k, const int64_t* lengths) {
    if (k < 1) throw std::invalid_argument("split: expected k >= 1, got " + std::to_string(k));
    std::vector<int64_t> weights(items.size());
    for (size_t p = 0; p < items.size(); ++p) weights[p] = lengths[items[p]];
    Groups groups = kk_partition<int64_t>(weights.data(), weights.size(), k, false);
    for (Group& g : groups) {
        for (int64_t& p : g) p = items[p];
    }
    return groups;
}

// First fit, longest first. The bins' free room sits in the leaves of a max-segment tree with one leaf per item
// (a bin not opened yet has room cap), so the first bin with room is a walk down the tree.
Groups first_fit_decreasing(const Group& items, const int64_t* lengths, int64_t cap) {
    Group order(items);
    std::sort(order.begin(), order.end(), [lengths](int64_t a, int64_t b) {
        if (lengths[a] != lengths[b]) return lengths[a] > lengths[b];
        return a < b;
    });
    size_t leaves = 1;
    while (leaves < order.size()) leaves *= 2;
    std::vector<int64_t> room(2 * leaves, cap);
    Groups bins;
    for (int64_t i : order) {
        const int64_t need = lengths[i];
        size_t node = 1;
        while (node < leaves) node = room[2 * node] >= need ? 2 * node : 2 * node + 1;
        const size_t b = node - leaves;
        if (b == bins.size()) bins.emplace_back();
        bins[b].push_back(i);
        room[node] -= need;
        while (node > 1) {
            node /= 2;
            room[node] = std::max(room[2 * node], room[2 * node + 1]);
        }
    }
    for (Group& g : bins) std::sort(g.begin(), g.end());
    return bins;
}

// The fewest micro-batches of one rank: KK at the lower bound if it fits (from_kk), else FFD.
Groups fewest(const Group& items, const int64_t* lengths, int64_t cap, bool& from_kk) {
    from_kk = true;
    if (items.empty()) return {};
    // ceil(tokens / cap) without tokens + cap - 1, which overflows int64 for a cap near 2**63 (and gave 0).
    const int64_t total = tokens(items, lengths);
    const int64_t lower_bound = total / cap + (total % cap != 0);
    Groups groups = split(items, lower_bound, lengths);
    if (heaviest_group(groups, lengths) <= cap) return groups;
    from_kk = false;
    return first_fit_decreasing(items, lengths, cap);
}

Groups spread(const Group& items, const Groups& base, bool from_kk, int64_t count, const int64_t* lengths,
              int64_t cap) {
    if (items.empty()) return Groups(count);
    if (from_kk && static_cast<int64_t>(base.size()) == count) return base;
    Groups groups = split(items, count, lengths);
    if (heaviest_group(groups, lengths) <= cap) return groups;
    Groups bins(base);
    // Halve the heaviest splittable micro-batch (ties: the lowest index) until there are count of them.
    std::vector<std::pair<int64_t, int64_t>> splittable;  // (-tokens, index): a min-heap via std::greater
    auto offer = [&](size_t j) {
        if (bins[j].size() < 2) return;
        splittable.push_back({-tokens(bins[j], lengths), static_cast<int64_t>(j)});
        std::push_heap(splittable.begin(), splittable.end(), std::greater<>());
    };
    for (size_t j = 0; j < bins.size(); ++j) offer(j);
    while (static_cast<int64_t>(bins.size()) < count) {
        if (splittable.empty()) {
            bins.emplace_back();
            continue;
        }
        std::pop_heap(splittable.begin(), splittable.end(), std::greater<>());
        const int64_t heaviest = splittable.back().second;
        splittable.pop_back();
        Groups halves = split(bins[heaviest], 2, lengths);
        bins[heaviest] = std::move(halves[0]);
        bins.push_back(std::move(halves[1]));
        offer(heaviest);
        offer(bins.size() - 1);
    }
    // Moves only go from the heaviest micro-batch to a lighter one, below the heaviest's old count: cap-safe.
    refine_groups<int64_t>(lengths, bins, true, items.size());
    for (Group& g : bins) std::sort(g.begin(), g.end());
    return bins;
}

// Heaviest first; equal token counts by first index; empty micro-batches last.
void order_heaviest_first(Groups& micro_batches, const int64_t* lengths, int64_t sentinel) {
    std::vector<std::pair<int64_t, int64_t>> keys(micro_batches.size());
    std::vector<size_t> order(micro_batches.size());
    for (size_t m = 0; m < micro_batches.size(); ++m) {
        keys[m] = {-tokens(micro_batches[m], lengths), micro_batches[m].empty() ? sentinel : micro_batches[m][0]};
        order[m] = m;
    }
    std::stable_sort(order.begin(), order.end(), [&keys](size_t a, size_t b) { return keys[a] < keys[b]; });
    Groups sorted;
    sorted.reserve(order.size());
    for (size_t m : order) sorted.push_back(std::move(micro_batches[m]));
    micro_batches = std::move(sorted);
}

}  // namespace

std::vector<Groups> plan_ranks(const int64_t* lengths, const Groups& ranks, int64_t max_tokens,
                               int64_t min_micro_batches) {
    if (max_tokens < 1) throw std::invalid_argument("max_tokens: expected an integer >= 1");
    if (min_micro_batches < 1) throw std::invalid_argument("min_micro_batches: expected an integer >= 1");
    int64_t n = 0;
    for (const Group& r : ranks) n += r.size();
    std::vector<Groups> bases;
    std::vector<char> from_kk(ranks.size());
    int64_t count = min_micro_batches;
    for (size_t r = 0; r < ranks.size(); ++r) {
        bool kk = true;
        bases.push_back(fewest(ranks[r], lengths, max_tokens, kk));
        from_kk[r] = kk;
        count = std::max<int64_t>(count, bases.back().size());
    }
    std::vector<Groups> plan;
    for (size_t r = 0; r < ranks.size(); ++r) {
        plan.push_back(spread(ranks[r], bases[r], from_kk[r], count, lengths, max_tokens));
        order_heaviest_first(plan.back(), lengths, n);
    }
    return plan;
}

}  // namespace batcher
}  // namespace rlhf_fast
