//! The DeepSeek model (V2/V3 family) on candle, CPU path: embed → decoder layers (MLA
//! attention, dense or mixture-of-experts MLP) → norm → lm_head. Structured after the
//! Hugging Face `transformers` implementation it must match (see ARCHITECTURE.md).

pub mod attention;
pub mod cache;
pub mod kernels;
pub mod moe;
pub mod ops;

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use self::attention::Attention;
use self::cache::{BLOCK_TOKENS, BlockTable, KvPool, SequenceCache};
use self::moe::{ExpertLoad, LocalExperts, MoeMlp, RoutedExperts, Routing};
use self::ops::{Embedding, KERNEL_MAX_TOKENS, Linear, Mlp, RmsNorm, Rope};
use crate::backend::{self, Backend, KvCache, Output, Pass};
use crate::config::Config;
use crate::ensure;
use crate::error::{Context, Result};
use crate::sampling::{Next, Want};
use crate::weights::{Checkpoint, DEFAULT_FP8_BLOCK};

/// The checkpoint tensors the model reads: all but the multi-token-prediction layers stored
/// after the main stack.
pub fn tensors_read<'a>(cfg: &Config, ckpt: &'a Checkpoint) -> impl Iterator<Item = &'a str> {
    let layers = cfg.num_hidden_layers;
    ckpt.names().filter(move |name| {
        let layer = name
            .strip_prefix("model.layers.")
            .and_then(|rest| rest.split('.').next()?.parse::<usize>().ok());
        layer.is_none_or(|l| l < layers)
    })
}

enum FeedForward {
    Dense(Mlp),
    Moe(MoeMlp),
}

struct DecoderLayer {
    input_norm: RmsNorm,
    attention: Attention,
    post_attention_norm: RmsNorm,
    mlp: FeedForward,
}

