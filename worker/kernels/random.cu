// Random tensors made on the GPU, for checks and benchmarks at full model shapes (a V3
// layer's experts are 11 GB in bf16: too much to make on the host and copy). Values are a
// hash of (seed, index), uniform in [−scale, scale).
#include "common.cuh"

__device__ __forceinline__ float uniform(unsigned long long seed, size_t i) {
    unsigned long long z = seed + 0x9e3779b97f4a7c15ull * (i + 1);  // splitmix64
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (float)(z >> 40) / (float)(1 << 24) * 2.f - 1.f;
}

extern "C" __global__ void fill_random_bf16(__nv_bfloat16* out, size_t n, unsigned long long seed,
                                            float scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        out[i] = __float2bfloat16(uniform(seed, i) * scale);
    }
}

extern "C" __global__ void fill_random_f32(float* out, size_t n, unsigned long long seed,
                                           float scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        out[i] = uniform(seed, i) * scale;
    }
}

extern "C" __global__ void fill_random_fp8(__nv_fp8_e4m3* out, size_t n, unsigned long long seed,
                                           float scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        out[i] = __nv_fp8_e4m3(uniform(seed, i) * scale);
    }
}
