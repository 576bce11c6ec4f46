//! The routed experts' GEMMs (grouped_gemm.cu): one launch multiplies each expert's segment
//! of the expert-ordered rows by that expert's weights, in bf16, in FP8, or bf16 activations
//! with FP8 weights (any GPU). The same kernels make the FP8 linear layers (one expert, f32
//! out).

use cudarc::driver::{CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};
use half::bf16;

use super::{Fp8, Gpu, MoeOrder, blocks, queue};
use crate::ensure;
use crate::error::Result;

/// Shared memory of one grouped-GEMM block: 4 stages × (128 + 128) rows × 64 bytes.
pub(super) const GROUPED_GEMM_SHARED_BYTES: u32 = 4 * 2 * 128 * 64;

/// The weight-only FP8 kernel's: the stages and one dequantised W tile (128 rows × 64 bytes).
pub(super) const GROUPED_GEMM_W8_SHARED_BYTES: u32 = GROUPED_GEMM_SHARED_BYTES + 128 * 64;

/// Row tile of the grouped GEMM (BM in grouped_gemm.cu).
pub const GEMM_TILE_ROWS: usize = 128;

const GEMM_TILE_COLS: usize = 128;

impl Gpu {
    fn grouped_grid(order: &MoeOrder, n: usize, shared_bytes: u32) -> LaunchConfig {
        // An upper bound on row tiles: blocks past the last return at once.
        let tiles = order.rows.div_ceil(GEMM_TILE_ROWS) + order.experts;
        blocks(
            (n.div_ceil(GEMM_TILE_COLS), tiles),
            256,
            shared_bytes as usize,
        )
    }

    /// y = x · W_eᵀ per expert segment: x [rows, k] bf16, w [experts, n, k], y [rows, n].
    pub fn grouped_gemm_bf16(
        &self,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        y: &mut CudaSlice<bf16>,
        order: &MoeOrder,
        n: usize,
        k: usize,
    ) -> Result<()> {
        ensure!(
            k.is_multiple_of(8) && n.is_multiple_of(2),
            "grouped_gemm: k ({k}) must be a multiple of 8 and n ({n}) even"
        );
        ensure!(
            x.len() == order.rows * k
                && w.len() == order.experts * n * k
                && y.len() == order.rows * n,
            "grouped_gemm: x must be [{}, {k}], w [{}, {n}, {k}], y [{}, {n}]",
            order.rows,
            order.experts,
            order.rows
        );
        let args = [order.experts, n, k].map(|v| v as i32);
        let mut launch = self
            .stream
            .launch_builder(self.function("grouped_gemm_bf16"));
        launch
            .arg(x)
            .arg(w)
            .arg(y)
            .arg(&order.offsets)
            .arg(&order.tile_start)
            .arg(&args[0])
            .arg(&args[1])
            .arg(&args[2]);
        queue(
            launch,
            Self::grouped_grid(order, n, GROUPED_GEMM_SHARED_BYTES),
        )?;
        Ok(())
    }

    /// FP8 weights per expert segment: w [experts, n, k] e4m3 with w_scale [experts, ⌈n/128⌉,
    /// ⌈k/128⌉], y [rows, n] bf16; x [rows, k] in FP8 (`grouped_gemm_fp8`, FP8 tensor cores)
    /// or bf16 (`grouped_gemm_fp8_weights`, any GPU: w dequantised tile by tile in the kernel,
    /// what `grouped_gemm_bf16` gives on `dequant_fp8`'s weights, bit for bit).
    pub fn grouped_gemm_fp8(
        &self,
        x: Fp8GemmInput<'_>,
        (w, w_scale): (&CudaSlice<Fp8>, &CudaSlice<f32>),
        y: &mut CudaSlice<bf16>,
        order: &MoeOrder,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let shape = Fp8Gemm {
            rows: order.rows,
            experts: order.experts,
            n,
            k,
        };
        let (kernel, shared_bytes) =
            self.check_fp8_gemm("grouped_gemm_fp8", x, (w, w_scale), y.len(), shape)?;
        let args = [order.experts, n, k].map(|v| v as i32);
        let mut launch = self.stream.launch_builder(self.function(&kernel));
        x.push(&mut launch);
        launch
            .arg(w)
            .arg(w_scale)
            .arg(y)
            .arg(&order.offsets)
            .arg(&order.tile_start)
            .arg(&args[0])
            .arg(&args[1])
            .arg(&args[2]);
        queue(launch, Self::grouped_grid(order, n, shared_bytes))
    }

