// Karmarkar-Karp k-way largest differencing plus a move/swap refinement; see rlhf_fast/batching/_kk.py.
#include <algorithm>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>

#include "batcher.h"

namespace rlhf_fast {
namespace batcher {
namespace {

template <typename W>
W magnitude(W x) {
    return x < W(0) ? -x : x;
}

// The partial sums of every state live in flat arrays, k entries per state slot; a merge writes the result
// into the first state's slot. Groups are linked lists of items (head / tail / next), so a union is O(1).
template <typename W>
struct States {
    int64_t k;
    std::vector<W> sums;
    std::vector<int32_t> head, tail, next;

    States(int64_t slots, int64_t k_, int64_t n)
        : k(k_), sums(slots * k_, W(0)), head(slots * k_, -1), tail(slots * k_, -1), next(n, -1) {}

    void put(int64_t slot, int64_t group, int64_t item, W weight) {
        const int64_t at = slot * k + group;
        sums[at] = weight;
        head[at] = tail[at] = static_cast<int32_t>(item);
    }
    W spread(int64_t slot) const { return sums[slot * k] - sums[slot * k + k - 1]; }
};

template <typename W>
struct Entry {
    W spread;
    int64_t id;
    int64_t slot;
};

// std heap comparator: true when a is served after b (smaller spread, or equal spread and a newer id).
template <typename W>
bool served_later(const Entry<W>& a, const Entry<W>& b) {
    if (a.spread != b.spread) return a.spread < b.spread;
    return a.id > b.id;
}

template <typename W>
struct MergedGroup {
    W sum;
    int32_t head, tail;
    int64_t position;
};

template <typename W>
void merge_into_first(States<W>& s, int64_t slot_a, int64_t slot_b, std::vector<MergedGroup<W>>& tmp) {
    const int64_t k = s.k;
    for (int64_t i = 0; i < k; ++i) {
        const int64_t a = slot_a * k + i, b = slot_b * k + (k - 1 - i);
        MergedGroup<W>& g = tmp[i];
        g.sum = s.sums[a] + s.sums[b];
        g.position = i;
        if (s.head[a] < 0) {
            g.head = s.head[b];
            g.tail = s.tail[b];
        } else if (s.head[b] < 0) {
            g.head = s.head[a];
            g.tail = s.tail[a];
        } else {
            s.next[s.tail[a]] = s.head[b];
            g.head = s.head[a];
            g.tail = s.tail[b];
        }
    }
    // Descending by sum, equal sums in merge order: the stable sort the Python path does.
    std::sort(tmp.begin(), tmp.end(), [](const MergedGroup<W>& x, const MergedGroup<W>& y) {
        if (x.sum != y.sum) return x.sum > y.sum;
        return x.position < y.position;
    });
    for (int64_t i = 0; i < k; ++i) {
        const int64_t at = slot_a * k + i;
        s.sums[at] = tmp[i].sum;
        s.head[at] = tmp[i].head;
        s.tail[at] = tmp[i].tail;
    }
}

struct Change {
    bool found = false;
    int64_t x = -1, y = -1;  // y = -1: move x; else swap x and y
};

// The best move or swap between the heaviest and the lightest group: |2d - gap| smallest, then lowest x, y.
template <typename W>
Change best_change(const W* w, const Group& heavy, const Group& light, W gap, bool allow_moves) {
    Change best;
    W best_score = W(0);
    auto consider = [&](W score, int64_t x, int64_t y) {
        if (!best.found || score < best_score ||
            (score == best_score && (x < best.x || (x == best.x && y < best.y)))) {
            best.found = true;
            best_score = score;
            best.x = x;
            best.y = y;
        }
    };
    if (allow_moves) {
        for (int64_t x : heavy) {
            const W d = w[x];
            if (W(0) < d && d < gap) consider(magnitude(W(2) * d - gap), x, -1);
        }
    }
    Group ordered(light);
    std::sort(ordered.begin(), ordered.end(), [w](int64_t a, int64_t b) {
        if (w[a] != w[b]) return w[a] < w[b];
        return a < b;
    });
    std::vector<W> doubled(ordered.size());
    for (size_t p = 0; p < ordered.size(); ++p) doubled[p] = W(2) * w[ordered[p]];
    for (int64_t x : heavy) {
        const W target = W(2) * w[x] - gap;  // the swap is ideal when 2 * w[y] == target
        const int64_t above = std::lower_bound(doubled.begin(), doubled.end(), target) - doubled.begin();
        for (int64_t p : {above, above - 1}) {
            if (p < 0 || p >= static_cast<int64_t>(doubled.size())) continue;
            const int64_t first = std::lower_bound(doubled.begin(), doubled.end(), doubled[p]) - doubled.begin();
            const int64_t y = ordered[first];
            const W d = w[x] - w[y];
            if (W(0) < d && d < gap) consider(magnitude(W(2) * d - gap), x, y);
        }
    }
    return best;
}

template <typename W>
void refine(const W* w, Groups& groups, std::vector<W>& sums, bool allow_moves, int64_t max_rounds) {
    for (int64_t round = 0; round < max_rounds; ++round) {
        const int64_t heavy = std::max_element(sums.begin(), sums.end()) - sums.begin();
        const int64_t light = std::min_element(sums.begin(), sums.end()) - sums.begin();
        const W gap = sums[heavy] - sums[light];
        if (!(gap > W(0))) return;
        const Change c = best_change(w, groups[heavy], groups[light], gap, allow_moves);
        if (!c.found) return;
        Group& h = groups[heavy];
        Group& l = groups[light];
        h.erase(std::find(h.begin(), h.end(), c.x));
        l.push_back(c.x);
        W d = w[c.x];
        if (c.y >= 0) {
            l.erase(std::find(l.begin(), l.end(), c.y));
            h.push_back(c.y);
            d = w[c.x] - w[c.y];
        }
        sums[heavy] = sums[heavy] - d;
        sums[light] = sums[light] + d;
    }
}

}  // namespace

template <typename W>
Groups kk_partition(const W* w, int64_t n, int64_t k, bool equal_size) {
    // The state arrays hold slots * k entries and int32 item links: k = 0 sized them to nothing (the first put
    // wrote out of bounds), and k or n past int32 could overflow slots * k. Refuse instead of trusting callers.
    constexpr int64_t limit = std::numeric_limits<int32_t>::max();
    if (k < 1 || k > limit) {
        throw std::invalid_argument("k: expected an integer in [1, " + std::to_string(limit) + "], got " +
                                    std::to_string(k));
    }
    if (n < 0 || n >= limit) {
        throw std::invalid_argument("weights: expected fewer than 2**31 items, got " + std::to_string(n));
    }
    if (equal_size && n % k != 0) {
        throw std::invalid_argument("weights: equal_size=True expects a length divisible by k=" +
                                    std::to_string(k) + ", got " + std::to_string(n));
    }
    Groups groups(k);
    if (n == 0) return groups;
    const int64_t slots = equal_size ? n / k : n;
    States<W> s(slots, k, n);
    std::vector<Entry<W>> heap;
    heap.reserve(slots);
    if (equal_size) {
        std::vector<int64_t> order(n);
        std::iota(order.begin(), order.end(), 0);
        std::sort(order.begin(), order.end(), [w](int64_t a, int64_t b) {
            if (w[a] != w[b]) return w[a] < w[b];
            return a < b;
        });
        for (int64_t c = 0; c < slots; ++c) {
            for (int64_t j = 0; j < k; ++j) {
                const int64_t item = order[c * k + (k - 1 - j)];  // descending by (weight, index)
                s.put(c, j, item, w[item]);
            }
            heap.push_back({s.spread(c), c, c});
        }
    } else {
        for (int64_t i = 0; i < n; ++i) {
            s.put(i, 0, i, w[i]);
            heap.push_back({s.spread(i), i, i});
        }
    }
    std::make_heap(heap.begin(), heap.end(), served_later<W>);
    std::vector<MergedGroup<W>> tmp(k);
    int64_t next_id = slots;
    while (heap.size() > 1) {
        std::pop_heap(heap.begin(), heap.end(), served_later<W>);
        const Entry<W> a = heap.back();
        heap.pop_back();
        std::pop_heap(heap.begin(), heap.end(), served_later<W>);
        const Entry<W> b = heap.back();
        heap.pop_back();
        merge_into_first(s, a.slot, b.slot, tmp);
        heap.push_back({s.spread(a.slot), next_id++, a.slot});
        std::push_heap(heap.begin(), heap.end(), served_later<W>);
    }
    const int64_t last = heap.front().slot;
    std::vector<W> sums(k);
    for (int64_t g = 0; g < k; ++g) {
        sums[g] = s.sums[last * k + g];
        for (int32_t item = s.head[last * k + g]; item >= 0; item = s.next[item]) {
            groups[g].push_back(item);
            if (item == s.tail[last * k + g]) break;
        }
    }
    refine(w, groups, sums, !equal_size, n);
    for (Group& g : groups) std::sort(g.begin(), g.end());
    return groups;
}

template <typename W>
void refine_groups(const W* w, Groups& groups, bool allow_moves, int64_t max_rounds) {
    std::vector<W> sums(groups.size(), W(0));
    for (size_t g = 0; g < groups.size(); ++g) {
        for (int64_t x : groups[g]) sums[g] = sums[g] + w[x];
    }
    refine(w, groups, sums, allow_moves, max_rounds);
}

template void refine_groups<int64_t>(const int64_t*, Groups&, bool, int64_t);
template Groups kk_partition<int64_t>(const int64_t*, int64_t, int64_t, bool);
template Groups kk_partition<double>(const double*, int64_t, int64_t, bool);

}  // namespace batcher
}  // namespace rlhf_fast
