//! FP8 e4m3 on the device: activations quantised with 1×128 scales, and checkpoint weights
//! dequantised to bf16 with their block scales.

use cudarc::driver::{CudaSlice, PushKernelArg};
use half::bf16;

use super::{Fp8GemmInput, Gpu, blocks, queue, strided};
use crate::ensure;
use crate::error::Result;

/// FP8 e4m3 values, bytes on the device.
pub type Fp8 = u8;

/// Activations made ready for a GEMM with FP8 weights on this GPU (`Gpu::fp8_activations`).
pub enum Fp8Activations<'a> {
    Fp8(CudaSlice<Fp8>, CudaSlice<f32>),
    Bf16(&'a CudaSlice<bf16>),
}

impl Fp8Activations<'_> {
    pub fn input(&self) -> Fp8GemmInput<'_> {
        match self {
            Fp8Activations::Fp8(x, scale) => Fp8GemmInput::Fp8(x, scale),
            Fp8Activations::Bf16(x) => Fp8GemmInput::Bf16(x),
        }
    }
}

impl Gpu {
    /// bf16 rows [rows, k] as a GEMM with FP8 weights takes them here: quantised to e4m3
    /// with 1×128 scales where the GPU has FP8 tensor cores, as they are elsewhere (the
    /// weight-only kernels).
    pub fn fp8_activations<'a>(
        &self,
        x: &'a CudaSlice<bf16>,
        (rows, k): (usize, usize),
    ) -> Result<Fp8Activations<'a>> {
        if !self.has_fp8_tensor_cores() {
            return Ok(Fp8Activations::Bf16(x));
        }
        let mut x8 = self.stream.alloc_zeros::<Fp8>(rows * k)?;
        let mut scale = self.stream.alloc_zeros::<f32>(rows * k.div_ceil(128))?;
        self.quantize_fp8(x, &mut x8, &mut scale, (rows, k))?;
        Ok(Fp8Activations::Fp8(x8, scale))
    }

    /// bf16 rows [rows, hidden] to FP8 with 1×128 scales ([rows, ⌈hidden/128⌉]).
    pub fn quantize_fp8(
        &self,
        x: &CudaSlice<bf16>,
        out: &mut CudaSlice<Fp8>,
        scale: &mut CudaSlice<f32>,
        (rows, hidden): (usize, usize),
    ) -> Result<()> {
        ensure!(
            x.len() == rows * hidden
                && out.len() == x.len()
                && scale.len() == rows * hidden.div_ceil(128),
            "quantize_fp8: x and out must be [{rows}, {hidden}], scale [{rows}, {}]",
            hidden.div_ceil(128)
        );
        let h = hidden as i32;
        let mut launch = self.stream.launch_builder(self.function("quantize_fp8"));
        launch.arg(x).arg(out).arg(scale).arg(&h);
        queue(launch, blocks((rows, 1), 128, 0))
    }

    /// bf16 weights from an FP8 checkpoint's: `matrices` stacked [rows, cols] with scale_inv
    /// [matrices, ⌈rows/128⌉, ⌈cols/128⌉].
    pub fn dequant_fp8(
        &self,
        q: &CudaSlice<Fp8>,
        scale_inv: &CudaSlice<f32>,
        out: &mut CudaSlice<bf16>,
        (matrices, rows, cols): (usize, usize, usize),
    ) -> Result<()> {
        ensure!(
            q.len() == matrices * rows * cols
                && out.len() == q.len()
                && scale_inv.len() == matrices * rows.div_ceil(128) * cols.div_ceil(128),
            "dequant_fp8: shapes do not match {matrices} × [{rows}, {cols}]"
        );
        let args = [matrices, rows, cols].map(|v| v as i32);
        let mut launch = self.stream.launch_builder(self.function("dequant_fp8"));
        launch
            .arg(q)
            .arg(scale_inv)
            .arg(out)
            .arg(&args[0])
            .arg(&args[1])
            .arg(&args[2]);
        queue(launch, strided(q.len(), 256))?;
        Ok(())
    }
}
