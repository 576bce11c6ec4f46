// FP8 weights to bf16, as the numerics contract reads them:
// w = fp8_to_f32(q) · scale_inv[i / 128][j / 128], rounded to bf16. grouped_gemm_fp8_weights
// makes the same values tile by tile; gpu-check holds it to this.
#include "common.cuh"

// q and out are `matrices` stacked [rows, cols] matrices (one per expert, say); scale_inv is
// [matrices, ⌈rows/128⌉, ⌈cols/128⌉].
extern "C" __global__ void dequant_fp8(const __nv_fp8_e4m3* __restrict__ q,
                                       const float* __restrict__ scale_inv,
                                       __nv_bfloat16* __restrict__ out, int matrices, int rows,
                                       int cols) {
    const int block_rows = (rows + 127) / 128, block_cols = (cols + 127) / 128;
    const size_t per_matrix = (size_t)rows * cols, total = per_matrix * matrices;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t m = i / per_matrix, within = i % per_matrix;
        const int r = within / cols, c = within % cols;
        const float s = scale_inv[(m * block_rows + r / 128) * block_cols + c / 128];
        out[i] = __float2bfloat16(float(q[i]) * s);
    }
}
