//! FP8 e4m3 on the device: activations quantised with 1×128 scales, and checkpoint weights
//! dequantised to bf16 with their block scales.

use cudarc::driver::{CudaSlice, PushKernelArg};
use half::bf16;

use super::{Gpu, blocks, queue, strided};
use crate::ensure;
use crate::error::Result;

/// FP8 e4m3 values, bytes on the device.
pub type Fp8 = u8;

impl Gpu {
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
