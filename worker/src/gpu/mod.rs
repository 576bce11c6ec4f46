//! The GPU path. Kernels are CUDA C sources in `worker/kernels/`, embedded in the binary and
//! compiled at start-up with NVRTC into a cubin for the device's architecture (`sm_80` for
//! A100, `sm_90a` for H100/H200), cached on disk. CUDA's libraries are loaded at run time, so
//! the workspace builds and tests with no CUDA installed.
//!
//! - [`nvrtc`]: the compiler, CUDA 12 or 13;
//! - [`runtime`]: a device, its kernels and cuBLAS, and typed launches;
//! - [`model`]: the model step on the device; [`experts`]: its routed experts, whole or an
//!   expert-parallel rank's share; [`nccl`]: the group's exchanges GPU to GPU;
//! - [`check`]: every kernel and the model step against the CPU path, and benchmarks at
//!   DeepSeek-V3 shapes (`deepseek-worker gpu-check`, run by `tests/gpu/run.sh`).

pub mod check;
pub mod experts;
pub mod model;
pub mod nccl;
pub mod nvrtc;
pub mod runtime;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::bail;
use crate::error::Result;

pub use nvrtc::Nvrtc;

/// Included textually into every kernel (NVRTC sees one source per program).
const COMMON: &str = include_str!("../../kernels/common.cuh");

/// Every kernel source, by name.
pub const KERNELS: &[(&str, &str)] = &[
    ("rms_norm", include_str!("../../kernels/rms_norm.cu")),
    ("silu_mul", include_str!("../../kernels/silu_mul.cu")),
    ("rope", include_str!("../../kernels/rope.cu")),
    ("moe_gate", include_str!("../../kernels/moe_gate.cu")),
    ("moe_permute", include_str!("../../kernels/moe_permute.cu")),
    (
        "grouped_gemm",
        include_str!("../../kernels/grouped_gemm.cu"),
    ),
    ("mla_decode", include_str!("../../kernels/mla_decode.cu")),
    ("sampling", include_str!("../../kernels/sampling.cu")),
    ("fp8", include_str!("../../kernels/fp8.cu")),
    ("random", include_str!("../../kernels/random.cu")),
    ("elementwise", include_str!("../../kernels/elementwise.cu")),
];

/// What CI compiles every kernel for: PTX for both generations, and the cubins the two
/// GPU pools run.
pub const CI_ARCHITECTURES: &[&str] = &["compute_80", "compute_90", "sm_80", "sm_90a"];

/// A kernel's whole source, `common.cuh` included.
pub fn full_source(source: &str) -> String {
    format!(
        "{COMMON}\n{}",
        source.replace("#include \"common.cuh\"", "")
    )
}

/// The cubin architecture for a compute capability: Hopper gets `sm_90a` (its own
/// instructions, as CUTLASS and DeepGEMM build), others their plain `sm_XY`.
pub fn architecture(major: i32, minor: i32) -> String {
    match (major, minor) {
        (9, 0) => "sm_90a".into(),
        _ => format!("sm_{major}{minor}"),
    }
}

/// Where the CUDA headers are: `DSD_CUDA_INCLUDE`, else `$CUDA_PATH/include`, else
/// `/usr/local/cuda/include`; None when none holds `cuda_bf16.h`.
pub fn cuda_include_dir() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("DSD_CUDA_INCLUDE").map(PathBuf::from),
        std::env::var_os("CUDA_PATH").map(|p| PathBuf::from(p).join("include")),
        Some(PathBuf::from("/usr/local/cuda/include")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|dir| dir.join("cuda_bf16.h").exists())
}

/// Where the worker image ships the cubins it compiled when it was built (sm_80, sm_90a),
/// read-only.
pub const SHIPPED_KERNELS_ENV: &str = "DSD_SHIPPED_KERNELS";

/// Compiled kernels on disk, keyed by a hash of the source: the cubins an image ships, then a
/// writable cache, so a start-up on a GPU the image was built for, or after the first
/// elsewhere (or on a machine without NVRTC, given a directory filled by
/// `deepseek-worker kernels`), compiles nothing.
pub struct KernelCache {
    shipped: Option<PathBuf>,
    dir: Option<PathBuf>,
}

