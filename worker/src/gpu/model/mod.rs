//! The model step on a GPU: the CPU path's computation (`model/`) with the weights on the
//! device as bf16, or with FP8 compute an FP8 checkpoint's linear layers and routed experts
//! as stored (`linear.rs`, `experts.rs`), and each step a sequence of the kernels in
//! `kernels/` and cuBLAS GEMMs, activations f32 between them and bf16 (or FP8) into the
//! tensor cores. The parts mirror `model/`: `attention.rs` (MLA), `mlp.rs` (dense and MoE),
//! `head.rs` (final norm, `lm_head`, sampling on the device), `load.rs` (weights onto the
//! device).
//!
//! The latent cache lives on the device in the blocks a [`KvPool`] hands out (the pool does
//! the bookkeeping, as on the CPU, with no host storage), so the scheduler batches GPU steps
//! as it batches CPU ones.

mod attention;
mod head;
mod linear;
mod load;
mod mlp;

use std::cell::Cell;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use cudarc::driver::CudaSlice;
use deepseek_proto::placement::PlacementPlan;
use half::bf16;

use self::attention::{Attention, Rows};
use self::load::{Loader, Source};
use self::mlp::FeedForward;
use super::experts::GpuExperts;
use super::runtime::Gpu;
use super::{Dtype, resolve_dtype};
use crate::backend::{self, Backend, KvCache, Output, Pass};
use crate::config::Config;
use crate::ep::{ExpertParallel, Transport, Wire, plan_matches_group, plan_matches_model};
use crate::error::{Context, Result};
use crate::model::attention::softmax_scale;
use crate::model::cache::{BLOCK_TOKENS, BlockTable, KvPool};
use crate::model::moe::{ExpertLoad, RoutedExperts, Routing};
use crate::model::ops::Rope;
use crate::sampling::Next;
use crate::weights::{Checkpoint, DEFAULT_FP8_BLOCK};
use crate::{bail, ensure};

/// One decoder layer's weights, but its routed experts (those are in `GpuModel::routed`).
struct Layer {
    input_norm: CudaSlice<bf16>,
    attention: Attention,
    post_norm: CudaSlice<bf16>,
    ffn: FeedForward,
}

/// Where a model's routed experts run: all here, or spread over an expert-parallel group.
enum Routed {
    Local(GpuExperts),
    Parallel(ExpertParallel),
}

pub struct GpuModel {
    gpu: Arc<Gpu>,
    routed: Routed,
    /// Tokens routed to each expert (counted where the routing reaches the host: on a rank
    /// of an expert-parallel group).
    expert_load: ExpertLoad,
    /// How FP8 checkpoint weights are held and multiplied (bf16 or FP8).
    pub dtype: Dtype,
    cfg: Config,
    embed: CudaSlice<bf16>,
    layers: Vec<Layer>,
    norm: CudaSlice<bf16>,
    lm_head: CudaSlice<bf16>,
    rope: Rope,
    softmax_scale: f32,
}

/// The latent cache on the device: per layer [blocks × 16, kv_lora] and
/// [blocks × 16, rope] bf16, indexed by the blocks of a [`KvPool`] of the same size.
pub struct GpuKv {
    c_kv: Vec<CudaSlice<bf16>>,
    k_pe: Vec<CudaSlice<bf16>>,
    blocks: usize,
}

impl GpuModel {
    /// Loads a checkpoint directory onto `gpu`. With FP8 compute (`--dtype fp8`, or auto
    /// for an FP8 checkpoint) every FP8 linear weight stays FP8 but `kv_b_proj` (see
    /// `Attention::kv_up`): FP8 GEMMs on sm_89 and later, weight-only FP8 elsewhere; the
    /// embeddings, norms, router and `lm_head` are bf16 (f32 router) as stored.
    pub fn open(dir: &Path, gpu: Gpu, dtype: Dtype) -> Result<Self> {
        let (cfg, ckpt, dtype) = Self::checkpoint(dir, dtype)?;
        Self::build(
            cfg,
            Arc::new(gpu),
            dtype,
            Source::Checkpoint(&ckpt),
            &|_, _| true,
            |e| Ok(Routed::Local(e)),
        )
    }

