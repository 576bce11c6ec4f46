//! Row-wise and elementwise launches: RMS norm, SwiGLU's activation, the embedding lookup,
//! residual adds and the cast to bf16.

use cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
use half::bf16;

use super::{Gpu, blocks, queue, strided};
use crate::ensure;
use crate::error::Result;

impl Gpu {
    /// y[rows, cols] = rms_norm(x) · weight; x's rows are x_stride apart.
    pub fn rms_norm(
        &self,
        x: &CudaView<'_, f32>,
        x_stride: usize,
        weight: &CudaSlice<bf16>,
        y: &mut CudaSlice<f32>,
        rows: usize,
        eps: f32,
    ) -> Result<()> {
        let cols = weight.len();
        ensure!(
            x_stride >= cols
                && x.len() >= rows.saturating_sub(1) * x_stride + cols
                && y.len() == rows * cols,
            "rms_norm: x must hold {rows} rows of {cols} values {x_stride} apart and y [{rows}, {cols}]"
        );
        let (stride, cols) = (x_stride as i32, cols as i32);
        let mut launch = self.stream.launch_builder(self.function("rms_norm"));
        launch
            .arg(x)
            .arg(&stride)
            .arg(weight)
            .arg(y)
            .arg(&cols)
            .arg(&eps);
        queue(launch, blocks((rows, 1), 256, 0))
    }

    /// h[rows, width] = silu(gate) · up from gate_up[rows, 2·width] (a fused GEMM's output).
    pub fn silu_mul(
        &self,
        gate_up: &CudaSlice<bf16>,
        h: &mut CudaSlice<bf16>,
        rows: usize,
    ) -> Result<()> {
        ensure!(
            rows > 0 && h.len().is_multiple_of(rows) && gate_up.len() == 2 * h.len(),
            "silu_mul: gate_up must be [{rows}, 2 × width] and h [{rows}, width]"
        );
        let width = h.len() / rows;
        self.silu_mul_rows(
            &gate_up.as_view(),
            &gate_up.slice(width..),
            2 * width,
            h,
            rows,
        )
    }

    /// h[rows, width] = silu(gate) · up, where gate and up rows are `stride` apart.
    pub fn silu_mul_rows(
        &self,
        gate: &CudaView<'_, bf16>,
        up: &CudaView<'_, bf16>,
        stride: usize,
        h: &mut CudaSlice<bf16>,
        rows: usize,
    ) -> Result<()> {
        ensure!(
            rows > 0 && h.len().is_multiple_of(rows),
            "silu_mul: h must be [{rows}, width]"
        );
        let width = h.len() / rows;
        let reach = (rows - 1) * stride + width;
        ensure!(
            stride >= width && gate.len() >= reach && up.len() >= reach,
            "silu_mul: gate and up must hold {rows} rows of {width}, {stride} apart"
        );
        let (stride, rows_i, width_i, n) = (stride as i32, rows as i32, width as i32, h.len());
        let mut launch = self.stream.launch_builder(self.function("silu_mul"));
        launch
            .arg(gate)
            .arg(up)
            .arg(&stride)
            .arg(h)
            .arg(&rows_i)
            .arg(&width_i);
        queue(launch, strided(n, 256))
    }

    /// out[r] = table[ids[r]] as f32.
    pub fn embedding(
        &self,
        table: &CudaSlice<bf16>,
        ids: &CudaSlice<i32>,
        out: &mut CudaSlice<f32>,
        hidden: usize,
    ) -> Result<()> {
        ensure!(
            hidden > 0 && table.len().is_multiple_of(hidden) && out.len() == ids.len() * hidden,
            "embedding: out must be [{}, {hidden}]",
            ids.len()
        );
        let h = hidden as i32;
        let mut launch = self.stream.launch_builder(self.function("embedding"));
        launch.arg(table).arg(ids).arg(out).arg(&h);
        queue(launch, blocks((ids.len(), 1), 256, 0))
    }

    /// x += y.
    pub fn add(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>) -> Result<()> {
        ensure!(
            x.len() == y.len(),
            "add: {} and {} values",
            x.len(),
            y.len()
        );
        let n = x.len();
        let mut launch = self.stream.launch_builder(self.function("add"));
        launch.arg(x).arg(y).arg(&n);
        queue(launch, strided(n, 256))
    }

    /// y = bf16(x).
    pub fn to_bf16(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<bf16>) -> Result<()> {
        ensure!(
            x.len() == y.len(),
            "to_bf16: {} and {} values",
            x.len(),
            y.len()
        );
        let n = x.len();
        let mut launch = self.stream.launch_builder(self.function("to_bf16"));
        launch.arg(x).arg(y).arg(&n);
        queue(launch, strided(n, 256))
    }
}