impl KernelCache {
    /// Shipped cubins from `DSD_SHIPPED_KERNELS`; the cache in `DSD_KERNEL_CACHE` (the
    /// operator's pods: a path on their writable `/tmp`), else
    /// `$XDG_CACHE_HOME/deepseek-worker/kernels`, else `~/.cache/deepseek-worker/kernels`.
    pub fn from_env() -> Self {
        let dir = std::env::var_os(deepseek_proto::pod::env::KERNEL_CACHE)
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                    .map(|d| d.join("deepseek-worker").join("kernels"))
            });
        KernelCache {
            shipped: std::env::var_os(SHIPPED_KERNELS_ENV).map(PathBuf::from),
            dir,
        }
    }

    pub fn at(dir: PathBuf) -> Self {
        KernelCache {
            shipped: None,
            dir: Some(dir),
        }
    }

    /// The file a kernel's cubin for `architecture` is kept in, under `dir`.
    fn file(dir: &Path, name: &str, source: &str, architecture: &str) -> PathBuf {
        let hash = crate::fnv1a([source.as_bytes(), architecture.as_bytes()]);
        dir.join(format!("{name}-{architecture}-{hash:016x}.cubin"))
    }

    /// The file a kernel's cubin for `architecture` is cached in.
    pub fn path(&self, name: &str, source: &str, architecture: &str) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        Some(Self::file(dir, name, source, architecture))
    }

    /// A kernel's cubin, shipped or cached, if either has it.
    fn lookup(&self, name: &str, source: &str, architecture: &str) -> Option<Vec<u8>> {
        [&self.shipped, &self.dir]
            .into_iter()
            .flatten()
            .find_map(|dir| std::fs::read(Self::file(dir, name, source, architecture)).ok())
    }

    /// Every kernel's cubin for `architecture`: from the cache, else compiled (and cached).
    /// `nvrtc` is only needed for what the cache lacks.
    pub fn cubins(
        &self,
        architecture: &str,
        nvrtc: Option<&Nvrtc>,
        include: Option<&Path>,
    ) -> Result<Vec<(&'static str, Vec<u8>)>> {
        KERNELS
            .iter()
            .map(|&(name, source)| {
                let source = full_source(source);
                if let Some(cubin) = self.lookup(name, &source, architecture) {
                    return Ok((name, cubin));
                }
                let (Some(nvrtc), Some(include)) = (nvrtc, include) else {
                    bail!(
                        "kernel {name} for {architecture} is not in the kernel cache ({}) and \
                         NVRTC or the CUDA headers are missing to compile it",
                        self.dir
                            .as_ref()
                            .map_or("none".into(), |d| d.display().to_string())
                    );
                };
                let cubin = nvrtc.compile(name, &source, architecture, include)?;
                // A cache that cannot be written costs the next start-up a compile, no more.
                if let Some(path) = self.path(name, &source, architecture)
                    && let Err(err) = store(&path, &cubin)
                {
                    tracing::warn!(path = %path.display(), error = %err, "kernel not cached");
                }
                Ok((name, cubin))
            })
            .collect()
    }
}

/// Writes whole or not at all: a concurrent start-up never reads half a cubin.
fn store(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let partial = path.with_extension(format!("{}.partial", std::process::id()));
    std::fs::write(&partial, bytes)?;
    std::fs::rename(&partial, path)?;
    Ok(())
}

/// `--device`: `cpu`, or `cuda:N` (`cuda` is `cuda:0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("expected `cpu` or `cuda:N` (N a GPU ordinal), got `{s}`")),
        }
    }
}

/// `--dtype`: how an FP8 checkpoint's linear weights (routed experts included) are held
/// and multiplied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Dtype {
    /// FP8 for an FP8 checkpoint, bf16 otherwise.
    Auto,
    /// bf16 weights (an FP8 checkpoint dequantised at load).
    Bf16,
    /// FP8 weights, one byte each (but `kv_b_proj`, bf16): FP8 tensor-core GEMMs on sm_89
    /// and later; elsewhere (A100) bf16 GEMMs on weights dequantised tile by tile inside
    /// the kernel.
    Fp8,
}