    /// Loads rank `rank` of an expert-parallel group: the replicated parts and the routed
    /// experts `plan` gives it. `join` is called once the weights are on the device and
    /// returns the group's transport; tokens cross it through host memory.
    pub fn open_rank(
        dir: &Path,
        gpu: Gpu,
        dtype: Dtype,
        (plan, rank, wire): (PlacementPlan, usize, Wire),
        join: impl FnOnce(&Gpu) -> Result<Arc<dyn Transport>>,
    ) -> Result<(Self, Arc<dyn Transport>)> {
        let (cfg, ckpt, dtype) = Self::checkpoint(dir, dtype)?;
        plan_matches_model(&plan, cfg.moe.n_routed_experts)?;
        let hidden = cfg.hidden_size;
        let owns = |layer: usize, e: usize| plan.layer(layer as u32)[e].contains(&(rank as u32));
        let mut joined = None;
        let model = Self::build(
            cfg,
            Arc::new(gpu),
            dtype,
            Source::Checkpoint(&ckpt),
            &owns,
            |e| {
                let transport = join(&e.gpu)?;
                plan_matches_group(&plan, transport.as_ref(), rank)?;
                joined = Some(transport.clone());
                let ep = ExpertParallel::new(Box::new(e), plan.clone(), transport, wire, hidden);
                Ok(Routed::Parallel(ep))
            },
        )?;
        Ok((model, joined.expect("the experts were loaded")))
    }

    /// The configuration, the opened checkpoint and the weights' precision `dtype` comes to.
    fn checkpoint(dir: &Path, dtype: Dtype) -> Result<(Config, Checkpoint, Dtype)> {
        let cfg = Config::from_file(&dir.join("config.json"))?;
        let asked = dtype;
        let mut dtype = resolve_dtype(asked, cfg.fp8.is_some());
        if dtype == Dtype::Fp8 {
            // The FP8 GEMM reads 16-byte rows and 128×128 scale blocks.
            let (hidden, width) = (cfg.hidden_size, cfg.moe.moe_intermediate_size);
            let why = match &cfg.fp8 {
                None => Some("needs an FP8 checkpoint".to_string()),
                Some(fp8) if fp8.block != [128, 128] => Some(format!(
                    "needs 128×128 weight blocks, this checkpoint has {:?}",
                    fp8.block
                )),
                Some(_) if hidden % 16 != 0 || width % 16 != 0 => Some(format!(
                    "needs hidden ({hidden}) and expert width ({width}) to be multiples of 16"
                )),
                Some(_) => None,
            };
            if let Some(why) = why {
                if asked == Dtype::Fp8 {
                    bail!("--dtype fp8 {why}: use --dtype bf16");
                }
                tracing::info!("FP8 weights {why}; running them in bf16");
                dtype = Dtype::Bf16;
            }
        }
        let block = cfg.fp8.as_ref().map_or(DEFAULT_FP8_BLOCK, |f| f.block);
        let ckpt = Checkpoint::open(dir)?.with_fp8_block(block);
        Ok((cfg, ckpt, dtype))
    }

    /// A model of `cfg`'s shapes with random weights made on the device: benchmarks at
    /// DeepSeek-V3 size without its checkpoint.
    pub fn random(cfg: Config, gpu: Gpu, dtype: Dtype, seed: u64) -> Result<Self> {
        Self::build(
            cfg,
            Arc::new(gpu),
            dtype,
            Source::Random(Cell::new(seed)),
            &|_, _| true,
            |e| Ok(Routed::Local(e)),
        )
    }

