//! The GPU path's kernels: CUDA C sources in `worker/kernels/`, embedded in the binary and
//! compiled at start-up with NVRTC for the device's architecture (`compute_80` for A100,
//! `compute_90` for H100/H200). NVRTC is loaded at run time, so the workspace builds and
//! tests with no CUDA installed; without it this module says what is missing.
//!
//! Not yet: running them (device memory, launches, cuBLAS) — see README, "Status".

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};

/// Included textually into every kernel (NVRTC sees one source per program).
const COMMON: &str = include_str!("../kernels/common.cuh");

/// Every kernel source, by name.
pub const KERNELS: &[(&str, &str)] = &[
    ("rms_norm", include_str!("../kernels/rms_norm.cu")),
    ("silu_mul", include_str!("../kernels/silu_mul.cu")),
    ("rope", include_str!("../kernels/rope.cu")),
    ("moe_permute", include_str!("../kernels/moe_permute.cu")),
];

/// The virtual architectures the kernels are built for.
pub const ARCHITECTURES: &[&str] = &["compute_80", "compute_90"];

/// A loaded NVRTC.
pub struct Nvrtc {
    pub version: (i32, i32),
}

impl Nvrtc {
    /// Loads whichever libnvrtc the library path has, or says why none was found.
    pub fn load() -> Result<Self> {
        // SAFETY: only probes for the library with dlopen.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            bail!(
                "NVRTC not found: no libnvrtc on the library path (install CUDA, or `pip install \
                 nvidia-cuda-nvrtc-cu12` and add its nvidia/cuda_nvrtc/lib to LD_LIBRARY_PATH)"
            );
        }
        let (mut major, mut minor) = (0, 0);
        // SAFETY: the library is present; nvrtcVersion writes two ints.
        unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }.result()?;
        Ok(Nvrtc {
            version: (major, minor),
        })
    }

    /// Compiles kernel source `source` to PTX for `architecture`; `include` holds
    /// `cuda_bf16.h` and `cuda_fp8.h`. Compile errors come with NVRTC's log.
    pub fn compile(
        &self,
        name: &str,
        source: &str,
        architecture: &'static str,
        include: &Path,
    ) -> Result<String> {
        let source = format!(
            "{COMMON}\n{}",
            source.replace("#include \"common.cuh\"", "")
        );
        let options = CompileOptions {
            arch: Some(architecture),
            include_paths: vec![include.display().to_string()],
            name: Some(format!("{name}.cu")),
            options: vec!["--std=c++17".into()],
            ..Default::default()
        };
        match compile_ptx_with_opts(source, options) {
            Ok(ptx) => Ok(ptx.to_src()),
            Err(err) => bail!("{name}.cu for {architecture}: {err:?}"),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
        eprintln!("NVRTC {}.{}", nvrtc.version.0, nvrtc.version.1);
        for (name, source) in KERNELS {
            for architecture in ARCHITECTURES {
                let ptx = nvrtc
                    .compile(name, source, architecture, &include)
                    .unwrap_or_else(|e| panic!("{e:#}"));
                assert!(
                    ptx.contains(".entry"),
                    "{name} for {architecture}: no kernel entry in the PTX"
                );
            }
        }
    }
}
