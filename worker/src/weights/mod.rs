//! Checkpoint loading: safetensors files (single or sharded through
//! `model.safetensors.index.json`), memory-mapped, read as f32.
//!
//! Every header is checked against its file before any tensor is read: a missing tensor, a
//! wrong shape or dtype, a truncated file or offsets that point outside the data are errors
//! naming the tensor and the file, never a panic or an out-of-bounds read. FP8 e4m3 weights
//! are dequantised with their `weight_scale_inv` block scales,
//! `w[i][j] = f32(q[i][j]) * scale_inv[i / block_rows][j / block_cols]`: into f32, or in
//! the CPU kernels' registers from the bytes read in place ([`Fp8Weights`]).
//!
//! The parts: `checkpoint.rs` opens the files (one, or the shards an index names) and loads
//! tensors; `header.rs` parses and checks a safetensors header; `dtype.rs` the element types
//! and their conversion; `fp8.rs` e4m3 decoding and block scales; `progress.rs` the
//! terminal's progress line.

mod checkpoint;
mod dtype;
mod fp8;
mod header;
mod progress;
#[cfg(test)]
mod tests_support;

use std::fmt;
use std::path::PathBuf;

pub use self::checkpoint::{Checkpoint, check_safetensors};
pub use self::dtype::{Bf16Weights, Dtype};
pub use self::fp8::{E4M3_AS_F16_FACTOR, Fp8Weights, fp8_e4m3_to_f32};
pub use self::header::TensorInfo;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// DeepSeek-V3's block size, used unless the config says otherwise.
pub const DEFAULT_FP8_BLOCK: [usize; 2] = [128, 128];

/// A load failure, naming the file and, where there is one, the tensor.
#[derive(Debug)]
pub struct LoadError {
    pub file: PathBuf,
    pub tensor: Option<String>,
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.tensor {
            Some(tensor) => write!(
                f,
                "{}: tensor {tensor}: {}",
                self.file.display(),
                self.message
            ),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for LoadError {}