    /// Loads everything from `source`: the routed experts `owns` selects, handed to
    /// `routed` once every other weight is on the device.
    fn build(
        cfg: Config,
        gpu: Arc<Gpu>,
        dtype: Dtype,
        source: Source<'_>,
        owns: &dyn Fn(usize, usize) -> bool,
        routed: impl FnOnce(GpuExperts) -> Result<Routed>,
    ) -> Result<Self> {
        let load = Loader {
            gpu: &gpu,
            source,
            fp8: dtype == Dtype::Fp8,
        };
        let (vocab, hidden) = (cfg.vocab_size, cfg.hidden_size);
        let embed = load.matrix("model.embed_tokens.weight", vocab, hidden)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                load.layer(&cfg, l)
                    .with_context(|| format!("layer {l} onto the GPU"))
            })
            .collect::<Result<_>>()?;
        let lm_head = if cfg.tie_word_embeddings && !load.contains("lm_head.weight") {
            load.matrix("model.embed_tokens.weight", vocab, hidden)?
        } else {
            load.matrix("lm_head.weight", vocab, hidden)?
        };
        let norm = load.vector("model.norm.weight", hidden)?;
        let experts = GpuExperts {
            layers: (0..cfg.num_hidden_layers)
                .map(|l| {
                    load.experts(&cfg, l, owns)
                        .with_context(|| format!("layer {l}'s experts onto the GPU"))
                })
                .collect::<Result<_>>()?,
            gpu: gpu.clone(),
            hidden,
            width: cfg.moe.moe_intermediate_size,
        };
        Ok(GpuModel {
            routed: routed(experts)?,
            expert_load: ExpertLoad::new(cfg.num_hidden_layers, cfg.moe.n_routed_experts),
            dtype,
            rope: Rope::new(&cfg),
            softmax_scale: softmax_scale(&cfg) as f32,
            gpu,
            cfg,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Device storage for `blocks` cache blocks, and the pool that hands them out.
    pub fn new_kv(&self, blocks: usize) -> Result<(GpuKv, KvPool)> {
        let slots = blocks * BLOCK_TOKENS;
        let stream = &self.gpu.stream;
        let layers = self.layers.len();
        let kv = GpuKv {
            c_kv: (0..layers)
                .map(|_| stream.alloc_zeros(slots * self.cfg.kv_lora_rank))
                .collect::<Result<_, _>>()?,
            k_pe: (0..layers)
                .map(|_| stream.alloc_zeros(slots * self.cfg.qk_rope_head_dim))
                .collect::<Result<_, _>>()?,
            blocks,
        };
        // bookkeeping only: the storage is `kv`
        Ok((kv, KvPool::new(0, 0, 0, blocks)))
    }

    /// Runs the rows of several sequences, as the CPU path's `Model::forward_batch`:
    /// `segments` gives each one's row count and block table, in row order; the tables must
    /// have blocks reserved for the new positions, and advance past them. Returns the logits
    /// [rows][vocab], or with `last_only` each segment's last row's (what sampling needs).
    pub fn forward_batch(
        &self,
        tokens: &[u32],
        kv: &mut GpuKv,
        segments: &mut [(usize, &mut BlockTable)],
        last_only: bool,
    ) -> Result<Vec<Vec<f32>>> {
        let (logits, rows) = self.pass(tokens, kv, segments, last_only)?;
        let vocab = self.cfg.vocab_size;
        let logits = self.gpu.stream.clone_dtoh(&logits)?;
        Ok(rows
            .iter()
            .map(|&r| logits[r * vocab..(r + 1) * vocab].to_vec())
            .collect())
    }

    /// One pass; the logits [rows, vocab] on the device, and which of their rows is each
    /// output (every row, or with `last_only` each segment's last).
    fn pass(
        &self,
        tokens: &[u32],
        kv: &mut GpuKv,
        segments: &mut [(usize, &mut BlockTable)],
        last_only: bool,
    ) -> Result<(CudaSlice<f32>, Vec<usize>)> {
        let (gpu, hidden) = (&self.gpu, self.cfg.hidden_size);
        backend::check_rows(tokens, segments, self.cfg.vocab_size)?;
        ensure!(
            segments
                .iter()
                .flat_map(|(_, t)| t.blocks())
                .all(|&b| (b as usize) < kv.blocks),
            "a block table names blocks outside the GPU cache"
        );
        let rows = Rows::upload(gpu, &self.rope, segments)?;
        let n = rows.count;
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let mut x = gpu.stream.alloc_zeros::<f32>(n * hidden)?;
        gpu.embedding(&self.embed, &gpu.stream.clone_htod(&ids)?, &mut x, hidden)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = self.bf16(&self.norm_rows(&x, &layer.input_norm, n)?)?;
            gpu.add(&mut x, &self.attention(l, &layer.attention, &h, &rows, kv)?)?;
            let h = self.norm_rows(&x, &layer.post_norm, n)?;
            let hb = self.bf16(&h)?;
            let y = match &layer.ffn {
                FeedForward::Dense(mlp) => self.dense(mlp, &hb, n)?,
                FeedForward::Moe(moe) => self.moe(l, moe, &h, &hb, n)?,
            };
            gpu.add(&mut x, &y)?;
        }
        let out = self.head(&x, segments, last_only)?;
        for (rows, table) in segments.iter_mut() {
            table.advance(*rows);
        }
        Ok(out)
    }

    /// RMSNorm of `rows` dense rows.
    fn norm_rows(
        &self,
        x: &CudaSlice<f32>,
        weight: &CudaSlice<bf16>,
        rows: usize,
    ) -> Result<CudaSlice<f32>> {
        let cols = weight.len();
        let mut y = self.gpu.stream.alloc_zeros::<f32>(rows * cols)?;
        self.gpu.rms_norm(
            &x.as_view(),
            cols,
            weight,
            &mut y,
            rows,
            self.cfg.rms_norm_eps as f32,
        )?;
        Ok(y)
    }

    fn bf16(&self, x: &CudaSlice<f32>) -> Result<CudaSlice<bf16>> {
        let mut y = self.gpu.stream.alloc_zeros::<bf16>(x.len())?;
        self.gpu.to_bf16(x, &mut y)?;
        Ok(y)
    }
}