impl DecoderLayer {
    fn load(cfg: &Config, ckpt: &Checkpoint, layer: usize) -> Result<Self> {
        let prefix = format!("model.layers.{layer}");
        let (hidden, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let mlp = if cfg.is_moe_layer(layer) {
            FeedForward::Moe(MoeMlp::load(cfg, ckpt, &format!("{prefix}.mlp"))?)
        } else {
            FeedForward::Dense(Mlp::load(
                ckpt,
                &format!("{prefix}.mlp"),
                hidden,
                cfg.intermediate_size,
            )?)
        };
        Ok(DecoderLayer {
            input_norm: RmsNorm::load(ckpt, &format!("{prefix}.input_layernorm"), hidden, eps)?,
            attention: Attention::load(cfg, ckpt, &format!("{prefix}.self_attn"))?,
            post_attention_norm: RmsNorm::load(
                ckpt,
                &format!("{prefix}.post_attention_layernorm"),
                hidden,
                eps,
            )?,
            mlp,
        })
    }
}

pub struct Model {
    cfg: Config,
    /// `[vocab, hidden]`
    embed: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    experts: Box<dyn RoutedExperts>,
    expert_load: ExpertLoad,
    /// `Backend::batchable_chunk_tokens`.
    batchable_chunk_tokens: usize,
}

impl Model {
    /// Opens a checkpoint directory (`config.json` and safetensors) and loads the whole
    /// model, with a progress line on a terminal for large checkpoints.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with_experts(dir, |cfg, ckpt| {
            Ok(Box::new(LocalExperts::load(cfg, ckpt)?))
        })
    }

    /// Like `open`, with the routed experts `experts` loads (an expert-parallel rank's),
    /// called once every replicated part is in memory.
    pub fn open_with_experts(
        dir: &Path,
        experts: impl FnOnce(&Config, &Checkpoint) -> Result<Box<dyn RoutedExperts>>,
    ) -> Result<Self> {
        let cfg = Config::from_file(&dir.join("config.json"))?;
        let block = cfg.fp8.as_ref().map_or(DEFAULT_FP8_BLOCK, |f| f.block);
        let ckpt = Checkpoint::open(dir)?.with_fp8_block(block);
        let total = ckpt.bytes_of(tensors_read(&cfg, &ckpt));
        let ckpt = ckpt.with_progress(total);
        Self::load_with_experts(cfg, &ckpt, experts)
    }

    /// Loads every layer with all routed experts in this process. Multi-token-prediction
    /// layers (`num_nextn_predict_layers`, stored after the main stack) are not read.
    pub fn load(cfg: Config, ckpt: &Checkpoint) -> Result<Self> {
        Self::load_with_experts(cfg, ckpt, |cfg, ckpt| {
            Ok(Box::new(LocalExperts::load(cfg, ckpt)?))
        })
    }

    /// Loads the replicated parts, then asks `experts` for the routed experts.
    pub fn load_with_experts(
        cfg: Config,
        ckpt: &Checkpoint,
        experts: impl FnOnce(&Config, &Checkpoint) -> Result<Box<dyn RoutedExperts>>,
    ) -> Result<Self> {
        let (vocab, hidden) = (cfg.vocab_size, cfg.hidden_size);
        let embed = Embedding::load(ckpt, "model.embed_tokens.weight", vocab, hidden)?;
        let layers: Vec<DecoderLayer> = (0..cfg.num_hidden_layers)
            .map(|l| DecoderLayer::load(&cfg, ckpt, l))
            .collect::<Result<_>>()?;
        let lm_head = if cfg.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
            Linear::load(ckpt, "model.embed_tokens", vocab, hidden)?
        } else {
            Linear::load(ckpt, "lm_head", vocab, hidden)?
        };
        let norm = RmsNorm::load(ckpt, "model.norm", hidden, cfg.rms_norm_eps)?;
        let experts = experts(&cfg, ckpt)?;
        let packed = |layer: &DecoderLayer| {
            layer.attention.is_packed()
                && match &layer.mlp {
                    FeedForward::Dense(mlp) => mlp.is_packed(),
                    FeedForward::Moe(moe) => moe.is_packed(),
                }
        };
        let rows_independent =
            lm_head.is_packed() && layers.iter().all(packed) && experts.rows_independent();
        Ok(Model {
            batchable_chunk_tokens: if rows_independent {
                KERNEL_MAX_TOKENS
            } else {
                0
            },
            norm,
            rope: Rope::new(&cfg),
            embed,
            layers,
            lm_head,
            experts,
            expert_load: ExpertLoad::new(cfg.num_hidden_layers, cfg.moe.n_routed_experts),
            cfg,
        })
    }

    /// A pool of `blocks` KV blocks for this model.
    pub fn new_pool(&self, blocks: usize) -> KvPool {
        KvPool::new(
            self.layers.len(),
            self.cfg.kv_lora_rank,
            self.cfg.qk_rope_head_dim,
            blocks,
        )
    }

    /// A single sequence's cache, growing as it needs.
    pub fn new_cache(&self) -> SequenceCache {
        SequenceCache::new(self.new_pool(0))
    }

    /// Runs `tokens` of one sequence after what `cache` holds; returns their logits
    /// `[tokens, vocab]` and extends the cache.
    pub fn forward(&self, tokens: &[u32], cache: &mut SequenceCache) -> Result<Tensor> {
        cache.make_room(tokens.len());
        self.forward_batch(
            tokens,
            &mut cache.pool,
            &mut [(tokens.len(), &mut cache.table)],
            false,
        )
    }

    /// One decode step for many sequences: `tokens[i]` extends `tables[i]`. Returns
    /// `[sequences, vocab]`; every row equals what `forward` gives that sequence alone, while
    /// each weight is read once for the whole step.
    pub fn forward_decode(
        &self,
        tokens: &[u32],
        pool: &mut KvPool,
        tables: &mut [&mut BlockTable],
    ) -> Result<Tensor> {
        let mut segments: Vec<(usize, &mut BlockTable)> =
            tables.iter_mut().map(|t| (1, &mut **t)).collect();
        self.forward_batch(tokens, pool, &mut segments, true)
    }

    /// Runs the rows of several sequences: `segments` gives each one's row count and block
    /// table, in row order; the tables must have blocks reserved for the new positions.
    pub fn forward_batch(
        &self,
        tokens: &[u32],
        pool: &mut KvPool,
        segments: &mut [(usize, &mut BlockTable)],
        per_row: bool,
    ) -> Result<Tensor> {
        self.forward_rows(tokens, pool, segments, per_row, None)
    }

    /// `forward_batch` giving the logits of `head_rows` only, in that order, when given: a
    /// prompt's other rows need no `lm_head`, which is a fifth of a prompt token's
    /// multiply-adds at bench-small's shapes (its 32000 × 1024 of 142 M active weights).
    fn forward_rows(
        &self,
        tokens: &[u32],
        pool: &mut KvPool,
        segments: &mut [(usize, &mut BlockTable)],
        per_row: bool,
        head_rows: Option<&[usize]>,
    ) -> Result<Tensor> {
        backend::check_rows(tokens, segments, self.cfg.vocab_size)?;
        let tables: Vec<(usize, &BlockTable)> = segments.iter().map(|(n, t)| (*n, &**t)).collect();
        // Run the step on a pool thread: parallel kernels started from a pool thread share
        // the work with it instead of parking the caller and waking it per kernel.
        let logits =
            rayon::scope(|_| self.forward_on_pool(tokens, pool, &tables, per_row, head_rows))?;
        for (n, table) in segments.iter_mut() {
            table.advance(*n);
        }
        Ok(logits)
    }

    fn forward_on_pool(
        &self,
        tokens: &[u32],
        pool: &mut KvPool,
        segments: &[(usize, &BlockTable)],
        per_row: bool,
        head_rows: Option<&[usize]>,
    ) -> Result<Tensor> {
        let mut x = self.embed.forward(tokens)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let attn = layer.attention.forward(
                &layer.input_norm.forward(&x)?,
                &self.rope,
                pool.layer_mut(i),
                segments,
                per_row,
            )?;
            x = (x + attn)?;
            let h = layer.post_attention_norm.forward(&x)?;
            let mlp = match &layer.mlp {
                FeedForward::Dense(mlp) => mlp.forward_with(&h, per_row)?,
                FeedForward::Moe(moe) => moe.forward(
                    i,
                    &h,
                    &self.cfg.moe,
                    self.experts.as_ref(),
                    &self.expert_load,
                    per_row,
                )?,
            };
            x = (x + mlp)?;
        }
        if let Some(rows) = head_rows {
            if rows.is_empty() {
                return Ok(Tensor::zeros(
                    (0, self.cfg.vocab_size),
                    DType::F32,
                    &Device::Cpu,
                )?);
            }
            let rows: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
            x = x.index_select(&Tensor::new(rows.as_slice(), &Device::Cpu)?, 0)?;
        }
        self.lm_head.forward_with(&self.norm.forward(&x)?, per_row)
    }
}

