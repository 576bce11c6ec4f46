//! The model step on a GPU: the CPU path's computation (`model/`) with the weights on the
//! device as bf16 (FP8 ones dequantised at load, but for routed experts run in FP8; see
//! `experts.rs`) and each step a sequence of the
//! kernels in `kernels/` and cuBLAS GEMMs, activations f32 between them and bf16 into the
//! tensor cores. Attention always runs in MLA's absorbed form over the latent cache, prompt
//! rows too (each sees up to its own position), so one kernel serves prefill and decode.
//!
//! The latent cache lives on the device in the blocks a [`KvPool`] hands out (the pool does
//! the bookkeeping, as on the CPU, with no host storage), so the scheduler batches GPU steps
//! as it batches CPU ones.

use std::cell::Cell;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Device, Tensor};
use cudarc::driver::CudaSlice;
use deepseek_proto::placement::PlacementPlan;
use half::bf16;

use super::experts::{Fp8Weights, GpuExperts, LayerExperts, Weights};
use super::runtime::{Fp8, GateRule, GemmShape, Gpu, Layout};
use super::{Dtype, resolve_dtype};
use crate::config::{Config, TopkMethod};
use crate::ep::{
    ExpertParallel, GroupError, Transport, Wire, plan_matches_group, plan_matches_model,
};
use crate::model::attention::softmax_scale;
use crate::model::cache::{BLOCK_TOKENS, BlockTable, KvPool};
use crate::model::moe::{ExpertLoad, RoutedExperts, Routing};
use crate::model::ops::Rope;
use crate::sampling::{DeviceDraw, Next, Want};
use crate::weights::{Checkpoint, DEFAULT_FP8_BLOCK};

/// A SwiGLU MLP: gate and up fused into one [2 × width, hidden] weight.
struct Dense {
    gate_up: CudaSlice<bf16>,
    down: CudaSlice<bf16>,
    width: usize,
}

struct Moe {
    /// [experts, hidden], f32 as the CPU path routes (a near tie must break the same way).
    router: CudaSlice<f32>,
    bias: Option<CudaSlice<f32>>,
    shared: Option<Dense>,
}

enum FeedForward {
    Dense(Dense),
    Moe(Box<Moe>),
}

enum QProj {
    Plain(CudaSlice<bf16>),
    LowRank {
        down: CudaSlice<bf16>,
        norm: CudaSlice<bf16>,
        up: CudaSlice<bf16>,
        rank: usize,
    },
}

struct Layer {
    input_norm: CudaSlice<bf16>,
    q: QProj,
    /// [kv_lora + rope, hidden]
    kv_down: CudaSlice<bf16>,
    kv_norm: CudaSlice<bf16>,
    /// [heads × (nope + v), kv_lora]: per head, nope key rows then v value rows.
    kv_up: CudaSlice<bf16>,
    o_proj: CudaSlice<bf16>,
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
    /// The routed experts' GEMM precision (bf16 or FP8).
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

/// Where each row of a pass sits: its position, its cache slot, and its sequence's block
/// table (one padded table row per row, `width` apart, as `mla_decode` reads them).
#[derive(Debug, PartialEq)]
struct RowLayout {
    positions: Vec<usize>,
    slots: Vec<i32>,
    tables: Vec<i32>,
    width: usize,
}

impl RowLayout {
    fn of(segments: &[(usize, &mut BlockTable)]) -> Self {
        let width = segments
            .iter()
            .map(|(_, t)| t.blocks().len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut layout = RowLayout {
            positions: Vec::new(),
            slots: Vec::new(),
            tables: Vec::new(),
            width,
        };
        for (rows, table) in segments {
            for position in table.tokens()..table.tokens() + rows {
                layout.positions.push(position);
                layout.slots.push(table.slot(position) as i32);
                let blocks = table.blocks().iter().map(|&b| b as i32);
                layout
                    .tables
                    .extend(blocks.chain(std::iter::repeat(0)).take(width));
            }
        }
        layout
    }
}

/// Where the weights come from: a checkpoint, or random numbers made on the device (for
/// benchmarks at full model shapes without the checkpoint).
enum Source<'a> {
    Checkpoint(&'a Checkpoint),
    Random(Cell<u64>),
}

/// Weights onto the device: matrices as bf16, the router as f32.
struct Loader<'a> {
    gpu: &'a Gpu,
    source: Source<'a>,
}

impl Loader<'_> {
    fn seed(counter: &Cell<u64>) -> u64 {
        counter.set(counter.get() + 1);
        counter.get()
    }