impl Backend for GpuModel {
    fn config(&self) -> &Config {
        &self.cfg
    }

    fn new_cache(&self, blocks: usize) -> Result<KvCache> {
        let (kv, pool) = self.new_kv(blocks)?;
        Ok(KvCache::on_gpu(kv, pool))
    }

    /// Device memory: weights, cache and working space for a pass of `batch_tokens` tokens
    /// use at most `fraction` of the GPU's memory, as vLLM's `gpu_memory_utilization` reads.
    fn kv_blocks_within(&self, fraction: f64, batch_tokens: usize) -> Result<usize> {
        const GIB: f64 = (1u64 << 30) as f64;
        let shape = self.cfg.shape();
        let working = shape.working_bytes(batch_tokens as u64) as f64;
        let (free, total) = self.gpu.stream.context().mem_get_info()?;
        let used = (total - free) as f64;
        let budget = fraction * total as f64 - used - working;
        let per_block = (BLOCK_TOKENS as u64 * shape.kv_bytes_per_token()) as f64;
        ensure!(
            budget >= per_block,
            "--kv-cache-fraction {fraction}: {:.1} GiB of the GPU's {:.1} GiB are in use after \
             loading and a pass of {batch_tokens} tokens needs {:.1} GiB more, which leaves \
             no room for the KV cache",
            used / GIB,
            total as f64 / GIB,
            working / GIB
        );
        Ok((budget / per_block) as usize)
    }

    fn forward(&self, cache: &mut KvCache, pass: Pass<'_, '_>) -> Result<Vec<Next>> {
        let kv = cache
            .device
            .as_mut()
            .context("a GPU model runs on a cache in GPU memory")?;
        match pass.output {
            Output::EveryRow => Ok(self
                .forward_batch(pass.tokens, kv, pass.segments, false)?
                .into_iter()
                .map(Next::Logits)
                .collect()),
            Output::LastRows(wants) => self.forward_sampled(pass.tokens, kv, pass.segments, wants),
        }
    }

    fn samples_on_device(&self) -> bool {
        true
    }

    /// cuBLAS picks its kernels by batch size: a chunk among other rows agrees with its
    /// pass alone to rounding only, and the prefix cache needs the same bits.
    fn batchable_chunk_tokens(&self) -> usize {
        0
    }

    fn forward_idle(&self) -> Result<()> {
        let Routed::Parallel(ep) = &self.routed else {
            return Ok(());
        };
        let empty = Tensor::zeros((0, self.cfg.hidden_size), DType::F32, &Device::Cpu)?;
        let nothing = Routing {
            experts: Vec::new(),
            weights: Vec::new(),
        };
        for layer in (0..self.layers.len()).filter(|&l| self.cfg.is_moe_layer(l)) {
            ep.forward(layer, &empty, &nothing, false)?;
        }
        Ok(())
    }

    fn expert_load(&self) -> &ExpertLoad {
        &self.expert_load
    }

    fn expert_bytes_sent(&self) -> Option<u64> {
        match &self.routed {
            Routed::Local(_) => None,
            Routed::Parallel(ep) => ep.bytes_sent(),
        }
    }
}
