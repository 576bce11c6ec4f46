//! A CUDA device with the kernels built for it, cuBLAS, and one typed launch per kernel.
//! Launches check shapes first and answer a bad one with an error naming it; they queue on
//! the device's stream and return at once.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use cudarc::cublas::{
    CudaBlas,
    sys::{cublasOperation_t, cudaDataType},
};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut,
    LaunchArgs, LaunchConfig, PushKernelArg, sys::CUfunction_attribute,
};
use cudarc::nvrtc::Ptx;
use half::bf16;

use super::{KernelCache, Nvrtc, architecture, cuda_include_dir};

/// Shared memory of one grouped-GEMM block: 4 stages × (128 + 128) rows × 64 bytes.
const GROUPED_GEMM_SHARED_BYTES: u32 = 4 * 2 * 128 * 64;
/// Row tile of the grouped GEMM (BM in grouped_gemm.cu).
pub const GEMM_TILE_ROWS: usize = 128;
const GEMM_TILE_COLS: usize = 128;
/// Largest kv_lora_rank and rope dims mla_decode.cu holds in registers.
const MLA_MAX_RANK: usize = 512;
const MLA_MAX_ROPE: usize = 128;

/// FP8 e4m3 values, bytes on the device.
pub type Fp8 = u8;

pub struct Gpu {
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    pub name: String,
    pub capability: (i32, i32),
    pub architecture: String,
    /// Which NVRTC compiled the kernels, or why none was needed or found.
    pub compiler: String,
    functions: HashMap<String, CudaFunction>,
}

/// A grid of at most `blocks` blocks of `threads`, for grid-stride loops over `n` items.
fn strided(n: usize, threads: u32) -> LaunchConfig {
    let blocks = n.div_ceil(threads as usize).min(65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn blocks(grid: (usize, usize), threads: u32, shared: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared as u32,
    }
}

/// Queues `launch`; a grid without blocks (an empty batch) has nothing to do.
fn queue(mut launch: LaunchArgs<'_>, config: LaunchConfig) -> Result<()> {
    let (x, y, z) = config.grid_dim;
    if x * y * z > 0 {
        // SAFETY: every caller first checks its buffers against the shapes the kernel reads
        // and writes, and pushes the arguments in the kernel's order and C types.
        unsafe { launch.launch(config) }?;
    }
    Ok(())
}

/// Names of a source's kernels: what follows `extern "C" __global__ void` (and an optional
/// `__launch_bounds__(…)`).
pub fn entry_points(source: &str) -> Vec<&str> {
    source
        .split("extern \"C\" __global__ void")
        .skip(1)
        .filter_map(|rest| {
            let rest = rest.trim_start();
            let rest = match rest.strip_prefix("__launch_bounds__(") {
                Some(bounded) => bounded.split_once(')')?.1.trim_start(),
                None => rest,
            };
            let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_'))?;
            Some(&rest[..end])
        })
        .collect()
}

/// The router's choice rule, as moe_gate.cu numbers it.
#[derive(Clone, Copy, Debug)]
pub struct GateRule {
    pub sigmoid: bool,
    /// 0: V3's noaux_tc, 1: V2's group-limited greedy, 2: plain top-k.
    pub method: i32,
    pub n_group: usize,
    pub topk_group: usize,
    pub topk: usize,
    pub normalize: bool,
    pub scale: f32,
}

impl GateRule {
    pub fn of(moe: &crate::config::Moe) -> Self {
        use crate::config::{Family, ScoringFunc, TopkMethod};
        GateRule {
            sigmoid: moe.scoring_func == ScoringFunc::Sigmoid,
            method: match moe.topk_method {
                TopkMethod::NoauxTc => 0,
                TopkMethod::GroupLimitedGreedy => 1,
                TopkMethod::Greedy => 2,
            },
            n_group: moe.n_group,
            topk_group: moe.topk_group,
            topk: moe.num_experts_per_tok,
            // as the CPU path: transformers normalises V3's weights only
            normalize: moe.norm_topk_prob && moe.family == Family::V3,
            scale: moe.routed_scaling_factor as f32,
        }
    }
}

/// The expert-ordered layout of one MoE batch, from `moe_sort`.
pub struct MoeOrder {
    pub offsets: CudaSlice<i32>,
    pub tile_start: CudaSlice<i32>,
    pub source: CudaSlice<i32>,
    pub row_of: CudaSlice<i32>,
    pub rows: usize,
    pub experts: usize,
    pub topk: usize,
}

/// Element types cuBLAS multiplies here.
pub trait GemmType: cudarc::driver::DeviceRepr {
    const DTYPE: cudaDataType;
}
impl GemmType for f32 {
    const DTYPE: cudaDataType = cudaDataType::CUDA_R_32F;
}
impl GemmType for bf16 {
    const DTYPE: cudaDataType = cudaDataType::CUDA_R_16BF;
}

/// Where a row-major GEMM operand's matrices sit in their buffer, in elements: the first
/// one's offset, the stride between rows, and between the matrices of a batch.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub offset: usize,
    pub row_stride: usize,
    pub batch_stride: usize,
}

