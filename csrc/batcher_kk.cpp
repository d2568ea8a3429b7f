// Karmarkar-Karp k-way largest differencing on sparse states plus a move/swap refinement; see
// rlhf_fast/batching/_kk.py for the steps, the order of equal groups and why it is O(n log^2 n) for any k.
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

// Every group ever formed: its sum, whether it was joined into another, and its items as a linked list.
template <typename W>
struct GroupTable {
    struct Record {
        W sum;
        int32_t head, tail;
        bool joined;
    };
    std::vector<Record> groups;
    std::vector<int32_t> next;  // per item

    GroupTable(const W* w, int64_t n) : next(n, -1) {
        groups.reserve(2 * n);  // at most n - 1 joins: growing never holds two copies of the table
        for (int64_t i = 0; i < n; ++i) {
            groups.push_back({w[i], static_cast<int32_t>(i), static_cast<int32_t>(i), false});
        }
    }
    W sum(int64_t g) const { return groups[g].sum; }
    bool joined(int64_t g) const { return groups[g].joined; }

    // A new group holding the items of x then y (both retired); returns its id.
    int64_t join(int64_t x, int64_t y) {
        Record& a = groups[x];
        Record& b = groups[y];
        a.joined = b.joined = true;
        next[a.tail] = b.head;
        groups.push_back({a.sum + b.sum, a.head, b.tail, false});
        return static_cast<int64_t>(groups.size()) - 1;
    }
};

template <typename W>
struct Key {
    W sum;
    int64_t id;
};

// std heap comparators (true when a is served after b). Groups are ordered by (sum descending, id ascending):
// `light` serves the last group of that order first, `heavy` the first.
// (Function objects rather than functions, so that the heap algorithms inline them.)
struct LightAfter {
    template <typename K>
    bool operator()(const K& a, const K& b) const {
        if (a.sum != b.sum) return a.sum > b.sum;
        return a.id < b.id;
    }
};
struct HeavyAfter {
    template <typename K>
    bool operator()(const K& a, const K& b) const {
        if (a.sum != b.sum) return a.sum < b.sum;
        return a.id > b.id;
    }
};

// The non-empty groups of one state; `heavy` may still hold joined groups (dropped when they reach the top).
template <typename W>
struct State {
    std::vector<Key<W>> light, heavy;

    void add(const GroupTable<W>& t, int64_t g) {
        light.push_back({t.sum(g), g});
        std::push_heap(light.begin(), light.end(), LightAfter());
        heavy.push_back({t.sum(g), g});
        std::push_heap(heavy.begin(), heavy.end(), HeavyAfter());
    }
    int64_t size() const { return static_cast<int64_t>(light.size()); }
    int64_t pop_lightest() {
        std::pop_heap(light.begin(), light.end(), LightAfter());
        const int64_t g = light.back().id;
        light.pop_back();
        return g;
    }
    W spread(const GroupTable<W>& t, int64_t k) {
        while (t.joined(heavy.front().id)) {
            std::pop_heap(heavy.begin(), heavy.end(), HeavyAfter());
            heavy.pop_back();
        }
        const W lightest = size() == k ? light.front().sum : W(0);
        return t.sum(heavy.front().id) - lightest;
    }
};

// The states being merged, in slots that are reused once their state is merged into another. A one-item state
// takes no slot until it is served (a slot per item would be n of them, touched in random order).
template <typename W>
struct StatePool {
    std::vector<State<W>> slots;
    std::vector<int64_t> free;

    int64_t acquire() {
        if (free.empty()) {
            slots.emplace_back();
            return static_cast<int64_t>(slots.size()) - 1;
        }
        const int64_t slot = free.back();
        free.pop_back();
        return slot;
    }
    void release(int64_t slot) {
        State<W>& s = slots[slot];
        if (s.light.capacity() > 64) {  // keep small buffers for reuse, give large ones back
            std::vector<Key<W>>().swap(s.light);
            std::vector<Key<W>>().swap(s.heavy);
        }
        s.light.clear();
        s.heavy.clear();
        free.push_back(slot);
    }
};

// Merge state b into state a or a into b (whichever has fewer groups moves); returns the merged state's slot.
// a's i-th heaviest group is joined with b's i-th lightest: only the overlap of the non-empty ones.
template <typename W>
int64_t merge(GroupTable<W>& t, StatePool<W>& pool, int64_t ia, int64_t ib, int64_t k, std::vector<int64_t>& a_low,
              std::vector<int64_t>& b_low) {
    State<W>& a = pool.slots[ia];
    State<W>& b = pool.slots[ib];
    const int64_t overlap = std::max<int64_t>(0, a.size() + b.size() - k);
    a_low.clear();
    b_low.clear();
    for (int64_t j = 0; j < overlap; ++j) a_low.push_back(a.pop_lightest());
    for (int64_t j = 0; j < overlap; ++j) b_low.push_back(b.pop_lightest());
    const bool into_a = a.size() >= b.size();
    State<W>& big = into_a ? a : b;
    const State<W>& small = into_a ? b : a;
    for (const Key<W>& key : small.light) big.add(t, key.id);
    for (int64_t j = 0; j < overlap; ++j) big.add(t, t.join(a_low[overlap - 1 - j], b_low[j]));
    pool.release(into_a ? ib : ia);
    return into_a ? ia : ib;
}

template <typename W>
struct Entry {
    W spread;
    int64_t id;
    int64_t slot;
};

