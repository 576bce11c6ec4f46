// Shared by every kernel: bf16 and FP8 types, and block-wide reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>

// NVRTC has no <cmath>.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

struct Sum {
    template <typename T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct Max {
    template <typename T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T value, Op op) {
    for (int offset = 16; offset > 0; offset /= 2) {
        value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
    }
    return value;
}

// `op` over `value` of every thread of the block (blockDim.x a multiple of 32, at most
// 1024); every thread gets the result. `identity` fills the unused warp slots.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T value, Op op, T identity) {
    __shared__ T partial[32];
    value = warp_reduce(value, op);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) partial[warp] = value;
    __syncthreads();
    value = lane < blockDim.x / 32 ? partial[lane] : identity;
    value = warp_reduce(value, op);
    __syncthreads();  // `partial` is free again for the next reduction
    return value;
}

template <typename T>
__device__ __forceinline__ T block_sum(T value) {
    return block_reduce(value, Sum{}, T(0));
}

// The largest value and its index; the lower index wins ties, as the CPU path's top-k and
// argmax do, and NaN loses to any number (so the result never depends on the reduction
// order). Packed so one reduction carries both.
struct Best {
    float value;
    int index;
};
struct BestOp {
    __device__ __forceinline__ Best operator()(Best a, Best b) const {
        const bool a_nan = isnan(a.value), b_nan = isnan(b.value);
        if (a_nan != b_nan) return a_nan ? b : a;
        return (a.value > b.value || (a.value == b.value && a.index < b.index) ||
                (a_nan && a.index < b.index)) ? a : b;
    }
};
__device__ __forceinline__ Best shfl_xor(Best b, int offset) {
    return {__shfl_xor_sync(0xffffffffu, b.value, offset),
            __shfl_xor_sync(0xffffffffu, b.index, offset)};
}
__device__ __forceinline__ Best block_best(Best best) {
    __shared__ Best partial[32];
    for (int offset = 16; offset > 0; offset /= 2) best = BestOp{}(best, shfl_xor(best, offset));
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) partial[warp] = best;
    __syncthreads();
    best = lane < blockDim.x / 32 ? partial[lane] : Best{-INFINITY, 0x7fffffff};
    for (int offset = 16; offset > 0; offset /= 2) best = BestOp{}(best, shfl_xor(best, offset));
    __syncthreads();
    return best;
}
