// RMSNorm, one block per row: y = x / sqrt(mean(x²) + eps) · weight. Activations f32,
// weights bf16 as the checkpoints store them. Rows of x are x_stride apart (a row can be the
// first cols of a wider one, as MLA's latent is of kv_a_proj's output); y is dense.
#include "common.cuh"

extern "C" __global__ void rms_norm(const float* __restrict__ x, int x_stride,
                                    const __nv_bfloat16* __restrict__ weight,
                                    float* __restrict__ y, int cols, float eps) {
    const float* row = x + (size_t)blockIdx.x * x_stride;
    float* out = y + (size_t)blockIdx.x * cols;
    float squares = 0.f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) squares += row[i] * row[i];
    const float root = sqrtf(block_sum(squares) / cols + eps);  // divided by, as the CPU does
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        out[i] = row[i] / root * __bfloat162float(weight[i]);
    }
}
