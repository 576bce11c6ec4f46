// Next-token sampling on the GPU, one block per row of logits, with the CPU sampler's
// semantics: greedy at temperature 0 (lowest index on ties); otherwise probabilities
// p ∝ exp(logit / T), cut by top-k, top-p and min-p, and the token where `uniform` (drawn by
// the host from the request's seeded generator) falls when the survivors are walked from
// most to least likely. Nothing is sorted: every cut and the walk itself are bisections over
// the probability's f32 bit pattern (ordered like the values, as all are ≥ 0), each step one
// pass over the row. Ties at a cut are all kept, where the CPU keeps them in index order up
// to the cut: the two differ only when a cut falls inside a run of equal probabilities.
//
// Penalties are applied to the logits before this kernel (they need the token history).
#include "common.cuh"

namespace {

constexpr int THREADS = 1024;
using Bits = unsigned long long;
constexpr Bits ONE = 0x3ff0000000000000ull;  // bits of 1.0, the largest p (p_max = exp(0))

__device__ __forceinline__ double value_of(Bits bits) { return __longlong_as_double((long long)bits); }

// Σ p over p ≥ threshold (and count), over the block's row.
__device__ double sum_at_least(const double* p, int vocab, double threshold) {
    double sum = 0.0;
    for (int i = threadIdx.x; i < vocab; i += THREADS) sum += p[i] >= threshold ? p[i] : 0.0;
    return block_sum(sum);
}
__device__ int count_at_least(const double* p, int vocab, double threshold) {
    int count = 0;
    for (int i = threadIdx.x; i < vocab; i += THREADS) count += p[i] >= threshold;
    return block_sum(count);
}

// The largest bit pattern b in [lo, ONE] with keep(b) true, given keep(lo) is true and
// keep is monotone (true up to some b, false after).
template <typename Keep>
__device__ Bits largest_kept(Bits lo, Keep keep) {
    Bits hi = ONE;
    while (lo < hi) {
        const Bits mid = lo + (hi - lo + 1) / 2;
        if (keep(mid)) lo = mid; else hi = mid - 1;
    }
    return lo;
}

}  // namespace

// logits [rows, vocab]; probs [rows, vocab] (f64) is scratch. Per row: temperature, top_k (0: all),
// top_p (1: all), min_p (0: none), uniform in [0, 1). tokens [rows] receives the choice.
extern "C" __global__ void __launch_bounds__(THREADS)
    sample(const float* __restrict__ logits, double* __restrict__ probs, int vocab,
           const float* __restrict__ temperature, const int* __restrict__ top_k,
           const float* __restrict__ top_p, const float* __restrict__ min_p,
           const double* __restrict__ uniform, int* __restrict__ tokens) {
    const int r = blockIdx.x;
    const float* row = logits + (size_t)r * vocab;
    double* p = probs + (size_t)r * vocab;

    Best best{-INFINITY, 0x7fffffff};
    for (int i = threadIdx.x; i < vocab; i += THREADS) best = BestOp{}(best, Best{row[i], i});
    best = block_best(best);
    const float t = temperature[r];
    if (t == 0.f) {
        if (threadIdx.x == 0) tokens[r] = best.index;
        return;
    }
    const double top = (double)best.value / t;
    for (int i = threadIdx.x; i < vocab; i += THREADS) p[i] = exp((double)row[i] / t - top);
    __syncthreads();
    const double total = sum_at_least(p, vocab, 0.0);

    // The cut: keep p ≥ bits_to_float(cut).
    Bits cut = 0;
    const int k = top_k[r];
    if (k > 0 && k < vocab) {
        cut = largest_kept(cut, [&](Bits b) { return count_at_least(p, vocab, value_of(b)) >= k; });
    }
    const float nucleus = top_p[r];
    if (nucleus < 1.f) {
        const double wanted = (double)nucleus * total;
        cut = largest_kept(cut, [&](Bits b) { return sum_at_least(p, vocab, value_of(b)) >= wanted; });
    }
    const float floor = min_p[r];  // relative to the most likely token, whose p is 1
    if (floor > 0.f) cut = max(cut, (Bits)__double_as_longlong((double)floor));

    // The walk: the token whose run of cumulative probability (most likely first) holds
    // target. `at` is the largest value v whose survivors p ≥ v already sum past target.
    const double kept_from = value_of(cut);
    const double target = uniform[r] * sum_at_least(p, vocab, kept_from);
    const Bits at = largest_kept(cut, [&](Bits b) { return sum_at_least(p, vocab, value_of(b)) > target; });
    const double v = value_of(at);
    const double before = at < ONE ? sum_at_least(p, vocab, value_of(at + 1)) : 0.0;
    // Within a run of equal probabilities, the CPU walks in index order.
    const int skip = v > 0.0 ? (int)((target - before) / v) : 0;
    int from = -1;
    for (int n = 0; n <= skip; ++n) {
        Best first{-INFINITY, 0x7fffffff};
        for (int i = threadIdx.x; i < vocab; i += THREADS) {
            if (p[i] == v && i > from) first = BestOp{}(first, Best{0.f, i});
        }
        first = block_best(first);
        if (first.index == 0x7fffffff) break;  // rounding ran past the run: keep its last
        from = first.index;
    }
    if (threadIdx.x == 0) tokens[r] = from;
}
