//! The model behind one interface, whatever its device. The scheduler, `generate` and the
//! server hold an `Arc<dyn Backend>`; the CPU [`Model`] and the [`GpuModel`] implement it,
//! and nothing else in the worker asks which one it has.

use std::path::Path;
use std::sync::Arc;

use crate::bail;
use crate::config::Config;
use crate::error::Result;
use crate::gpu::model::{GpuKv, GpuModel};
use crate::gpu::runtime::Gpu;
use crate::gpu::{DeviceSpec, Dtype};
use crate::model::Model;
use crate::model::cache::{BlockTable, KvPool};
use crate::model::moe::ExpertLoad;
use crate::sampling::{Next, Want};

/// A loaded model on its device.
pub trait Backend: Send + Sync {
    fn config(&self) -> &Config;

    /// A KV cache of `blocks` blocks on this backend's device.
    fn new_cache(&self, blocks: usize) -> Result<KvCache>;

    /// How many KV blocks fit in `fraction` of the memory left once the weights are loaded,
    /// keeping room for a pass of `batch_tokens` tokens.
    fn kv_blocks_within(&self, fraction: f64, batch_tokens: usize) -> Result<usize>;

    /// One forward pass: appends `pass`'s rows to their sequences' caches and returns what
    /// `pass.output` asks for.
    fn forward(&self, cache: &mut KvCache, pass: Pass<'_, '_>) -> Result<Vec<Next>>;

    /// An expert-parallel rank's part in a pass it has no tokens for: every MoE layer's
    /// exchange with nothing to send, so that peers with tokens can go on.
    fn forward_idle(&self) -> Result<()>;

    /// Whether a pass can sample next tokens where the logits are (`Want::Token`).
    fn samples_on_device(&self) -> bool;

    /// Prompt chunks of up to this many tokens compute in a batch-invariant pass, among other
    /// sequences' rows, exactly what they compute in a pass of their own (0: none do), so the
    /// scheduler runs them with the decode rows and each weight is read once for all.
    fn batchable_chunk_tokens(&self) -> usize;

    /// Tokens routed to each expert so far.
    fn expert_load(&self) -> &ExpertLoad;

    /// Bytes this rank has sent to the others of its expert-parallel group, if in one.
    fn expert_bytes_sent(&self) -> Option<u64>;
}

/// The rows of one forward pass.
pub struct Pass<'a, 'b> {
    pub tokens: &'a [u32],
    /// Each sequence's row count and block table, in row order. The tables hold blocks for
    /// the new positions and advance past them.
    pub segments: &'a mut [(usize, &'b mut BlockTable)],
    /// Every row's numbers exactly what they would be alone (the CPU path's batched decode,
    /// with short prompt chunks among its rows; cuBLAS picks kernels by batch size, so GPU
    /// rows agree with their runs alone to rounding, not bit for bit).
    pub batch_invariant: bool,
    pub output: Output<'a>,
}

/// What a pass gives back.
#[derive(Clone, Copy)]
pub enum Output<'a> {
    /// The logits of every row, in row order.
    EveryRow,
    /// For each segment, what its last row should give. `Want::Nothing` gives an empty
    /// `Next::Logits`.
    LastRows(&'a [Want]),
}

/// A paged KV cache: the pool hands out blocks (and, on the CPU, holds their contents); a
/// GPU backend keeps the contents on its device.
pub struct KvCache {
    pub pool: KvPool,
    pub(crate) device: Option<GpuKv>,
}

impl KvCache {
    pub(crate) fn in_host_memory(pool: KvPool) -> Self {
        KvCache { pool, device: None }
    }

    pub(crate) fn on_gpu(kv: GpuKv, pool: KvPool) -> Self {
        KvCache {
            pool,
            device: Some(kv),
        }
    }
}

/// Opens the checkpoint in `dir` on `device`: the CPU model, or the GPU model with its
/// routed experts in `dtype`.
pub fn open(dir: &Path, device: DeviceSpec, dtype: Dtype) -> Result<Arc<dyn Backend>> {
    Ok(match device {
        DeviceSpec::Cpu => Arc::new(Model::open(dir)?),
        DeviceSpec::Cuda(ordinal) => Arc::new(GpuModel::open(dir, open_gpu(ordinal)?, dtype)?),
    })
}

/// Opens GPU `ordinal` and says which it is.
pub fn open_gpu(ordinal: usize) -> Result<Gpu> {
    let gpu = Gpu::open(ordinal)?;
    tracing::info!(gpu = %gpu.name, architecture = %gpu.architecture, compiler = %gpu.compiler, "GPU opened");
    Ok(gpu)
}

/// The last row of each segment, as indices into the pass's rows.
pub fn last_rows(segments: &[(usize, &mut BlockTable)]) -> Vec<usize> {
    segments
        .iter()
        .scan(0, |end, (rows, _)| {
            *end += rows;
            Some(*end - 1)
        })
        .collect()
}

/// Checks a pass's rows before any work: as many tokens as the segments hold, none empty,
/// blocks reserved for every new position, ids inside the vocabulary.
pub fn check_rows(
    tokens: &[u32],
    segments: &[(usize, &mut BlockTable)],
    vocab_size: usize,
) -> Result<()> {
    let rows: usize = segments.iter().map(|(n, _)| n).sum();
    if tokens.is_empty() || tokens.len() != rows || segments.iter().any(|(n, _)| *n == 0) {
        bail!("forward needs at least one token, as many as the segments hold, in every segment");
    }
    if segments.iter().any(|(n, t)| t.tokens() + n > t.capacity()) {
        bail!("a sequence has no KV blocks reserved for its new tokens");
    }
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab_size) {
        bail!("token id {bad} is outside the vocabulary ({vocab_size})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_checked_before_a_pass() {
        let mut pool = KvPool::new(0, 0, 0, 4);
        let (mut a, mut b) = (BlockTable::default(), BlockTable::default());
        assert!(pool.reserve(&mut a, 3) && pool.reserve(&mut b, 1));
        let cases: [(&[u32], [usize; 2], Option<&str>); 5] = [
            (&[1, 2, 3, 4], [3, 1], None),
            (&[1, 2, 3], [3, 1], Some("as many as")),
            (&[1, 2, 3, 4], [4, 0], Some("in every segment")),
            (&[1; 20], [3, 17], Some("no KV blocks")),
            (&[1, 2, 3, 99], [3, 1], Some("token id 99")),
        ];
        for (tokens, rows, error) in cases {
            let result = check_rows(tokens, &[(rows[0], &mut a), (rows[1], &mut b)], 10);
            match error {
                None => result.unwrap(),
                Some(expected) => assert!(
                    result
                        .as_ref()
                        .is_err_and(|e| e.to_string().contains(expected)),
                    "{rows:?}: {result:?}"
                ),
            }
        }
    }

    #[test]
    fn last_rows_are_each_segments_end() {
        let (mut a, mut b, mut c) = Default::default();
        assert_eq!(
            last_rows(&[(1, &mut a), (5, &mut b), (2, &mut c)]),
            [0, 5, 7]
        );
    }
}