impl Layout {
    /// One matrix from the buffer's start.
    pub fn dense(row_stride: usize) -> Self {
        Layout {
            offset: 0,
            row_stride,
            batch_stride: 0,
        }
    }

    /// One past the last element a batch of `rows` × `cols` matrices reaches.
    fn reach(&self, rows: usize, cols: usize, batch: usize) -> usize {
        if rows == 0 || cols == 0 || batch == 0 {
            return 0;
        }
        self.offset + (batch - 1) * self.batch_stride + (rows - 1) * self.row_stride + cols
    }
}

/// A GEMM operand as cuBLAS takes it: a device address and element type, with its strides.
#[derive(Clone, Copy)]
struct Operand {
    ptr: u64,
    dtype: cudaDataType,
    row_stride: usize,
    batch_stride: usize,
}

impl Operand {
    fn at<T: GemmType>(ptr: u64, layout: Layout) -> Self {
        Operand {
            ptr: ptr + (layout.offset * std::mem::size_of::<T>()) as u64,
            dtype: T::DTYPE,
            row_stride: layout.row_stride,
            batch_stride: layout.batch_stride,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
}

impl Gpu {
    /// Opens GPU `ordinal` and loads every kernel for its architecture (from the kernel
    /// cache, else compiled with NVRTC).
    pub fn open(ordinal: usize) -> Result<Self> {
        // SAFETY: only probes for libcuda with dlopen.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            bail!("--device cuda:{ordinal}: no CUDA driver (libcuda.so.1) on this machine");
        }
        let context = CudaContext::new(ordinal)
            .with_context(|| format!("--device cuda:{ordinal}: cannot open the GPU"))?;
        // SAFETY: every buffer lives and is used on the one default stream, so the events
        // cudarc records to order work between streams are not needed.
        unsafe { context.disable_event_tracking() };
        let capability = context.compute_capability()?;
        let architecture = architecture(capability.0, capability.1);
        let nvrtc = Nvrtc::load();
        let compiler = match &nvrtc {
            Ok(n) => format!("NVRTC {}.{} ({})", n.version.0, n.version.1, n.found),
            Err(e) => format!("{e:#}"),
        };
        let include = cuda_include_dir();
        let cubins = KernelCache::from_env()
            .cubins(&architecture, nvrtc.as_ref().ok(), include.as_deref())
            .with_context(|| format!("building the kernels for {architecture} ({compiler})"))?;
        let mut functions = HashMap::new();
        for (name, cubin) in cubins {
            let module = context
                .load_module(Ptx::from_binary(cubin))
                .with_context(|| format!("loading kernel {name} for {architecture}"))?;
            let source = super::KERNELS.iter().find(|(n, _)| *n == name).unwrap().1;
            for entry in entry_points(source) {
                functions.insert(entry.to_string(), module.load_function(entry)?);
            }
        }
        for entry in ["grouped_gemm_bf16", "grouped_gemm_fp8"] {
            functions[entry].set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                GROUPED_GEMM_SHARED_BYTES as i32,
            )?;
        }
        let stream = context.default_stream();
        Ok(Gpu {
            blas: CudaBlas::new(stream.clone())?,
            stream,
            name: context.name()?,
            capability,
            architecture,
            compiler,
            functions,
        })
    }

    pub fn has_fp8_tensor_cores(&self) -> bool {
        self.capability >= (8, 9)
    }

    fn function(&self, name: &str) -> &CudaFunction {
        &self.functions[name]
    }

    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

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