impl Backend for Model {
    fn config(&self) -> &Config {
        &self.cfg
    }

    fn new_cache(&self, blocks: usize) -> Result<KvCache> {
        Ok(KvCache::in_host_memory(self.new_pool(blocks)))
    }

    /// Host memory: `MemAvailable` now that the weights are in.
    fn kv_blocks_within(&self, fraction: f64, _batch_tokens: usize) -> Result<usize> {
        let meminfo = std::fs::read_to_string("/proc/meminfo")
            .context("--kv-cache-fraction needs /proc/meminfo")?;
        let available_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no MemAvailable in /proc/meminfo")?;
        // f32 latents: c_kv and k_pe per token per layer.
        let per_block = 4
            * BLOCK_TOKENS
            * self.layers.len()
            * (self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim);
        Ok(((available_kib * 1024.0 * fraction) as usize / per_block).max(1))
    }

    /// Only the rows asked for go through `lm_head`: a prompt chunk's last row, and none of
    /// a segment that wants nothing. Their logits are those a pass of every row gives them.
    fn forward(&self, cache: &mut KvCache, pass: Pass<'_, '_>) -> Result<Vec<Next>> {
        let wants = match pass.output {
            Output::EveryRow => None,
            Output::LastRows(wants) => Some(wants),
        };
        let head_rows: Option<Vec<usize>> = match wants {
            Some(wants) => {
                ensure!(wants.len() == pass.segments.len(), "one want per segment");
                let last = backend::last_rows(pass.segments);
                Some(
                    last.into_iter()
                        .zip(wants)
                        .filter(|(_, want)| !matches!(want, Want::Nothing))
                        .map(|(row, _)| row)
                        .collect(),
                )
            }
            None => None,
        };
        let logits = self
            .forward_rows(
                pass.tokens,
                &mut cache.pool,
                pass.segments,
                pass.batch_invariant,
                head_rows.as_deref(),
            )?
            .to_vec2::<f32>()?;
        let mut logits = logits.into_iter();
        Ok(match wants {
            None => logits.map(Next::Logits).collect(),
            Some(wants) => wants
                .iter()
                .map(|want| match want {
                    Want::Nothing => Next::Logits(Vec::new()),
                    _ => Next::Logits(logits.next().unwrap_or_default()),
                })
                .collect(),
        })
    }

    fn forward_idle(&self) -> Result<()> {
        let empty = Tensor::zeros((0, self.cfg.hidden_size), DType::F32, &Device::Cpu)?;
        let nothing = Routing {
            experts: Vec::new(),
            weights: Vec::new(),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            if matches!(layer.mlp, FeedForward::Moe(_)) {
                self.experts.forward(i, &empty, &nothing, false)?;
            }
        }
        Ok(())
    }

    fn samples_on_device(&self) -> bool {
        false
    }

    /// With every weight a row goes through kept as stored, rows take the blocked kernel in
    /// a batch-invariant pass, and so do a pass's own rows up to `KERNEL_MAX_TOKENS`.
    fn batchable_chunk_tokens(&self) -> usize {
        self.batchable_chunk_tokens
    }

    fn expert_load(&self) -> &ExpertLoad {
        &self.expert_load
    }

    fn expert_bytes_sent(&self) -> Option<u64> {
        self.experts.bytes_sent()
    }
}
