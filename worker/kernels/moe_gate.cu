// The MoE router's choice, one block per token, exactly as the CPU path's `route`: scores
// from the router logits (sigmoid or softmax), the correction bias for choosing only,
// group-limited selection (V3: groups ranked by their two best choice scores, others masked
// with −∞; V2: by their best, masked with 0), top-k with ties to the lower index, then the
// chosen experts' unbiased scores, normalised (V3) and scaled.
#include "common.cuh"

enum Scoring { SIGMOID = 0, SOFTMAX = 1 };
enum Method { NOAUX_TC = 0, GROUP_LIMITED_GREEDY = 1, GREEDY = 2 };

// Dynamic shared memory: 2 × experts floats + experts bytes.
extern "C" __global__ void moe_gate(const float* __restrict__ logits,
                                    const float* __restrict__ bias, int has_bias,
                                    int* __restrict__ experts_out, float* __restrict__ weights_out,
                                    int experts, int scoring, int method, int n_group,
                                    int topk_group, int topk, int normalize, float scale) {
    extern __shared__ float shared[];
    float* score = shared;
    float* choice = shared + experts;
    bool* taken = reinterpret_cast<bool*>(shared + 2 * experts);
    const float* row = logits + (size_t)blockIdx.x * experts;

    // exp in double and sums in index order, as the CPU computes them: a last-bit difference
    // in a score could flip a near-tied choice.
    float local_max = -INFINITY;
    for (int e = threadIdx.x; e < experts; e += blockDim.x) local_max = fmaxf(local_max, row[e]);
    const float max = scoring == SOFTMAX ? block_reduce(local_max, Max{}, -INFINITY) : 0.f;
    for (int e = threadIdx.x; e < experts; e += blockDim.x) {
        score[e] = scoring == SOFTMAX ? (float)exp((double)(row[e] - max))
                                      : 1.f / (1.f + (float)exp(-(double)row[e]));
    }
    __syncthreads();
    __shared__ float sum;
    if (threadIdx.x == 0) {
        float total = 0.f;
        for (int e = 0; e < experts; ++e) total += score[e];
        sum = total;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < experts; e += blockDim.x) {
        if (scoring == SOFTMAX) score[e] /= sum;
        choice[e] = score[e] + (has_bias ? bias[e] : 0.f);
        taken[e] = false;
    }
    __syncthreads();

    if (method != GREEDY && n_group > 1) {
        // A handful of groups: one thread ranks them.
        if (threadIdx.x == 0) {
            const int per_group = experts / n_group;
            float group_score[32];
            bool kept[32];
            for (int g = 0; g < n_group; ++g) {
                float first = -INFINITY, second = -INFINITY;
                for (int e = g * per_group; e < (g + 1) * per_group; ++e) {
                    const float c = choice[e];
                    if (c > first) {
                        second = first;
                        first = c;
                    } else if (c > second) {
                        second = c;
                    }
                }
                // a one-expert group's "two best" is that expert
                group_score[g] = method == NOAUX_TC ? first + (per_group > 1 ? second : 0.f) : first;
                kept[g] = false;
            }
            for (int pick = 0; pick < topk_group; ++pick) {
                int best = -1;
                for (int g = 0; g < n_group; ++g) {
                    if (!kept[g] && (best < 0 || group_score[g] > group_score[best])) best = g;
                }
                kept[best] = true;
            }
            const float masked = method == NOAUX_TC ? -INFINITY : 0.f;
            for (int e = 0; e < experts; ++e) {
                if (!kept[e / per_group]) choice[e] = masked;
            }
        }
        __syncthreads();
    }

    float picked_sum = 0.f;
    int* chosen = experts_out + (size_t)blockIdx.x * topk;
    __shared__ int picked;
    for (int k = 0; k < topk; ++k) {
        Best best{-INFINITY, 0x7fffffff};
        for (int e = threadIdx.x; e < experts; e += blockDim.x) {
            if (!taken[e]) best = BestOp{}(best, Best{choice[e], e});
        }
        best = block_best(best);
        if (threadIdx.x == 0) {
            // Only NaN scores left (a broken checkpoint) leave no best: take the lowest
            // untaken expert rather than an index out of range.
            int e = best.index;
            if (e >= experts) {
                for (e = 0; taken[e]; ++e) {
                }
            }
            taken[e] = true;
            chosen[k] = e;
            picked = e;
        }
        __syncthreads();
        picked_sum += score[picked];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        const float norm = normalize ? picked_sum + 1e-20f : 1.f;
        for (int k = 0; k < topk; ++k) {
            weights_out[(size_t)blockIdx.x * topk + k] = score[chosen[k]] / norm * scale;
        }
    }
}