    /// y [tokens, heads, dim] = rope(x), x's (token, head) rows x_stride apart; cos, sin
    /// [tokens, dim/2].
    pub fn rope(
        &self,
        x: &CudaView<'_, f32>,
        x_stride: usize,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        (tokens, heads, dim): (usize, usize, usize),
    ) -> Result<()> {
        let rows = tokens * heads;
        ensure!(
            dim.is_multiple_of(2)
                && x_stride >= dim
                && x.len() >= rows.saturating_sub(1) * x_stride + dim
                && y.len() == rows * dim
                && cos.len() == tokens * dim / 2
                && sin.len() == cos.len(),
            "rope: shapes do not match [{tokens}, {heads}, {dim}] with rows {x_stride} apart"
        );
        let (stride, t, h, d) = (x_stride as i32, tokens as i32, heads as i32, dim as i32);
        let mut launch = self.stream.launch_builder(self.function("rope"));
        launch
            .arg(x)
            .arg(&stride)
            .arg(cos)
            .arg(sin)
            .arg(y)
            .arg(&t)
            .arg(&h)
            .arg(&d);
        queue(launch, strided(rows * dim / 2, 256))
    }

    /// Each token's experts and weights ([tokens, topk]) from its router logits
    /// ([tokens, experts]).
    pub fn moe_gate(
        &self,
        logits: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        experts: usize,
        rule: GateRule,
        chosen: &mut CudaSlice<i32>,
        weights: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let tokens = logits.len() / experts;
        ensure!(
            logits.len() == tokens * experts
                && chosen.len() == tokens * rule.topk
                && weights.len() == chosen.len(),
            "moe_gate: logits must be [tokens, {experts}], experts and weights [tokens, {}]",
            rule.topk
        );
        ensure!(
            rule.n_group <= 32
                && experts.is_multiple_of(rule.n_group.max(1))
                && rule.topk_group <= rule.n_group
                && (1..=experts).contains(&rule.topk),
            "moe_gate: {experts} experts in {} groups keeping {}, top-{}",
            rule.n_group,
            rule.topk_group,
            rule.topk
        );
        ensure!(
            bias.is_none_or(|b| b.len() == experts),
            "moe_gate: bias must hold {experts} values"
        );
        // Without a bias the kernel reads none; any valid pointer stands in.
        let (bias, has_bias) = match bias {
            Some(bias) => (bias, 1i32),
            None => (logits, 0i32),
        };
        let scoring = if rule.sigmoid { 0 } else { 1 }; // moe_gate.cu's SIGMOID, SOFTMAX
        let args = [
            experts,
            scoring,
            rule.method as usize,
            rule.n_group,
            rule.topk_group,
            rule.topk,
            rule.normalize as usize,
        ]
        .map(|v| v as i32);
        let mut launch = self.stream.launch_builder(self.function("moe_gate"));
        launch
            .arg(logits)
            .arg(bias)
            .arg(&has_bias)
            .arg(chosen)
            .arg(weights);
        for arg in &args {
            launch.arg(arg);
        }
        launch.arg(&rule.scale);
        queue(launch, blocks((tokens, 1), 256, experts * 9))?;
        Ok(())
    }

    /// Orders `chosen` ([pairs] expert ids) by expert.
    pub fn moe_sort(
        &self,
        chosen: &CudaSlice<i32>,
        topk: usize,
        experts: usize,
    ) -> Result<MoeOrder> {
        let rows = chosen.len();
        ensure!(
            topk > 0 && rows.is_multiple_of(topk),
            "moe_sort: {rows} choices are not tokens × top-{topk}"
        );
        let mut order = MoeOrder {
            offsets: self.stream.alloc_zeros(experts + 1)?,
            tile_start: self.stream.alloc_zeros(experts + 1)?,
            source: self.stream.alloc_zeros(rows.max(1))?,
            row_of: self.stream.alloc_zeros(rows.max(1))?,
            rows,
            experts,
            topk,
        };
        let args = [rows, topk, experts].map(|v| v as i32);
        let mut launch = self.stream.launch_builder(self.function("moe_sort"));
        launch.arg(chosen).arg(&args[0]).arg(&args[1]).arg(&args[2]);
        launch
            .arg(&mut order.offsets)
            .arg(&mut order.tile_start)
            .arg(&mut order.source)
            .arg(&mut order.row_of);
        queue(launch, blocks((1, 1), 1024, experts * 8))?;
        Ok(order)
    }