    /// A linear layer with FP8 weights, y [rows, n] f32 = x · wᵀ: w [n, k] e4m3 with
    /// w_scale [⌈n/128⌉, ⌈k/128⌉]; x in FP8 (`linear_fp8`, FP8 tensor cores) or bf16
    /// (`linear_fp8_weights`, any GPU: w dequantised tile by tile in the kernel).
    pub fn linear_fp8(
        &self,
        x: Fp8GemmInput<'_>,
        (w, w_scale): (&CudaSlice<Fp8>, &CudaSlice<f32>),
        y: &mut CudaSlice<f32>,
        (rows, n, k): (usize, usize, usize),
    ) -> Result<()> {
        let shape = Fp8Gemm {
            rows,
            experts: 1,
            n,
            k,
        };
        let (kernel, shared_bytes) =
            self.check_fp8_gemm("linear_fp8", x, (w, w_scale), y.len(), shape)?;
        let args = [rows, n, k].map(|v| v as i32);
        let mut launch = self.stream.launch_builder(self.function(&kernel));
        x.push(&mut launch);
        launch
            .arg(w)
            .arg(w_scale)
            .arg(y)
            .arg(&args[0])
            .arg(&args[1])
            .arg(&args[2]);
        let grid = (n.div_ceil(GEMM_TILE_COLS), rows.div_ceil(GEMM_TILE_ROWS));
        queue(launch, blocks(grid, 256, shared_bytes as usize))
    }

    /// Checks an FP8-weight GEMM's operands against its shape; the kernel to launch (`name`,
    /// or `name` + `_weights` for bf16 activations) and its shared memory.
    fn check_fp8_gemm(
        &self,
        name: &'static str,
        x: Fp8GemmInput<'_>,
        (w, w_scale): (&CudaSlice<Fp8>, &CudaSlice<f32>),
        y_len: usize,
        Fp8Gemm {
            rows,
            experts,
            n,
            k,
        }: Fp8Gemm,
    ) -> Result<(String, u32)> {
        ensure!(
            k.is_multiple_of(16) && n.is_multiple_of(2),
            "{name}: k ({k}) must be a multiple of 16 and n ({n}) even"
        );
        let (kb, nb) = (k.div_ceil(128), n.div_ceil(128));
        ensure!(
            w.len() == experts * n * k && w_scale.len() == experts * nb * kb && y_len == rows * n,
            "{name}: w must be {experts} × [{n}, {k}] with scales [{nb}, {kb}] each, y [{rows}, {n}]"
        );
        match x {
            Fp8GemmInput::Fp8(x, x_scale) => {
                ensure!(
                    self.has_fp8_tensor_cores(),
                    "{name} with FP8 activations needs sm_89 or later; this GPU is {}",
                    self.architecture
                );
                ensure!(
                    x.len() == rows * k && x_scale.len() == rows * kb,
                    "{name}: x must be [{rows}, {k}] e4m3 with scales [{rows}, {kb}]"
                );
                Ok((name.to_string(), GROUPED_GEMM_SHARED_BYTES))
            }
            Fp8GemmInput::Bf16(x) => {
                ensure!(x.len() == rows * k, "{name}: x must be [{rows}, {k}] bf16");
                Ok((format!("{name}_weights"), GROUPED_GEMM_W8_SHARED_BYTES))
            }
        }
    }
}

/// The sizes of an FP8-weight GEMM: `rows` of x, `experts` weight matrices of [n, k].
#[derive(Clone, Copy)]
struct Fp8Gemm {
    rows: usize,
    experts: usize,
    n: usize,
    k: usize,
}

/// The activations of a GEMM with FP8 weights: e4m3 with 1×128 scales, or bf16.
#[derive(Clone, Copy)]
pub enum Fp8GemmInput<'a> {
    Fp8(&'a CudaSlice<Fp8>, &'a CudaSlice<f32>),
    Bf16(&'a CudaSlice<bf16>),
}

impl<'a> Fp8GemmInput<'a> {
    /// Pushes the kernel arguments x (and x_scale), which come first in every FP8 kernel.
    fn push(self, launch: &mut LaunchArgs<'a>) {
        match self {
            Fp8GemmInput::Fp8(x, x_scale) => launch.arg(x).arg(x_scale),
            Fp8GemmInput::Bf16(x) => launch.arg(x),
        };
    }
}
