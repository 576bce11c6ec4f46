// Token permutation around the grouped expert GEMM. The host sorts (token, k) pairs by
// expert; `moe_permute` gathers each pair's token row into expert order, and
// `moe_unpermute` adds each token's expert outputs back, weighted by its gates, in k order
// (so a token's sum does not depend on the batch).
#include "common.cuh"

// out[r] = x[source[r]] for every row r of the expert-ordered batch; one block per row.
extern "C" __global__ void moe_permute(const float* __restrict__ x, const int* __restrict__ source,
                                       float* __restrict__ out, int hidden) {
    const float* from = x + (size_t)source[blockIdx.x] * hidden;
    float* to = out + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) to[i] = from[i];
}

// y[t] = Σ_k weight[t·topk + k] · expert_out[row[t·topk + k]]; one block per token.
extern "C" __global__ void moe_unpermute(const float* __restrict__ expert_out,
                                         const int* __restrict__ row,
                                         const float* __restrict__ weight,
                                         float* __restrict__ y, int topk, int hidden) {
    const int t = blockIdx.x;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float sum = 0.f;
        for (int k = 0; k < topk; ++k) {
            sum += weight[t * topk + k] * expert_out[(size_t)row[t * topk + k] * hidden + i];
        }
        y[(size_t)t * hidden + i] = sum;
    }
}
