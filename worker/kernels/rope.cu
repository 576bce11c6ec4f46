// Rotary embedding of MLA's decoupled dims, YaRN included: `cos`/`sin` ([tokens, dim/2])
// carry the per-position angles already scaled by the attention factor. Input pairs are
// interleaved as the checkpoints store them, (x0, x1), (x2, x3), …; the output is
// half-split (all first elements, then all second ones), for queries and keys alike.
// Input (token, head) rows are x_stride apart (the roped part of a wider row: q's last
// dims, kv_a_proj's); the output is dense [tokens, heads, dim].
#include "common.cuh"

extern "C" __global__ void rope(const float* __restrict__ x, int x_stride, const float* __restrict__ cos,
                                const float* __restrict__ sin, float* __restrict__ y,
                                int tokens, int heads, int dim) {
    const int half = dim / 2;
    const size_t total = (size_t)tokens * heads * half;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const int pair = i % half;
        const size_t row = i / half;  // token × heads + head
        const int token = row / heads;
        const float even = x[row * x_stride + 2 * pair], odd = x[row * x_stride + 2 * pair + 1];
        const float c = cos[(size_t)token * half + pair], s = sin[(size_t)token * half + pair];
        y[row * dim + pair] = even * c - odd * s;
        y[row * dim + half + pair] = odd * c + even * s;
    }
}
