// Grouped GEMM over experts: y[r] = x[r] · W_eᵀ for every row r of expert e's segment
// [offsets[e], offsets[e+1]) of the expert-ordered batch (see moe_permute.cu). x is
// [rows, K]; W is [experts, N, K], each expert's weight as checkpoints store it ([out, in]);
// y is [rows, N] bf16 with f32 accumulation. A dense layer's linear is the one-expert case:
// the linear_* kernels run the same tiles over all rows, writing f32 as cuBLAS's linears do.
//
// Tensor cores through mma.sync, which sm_80 and sm_90 both run: 128×128 output tiles,
// 8 warps of 64×32, a 4-stage cp.async pipeline of 64-byte K slices (32 bf16 or 64 FP8
// values: one shared-memory geometry for both), XOR-swizzled so ldmatrix is conflict-free.
// The FP8 kernel (sm_89+) takes e4m3 activations with 1×128 scales and weights with
// 128×128 block scales, DeepSeek-V3's format: each 128-deep K block accumulates on its own
// and is added to the total times its two scales.
// The weight-only FP8 kernel (any architecture; A100 has no FP8 tensor cores) takes bf16
// activations and those e4m3 weights: each stage's 32-deep weight slice is dequantised in
// shared memory to bf16, bf16(w · scale) as dequant_fp8 makes it at load, so it computes
// what the bf16 kernel computes on dequantised weights, bit for bit, holding one byte per
// weight instead of two.
//
// Blocks: x = N tile, y = row tile over all experts (tile_start from moe_sort); blocks past
// the last tile return at once, so the grid can be sized without reading counts back.
#include "common.cuh"