    /// The expert-ordered bf16 copy of x ([tokens, hidden]).
    pub fn moe_permute(
        &self,
        x: &CudaSlice<f32>,
        order: &MoeOrder,
        out: &mut CudaSlice<bf16>,
        hidden: usize,
    ) -> Result<()> {
        ensure!(
            hidden.is_multiple_of(4)
                && x.len() == order.rows / order.topk * hidden
                && out.len() == order.rows * hidden,
            "moe_permute: hidden ({hidden}) must be a multiple of 4, x [{}, {hidden}] and out \
             [{}, {hidden}]",
            order.rows / order.topk,
            order.rows
        );
        let h = hidden as i32;
        let mut launch = self.stream.launch_builder(self.function("moe_permute"));
        launch.arg(x).arg(&order.source).arg(out).arg(&h);
        queue(launch, blocks((order.rows, 1), 256, 0))?;
        Ok(())
    }

    /// The same, quantised to FP8 with 1×128 scales ([rows, ⌈hidden/128⌉]).
    pub fn moe_permute_fp8(
        &self,
        x: &CudaSlice<f32>,
        order: &MoeOrder,
        out: &mut CudaSlice<Fp8>,
        scale: &mut CudaSlice<f32>,
        hidden: usize,
    ) -> Result<()> {
        ensure!(
            x.len() == order.rows / order.topk * hidden
                && out.len() == order.rows * hidden
                && scale.len() == order.rows * hidden.div_ceil(128),
            "moe_permute_fp8: x must be [{}, {hidden}], out [{}, {hidden}] and scale [{}, {}]",
            order.rows / order.topk,
            order.rows,
            order.rows,
            hidden.div_ceil(128)
        );
        let h = hidden as i32;
        let mut launch = self.stream.launch_builder(self.function("moe_permute_fp8"));
        launch.arg(x).arg(&order.source).arg(out).arg(scale).arg(&h);
        queue(launch, blocks((order.rows, 1), 128, 0))?;
        Ok(())
    }

    /// y[t] = Σ_k weight[t, k] · expert_out[row_of[t, k]].
    pub fn moe_unpermute(
        &self,
        expert_out: &CudaSlice<bf16>,
        order: &MoeOrder,
        weights: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        hidden: usize,
    ) -> Result<()> {
        let (tokens, topk) = (order.rows / order.topk, order.topk);
        ensure!(
            hidden.is_multiple_of(4)
                && expert_out.len() == order.rows * hidden
                && weights.len() == order.rows
                && y.len() == tokens * hidden,
            "moe_unpermute: shapes do not match {tokens} tokens × top-{topk} × {hidden}"
        );
        let (k, h) = (topk as i32, hidden as i32);
        let mut launch = self.stream.launch_builder(self.function("moe_unpermute"));
        launch
            .arg(expert_out)
            .arg(&order.row_of)
            .arg(weights)
            .arg(y)
            .arg(&k)
            .arg(&h);
        queue(launch, blocks((tokens, 1), 256, 0))?;
        Ok(())
    }

