// Shared by every kernel: bf16 and FP8 types, and a block-wide sum.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>

// Sum of `value` over the block (blockDim.x a multiple of 32, at most 1024); every thread
// gets the result.
__device__ __forceinline__ float block_sum(float value) {
    __shared__ float partial[32];
    for (int offset = 16; offset > 0; offset /= 2) {
        value += __shfl_down_sync(0xffffffffu, value, offset);
    }
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) partial[warp] = value;
    __syncthreads();
    value = lane < blockDim.x / 32 ? partial[lane] : 0.f;
    if (warp == 0) {
        for (int offset = 16; offset > 0; offset /= 2) {
            value += __shfl_down_sync(0xffffffffu, value, offset);
        }
        if (lane == 0) partial[0] = value;
    }
    __syncthreads();
    const float total = partial[0];
    __syncthreads();
    return total;
}
