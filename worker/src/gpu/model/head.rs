//! The end of a pass on the GPU: the final norm and `lm_head` over the rows asked for, and
//! the next tokens sampled where the logits are.

use cudarc::driver::CudaSlice;

use super::{GpuKv, GpuModel};
use crate::backend;
use crate::ensure;
use crate::error::Result;
use crate::model::cache::BlockTable;
use crate::sampling::{DeviceDraw, Next, Want};

impl GpuModel {
    /// The logits [rows, vocab] of the final hidden states `x` [n, hidden], and which of their
    /// rows is each output: every row, or with `last_only` each segment's last. A prompt
    /// chunk alone needs its last row only: 1 row through `lm_head`, not hundreds.
    pub(super) fn head(
        &self,
        x: &CudaSlice<f32>,
        segments: &[(usize, &mut BlockTable)],
        last_only: bool,
    ) -> Result<(CudaSlice<f32>, Vec<usize>)> {
        let (gpu, hidden, vocab) = (&self.gpu, self.cfg.hidden_size, self.cfg.vocab_size);
        let n = x.len() / hidden;
        let from = if last_only && segments.len() == 1 {
            n - 1
        } else {
            0
        };
        let rows = n - from;
        let mut normed = gpu.stream.alloc_zeros::<f32>(rows * hidden)?;
        gpu.rms_norm(
            &x.slice(from * hidden..),
            hidden,
            &self.norm,
            &mut normed,
            rows,
            self.cfg.rms_norm_eps as f32,
        )?;
        let mut logits = gpu.stream.alloc_zeros::<f32>(rows * vocab)?;
        gpu.linear(
            &self.bf16(&normed)?,
            &self.lm_head,
            &mut logits,
            (rows, vocab, hidden),
        )?;
        let outputs = if last_only && from == 0 {
            backend::last_rows(segments)
        } else {
            (0..rows).collect()
        };
        Ok((logits, outputs))
    }

    /// The same pass for a scheduler step: what `wants` asks of each segment's last row —
    /// its next token sampled here, its logits copied to the host, or nothing (an empty
    /// `Next::Logits`, for a pass that does not complete the sequence).
    pub fn forward_sampled(
        &self,
        tokens: &[u32],
        kv: &mut GpuKv,
        segments: &mut [(usize, &mut BlockTable)],
        wants: &[Want],
    ) -> Result<Vec<Next>> {
        ensure!(wants.len() == segments.len(), "one want per segment");
        let draws: Vec<Option<DeviceDraw>> = wants
            .iter()
            .map(|w| match w {
                Want::Token(draw) => Some(*draw),
                _ => None,
            })
            .collect();
        let (logits, rows) = self.pass(tokens, kv, segments, true)?;
        let (gpu, vocab) = (&self.gpu, self.cfg.vocab_size);
        let mut sampled = vec![0i32; rows.len()];
        if draws.iter().any(Option::is_some) {
            // Rows without a draw are sampled greedily and the result ignored: one launch.
            let each = |f: &dyn Fn(&DeviceDraw) -> f32| -> Vec<f32> {
                draws.iter().map(|d| d.as_ref().map_or(0.0, f)).collect()
            };
            let stream = &gpu.stream;
            // one row per segment, in order: decode rows, or one prompt chunk's last
            ensure!(
                logits.len() == rows.len() * vocab,
                "sampling on the GPU takes decode rows or a single prompt chunk"
            );
            let mut probs = stream.alloc_zeros::<f64>(logits.len())?;
            let mut tokens_out = stream.alloc_zeros::<i32>(rows.len())?;
            gpu.sample(
                &logits,
                &mut probs,
                vocab,
                &stream.clone_htod(&each(&|d| d.temperature))?,
                &stream.clone_htod(
                    &draws
                        .iter()
                        .map(|d| d.as_ref().map_or(0, |d| d.top_k as i32))
                        .collect::<Vec<_>>(),
                )?,
                &stream.clone_htod(&each(&|d| d.top_p))?,
                &stream.clone_htod(&each(&|d| d.min_p))?,
                &stream.clone_htod(
                    &draws
                        .iter()
                        .map(|d| d.as_ref().map_or(0.0, |d| d.uniform))
                        .collect::<Vec<_>>(),
                )?,
                &mut tokens_out,
            )?;
            sampled = stream.clone_dtoh(&tokens_out)?;
        }
        wants
            .iter()
            .zip(rows)
            .zip(sampled)
            .map(|((want, r), token)| match want {
                Want::Token(_) => {
                    // NaN logits leave the kernel without a token
                    ensure!(
                        (0..vocab as i32).contains(&token),
                        "the GPU sampler found no token (are the logits NaN?)"
                    );
                    Ok(Next::Token(token as u32))
                }
                Want::Logits => Ok(Next::Logits(
                    gpu.stream
                        .clone_dtoh(&logits.slice(r * vocab..(r + 1) * vocab))?,
                )),
                Want::Nothing => Ok(Next::Logits(Vec::new())),
            })
            .collect()
    }
}
