// SwiGLU's middle: h = silu(gate) · up = gate / (1 + e^−gate) · up, row by row. gate and up
// rows are `stride` apart: the halves of a fused gate-and-up GEMM's output (up = gate +
// width, stride = 2 × width), or two separate outputs (stride = width).
#include "common.cuh"

extern "C" __global__ void silu_mul(const __nv_bfloat16* __restrict__ gate,
                                    const __nv_bfloat16* __restrict__ up, int stride,
                                    __nv_bfloat16* __restrict__ h, int rows, int width) {
    const size_t total = (size_t)rows * width;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t at = i / width * stride + i % width;
        const float g = __bfloat162float(gate[at]);
        const float u = __bfloat162float(up[at]);
        h[i] = __float2bfloat16(g / (1.f + expf(-g)) * u);
    }
}