    fn grouped_grid(order: &MoeOrder, n: usize) -> LaunchConfig {
        // An upper bound on row tiles: blocks past the last return at once.
        let tiles = order.rows.div_ceil(GEMM_TILE_ROWS) + order.experts;
        blocks(
            (n.div_ceil(GEMM_TILE_COLS), tiles),
            256,
            GROUPED_GEMM_SHARED_BYTES as usize,
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
        queue(launch, Self::grouped_grid(order, n))?;
        Ok(())
    }

    /// The FP8 form: x [rows, k] e4m3 with x_scale [rows, ⌈k/128⌉]; w [experts, n, k] with
    /// w_scale [experts, ⌈n/128⌉, ⌈k/128⌉]. Needs FP8 tensor cores.
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_gemm_fp8(
        &self,
        x: &CudaSlice<Fp8>,
        x_scale: &CudaSlice<f32>,
        w: &CudaSlice<Fp8>,
        w_scale: &CudaSlice<f32>,
        y: &mut CudaSlice<bf16>,
        order: &MoeOrder,
        n: usize,
        k: usize,
    ) -> Result<()> {
        ensure!(
            self.has_fp8_tensor_cores(),
            "grouped_gemm_fp8 needs sm_89 or later; this GPU is {}",
            self.architecture
        );
        ensure!(
            k.is_multiple_of(16) && n.is_multiple_of(2),
            "grouped_gemm_fp8: k ({k}) must be a multiple of 16 and n ({n}) even"
        );
        let (kb, nb) = (k.div_ceil(128), n.div_ceil(128));
        ensure!(
            x.len() == order.rows * k
                && x_scale.len() == order.rows * kb
                && w.len() == order.experts * n * k
                && w_scale.len() == order.experts * nb * kb
                && y.len() == order.rows * n,
            "grouped_gemm_fp8: shapes do not match {} rows, {} experts, n {n}, k {k}",
            order.rows,
            order.experts
        );
        let args = [order.experts, n, k].map(|v| v as i32);
        let mut launch = self
            .stream
            .launch_builder(self.function("grouped_gemm_fp8"));
        launch
            .arg(x)
            .arg(x_scale)
            .arg(w)
            .arg(w_scale)
            .arg(y)
            .arg(&order.offsets)
            .arg(&order.tile_start)
            .arg(&args[0])
            .arg(&args[1])
            .arg(&args[2]);
        queue(launch, Self::grouped_grid(order, n))?;
        Ok(())
    }

    /// Dense y[rows, out] = x[rows, inp] · w[out, inp]ᵀ through cuBLAS, f32 accumulation;
    /// bf16 or f32 in, bf16 or f32 out.
    pub fn linear<X: GemmType, Y: GemmType>(
        &self,
        x: &CudaSlice<X>,
        w: &CudaSlice<X>,
        y: &mut CudaSlice<Y>,
        (rows, out, inp): (usize, usize, usize),
    ) -> Result<()> {
        ensure!(
            x.len() == rows * inp && w.len() == out * inp && y.len() == rows * out,
            "linear: x must be [{rows}, {inp}], w [{out}, {inp}], y [{rows}, {out}]"
        );
        let shape = GemmShape {
            m: rows,
            n: out,
            k: inp,
            batch: 1,
        };
        self.batched_gemm(
            (x, Layout::dense(inp)),
            (w, Layout::dense(inp)),
            true,
            (y, Layout::dense(out)),
            shape,
        )
    }

    /// Row-major y[b] (m × n) = x[b] (m × k) · (w[b]ᵀ if `w_is_nk`, w[b] [k, n] otherwise)
    /// for b < batch, each operand where its layout says in its buffer (per-head products
    /// over slices of wider rows, say); checked to stay inside every buffer.
    pub fn batched_gemm<X: GemmType, Y: GemmType>(
        &self,
        (x, x_at): (&CudaSlice<X>, Layout),
        (w, w_at): (&CudaSlice<X>, Layout),
        w_is_nk: bool,
        (y, y_at): (&mut CudaSlice<Y>, Layout),
        shape: GemmShape,
    ) -> Result<()> {
        let GemmShape { m, n, k, batch } = shape;
        let (w_rows, w_cols) = if w_is_nk { (n, k) } else { (k, n) };
        ensure!(
            x_at.row_stride >= k
                && w_at.row_stride >= w_cols
                && y_at.row_stride >= n
                && x_at.reach(m, k, batch) <= x.len()
                && w_at.reach(w_rows, w_cols, batch) <= w.len()
                && y_at.reach(m, n, batch) <= y.len(),
            "gemm {shape:?}: an operand runs past its buffer (x {x_at:?} of {}, w {w_at:?} of \
             {}, y {y_at:?} of {})",
            x.len(),
            w.len(),
            y.len()
        );
        let (xp, _x) = x.device_ptr(&self.stream);
        let (wp, _w) = w.device_ptr(&self.stream);
        let (yp, _y) = y.device_ptr_mut(&self.stream);
        // SAFETY: every operand's matrices lie inside its buffer (checked above).
        unsafe {
            self.gemm(
                Operand::at::<X>(xp, x_at),
                Operand::at::<X>(wp, w_at),
                w_is_nk,
                Operand::at::<Y>(yp, y_at),
                shape,
            )
        }
    }

    /// Row-major y[b] (m × n) = x[b] (m × k) · (w[b]ᵀ if `w_is_nk`, w[b] [k, n] otherwise)
    /// for b < batch, with f32 accumulation: cuBLAS is column-major, so it computes
    /// yᵀ = op(w)ᵀ · xᵀ on the same memory.
    ///
    /// # Safety
    /// Every operand's pointer must hold its matrices as its strides and the shape say.
    unsafe fn gemm(
        &self,
        x: Operand,
        w: Operand,
        w_is_nk: bool,
        y: Operand,
        GemmShape { m, n, k, batch }: GemmShape,
    ) -> Result<()> {
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t};
        if m == 0 || n == 0 || batch == 0 {
            return Ok(());
        }
        let (one, zero) = (1f32, 0f32);
        let transpose = if w_is_nk {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        };
        // SAFETY: the caller vouches for the operands; alpha and beta are f32 as the f32
        // compute type requires.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *self.blas.handle(),
                transpose,
                cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                (&one as *const f32).cast(),
                w.ptr as *const _,
                w.dtype,
                w.row_stride as i32,
                w.batch_stride as i64,
                x.ptr as *const _,
                x.dtype,
                x.row_stride as i32,
                x.batch_stride as i64,
                (&zero as *const f32).cast(),
                y.ptr as *mut _,
                y.dtype,
                y.row_stride as i32,
                y.batch_stride as i64,
                batch as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }?;
        Ok(())
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