// std heap comparator: true when a is served after b (smaller spread, or equal spread and a newer id).
struct ServedLater {
    template <typename E>
    bool operator()(const E& a, const E& b) const {
        if (a.spread != b.spread) return a.spread < b.spread;
        return a.id > b.id;
    }
};

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

// Lightest first, then lowest index: the refinement's lightest group (its heaviest is HeavyAfter's order).
struct LighterAfter {
    template <typename K>
    bool operator()(const K& a, const K& b) const {
        if (a.sum != b.sum) return a.sum > b.sum;
        return a.id > b.id;
    }
};

// The top entry of a heap of (sum, group) whose sum is still the group's (stale entries are popped).
template <typename W, typename After>
int64_t current_top(std::vector<Key<W>>& heap, const std::vector<W>& sums, After after) {
    while (heap.front().sum != sums[heap.front().id]) {
        std::pop_heap(heap.begin(), heap.end(), after);
        heap.pop_back();
    }
    return heap.front().id;
}

template <typename W>
void refine(const W* w, Groups& groups, std::vector<W>& sums, bool allow_moves, int64_t max_rounds) {
    std::vector<Key<W>> heaviest, lightest;
    for (size_t g = 0; g < sums.size(); ++g) {
        heaviest.push_back({sums[g], static_cast<int64_t>(g)});
        lightest.push_back({sums[g], static_cast<int64_t>(g)});
    }
    std::make_heap(heaviest.begin(), heaviest.end(), HeavyAfter());
    std::make_heap(lightest.begin(), lightest.end(), LighterAfter());
    for (int64_t round = 0; round < max_rounds; ++round) {
        const int64_t heavy = current_top(heaviest, sums, HeavyAfter());
        const int64_t light = current_top(lightest, sums, LighterAfter());
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
        for (int64_t g : {heavy, light}) {
            heaviest.push_back({sums[g], g});
            std::push_heap(heaviest.begin(), heaviest.end(), HeavyAfter());
            lightest.push_back({sums[g], g});
            std::push_heap(lightest.begin(), lightest.end(), LighterAfter());
        }
    }
}

}  // namespace

template <typename W>
Groups kk_partition(const W* w, int64_t n, int64_t k, bool equal_size) {
    // Item links are int32 and k sizes the result: refuse k or n past int32 instead of trusting callers.
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
    GroupTable<W> t(w, n);
    StatePool<W> pool;
    // The initial states are served from a sorted list, the merged ones from a heap: the next state served is
    // the first of the two, exactly as from one heap of all (a merged state never goes back to the list).
    // An initial one-item state is its group, -1 - g, until it is served.
    std::vector<Entry<W>> initial, heap;
    if (equal_size) {
        std::vector<int64_t> order(n);
        std::iota(order.begin(), order.end(), 0);
        std::sort(order.begin(), order.end(), [w](int64_t a, int64_t b) {
            if (w[a] != w[b]) return w[a] < w[b];
            return a < b;
        });
        for (int64_t c = 0; c < n / k; ++c) {
            const int64_t slot = pool.acquire();
            for (int64_t j = 0; j < k; ++j) pool.slots[slot].add(t, order[c * k + j]);
            initial.push_back({pool.slots[slot].spread(t, k), c, slot});
        }
    } else {
        initial.reserve(n);
        for (int64_t i = 0; i < n; ++i) initial.push_back({k == 1 ? W(0) : w[i], i, -1 - i});
    }
    std::sort(initial.begin(), initial.end(), [](const Entry<W>& a, const Entry<W>& b) { return ServedLater()(b, a); });
    size_t next_initial = 0;
    auto serve = [&]() {
        int64_t slot;
        if (next_initial < initial.size() && (heap.empty() || ServedLater()(heap.front(), initial[next_initial]))) {
            slot = initial[next_initial++].slot;
        } else {
            std::pop_heap(heap.begin(), heap.end(), ServedLater());
            slot = heap.back().slot;
            heap.pop_back();
        }
        if (slot < 0) {
            const int64_t g = -1 - slot;
            slot = pool.acquire();
            pool.slots[slot].add(t, g);
        }
        return slot;
    };
    std::vector<int64_t> a_low, b_low;
    int64_t next_id = static_cast<int64_t>(initial.size());
    while (initial.size() - next_initial + heap.size() > 1) {
        const int64_t a = serve();
        const int64_t b = serve();
        const int64_t merged = merge(t, pool, a, b, k, a_low, b_low);
        heap.push_back({pool.slots[merged].spread(t, k), next_id++, merged});
        std::push_heap(heap.begin(), heap.end(), ServedLater());
    }
    const int64_t last_slot = heap.empty() ? initial.back().slot : heap.front().slot;
    std::vector<int64_t> ids;
    if (last_slot < 0) {
        ids.push_back(-1 - last_slot);
    } else {
        for (const Key<W>& key : pool.slots[last_slot].light) ids.push_back(key.id);
    }
    std::sort(ids.begin(), ids.end(), [&t](int64_t x, int64_t y) {
        if (t.sum(x) != t.sum(y)) return t.sum(x) > t.sum(y);
        return x < y;
    });
    std::vector<W> sums(k, W(0));
    for (size_t g = 0; g < ids.size(); ++g) {
        const auto& record = t.groups[ids[g]];
        sums[g] = record.sum;
        for (int32_t item = record.head;; item = t.next[item]) {
            groups[g].push_back(item);
            if (item == record.tail) break;
        }
    }
    pool = StatePool<W>();  // the refinement needs no states
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