namespace {

constexpr int BM = 128, BN = 128, SLICE = 64, STAGES = 4, THREADS = 256;
constexpr int TILE_BYTES = BM * SLICE;          // one operand's slice; BN == BM
constexpr int STAGE_BYTES = 2 * TILE_BYTES;     // x and W
constexpr int SCALE_BLOCK = 128;                // FP8 scale granularity, in K values and N rows
constexpr int W8_SLICE = SLICE / 2;             // a weight-only stage's e4m3 bytes per row

// What the operands are: both bf16, both e4m3 (scaled), or bf16 activations and e4m3
// weights dequantised in shared memory.
enum class Operands { Bf16, Fp8, Fp8Weights };

// Byte offset of 16-byte chunk `chunk` (0..3) of tile row `row`: chunks rotate with the row
// pair so that the 8 rows one ldmatrix reads fall in 8 different bank groups.
__device__ __forceinline__ int swizzle(int row, int chunk) {
    return row * SLICE + ((chunk ^ ((row >> 1) & 3)) << 4);
}

__device__ __forceinline__ void cp_async16(void* shared, const void* global, bool valid) {
    const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
    const int bytes = valid ? 16 : 0;  // 0 fills the chunk with zeros
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global),
                 "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* shared) {
    const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

template <bool FP8>
__device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                    unsigned b1) {
    if constexpr (FP8) {
#if __CUDA_ARCH__ >= 890
        asm volatile(
            "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, "
            "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
            "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// The expert whose row tiles hold tile `tile`: the last e with tile_start[e] <= tile.
__device__ __forceinline__ int expert_of_tile(const int* tile_start, int experts, int tile) {
    int lo = 0, hi = experts - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (tile_start[mid] <= tile) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// A stage's e4m3 weight slice (BN rows × 32 bytes, unswizzled) → bf16(w · scale) in `out`,
// laid out as a bf16 stage's W tile (BN rows × 64 bytes, swizzled) for ldmatrix.
__device__ __forceinline__ void dequantize_slice(const unsigned char* w8, unsigned char* out,
                                                 float scale) {
    const int row = threadIdx.x / 2, half = threadIdx.x % 2;  // 16 values a thread
    const uint4 packed = *reinterpret_cast<const uint4*>(w8 + row * W8_SLICE + half * 16);
    const unsigned char* bytes = reinterpret_cast<const unsigned char*>(&packed);
    __align__(16) __nv_bfloat16 values[16];
    for (int i = 0; i < 16; ++i) {
        __nv_fp8_e4m3 q;
        q.__x = bytes[i];
        values[i] = __float2bfloat16(float(q) * scale);
    }
    const uint4* chunks = reinterpret_cast<const uint4*>(values);
    *reinterpret_cast<uint4*>(out + swizzle(row, 2 * half)) = chunks[0];
    *reinterpret_cast<uint4*>(out + swizzle(row, 2 * half + 1)) = chunks[1];
}

// Two adjacent outputs, as bf16 (the experts') or f32 (a linear's).
__device__ __forceinline__ void store_pair(__nv_bfloat16* y, float a, float b) {
    *reinterpret_cast<__nv_bfloat162*>(y) = __floats2bfloat162_rn(a, b);
}
__device__ __forceinline__ void store_pair(float* y, float a, float b) {
    *reinterpret_cast<float2*>(y) = make_float2(a, b);
}

// A block's rows: those of expert e from row0, up to row_end (128 at most).
struct RowTile {
    int expert, row0, row_end;
};

// The row tile of grouped-GEMM block row `tile`; false past the last.
__device__ __forceinline__ bool grouped_row_tile(const int* offsets, const int* tile_start,
                                                 int experts, int tile, RowTile& out) {
    if (tile >= tile_start[experts]) return false;
    const int e = expert_of_tile(tile_start, experts, tile);
    out = {e, offsets[e] + (tile - tile_start[e]) * BM, offsets[e + 1]};
    return true;
}

// One block's 128×128 output tile: rows.row0.. of x times columns blockIdx.x × BN.. of
// expert rows.expert's W.
template <Operands OPS, typename Out>
__device__ __forceinline__ void gemm_tile(const unsigned char* __restrict__ x,
                                          const float* __restrict__ x_scale,
                                          const unsigned char* __restrict__ w,
                                          const float* __restrict__ w_scale,
                                          Out* __restrict__ y, RowTile rows, int n, int k) {
    constexpr bool FP8 = OPS == Operands::Fp8, W8 = OPS == Operands::Fp8Weights;
    extern __shared__ __align__(128) unsigned char shared[];
    const int e = rows.expert, row0 = rows.row0, row_end = rows.row_end;
    const int n0 = blockIdx.x * BN;
    const int row_bytes = FP8 ? k : 2 * k;  // of x, and of W but for W8
    const int w_row_bytes = FP8 || W8 ? k : 2 * k;
    const int slices = (row_bytes + SLICE - 1) / SLICE;
    const unsigned char* weight = w + (size_t)e * n * w_row_bytes;
    // W8: the bf16 W tile the MMAs read, past the stages.
    unsigned char* dequantized = shared + STAGES * STAGE_BYTES;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int warp_m = (warp / 4) * 64, warp_n = (warp % 4) * 32;

    auto load = [&](int slice, int stage) {
        unsigned char* tile_x = shared + stage * STAGE_BYTES;
        unsigned char* tile_w = tile_x + TILE_BYTES;
        for (int c = threadIdx.x; c < BM * 4; c += THREADS) {
            const int row = c / 4, chunk = c % 4;
            const int byte = slice * SLICE + chunk * 16;
            const bool in_k = byte < row_bytes;
            const bool x_ok = in_k && row0 + row < row_end;
            cp_async16(tile_x + swizzle(row, chunk),
                       x_ok ? x + (size_t)(row0 + row) * row_bytes + byte : x, x_ok);
            if constexpr (W8) {
                // The same 32 K values of W: 32 bytes a row, two chunks, unswizzled.
                if (chunk >= 2) continue;
                const int w_byte = slice * W8_SLICE + chunk * 16;
                const bool w_ok = w_byte < w_row_bytes && n0 + row < n;
                cp_async16(tile_w + row * W8_SLICE + chunk * 16,
                           w_ok ? weight + (size_t)(n0 + row) * w_row_bytes + w_byte : weight,
                           w_ok);
            } else {
                const bool w_ok = in_k && n0 + row < n;
                cp_async16(tile_w + swizzle(row, chunk),
                           w_ok ? weight + (size_t)(n0 + row) * row_bytes + byte : weight, w_ok);
            }
        }
    };

    float acc[4][4][4] = {};
    float part[FP8 ? 4 : 1][FP8 ? 4 : 1][4] = {};  // the current 128-deep K block (FP8)

    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < slices) load(s, s);
        cp_async_commit();
    }
    for (int slice = 0; slice < slices; ++slice) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        // The stage refilled here was read in the previous iteration, which every thread
        // has finished (the barrier above).
        if (slice + STAGES - 1 < slices) load(slice + STAGES - 1, (slice + STAGES - 1) % STAGES);
        cp_async_commit();

        const unsigned char* tile_x = shared + (slice % STAGES) * STAGE_BYTES;
        const unsigned char* tile_w = tile_x + TILE_BYTES;
        if constexpr (W8) {
            // Every thread has finished the last slice's MMAs (the barrier above).
            const int blocks_k = (k + SCALE_BLOCK - 1) / SCALE_BLOCK;
            const int blocks_n = (n + SCALE_BLOCK - 1) / SCALE_BLOCK;
            const int block_k = slice * (SLICE / 2) / SCALE_BLOCK;
            dequantize_slice(tile_w, dequantized,
                             w_scale[((size_t)e * blocks_n + n0 / SCALE_BLOCK) * blocks_k + block_k]);
            __syncthreads();
            tile_w = dequantized;
        }
        for (int half = 0; half < 2; ++half) {  // 32 bytes: one k16 (bf16) or k32 (FP8) step
            unsigned a[4][4], b[4][2];
            for (int mi = 0; mi < 4; ++mi) {
                const int row = warp_m + mi * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
                ldmatrix_x4(a[mi], tile_x + swizzle(row, 2 * half + lane / 16));
            }
            for (int nj = 0; nj < 2; ++nj) {
                const int row = warp_n + nj * 16 + (lane % 8) + (lane / 16) * 8;
                unsigned r[4];
                ldmatrix_x4(r, tile_w + swizzle(row, 2 * half + (lane / 8) % 2));
                b[2 * nj][0] = r[0];
                b[2 * nj][1] = r[1];
                b[2 * nj + 1][0] = r[2];
                b[2 * nj + 1][1] = r[3];
            }
            for (int mi = 0; mi < 4; ++mi) {
                for (int ni = 0; ni < 4; ++ni) {
                    if constexpr (FP8) {
                        mma<true>(part[mi][ni], a[mi], b[ni][0], b[ni][1]);
                    } else {
                        mma<false>(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
                    }
                }
            }
        }

        if constexpr (FP8) {
            const int block_k = slice * SLICE / SCALE_BLOCK;
            if ((slice + 1) * SLICE % SCALE_BLOCK == 0 || slice + 1 == slices) {
                const int blocks_k = (k + SCALE_BLOCK - 1) / SCALE_BLOCK;
                const int blocks_n = (n + SCALE_BLOCK - 1) / SCALE_BLOCK;
                const float ws = w_scale[((size_t)e * blocks_n + n0 / SCALE_BLOCK) * blocks_k + block_k];
                for (int mi = 0; mi < 4; ++mi) {
                    for (int h = 0; h < 2; ++h) {
                        const int row = row0 + warp_m + mi * 16 + lane / 4 + h * 8;
                        const float xs =
                            row < row_end ? x_scale[(size_t)row * blocks_k + block_k] * ws : 0.f;
                        for (int ni = 0; ni < 4; ++ni) {
                            acc[mi][ni][2 * h] += part[mi][ni][2 * h] * xs;
                            acc[mi][ni][2 * h + 1] += part[mi][ni][2 * h + 1] * xs;
                            part[mi][ni][2 * h] = part[mi][ni][2 * h + 1] = 0.f;
                        }
                    }
                }
            }
        }
    }
    cp_async_wait<0>();

    for (int mi = 0; mi < 4; ++mi) {
        for (int h = 0; h < 2; ++h) {
            const int row = row0 + warp_m + mi * 16 + lane / 4 + h * 8;
            if (row >= row_end) continue;
            for (int ni = 0; ni < 4; ++ni) {
                const int col = n0 + warp_n + ni * 8 + 2 * (lane % 4);
                if (col >= n) continue;  // n is even, so col + 1 < n too
                store_pair(y + (size_t)row * n + col, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
            }
        }
    }
}

}  // namespace

// Dynamic shared memory: GROUPED_GEMM_SHARED_BYTES (64 KiB, above the default 48 KiB cap:
// the host raises the kernel's limit). k is a multiple of 8 and n of 2.
extern "C" __global__ void __launch_bounds__(THREADS)
    grouped_gemm_bf16(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                      __nv_bfloat16* __restrict__ y, const int* __restrict__ offsets,
                      const int* __restrict__ tile_start, int experts, int n, int k) {
    RowTile rows;
    if (!grouped_row_tile(offsets, tile_start, experts, blockIdx.y, rows)) return;
    gemm_tile<Operands::Bf16>(reinterpret_cast<const unsigned char*>(x), nullptr,
                              reinterpret_cast<const unsigned char*>(w), nullptr, y, rows, n, k);
}

// x_scale is [rows, ⌈k/128⌉], w_scale [experts, ⌈n/128⌉, ⌈k/128⌉]; k is a multiple of 16.
// Compiled for every architecture, but it only computes on sm_89 and later: the host never
// launches it on sm_80 (A100 runs the weight-only kernel below).
extern "C" __global__ void __launch_bounds__(THREADS)
    grouped_gemm_fp8(const __nv_fp8_e4m3* __restrict__ x, const float* __restrict__ x_scale,
                     const __nv_fp8_e4m3* __restrict__ w, const float* __restrict__ w_scale,
                     __nv_bfloat16* __restrict__ y, const int* __restrict__ offsets,
                     const int* __restrict__ tile_start, int experts, int n, int k) {
#if __CUDA_ARCH__ >= 890
    RowTile rows;
    if (!grouped_row_tile(offsets, tile_start, experts, blockIdx.y, rows)) return;
    gemm_tile<Operands::Fp8>(reinterpret_cast<const unsigned char*>(x), x_scale,
                             reinterpret_cast<const unsigned char*>(w), w_scale, y, rows, n, k);
#endif
}

// x [rows, k] bf16; w [experts, n, k] e4m3 with w_scale [experts, ⌈n/128⌉, ⌈k/128⌉]. Dynamic
// shared memory: GROUPED_GEMM_W8_SHARED_BYTES (the stages and one dequantised W tile). k is
// a multiple of 16 and n of 2.
extern "C" __global__ void __launch_bounds__(THREADS)
    grouped_gemm_fp8_weights(const __nv_bfloat16* __restrict__ x,
                             const __nv_fp8_e4m3* __restrict__ w, const float* __restrict__ w_scale,
                             __nv_bfloat16* __restrict__ y, const int* __restrict__ offsets,
                             const int* __restrict__ tile_start, int experts, int n, int k) {
    RowTile rows;
    if (!grouped_row_tile(offsets, tile_start, experts, blockIdx.y, rows)) return;
    gemm_tile<Operands::Fp8Weights>(reinterpret_cast<const unsigned char*>(x), nullptr,
                                    reinterpret_cast<const unsigned char*>(w), w_scale, y, rows,
                                    n, k);
}

// A linear layer's y [rows, n] f32 = x [rows, k] · wᵀ, w [n, k] e4m3 with w_scale
// [⌈n/128⌉, ⌈k/128⌉]: grid (⌈n/128⌉, ⌈rows/128⌉). The FP8 form (sm_89+) takes x in e4m3 with
// x_scale [rows, ⌈k/128⌉]; the weight-only form (any architecture) takes x in bf16. Shared
// memory and the conditions on n and k as for the grouped kernels above.
extern "C" __global__ void __launch_bounds__(THREADS)
    linear_fp8(const __nv_fp8_e4m3* __restrict__ x, const float* __restrict__ x_scale,
               const __nv_fp8_e4m3* __restrict__ w, const float* __restrict__ w_scale,
               float* __restrict__ y, int rows, int n, int k) {
#if __CUDA_ARCH__ >= 890
    gemm_tile<Operands::Fp8>(reinterpret_cast<const unsigned char*>(x), x_scale,
                             reinterpret_cast<const unsigned char*>(w), w_scale, y,
                             RowTile{0, int(blockIdx.y) * BM, rows}, n, k);
#endif
}

extern "C" __global__ void __launch_bounds__(THREADS)
    linear_fp8_weights(const __nv_bfloat16* __restrict__ x, const __nv_fp8_e4m3* __restrict__ w,
                       const float* __restrict__ w_scale, float* __restrict__ y, int rows, int n,
                       int k) {
    gemm_tile<Operands::Fp8Weights>(reinterpret_cast<const unsigned char*>(x), nullptr,
                                    reinterpret_cast<const unsigned char*>(w), w_scale, y,
                                    RowTile{0, int(blockIdx.y) * BM, rows}, n, k);
}
