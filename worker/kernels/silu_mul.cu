// SwiGLU's middle: h = silu(gate) · up = gate / (1 + e^−gate) · up, elementwise.
#include "common.cuh"

extern "C" __global__ void silu_mul(const float* __restrict__ gate, const float* __restrict__ up,
                                    float* __restrict__ h, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float g = gate[i];
        h[i] = g / (1.f + __expf(-g)) * up[i];
    }
}
