// The small steps between the big kernels of a forward pass.
#include "common.cuh"

// out[r] = f32(table[ids[r]]); one block per row.
extern "C" __global__ void embedding(const __nv_bfloat16* __restrict__ table,
                                     const int* __restrict__ ids, float* __restrict__ out,
                                     int hidden) {
    const __nv_bfloat16* from = table + (size_t)ids[blockIdx.x] * hidden;
    float* to = out + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) to[i] = __bfloat162float(from[i]);
}

// x += y (the residual stream).
extern "C" __global__ void add(float* __restrict__ x, const float* __restrict__ y, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        x[i] += y[i];
    }
}

// y = bf16(x): activations into a tensor-core GEMM.
extern "C" __global__ void to_bf16(const float* __restrict__ x, __nv_bfloat16* __restrict__ y,
                                   size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        y[i] = __float2bfloat16(x[i]);
    }
}

// Row r's latent and roped key into cache slot slots[r] (block · 16 + offset), as bf16;
// one block per row.
extern "C" __global__ void kv_write(const float* __restrict__ c_kv, const float* __restrict__ k_pe,
                                    const int* __restrict__ slots,
                                    __nv_bfloat16* __restrict__ cache_c,
                                    __nv_bfloat16* __restrict__ cache_pe, int rank, int rope) {
    const size_t slot = slots[blockIdx.x];
    for (int i = threadIdx.x; i < rank; i += blockDim.x) {
        cache_c[slot * rank + i] = __float2bfloat16(c_kv[(size_t)blockIdx.x * rank + i]);
    }
    for (int i = threadIdx.x; i < rope; i += blockDim.x) {
        cache_pe[slot * rope + i] = __float2bfloat16(k_pe[(size_t)blockIdx.x * rope + i]);
    }
}