    fn f32(&self, name: &str, shape: &[usize]) -> Result<CudaSlice<f32>> {
        match &self.source {
            Source::Checkpoint(ckpt) => {
                Ok(self.gpu.stream.clone_htod(&ckpt.load_f32(name, shape)?)?)
            }
            Source::Random(seed) => {
                self.gpu
                    .random_f32(shape.iter().product(), Self::seed(seed), 0.05)
            }
        }
    }

    /// Several tensors of `shape` stacked in order into one device buffer, each converted on
    /// its own (a whole layer's experts never sit on the host at once).
    fn stacked(&self, names: &[String], shape: &[usize]) -> Result<CudaSlice<bf16>> {
        let size: usize = shape.iter().product();
        let ckpt = match &self.source {
            Source::Checkpoint(ckpt) => ckpt,
            Source::Random(seed) => {
                // 1/√(input width) keeps the activations in range
                let scale = 1.0 / (*shape.last().unwrap_or(&1) as f32).sqrt();
                return self
                    .gpu
                    .random_bf16(names.len() * size, Self::seed(seed), scale);
            }
        };
        let mut out = self.gpu.stream.alloc_zeros::<bf16>(names.len() * size)?;
        for (i, name) in names.iter().enumerate() {
            let values: Vec<bf16> = ckpt
                .load_f32(name, shape)?
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect();
            let mut part = out.slice_mut(i * size..(i + 1) * size);
            self.gpu.stream.memcpy_htod(&values, &mut part)?;
        }
        Ok(out)
    }

    /// Several FP8 [rows, cols] tensors stacked, kept as e4m3 with their block scales.
    fn fp8_stacked(&self, names: &[String], rows: usize, cols: usize) -> Result<Fp8Weights> {
        let per_scale = rows.div_ceil(128) * cols.div_ceil(128);
        let ckpt = match &self.source {
            Source::Checkpoint(ckpt) => ckpt,
            Source::Random(seed) => {
                return Ok(Fp8Weights {
                    q: self
                        .gpu
                        .random_fp8(names.len() * rows * cols, Self::seed(seed), 448.0)?,
                    scale: self
                        .gpu
                        .random_f32(names.len() * per_scale, Self::seed(seed), 1e-3)?,
                });
            }
        };
        let stream = &self.gpu.stream;
        let mut q = stream.alloc_zeros::<Fp8>(names.len() * rows * cols)?;
        let mut scale = stream.alloc_zeros::<f32>(names.len() * per_scale)?;
        for (i, name) in names.iter().enumerate() {
            let (bytes, scales) = ckpt.load_fp8(name, &[rows, cols])?;
            stream.memcpy_htod(
                &bytes,
                &mut q.slice_mut(i * rows * cols..(i + 1) * rows * cols),
            )?;
            stream.memcpy_htod(
                &scales,
                &mut scale.slice_mut(i * per_scale..(i + 1) * per_scale),
            )?;
        }
        Ok(Fp8Weights { q, scale })
    }

    /// The routed experts of layer `layer` that `owns` selects, in FP8 when `fp8`; None for
    /// a dense layer.
    fn experts(
        &self,
        cfg: &Config,
        layer: usize,
        fp8: bool,
        owns: &dyn Fn(usize, usize) -> bool,
    ) -> Result<Option<LayerExperts>> {
        if !cfg.is_moe_layer(layer) {
            return Ok(None);
        }
        let (hidden, width) = (cfg.hidden_size, cfg.moe.moe_intermediate_size);
        let held: Vec<usize> = (0..cfg.moe.n_routed_experts)
            .filter(|&e| owns(layer, e))
            .collect();
        if held.is_empty() {
            // no tokens are ever sent here for this layer
            return Ok(None);
        }
        let mut slot = vec![-1; cfg.moe.n_routed_experts];
        for (i, &e) in held.iter().enumerate() {
            slot[e] = i as i32;
        }
        let name =
            |e: usize, part: &str| format!("model.layers.{layer}.mlp.experts.{e}.{part}.weight");
        let all = |part: &str| -> Vec<String> { held.iter().map(|&e| name(e, part)).collect() };
        let weights = if fp8 {
            Weights::Fp8 {
                gate: self.fp8_stacked(&all("gate_proj"), width, hidden)?,
                up: self.fp8_stacked(&all("up_proj"), width, hidden)?,
                down: self.fp8_stacked(&all("down_proj"), hidden, width)?,
            }
        } else {
            let gate_up: Vec<String> = held
                .iter()
                .flat_map(|&e| [name(e, "gate_proj"), name(e, "up_proj")])
                .collect();
            Weights::Bf16 {
                gate_up: self.stacked(&gate_up, &[width, hidden])?,
                down: self.stacked(&all("down_proj"), &[hidden, width])?,
            }
        };
        Ok(Some(LayerExperts { weights, slot }))
    }

    fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::Checkpoint(ckpt) => ckpt.contains(name),
            Source::Random(_) => true,
        }
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<CudaSlice<bf16>> {
        self.stacked(&[name.to_string()], &[rows, cols])
    }

    /// 1-D, as checkpoints store norm weights.
    fn vector(&self, name: &str, len: usize) -> Result<CudaSlice<bf16>> {
        self.stacked(&[name.to_string()], &[len])
    }

    fn dense(&self, prefix: &str, hidden: usize, width: usize) -> Result<Dense> {
        Ok(Dense {
            gate_up: self.stacked(
                &[
                    format!("{prefix}.gate_proj.weight"),
                    format!("{prefix}.up_proj.weight"),
                ],
                &[width, hidden],
            )?,
            down: self.matrix(&format!("{prefix}.down_proj.weight"), hidden, width)?,
            width,
        })
    }

    /// Layer `layer`, but its routed experts (see `experts`).
    fn layer(&self, cfg: &Config, layer: usize) -> Result<Layer> {
        let p = format!("model.layers.{layer}");
        let (hidden, heads) = (cfg.hidden_size, cfg.num_attention_heads);
        let (kv_lora, rope) = (cfg.kv_lora_rank, cfg.qk_rope_head_dim);
        let q_out = heads * cfg.qk_head_dim();
        let q = match cfg.q_lora_rank {
            None => {
                QProj::Plain(self.matrix(&format!("{p}.self_attn.q_proj.weight"), q_out, hidden)?)
            }
            Some(rank) => QProj::LowRank {
                down: self.matrix(&format!("{p}.self_attn.q_a_proj.weight"), rank, hidden)?,
                norm: self.vector(&format!("{p}.self_attn.q_a_layernorm.weight"), rank)?,
                up: self.matrix(&format!("{p}.self_attn.q_b_proj.weight"), q_out, rank)?,
                rank,
            },
        };
        let ffn = if cfg.is_moe_layer(layer) {
            let moe = &cfg.moe;
            let (experts, width) = (moe.n_routed_experts, moe.moe_intermediate_size);
            FeedForward::Moe(Box::new(Moe {
                router: self.f32(&format!("{p}.mlp.gate.weight"), &[experts, hidden])?,
                bias: match moe.topk_method {
                    TopkMethod::NoauxTc => Some(
                        self.f32(&format!("{p}.mlp.gate.e_score_correction_bias"), &[experts])?,
                    ),
                    _ => None,
                },
                shared: match moe.n_shared_experts {
                    0 => None,
                    n => Some(self.dense(&format!("{p}.mlp.shared_experts"), hidden, n * width)?),
                },
            }))
        } else {
            FeedForward::Dense(self.dense(&format!("{p}.mlp"), hidden, cfg.intermediate_size)?)
        };
        Ok(Layer {
            input_norm: self.vector(&format!("{p}.input_layernorm.weight"), hidden)?,
            q,
            kv_down: self.matrix(
                &format!("{p}.self_attn.kv_a_proj_with_mqa.weight"),
                kv_lora + rope,
                hidden,
            )?,
            kv_norm: self.vector(&format!("{p}.self_attn.kv_a_layernorm.weight"), kv_lora)?,
            kv_up: self.matrix(
                &format!("{p}.self_attn.kv_b_proj.weight"),
                heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                kv_lora,
            )?,
            o_proj: self.matrix(
                &format!("{p}.self_attn.o_proj.weight"),
                hidden,
                heads * cfg.v_head_dim,
            )?,
            post_norm: self.vector(&format!("{p}.post_attention_layernorm.weight"), hidden)?,
            ffn,
        })
    }
}

