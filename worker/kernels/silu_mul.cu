// SwiGLU's middle on the output of a fused gate-and-up GEMM: each row of gate_up is
// [gate (width) | up (width)], and h = silu(gate) · up = gate / (1 + e^−gate) · up.
#include "common.cuh"

extern "C" __global__ void silu_mul(const __nv_bfloat16* __restrict__ gate_up,
                                    __nv_bfloat16* __restrict__ h, int rows, int width) {
    const size_t total = (size_t)rows * width;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t row = i / width, col = i % width;
        const float g = __bfloat162float(gate_up[row * 2 * width + col]);
        const float u = __bfloat162float(gate_up[row * 2 * width + width + col]);
        h[i] = __float2bfloat16(g / (1.f + expf(-g)) * u);
    }
}