/// What `dtype` comes to for a checkpoint that is (or is not) FP8. Any GPU holds FP8
/// weights; only sm_89 and later multiply in FP8 (`Gpu::has_fp8_tensor_cores`).
pub fn resolve_dtype(dtype: Dtype, fp8_checkpoint: bool) -> Dtype {
    match dtype {
        Dtype::Auto if fp8_checkpoint => Dtype::Fp8,
        Dtype::Auto | Dtype::Bf16 => Dtype::Bf16,
        Dtype::Fp8 => Dtype::Fp8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_and_dtype_flags() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert!(
            "gpu:1"
                .parse::<DeviceSpec>()
                .unwrap_err()
                .contains("`gpu:1`")
        );
        assert!("cuda:x".parse::<DeviceSpec>().is_err());

        assert_eq!(resolve_dtype(Dtype::Auto, true), Dtype::Fp8);
        assert_eq!(resolve_dtype(Dtype::Auto, false), Dtype::Bf16);
        assert_eq!(resolve_dtype(Dtype::Bf16, true), Dtype::Bf16);
        assert_eq!(resolve_dtype(Dtype::Fp8, true), Dtype::Fp8);
        assert_eq!(architecture(9, 0), "sm_90a");
        assert_eq!(architecture(8, 0), "sm_80");
        assert_eq!(architecture(8, 9), "sm_89");
    }

    #[test]
    fn the_cache_serves_without_nvrtc_once_filled() {
        let dir = std::env::temp_dir().join(format!("dsd-kernels-{}", std::process::id()));
        let cache = KernelCache::at(dir.clone());
        let missing = cache.cubins("sm_90a", None, None).unwrap_err().to_string();
        assert!(missing.contains("not in the kernel cache"), "{missing}");
        for &(name, source) in KERNELS {
            let path = cache.path(name, &full_source(source), "sm_90a").unwrap();
            store(&path, name.as_bytes()).unwrap();
        }
        let cubins = cache.cubins("sm_90a", None, None).unwrap();
        assert!(cubins.iter().all(|(name, cubin)| cubin == name.as_bytes()));
        // The same directory shipped in an image serves a cache that holds nothing.
        let empty = std::env::temp_dir().join(format!("dsd-kernels-empty-{}", std::process::id()));
        let image = KernelCache {
            shipped: Some(dir.clone()),
            dir: Some(empty),
        };
        assert_eq!(image.cubins("sm_90a", None, None).unwrap(), cubins);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// CI installs NVRTC and the headers from PyPI and sets `DSD_REQUIRE_NVRTC`; elsewhere
    /// the test says what it skipped.
    #[test]
    fn every_kernel_compiles_for_a100_and_h100() {
        let required = std::env::var_os("DSD_REQUIRE_NVRTC").is_some();
        let (nvrtc, include) = match (Nvrtc::load(), cuda_include_dir()) {
            (Ok(nvrtc), Some(include)) => (nvrtc, include),
            (nvrtc, include) => {
                let why = format!(
                    "NVRTC: {:?}, CUDA headers: {include:?}",
                    nvrtc.err().map(|e| e.to_string())
                );
                assert!(!required, "DSD_REQUIRE_NVRTC is set but {why}");
                eprintln!("skipped: {why}");
                return;
            }
        };
        eprintln!(
            "NVRTC {}.{} ({})",
            nvrtc.version.0, nvrtc.version.1, nvrtc.found
        );
        for (name, source) in KERNELS {
            for architecture in CI_ARCHITECTURES {
                let out = nvrtc
                    .compile(name, &full_source(source), architecture, &include)
                    .unwrap_or_else(|e| panic!("{e}"));
                if architecture.starts_with("compute_") {
                    let ptx = String::from_utf8_lossy(&out);
                    assert!(
                        ptx.contains(".entry"),
                        "{name} for {architecture}: no entry"
                    );
                } else {
                    assert!(
                        out.starts_with(b"\x7fELF"),
                        "{name} for {architecture}: no ELF"
                    );
                }
            }
        }
    }
}