impl GpuModel {
    /// Loads a checkpoint directory onto `gpu`. With FP8 compute (`--dtype fp8`, or auto on
    /// sm_89+ for an FP8 checkpoint) the routed experts stay FP8 and their GEMMs take FP8
    /// activations; everything else runs bf16 weights (FP8 ones dequantised at load).
    pub fn open(dir: &Path, gpu: Gpu, dtype: Dtype) -> Result<Self> {
        let (cfg, ckpt, dtype) = Self::checkpoint(dir, &gpu, dtype)?;
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
        let (cfg, ckpt, dtype) = Self::checkpoint(dir, &gpu, dtype)?;
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

    /// The configuration, the opened checkpoint and the expert precision `dtype` comes to.
    fn checkpoint(dir: &Path, gpu: &Gpu, dtype: Dtype) -> Result<(Config, Checkpoint, Dtype)> {
        let cfg = Config::from_file(&dir.join("config.json"))?;
        let asked = dtype;
        let mut dtype = resolve_dtype(asked, gpu.capability, cfg.fp8.is_some())?;
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
                tracing::info!("FP8 experts {why}; running them in bf16");
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
        let load = Loader { gpu: &gpu, source };
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
                    load.experts(&cfg, l, dtype == Dtype::Fp8, owns)
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

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Cache blocks that fit when weights, cache and working space for a pass of
    /// `batch_tokens` tokens use at most `fraction` of the GPU's memory, as vLLM's
    /// `gpu_memory_utilization` reads.
    pub fn kv_blocks_within(&self, fraction: f64, batch_tokens: usize) -> Result<usize> {
        const GIB: f64 = (1u64 << 30) as f64;
        let (free, total) = self.gpu.stream.context().mem_get_info()?;
        let used = (total - free) as f64;
        let budget = fraction * total as f64 - used - self.working_bytes(batch_tokens);
        let per_block = 2
            * BLOCK_TOKENS
            * self.layers.len()
            * (self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim);
        ensure!(
            budget >= per_block as f64,
            "--kv-cache-fraction {fraction}: {:.1} GiB of the GPU's {:.1} GiB are in use after \
             loading and a pass of {batch_tokens} tokens needs {:.1} GiB more, which leaves \
             no room for the KV cache",
            used / GIB,
            total as f64 / GIB,
            self.working_bytes(batch_tokens) / GIB
        );
        Ok((budget / per_block as f64) as usize)
    }

    /// A generous bound on the device memory a pass of `tokens` tokens allocates: one
    /// layer's activations (twice, as the next layer's come before the last are freed), the
    /// experts' rows, and 1 GiB for cuBLAS and the logits.
    fn working_bytes(&self, tokens: usize) -> f64 {
        let c = &self.cfg;
        let (heads, qk, rope, lora, v) = (
            c.num_attention_heads,
            c.qk_head_dim(),
            c.qk_rope_head_dim,
            c.kv_lora_rank,
            c.v_head_dim,
        );
        let f32s = 4 * c.hidden_size + heads * (qk + rope + 2 * lora + v) + 2 * (lora + rope);
        let bf16s = 2 * c.hidden_size + heads * (qk + lora + v);
        let experts =
            c.moe.num_experts_per_tok * (2 * c.hidden_size + 3 * c.moe.moe_intermediate_size);
        let per_token = 4 * (f32s + c.moe.n_routed_experts) + 2 * (bf16s + experts);
        2.0 * (tokens * per_token) as f64 + (1u64 << 30) as f64
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

    /// One pass; the logits [rows, vocab] on the device, and which of their rows is each
    /// output (every row, or with `last_only` each segment's last).
    fn pass(
        &self,
        tokens: &[u32],
        kv: &mut GpuKv,
        segments: &mut [(usize, &mut BlockTable)],
        last_only: bool,
    ) -> Result<(CudaSlice<f32>, Vec<usize>)> {
        let cfg = &self.cfg;
        let gpu = &self.gpu;
        let stream = &gpu.stream;
        let n = tokens.len();
        ensure!(
            n > 0
                && n == segments.iter().map(|(rows, _)| rows).sum::<usize>()
                && segments.iter().all(|(rows, _)| *rows > 0),
            "forward needs at least one token, as many as the segments hold, in every segment"
        );
        ensure!(
            segments
                .iter()
                .all(|(rows, t)| t.tokens() + rows <= t.capacity()),
            "a sequence has no KV blocks reserved for its new tokens"
        );
        ensure!(
            segments
                .iter()
                .flat_map(|(_, t)| t.blocks())
                .all(|&b| (b as usize) < kv.blocks),
            "a block table names blocks outside the GPU cache"
        );
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            bail!(
                "token id {bad} is outside the vocabulary ({})",
                cfg.vocab_size
            );
        }
        let (hidden, heads, eps) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.rms_norm_eps as f32,
        );
        let (nope, rope, v_dim, kv_lora) = (
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        );
        let qk = nope + rope;

        let RowLayout {
            positions,
            slots,
            tables,
            width,
        } = RowLayout::of(segments);
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let (cos, sin) = self.rope.tables(&positions)?;
        let cos = stream.clone_htod(&cos.flatten_all()?.to_vec1::<f32>()?)?;
        let sin = stream.clone_htod(&sin.flatten_all()?.to_vec1::<f32>()?)?;
        let slots = stream.clone_htod(&slots)?;
        let tables = stream.clone_htod(&tables)?;
        // a row sees every position up to its own
        let lengths =
            stream.clone_htod(&positions.iter().map(|&p| p as i32 + 1).collect::<Vec<_>>())?;

        let mut x = stream.alloc_zeros::<f32>(n * hidden)?;
        gpu.embedding(&self.embed, &stream.clone_htod(&ids)?, &mut x, hidden)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = self.norm_rows(&x, &layer.input_norm, n)?;
            let hb = self.bf16(&h)?;
            let mut q = stream.alloc_zeros::<f32>(n * heads * qk)?;
            match &layer.q {
                QProj::Plain(w) => gpu.linear(&hb, w, &mut q, (n, heads * qk, hidden))?,
                QProj::LowRank {
                    down,
                    norm,
                    up,
                    rank,
                } => {
                    let mut qa = stream.alloc_zeros::<f32>(n * rank)?;
                    gpu.linear(&hb, down, &mut qa, (n, *rank, hidden))?;
                    let qa = self.bf16(&self.norm_rows(&qa, norm, n)?)?;
                    gpu.linear(&qa, up, &mut q, (n, heads * qk, *rank))?;
                }
            }
            let mut kv_a = stream.alloc_zeros::<f32>(n * (kv_lora + rope))?;
            gpu.linear(&hb, &layer.kv_down, &mut kv_a, (n, kv_lora + rope, hidden))?;
            let mut c_kv = stream.alloc_zeros::<f32>(n * kv_lora)?;
            gpu.rms_norm(
                &kv_a.as_view(),
                kv_lora + rope,
                &layer.kv_norm,
                &mut c_kv,
                n,
                eps,
            )?;
            let mut k_pe = stream.alloc_zeros::<f32>(n * rope)?;
            gpu.rope(
                &kv_a.slice(kv_lora..),
                kv_lora + rope,
                &cos,
                &sin,
                &mut k_pe,
                (n, 1, rope),
            )?;
            let mut q_pe = stream.alloc_zeros::<f32>(n * heads * rope)?;
            gpu.rope(
                &q.slice(nope..),
                qk,
                &cos,
                &sin,
                &mut q_pe,
                (n, heads, rope),
            )?;
            gpu.kv_write(
                (&c_kv, &k_pe),
                &slots,
                (&mut kv.c_kv[l], &mut kv.k_pe[l]),
                (kv_lora, rope),
            )?;

            // Absorbed attention: q_lat = q_nope · W_UK per head, attention over the latents,
            // then W_UV per head.
            let qb = self.bf16(&q)?;
            // per head h: q_nope is qb's row slice at h·qk; W_UK rows are kv_up's rows
            // h·(nope+v) .. +nope, W_UV rows the v after them
            let per_head = |offset: usize| Layout {
                offset,
                row_stride: kv_lora,
                batch_stride: (nope + v_dim) * kv_lora,
            };
            let mut q_lat = stream.alloc_zeros::<f32>(n * heads * kv_lora)?;
            gpu.batched_gemm(
                (
                    &qb,
                    Layout {
                        offset: 0,
                        row_stride: heads * qk,
                        batch_stride: qk,
                    },
                ),
                (&layer.kv_up, per_head(0)),
                false,
                (
                    &mut q_lat,
                    Layout {
                        offset: 0,
                        row_stride: heads * kv_lora,
                        batch_stride: kv_lora,
                    },
                ),
                GemmShape {
                    m: n,
                    n: kv_lora,
                    k: nope,
                    batch: heads,
                },
            )?;
            let mut latent = stream.alloc_zeros::<f32>(n * heads * kv_lora)?;
            gpu.mla_decode(
                &q_lat,
                &q_pe,
                &kv.c_kv[l],
                &kv.k_pe[l],
                (&tables, width),
                &lengths,
                &mut latent,
                (n, heads, kv_lora, rope),
                self.softmax_scale,
            )?;
            let latent = self.bf16(&latent)?;
            let mut o = stream.alloc_zeros::<f32>(n * heads * v_dim)?;
            gpu.batched_gemm(
                (
                    &latent,
                    Layout {
                        offset: 0,
                        row_stride: heads * kv_lora,
                        batch_stride: kv_lora,
                    },
                ),
                (&layer.kv_up, per_head(nope * kv_lora)),
                true,
                (
                    &mut o,
                    Layout {
                        offset: 0,
                        row_stride: heads * v_dim,
                        batch_stride: v_dim,
                    },
                ),
                GemmShape {
                    m: n,
                    n: v_dim,
                    k: kv_lora,
                    batch: heads,
                },
            )?;
            let mut attention = stream.alloc_zeros::<f32>(n * hidden)?;
            gpu.linear(
                &self.bf16(&o)?,
                &layer.o_proj,
                &mut attention,
                (n, hidden, heads * v_dim),
            )?;
            gpu.add(&mut x, &attention)?;

            let h = self.norm_rows(&x, &layer.post_norm, n)?;
            let hb = self.bf16(&h)?;
            let y = match &layer.ffn {
                FeedForward::Dense(mlp) => self.dense(mlp, &hb, n)?,
                FeedForward::Moe(moe) => self.moe(l, moe, &h, &hb, n)?,
            };
            gpu.add(&mut x, &y)?;
        }
        // A prompt chunk alone needs its last row's logits only: 1 row through lm_head, not
        // hundreds (and 1 row copied to the host).
        let from = if last_only && segments.len() == 1 {
            n - 1
        } else {
            0
        };
        let rows = n - from;
        let mut normed = stream.alloc_zeros::<f32>(rows * hidden)?;
        gpu.rms_norm(
            &x.slice(from * hidden..),
            hidden,
            &self.norm,
            &mut normed,
            rows,
            eps,
        )?;
        let x = self.bf16(&normed)?;
        let vocab = cfg.vocab_size;
        let mut logits = stream.alloc_zeros::<f32>(rows * vocab)?;
        gpu.linear(&x, &self.lm_head, &mut logits, (rows, vocab, hidden))?;
        let outputs: Vec<usize> = if last_only && from == 0 {
            // each segment's last row
            let mut end = 0;
            segments
                .iter()
                .map(|(rows, _)| {
                    end += rows;
                    end - 1
                })
                .collect()
        } else {
            (0..rows).collect()
        };
        for (rows, table) in segments.iter_mut() {
            table.advance(*rows);
        }
        Ok((logits, outputs))
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

    /// down(silu(gate(x)) · up(x)) for x [rows, hidden] bf16; f32 out.
    fn dense(&self, mlp: &Dense, x: &CudaSlice<bf16>, rows: usize) -> Result<CudaSlice<f32>> {
        let (gpu, hidden) = (&self.gpu, self.cfg.hidden_size);
        let mut gate_up = gpu.stream.alloc_zeros::<bf16>(rows * 2 * mlp.width)?;
        gpu.linear(x, &mlp.gate_up, &mut gate_up, (rows, 2 * mlp.width, hidden))?;
        let mut h = gpu.stream.alloc_zeros::<bf16>(rows * mlp.width)?;
        gpu.silu_mul(&gate_up, &mut h, rows)?;
        let mut y = gpu.stream.alloc_zeros::<f32>(rows * hidden)?;
        gpu.linear(&h, &mlp.down, &mut y, (rows, hidden, mlp.width))?;
        Ok(y)
    }

    /// The routed experts (gate, then the experts here or across the group) plus the shared
    /// ones.
    fn moe(
        &self,
        layer: usize,
        moe: &Moe,
        x: &CudaSlice<f32>,
        xb: &CudaSlice<bf16>,
        tokens: usize,
    ) -> Result<CudaSlice<f32>> {
        let (gpu, cfg) = (&self.gpu, &self.cfg.moe);
        let hidden = self.cfg.hidden_size;
        let experts = cfg.n_routed_experts;
        let rule = GateRule::of(cfg);
        let mut logits = gpu.stream.alloc_zeros::<f32>(tokens * experts)?;
        gpu.linear(x, &moe.router, &mut logits, (tokens, experts, hidden))?;
        let mut chosen = gpu.stream.alloc_zeros::<i32>(tokens * rule.topk)?;
        let mut weights = gpu.stream.alloc_zeros::<f32>(tokens * rule.topk)?;
        gpu.moe_gate(
            &logits,
            moe.bias.as_ref(),
            experts,
            rule,
            &mut chosen,
            &mut weights,
        )?;
        let mut y = match &self.routed {
            // every expert is here, so an expert's id is its slot
            Routed::Local(local) => local.compute(layer, x, &chosen, &weights, rule.topk)?,
            Routed::Parallel(ep) => {
                let stream = &gpu.stream;
                let (ids, gates) = (stream.clone_dtoh(&chosen)?, stream.clone_dtoh(&weights)?);
                let routing = Routing {
                    experts: ids
                        .chunks(rule.topk)
                        .map(|c| c.iter().map(|&e| e as usize).collect())
                        .collect(),
                    weights: gates.chunks(rule.topk).map(<[f32]>::to_vec).collect(),
                };
                self.expert_load.record(layer, &routing);
                let x = Tensor::from_vec(stream.clone_dtoh(x)?, (tokens, hidden), &Device::Cpu)?;
                // Once the dispatch has gone out, any failure leaves the peers waiting for
                // this rank's combine: the whole group must fail and re-form.
                let y = ep.forward(layer, &x, &routing, false).map_err(|e| {
                    if GroupError::is_in(&e) {
                        e
                    } else {
                        GroupError(format!("{e:#}")).into()
                    }
                })?;
                stream.clone_htod(&y.flatten_all()?.to_vec1::<f32>()?)?
            }
        };
        if let Some(shared) = &moe.shared {
            gpu.add(&mut y, &self.dense(shared, xb, tokens)?)?;
        }
        Ok(y)
    }

    /// An expert-parallel rank's part in a pass it has no tokens for: every MoE layer's
    /// exchange with nothing to send, so that peers with tokens can go on.
    pub fn forward_idle(&self) -> Result<()> {
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

    pub fn expert_load(&self) -> &ExpertLoad {
        &self.expert_load
    }

    /// Bytes this rank has sent to the others of its expert-parallel group, if in one.
    pub fn expert_bytes_sent(&self) -> Option<u64> {
        match &self.routed {
            Routed::Local(_) => None,
            Routed::Parallel(ep) => ep.bytes_sent(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_of_a_mixed_pass_find_their_slots_and_tables() {
        let mut pool = KvPool::new(0, 0, 0, 8);
        let (mut a, mut b) = (BlockTable::default(), BlockTable::default());
        assert!(pool.reserve(&mut a, 20) && pool.reserve(&mut b, 3)); // a: blocks 0, 1; b: 2
        a.advance(18); // a decodes position 18; b prefills positions 0..3
        let layout = RowLayout::of(&[(1, &mut a), (3, &mut b)]);
        assert_eq!(layout.positions, [18, 0, 1, 2]);
        assert_eq!(layout.slots, [16 + 2, 32, 33, 34]);
        assert_eq!(layout.width, 2);
        assert_eq!(layout.tables, [0, 1, 2, 0, 2, 0, 2, 0]);
    }
}