    /// Writes each row's latent (c_kv [rows, rank]) and roped key (k_pe [rows, rope]) into
    /// cache slot slots[r] (block · 16 + offset).
    pub fn kv_write(
        &self,
        (c_kv, k_pe): (&CudaSlice<f32>, &CudaSlice<f32>),
        slots: &CudaSlice<i32>,
        (cache_c, cache_pe): (&mut CudaSlice<bf16>, &mut CudaSlice<bf16>),
        (rank, rope): (usize, usize),
    ) -> Result<()> {
        let rows = slots.len();
        ensure!(
            c_kv.len() == rows * rank
                && k_pe.len() == rows * rope
                && cache_c.len() / rank.max(1) == cache_pe.len() / rope.max(1),
            "kv_write: c_kv must be [{rows}, {rank}], k_pe [{rows}, {rope}], the caches as many slots"
        );
        let (r, p) = (rank as i32, rope as i32);
        let mut launch = self.stream.launch_builder(self.function("kv_write"));
        launch
            .arg(c_kv)
            .arg(k_pe)
            .arg(slots)
            .arg(cache_c)
            .arg(cache_pe)
            .arg(&r)
            .arg(&p);
        queue(launch, blocks((rows, 1), 256, 0))
    }

    /// Absorbed MLA attention: out [rows, heads, rank] from q_lat [rows, heads, rank], q_pe
    /// [rows, heads, rope] and the paged bf16 cache; row s reads block table row
    /// s · table_stride (0: every row shares one table, a prompt's rows) and sees its first
    /// lengths[s] positions. The tables must name blocks inside the cache.
    #[allow(clippy::too_many_arguments)]
    pub fn mla_decode(
        &self,
        q_lat: &CudaSlice<f32>,
        q_pe: &CudaSlice<f32>,
        c_kv: &CudaSlice<bf16>,
        k_pe: &CudaSlice<bf16>,
        (block_table, table_stride): (&CudaSlice<i32>, usize),
        lengths: &CudaSlice<i32>,
        out: &mut CudaSlice<f32>,
        (seqs, heads, rank, rope): (usize, usize, usize, usize),
        scale: f32,
    ) -> Result<()> {
        ensure!(
            (2..=MLA_MAX_RANK).contains(&rank)
                && rank.is_multiple_of(2)
                && (2..=MLA_MAX_ROPE).contains(&rope)
                && rope.is_multiple_of(2),
            "mla_decode: kv_lora_rank ({rank}) must be even and in 2..={MLA_MAX_RANK}, rope dims ({rope}) even and in 2..={MLA_MAX_ROPE}"
        );
        ensure!(
            seqs > 0
                && lengths.len() == seqs
                && block_table.len() > (seqs - 1) * table_stride
                && q_lat.len() == seqs * heads * rank
                && q_pe.len() == seqs * heads * rope
                && out.len() == q_lat.len()
                && c_kv.len() / rank == k_pe.len() / rope,
            "mla_decode: shapes do not match {seqs} sequences × {heads} heads"
        );
        let table_stride = table_stride as i32;
        let args = [heads, rank, rope].map(|v| v as i32);
        let mut launch = self.stream.launch_builder(self.function("mla_decode"));
        launch
            .arg(q_lat)
            .arg(q_pe)
            .arg(c_kv)
            .arg(k_pe)
            .arg(block_table)
            .arg(&table_stride)
            .arg(lengths)
            .arg(out)
            .arg(&args[0])
            .arg(&args[1])
            .arg(&args[2])
            .arg(&scale);
        queue(launch, blocks((seqs, heads), 128, 0))?;
        Ok(())
    }

