// MLA decode attention in the absorbed form, over the paged latent cache. The query's
// no-rope part arrives already multiplied into latent space (q_lat = q_nope · W_UK, width
// kv_lora_rank), so keys and values are the cached latents themselves:
//   s_j = scale · (q_lat · c_kv[j] + q_pe · k_pe[j]),  out = Σ_j softmax(s)_j · c_kv[j]
// and W_UV is applied to `out` afterwards. The cache is bf16 blocks of 16 positions,
// [blocks, 16, rank] and [blocks, 16, rope]; query row s reads block table row
// s · table_stride and sees its first lengths[s] positions. Prompt rows use the same kernel:
// the rows of one sequence share its table (stride 0), each seeing up to its own position.
//
// One block of 4 warps per (row, head): rows on the grid's x, which has room for any prompt. Warps take positions round-robin, each with
// its own running max and sum (online softmax); a lane holds 2 of every 64 latent dims;
// the warps' partial results are merged at the end.
#include "common.cuh"

namespace {
constexpr int WARPS = 4, BLOCK_TOKENS = 16;
constexpr int MAX_RANK = 512, MAX_ROPE = 128;  // DeepSeek-V2/V3: 512 and 64
constexpr int RANK_STEPS = MAX_RANK / 64, ROPE_STEPS = MAX_ROPE / 64;
}  // namespace

// Static shared memory: WARPS × MAX_RANK floats. rank and rope are even.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
    mla_decode(const float* __restrict__ q_lat, const float* __restrict__ q_pe,
               const __nv_bfloat16* __restrict__ c_kv, const __nv_bfloat16* __restrict__ k_pe,
               const int* __restrict__ block_table, int table_stride,
               const int* __restrict__ lengths, float* __restrict__ out, int heads, int rank,
               int rope, float scale) {
    const int seq = blockIdx.x, head = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const size_t query = (size_t)seq * heads + head;
    const int length = lengths[seq];
    const int* blocks = block_table + (size_t)seq * table_stride;

    float2 ql[RANK_STEPS], qp[ROPE_STEPS], acc[RANK_STEPS];
    for (int t = 0; t < RANK_STEPS; ++t) {
        const int d = 2 * lane + 64 * t;
        ql[t] = d < rank ? make_float2(q_lat[query * rank + d], q_lat[query * rank + d + 1])
                         : make_float2(0.f, 0.f);
        acc[t] = make_float2(0.f, 0.f);
    }
    for (int t = 0; t < ROPE_STEPS; ++t) {
        const int d = 2 * lane + 64 * t;
        qp[t] = d < rope ? make_float2(q_pe[query * rope + d], q_pe[query * rope + d + 1])
                         : make_float2(0.f, 0.f);
    }

    float running_max = -INFINITY, running_sum = 0.f;
    for (int j = warp; j < length; j += WARPS) {
        const size_t slot = (size_t)blocks[j / BLOCK_TOKENS] * BLOCK_TOKENS + j % BLOCK_TOKENS;
        const __nv_bfloat162* c = reinterpret_cast<const __nv_bfloat162*>(c_kv + slot * rank);
        const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(k_pe + slot * rope);
        float2 cv[RANK_STEPS];
        float dot = 0.f;
        for (int t = 0; t < RANK_STEPS; ++t) {
            const int d = 2 * lane + 64 * t;
            cv[t] = d < rank ? __bfloat1622float2(c[d / 2]) : make_float2(0.f, 0.f);
            dot += ql[t].x * cv[t].x + ql[t].y * cv[t].y;
        }
        for (int t = 0; t < ROPE_STEPS; ++t) {
            const int d = 2 * lane + 64 * t;
            if (d < rope) {
                const float2 pv = __bfloat1622float2(p[d / 2]);
                dot += qp[t].x * pv.x + qp[t].y * pv.y;
            }
        }
        const float s = warp_reduce(dot, Sum{}) * scale;
        const float new_max = fmaxf(running_max, s);
        const float correction = expf(running_max - new_max), weight = expf(s - new_max);
        running_sum = running_sum * correction + weight;
        for (int t = 0; t < RANK_STEPS; ++t) {
            acc[t].x = acc[t].x * correction + weight * cv[t].x;
            acc[t].y = acc[t].y * correction + weight * cv[t].y;
        }
        running_max = new_max;
    }

    __shared__ float warp_acc[WARPS][MAX_RANK];
    __shared__ float warp_max[WARPS], warp_sum[WARPS];
    for (int t = 0; t < RANK_STEPS; ++t) {
        const int d = 2 * lane + 64 * t;
        if (d < rank) {
            warp_acc[warp][d] = acc[t].x;
            warp_acc[warp][d + 1] = acc[t].y;
        }
    }
    if (lane == 0) {
        warp_max[warp] = running_max;
        warp_sum[warp] = running_sum;
    }
    __syncthreads();
    float total_max = -INFINITY;
    for (int w = 0; w < WARPS; ++w) total_max = fmaxf(total_max, warp_max[w]);
    float factor[WARPS], total = 0.f;
    for (int w = 0; w < WARPS; ++w) {
        // a warp that saw no position has max −∞ and contributes nothing
        factor[w] = warp_sum[w] > 0.f ? expf(warp_max[w] - total_max) : 0.f;
        total += warp_sum[w] * factor[w];
    }
    const float inverse = total > 0.f ? 1.f / total : 0.f;  // an empty sequence gives zeros
    for (int d = threadIdx.x; d < rank; d += blockDim.x) {
        float sum = 0.f;
        for (int w = 0; w < WARPS; ++w) sum += warp_acc[w][d] * factor[w];
        out[query * rank + d] = sum * inverse;
    }
}
