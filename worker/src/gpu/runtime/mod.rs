//! A CUDA device with the kernels built for it, cuBLAS, and one typed launch per kernel.
//! Launches check shapes first and answer a bad one with an error naming it; they queue on
//! the device's stream and return at once.
//!
//! The launches by concern: `elementwise.rs` (norm, activation, embedding, adds and casts),
//! `attention.rs` (rope, the latent cache, MLA decode), `moe.rs` (routing and the expert
//! order), `grouped_gemm.rs` (the experts' GEMMs and FP8 linears), `gemm.rs` (cuBLAS), `fp8.rs` (FP8
//! conversion), `sampling.rs` (tokens drawn on the device) and `random.rs` (test data).

mod attention;
mod elementwise;
mod fp8;
mod gemm;
mod grouped_gemm;
mod moe;
mod random;
mod sampling;

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaStream, LaunchArgs, LaunchConfig, sys::CUfunction_attribute,
};
use cudarc::nvrtc::Ptx;

use self::grouped_gemm::{GROUPED_GEMM_SHARED_BYTES, GROUPED_GEMM_W8_SHARED_BYTES};
use super::{KernelCache, Nvrtc, architecture, cuda_include_dir};
use crate::bail;
use crate::error::{Context, Result};

pub use self::fp8::Fp8;
pub use self::fp8::Fp8Activations;
pub use self::gemm::{GemmShape, GemmType, Layout};
pub use self::grouped_gemm::{Fp8GemmInput, GEMM_TILE_ROWS};
pub use self::moe::{GateRule, MoeOrder};

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
            Err(e) => format!("{e}"),
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
        for (entry, bytes) in [
            ("grouped_gemm_bf16", GROUPED_GEMM_SHARED_BYTES),
            ("grouped_gemm_fp8", GROUPED_GEMM_SHARED_BYTES),
            ("grouped_gemm_fp8_weights", GROUPED_GEMM_W8_SHARED_BYTES),
            ("linear_fp8", GROUPED_GEMM_SHARED_BYTES),
            ("linear_fp8_weights", GROUPED_GEMM_W8_SHARED_BYTES),
        ] {
            functions[entry].set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_points_are_read_from_the_sources() {
        let gemm = super::super::KERNELS
            .iter()
            .find(|(n, _)| *n == "grouped_gemm")
            .unwrap()
            .1;
        assert_eq!(
            entry_points(gemm),
            [
                "grouped_gemm_bf16",
                "grouped_gemm_fp8",
                "grouped_gemm_fp8_weights",
                "linear_fp8",
                "linear_fp8_weights"
            ]
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
        assert_eq!(total, 24);
    }
}