    /// One token per row of logits [rows, vocab]; per-row parameters; probs is scratch of the
    /// logits' size.
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        logits: &CudaSlice<f32>,
        probs: &mut CudaSlice<f64>,
        vocab: usize,
        temperature: &CudaSlice<f32>,
        top_k: &CudaSlice<i32>,
        top_p: &CudaSlice<f32>,
        min_p: &CudaSlice<f32>,
        uniform: &CudaSlice<f64>,
        tokens: &mut CudaSlice<i32>,
    ) -> Result<()> {
        let rows = tokens.len();
        ensure!(
            logits.len() == rows * vocab
                && probs.len() == logits.len()
                && [
                    temperature.len(),
                    top_k.len(),
                    top_p.len(),
                    min_p.len(),
                    uniform.len()
                ]
                .iter()
                .all(|&l| l == rows),
            "sample: logits must be [{rows}, {vocab}] with {rows} of each parameter"
        );
        let v = vocab as i32;
        let mut launch = self.stream.launch_builder(self.function("sample"));
        launch
            .arg(logits)
            .arg(probs)
            .arg(&v)
            .arg(temperature)
            .arg(top_k)
            .arg(top_p)
            .arg(min_p)
            .arg(uniform)
            .arg(tokens);
        queue(launch, blocks((rows, 1), 1024, 0))?;
        Ok(())
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

    /// `n` values uniform in [−scale, scale), made on the device.
    pub fn random_bf16(&self, n: usize, seed: u64, scale: f32) -> Result<CudaSlice<bf16>> {
        self.random("fill_random_bf16", n, seed, scale)
    }
    pub fn random_f32(&self, n: usize, seed: u64, scale: f32) -> Result<CudaSlice<f32>> {
        self.random("fill_random_f32", n, seed, scale)
    }
    pub fn random_fp8(&self, n: usize, seed: u64, scale: f32) -> Result<CudaSlice<Fp8>> {
        self.random("fill_random_fp8", n, seed, scale)
    }

    fn random<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        kernel: &str,
        n: usize,
        seed: u64,
        scale: f32,
    ) -> Result<CudaSlice<T>> {
        let mut out = self.stream.alloc_zeros::<T>(n)?;
        let mut launch = self.stream.launch_builder(self.function(kernel));
        launch.arg(&mut out).arg(&n).arg(&seed).arg(&scale);
        queue(launch, strided(n, 256))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layout_reaches_its_last_matrix_last_row_end() {
        // 3 heads of a [rows=2, heads × 4] buffer, 3 columns each
        let per_head = Layout {
            offset: 1,
            row_stride: 12,
            batch_stride: 4,
        };
        assert_eq!(per_head.reach(2, 3, 3), 1 + 2 * 4 + 12 + 3);
        assert_eq!(Layout::dense(5).reach(4, 5, 1), 20);
        assert_eq!(Layout::dense(5).reach(0, 5, 1), 0);
    }

    #[test]
    fn entry_points_are_read_from_the_sources() {
        let gemm = super::super::KERNELS
            .iter()
            .find(|(n, _)| *n == "grouped_gemm")
            .unwrap()
            .1;
        assert_eq!(
            entry_points(gemm),
            ["grouped_gemm_bf16", "grouped_gemm_fp8"]
        );
        let permute = super::super::KERNELS
            .iter()
            .find(|(n, _)| *n == "moe_permute")
            .unwrap()
            .1;
        assert_eq!(
            entry_points(permute),
            [
                "moe_sort",
                "moe_permute",
                "moe_permute_fp8",
                "quantize_fp8",
                "moe_unpermute"
            ]
        );
        let total: usize = super::super::KERNELS
            .iter()
            .map(|(_, s)| entry_points(s).len())
            .sum();
        assert_eq!(total, 21);
    }
}
