// Token permutation around the grouped expert GEMM. `moe_sort` orders the (token, k) pairs
// by expert; `moe_permute` gathers each pair's token row into that order (as bf16, or as
// FP8 with 1×128 scales); `moe_unpermute` adds each token's expert outputs back, weighted by
// its gates in k order, so a token's sum does not depend on the batch.
#include "common.cuh"

constexpr int GEMM_ROWS = 128;  // BM of grouped_gemm.cu
constexpr float FP8_MAX = 448.f;

// From `experts` ([pairs] = [tokens × topk]) builds, in one block:
//   offsets[e]    first row of expert e in the expert-ordered batch; offsets[experts] = pairs
//   tile_start[e] GEMM row tiles before expert e; tile_start[experts] = all tiles
//   source[row]   the token whose input that row is
//   row_of[pair]  where pair's output lands
// Rows within an expert are in no particular order; every row is computed on its own, so
// the results do not depend on it. Dynamic shared memory: 2 × experts ints.
extern "C" __global__ void moe_sort(const int* __restrict__ experts_of, int pairs, int topk,
                                    int experts, int* __restrict__ offsets,
                                    int* __restrict__ tile_start, int* __restrict__ source,
                                    int* __restrict__ row_of) {
    extern __shared__ int counts[];
    int* cursor = counts + experts;
    for (int e = threadIdx.x; e < experts; e += blockDim.x) counts[e] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) atomicAdd(&counts[experts_of[p]], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        int row = 0, tiles = 0;
        for (int e = 0; e < experts; ++e) {
            offsets[e] = row;
            tile_start[e] = tiles;
            cursor[e] = row;
            row += counts[e];
            tiles += (counts[e] + GEMM_ROWS - 1) / GEMM_ROWS;
        }
        offsets[experts] = row;
        tile_start[experts] = tiles;
    }
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int row = atomicAdd(&cursor[experts_of[p]], 1);
        source[row] = p / topk;
        row_of[p] = row;
    }
}

// out[r] = bf16(x[source[r]]); one block per row, four values per thread and step
// (hidden is a multiple of 4).
extern "C" __global__ void moe_permute(const float* __restrict__ x, const int* __restrict__ source,
                                       __nv_bfloat16* __restrict__ out, int hidden) {
    const float4* from = reinterpret_cast<const float4*>(x + (size_t)source[blockIdx.x] * hidden);
    __nv_bfloat162* to = reinterpret_cast<__nv_bfloat162*>(out + (size_t)blockIdx.x * hidden);
    for (int i = threadIdx.x; i < hidden / 4; i += blockDim.x) {
        const float4 v = from[i];
        to[2 * i] = __floats2bfloat162_rn(v.x, v.y);
        to[2 * i + 1] = __floats2bfloat162_rn(v.z, v.w);
    }
}

// Quantises one row to FP8 e4m3 the way DeepSeek-V3 runs its activations: each 128-wide
// group gets scale = max|x| / 448, stored in scale[group]. A block of 128 threads.
template <typename Load>
__device__ __forceinline__ void quantize_row(Load load, __nv_fp8_e4m3* __restrict__ to,
                                             float* __restrict__ scale, int hidden) {
    const int groups = (hidden + 127) / 128;
    for (int g = 0; g < groups; ++g) {
        const int i = g * 128 + threadIdx.x;
        const float v = i < hidden ? load(i) : 0.f;
        const float amax = block_reduce(fabsf(v), Max{}, 0.f);
        const float s = amax > 0.f ? amax / FP8_MAX : 1.f;
        if (i < hidden) to[i] = __nv_fp8_e4m3(v / s);
        if (threadIdx.x == 0) scale[g] = s;
    }
}

// The permute gather, quantised: out[r] = fp8(x[source[r]]) with scale [rows, ⌈hidden/128⌉].
extern "C" __global__ void moe_permute_fp8(const float* __restrict__ x,
                                           const int* __restrict__ source,
                                           __nv_fp8_e4m3* __restrict__ out,
                                           float* __restrict__ scale, int hidden) {
    const float* from = x + (size_t)source[blockIdx.x] * hidden;
    quantize_row([&](int i) { return from[i]; }, out + (size_t)blockIdx.x * hidden,
                 scale + (size_t)blockIdx.x * ((hidden + 127) / 128), hidden);
}

// bf16 rows (the experts' SiLU output) quantised the same way, for the FP8 down projection.
extern "C" __global__ void quantize_fp8(const __nv_bfloat16* __restrict__ x,
                                        __nv_fp8_e4m3* __restrict__ out,
                                        float* __restrict__ scale, int hidden) {
    const __nv_bfloat16* from = x + (size_t)blockIdx.x * hidden;
    quantize_row([&](int i) { return __bfloat162float(from[i]); },
                 out + (size_t)blockIdx.x * hidden,
                 scale + (size_t)blockIdx.x * ((hidden + 127) / 128), hidden);
}

// y[t] = Σ_k weight[t·topk + k] · expert_out[row_of[t·topk + k]]; one block per token, four
// values per thread and step (hidden is a multiple of 4).
extern "C" __global__ void moe_unpermute(const __nv_bfloat16* __restrict__ expert_out,
                                         const int* __restrict__ row_of,
                                         const float* __restrict__ weight,
                                         float* __restrict__ y, int topk, int hidden) {
    const int t = blockIdx.x;
    float4* out = reinterpret_cast<float4*>(y + (size_t)t * hidden);
    for (int i = threadIdx.x; i < hidden / 4; i += blockDim.x) {
        float4 sum = {0.f, 0.f, 0.f, 0.f};
        for (int k = 0; k < topk; ++k) {
            const float w = weight[t * topk + k];
            const __nv_bfloat162* in = reinterpret_cast<const __nv_bfloat162*>(
                expert_out + (size_t)row_of[t * topk + k] * hidden);
            const float2 lo = __bfloat1622float2(in[2 * i]), hi = __bfloat1622float2(in[2 * i + 1]);
            sum.x += w * lo.x;
            sum.y += w * lo.y;
            sum.z += w * hi.x;
            sum.w += w * hi.y;
        }
        out[i] = sum;
    }
}
