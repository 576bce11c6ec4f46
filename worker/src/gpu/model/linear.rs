//! A linear layer's weight on the GPU, and y = x · Wᵀ through it: bf16 through cuBLAS, or an
//! FP8 checkpoint's e4m3 with its 128×128 block scales (one byte a weight) through the FP8
//! kernels of `grouped_gemm.cu`: FP8 tensor cores on sm_89 and later, x quantised with 1×128
//! scales as DeepSeek-V3 runs; elsewhere (A100) bf16 MMAs on weights dequantised in the kernel.

use cudarc::driver::CudaSlice;
use half::bf16;

use crate::error::Result;
use crate::gpu::experts::Fp8Weights;
use crate::gpu::runtime::{Fp8, Gpu, LinearInput};

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
    let shape = (rows, out, inp);
    if !gpu.has_fp8_tensor_cores() {
        return gpu.linear_fp8(LinearInput::Bf16(x), &w.q, &w.scale, y, shape);
    }
    let mut x8 = gpu.stream.alloc_zeros::<Fp8>(rows * inp)?;
    let mut x_scale = gpu.stream.alloc_zeros::<f32>(rows * inp.div_ceil(128))?;
    gpu.quantize_fp8(x, &mut x8, &mut x_scale, (rows, inp))?;
    gpu.linear_fp8(LinearInput::Fp8(&x8, &x_scale), &w.q, &w.scale, y, shape)
}
