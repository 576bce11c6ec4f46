//! Weights onto the GPU, from a checkpoint or made at random on the device.

use std::cell::Cell;

use cudarc::driver::CudaSlice;
use half::bf16;

use super::Layer;
use super::attention::{Attention, QProj};
use super::linear::Linear;
use super::mlp::{Dense, FeedForward, GateUp, Moe};
use crate::config::{Config, TopkMethod};
use crate::error::Result;
use crate::gpu::experts::{Fp8Weights, LayerExperts, Weights};
use crate::gpu::runtime::{Fp8, Gpu};
use crate::weights::{Checkpoint, Dtype};

/// Where the weights come from: a checkpoint, or random numbers made on the device (for
/// benchmarks at full model shapes without the checkpoint).
pub(super) enum Source<'a> {
    Checkpoint(&'a Checkpoint),
    Random(Cell<u64>),
}

/// Weights onto the device: matrices as bf16 (or, with `fp8`, an FP8 checkpoint's linear
/// layers as stored), the router as f32.
pub(super) struct Loader<'a> {
    pub(super) gpu: &'a Gpu,
    pub(super) source: Source<'a>,
    /// Keep FP8 weights FP8 (`--dtype fp8`, or auto for an FP8 checkpoint).
    pub(super) fp8: bool,
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
                // e4m3 over its whole range, and block scales that bring the weights to the
                // bf16 ones' size (1/√(input width)), so activations stay in range
                let scale = 2.0 / (448.0 * (cols as f32).sqrt());
                return Ok(Fp8Weights {
                    q: self
                        .gpu
                        .random_fp8(names.len() * rows * cols, Self::seed(seed), 448.0)?,
                    scale: self
                        .gpu
                        .random_f32(names.len() * per_scale, Self::seed(seed), scale)?,
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

    /// The routed experts of layer `layer` that `owns` selects, in FP8 with `self.fp8`;
    /// None for a dense layer.
    pub(super) fn experts(
        &self,
        cfg: &Config,
        layer: usize,
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
        let weights = if self.fp8 {
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

    pub(super) fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::Checkpoint(ckpt) => ckpt.contains(name),
            Source::Random(_) => true,
        }
    }

    pub(super) fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<CudaSlice<bf16>> {
        self.stacked(&[name.to_string()], &[rows, cols])
    }

    /// 1-D, as checkpoints store norm weights.
    pub(super) fn vector(&self, name: &str, len: usize) -> Result<CudaSlice<bf16>> {
        self.stacked(&[name.to_string()], &[len])
    }

    /// Whether the [rows, cols] weight `name` is held in FP8: kept so with `self.fp8` where
    /// the checkpoint stores it so and the FP8 kernels take its shape (16-byte rows, column
    /// pairs out).
    fn keeps_fp8(&self, name: &str, rows: usize, cols: usize) -> bool {
        let stored_fp8 = match &self.source {
            Source::Checkpoint(ckpt) => ckpt.info(name).is_ok_and(|t| t.dtype == Dtype::F8E4M3),
            Source::Random(_) => true,
        };
        self.fp8 && stored_fp8 && cols.is_multiple_of(16) && rows.is_multiple_of(2)
    }

    /// A linear layer's [rows, cols] weight, FP8 where `keeps_fp8`.
    fn linear(&self, name: &str, rows: usize, cols: usize) -> Result<Linear> {
        Ok(if self.keeps_fp8(name, rows, cols) {
            Linear::Fp8(self.fp8_stacked(&[name.to_string()], rows, cols)?)
        } else {
            Linear::Bf16(self.matrix(name, rows, cols)?)
        })
    }

    fn dense(&self, prefix: &str, hidden: usize, width: usize) -> Result<Dense> {
        let [gate, up] = ["gate_proj", "up_proj"].map(|p| format!("{prefix}.{p}.weight"));
        let gate_up = if self.keeps_fp8(&gate, width, hidden) && self.keeps_fp8(&up, width, hidden)
        {
            GateUp::Fp8 {
                gate: self.fp8_stacked(&[gate], width, hidden)?,
                up: self.fp8_stacked(&[up], width, hidden)?,
            }
        } else {
            GateUp::Fused(self.stacked(&[gate, up], &[width, hidden])?)
        };
        Ok(Dense {
            gate_up,
            down: self.linear(&format!("{prefix}.down_proj.weight"), hidden, width)?,
            width,
        })
    }

    /// Layer `layer`, but its routed experts (see `experts`).
    pub(super) fn layer(&self, cfg: &Config, layer: usize) -> Result<Layer> {
        let p = format!("model.layers.{layer}");
        let hidden = cfg.hidden_size;
        let ffn = if cfg.is_moe_layer(layer) {
            let moe = &cfg.moe;
            let (experts, width) = (moe.n_routed_experts, moe.moe_intermediate_size);
            FeedForward::Moe(Moe {
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
            })
        } else {
            FeedForward::Dense(self.dense(&format!("{p}.mlp"), hidden, cfg.intermediate_size)?)
        };
        Ok(Layer {
            input_norm: self.vector(&format!("{p}.input_layernorm.weight"), hidden)?,
            attention: self.attention(cfg, &format!("{p}.self_attn"))?,
            post_norm: self.vector(&format!("{p}.post_attention_layernorm.weight"), hidden)?,
            ffn,
        })
    }

    fn attention(&self, cfg: &Config, p: &str) -> Result<Attention> {
        let (hidden, heads) = (cfg.hidden_size, cfg.num_attention_heads);
        let (kv_lora, rope) = (cfg.kv_lora_rank, cfg.qk_rope_head_dim);
        let q_out = heads * cfg.qk_head_dim();
        Ok(Attention {
            q: match cfg.q_lora_rank {
                None => QProj::Plain(self.linear(&format!("{p}.q_proj.weight"), q_out, hidden)?),
                Some(rank) => QProj::LowRank {
                    down: self.linear(&format!("{p}.q_a_proj.weight"), rank, hidden)?,
                    norm: self.vector(&format!("{p}.q_a_layernorm.weight"), rank)?,
                    up: self.linear(&format!("{p}.q_b_proj.weight"), q_out, rank)?,
                    rank,
                },
            },
            kv_down: self.linear(
                &format!("{p}.kv_a_proj_with_mqa.weight"),
                kv_lora + rope,
                hidden,
            )?,
            kv_norm: self.vector(&format!("{p}.kv_a_layernorm.weight"), kv_lora)?,
            kv_up: self.matrix(
                &format!("{p}.kv_b_proj.weight"),
                heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                kv_lora,
            )?,
            o_proj: self.linear(
                &format!("{p}.o_proj.weight"),
                hidden,
                heads * cfg.v_head_dim,
            )?,
        })
    }
}
