//! A linear layer's weight on the GPU, and y = x · Wᵀ through it: bf16 through cuBLAS, or an
//! FP8 checkpoint's e4m3 with its 128×128 block scales (one byte a weight) through the FP8
//! kernels of `grouped_gemm.cu`: FP8 tensor cores on sm_89 and later, x quantised with 1×128
//! scales as DeepSeek-V3 runs; elsewhere (A100) bf16 MMAs on weights dequantised in the kernel.

use cudarc::driver::CudaSlice;
use half::bf16;

use crate::error::Result;
use crate::gpu::experts::Fp8Weights;
use crate::gpu::runtime::Gpu;

pub(super) enum Linear {
    Bf16(CudaSlice<bf16>),
    Fp8(Fp8Weights),
}

impl Linear {
    /// y [rows, out] f32 = x [rows, inp] · Wᵀ.
    pub(super) fn apply(
        &self,
        gpu: &Gpu,
        x: &CudaSlice<bf16>,
        y: &mut CudaSlice<f32>,
        shape: (usize, usize, usize),
    ) -> Result<()> {
        match self {
            Linear::Bf16(w) => gpu.linear(x, w, y, shape),
            Linear::Fp8(w) => fp8_linear(gpu, w, x, y, shape),
        }
    }
}

/// y [rows, out] f32 = x [rows, inp] · Wᵀ for FP8 weights, in FP8 where the GPU can.
pub(super) fn fp8_linear(
    gpu: &Gpu,
    w: &Fp8Weights,
    x: &CudaSlice<bf16>,
    y: &mut CudaSlice<f32>,
    (rows, out, inp): (usize, usize, usize),
) -> Result<()> {
    let x = gpu.fp8_activations(x, (rows, inp))?;
    gpu.linear_fp8(x.input(), (&w.q, &w.scale), y, (rows, out, inp))
}
