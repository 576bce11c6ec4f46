//! Token sampling on the device: one token per row of logits, with per-row parameters.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{Gpu, blocks, queue};
use crate::ensure;
use crate::error::Result;

impl Gpu {
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
}
