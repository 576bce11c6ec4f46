//! Multi-head latent attention (MLA), as DeepSeek-V2/V3 define it.
//!
//! Keys and values are compressed into one latent per token (`c_kv`, `kv_lora_rank` values,
//! normalised) plus a shared roped key (`k_pe`, `qk_rope_head_dim` values): that pair is all
//! the KV cache holds. Prefill expands the latent through `kv_b_proj` into per-head keys and
//! values. Decode uses the weight-absorbed form instead: `kv_b_proj`'s key half is folded into
//! the query and its value half applied after attention, so attention runs directly on the
//! latents.

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::cache::LayerCache;
use super::ops::{Linear, RmsNorm, Rope, softmax_last, yarn_mscale};
use crate::config::Config;
use crate::weights::Checkpoint;

/// The query projection: direct, or through a low-rank bottleneck (V3, V2 full size).
enum QProj {
    Plain(Linear),
    LowRank {
        down: Linear,
        norm: RmsNorm,
        up: Linear,
    },
}

pub struct Attention {
    q: QProj,
    kv_down: Linear,
    kv_norm: RmsNorm,
    /// `[heads × (nope + v), kv_lora_rank]`, kept for the prefill path.
    kv_up: Linear,
    /// Key half of `kv_up` per head, `[heads, nope, kv_lora_rank]` (absorbed decode).
    w_uk: Tensor,
    /// Value half of `kv_up` per head, transposed: `[heads, kv_lora_rank, v]`.
    w_uv_t: Tensor,
    o_proj: Linear,
    heads: usize,
    nope: usize,
    rope_dim: usize,
    v_dim: usize,
    kv_lora: usize,
    softmax_scale: f64,
}

impl Attention {
    pub fn load(cfg: &Config, ckpt: &Checkpoint, prefix: &str) -> Result<Self> {
        let (hidden, heads) = (cfg.hidden_size, cfg.num_attention_heads);
        let (nope, rope_dim, v_dim, kv_lora) = (
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        );
        let q_out = heads * cfg.qk_head_dim();
        let q = match cfg.q_lora_rank {
            None => QProj::Plain(Linear::load(
                ckpt,
                &format!("{prefix}.q_proj"),
                q_out,
                hidden,
            )?),
            Some(rank) => QProj::LowRank {
                down: Linear::load(ckpt, &format!("{prefix}.q_a_proj"), rank, hidden)?,
                norm: RmsNorm::load(
                    ckpt,
                    &format!("{prefix}.q_a_layernorm"),
                    rank,
                    cfg.rms_norm_eps,
                )?,
                up: Linear::load(ckpt, &format!("{prefix}.q_b_proj"), q_out, rank)?,
            },
        };
        let kv_up = Linear::load(
            ckpt,
            &format!("{prefix}.kv_b_proj"),
            heads * (nope + v_dim),
            kv_lora,
        )?;
        let per_head = kv_up.weight()?.reshape((heads, nope + v_dim, kv_lora))?;
        let w_uk = per_head.narrow(1, 0, nope)?.contiguous()?;
        let w_uv_t = per_head
            .narrow(1, nope, v_dim)?
            .transpose(1, 2)?
            .contiguous()?;
        let mut softmax_scale = 1.0 / (cfg.qk_head_dim() as f64).sqrt();
        if let Some(yarn) = cfg.yarn.as_ref().filter(|y| y.mscale_all_dim != 0.0) {
            let m = yarn_mscale(yarn.factor, yarn.mscale_all_dim);
            softmax_scale *= m * m;
        }
        Ok(Attention {
            q,
            kv_down: Linear::load(
                ckpt,
                &format!("{prefix}.kv_a_proj_with_mqa"),
                kv_lora + rope_dim,
                hidden,
            )?,
            kv_norm: RmsNorm::load(
                ckpt,
                &format!("{prefix}.kv_a_layernorm"),
                kv_lora,
                cfg.rms_norm_eps,
            )?,
            kv_up,
            w_uk,
            w_uv_t,
            o_proj: Linear::load(ckpt, &format!("{prefix}.o_proj"), hidden, heads * v_dim)?,
            heads,
            nope,
            rope_dim,
            v_dim,
            kv_lora,
            softmax_scale,
        })
    }

    /// `x`: `[tokens, hidden]`, the rows of one or more sequences: `segments` gives each
    /// sequence's row count and cache, in row order. Each sequence's rows sit at positions
    /// `cache.tokens()..`; their latents are appended and `[tokens, hidden]` returned.
    /// `per_row` computes every row independently of the others (batched decode).
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        segments: &mut [(usize, &mut LayerCache)],
        per_row: bool,
    ) -> Result<Tensor> {
        let tokens = x.dim(0)?;
        let q = match &self.q {
            QProj::Plain(proj) => proj.forward_with(x, per_row)?,
            QProj::LowRank { down, norm, up } => {
                up.forward_with(&norm.forward(&down.forward_with(x, per_row)?)?, per_row)?
            }
        };
        let q = q.reshape((tokens, self.heads, self.nope + self.rope_dim))?;
        let kv = self.kv_down.forward_with(x, per_row)?;
        let c_kv = self.kv_norm.forward(&kv.narrow(1, 0, self.kv_lora)?)?;

        let mut outs = Vec::with_capacity(segments.len());
        let mut row = 0;
        for (len, cache) in segments.iter_mut() {
            let len = *len;
            let start = cache.tokens();
            let (cos, sin) = rope.tables(start, len)?;
            let q = q.narrow(0, row, len)?;
            let q_nope = q.narrow(2, 0, self.nope)?;
            let q_pe = rope.apply(&q.narrow(2, self.nope, self.rope_dim)?, &cos, &sin)?;
            let k_pe = kv
                .narrow(0, row, len)?
                .narrow(1, self.kv_lora, self.rope_dim)?
                .reshape((len, 1, self.rope_dim))?;
            let k_pe = rope
                .apply(&k_pe, &cos, &sin)?
                .reshape((len, self.rope_dim))?;
            cache.append(&c_kv.narrow(0, row, len)?, &k_pe)?;
            outs.push(if len == 1 && start > 0 {
                self.attend_absorbed(&q_nope, &q_pe, cache)?
            } else {
                self.attend_expanded(&q_nope, &q_pe, cache, start)?
            });
            row += len;
        }
        let out = if outs.len() == 1 {
            outs.pop().expect("one segment")
        } else {
            Tensor::cat(&outs, 0)?
        };
        self.o_proj.forward_with(&out, per_row)
    }

    /// Prefill: expand every cached latent into per-head keys and values.
    fn attend_expanded(
        &self,
        q_nope: &Tensor,
        q_pe: &Tensor,
        cache: &LayerCache,
        start: usize,
    ) -> Result<Tensor> {
        let tokens = q_nope.dim(0)?;
        let (c_kv, k_pe) = cache.tensors()?;
        let total = c_kv.dim(0)?;
        let kv = self
            .kv_up
            .forward(&c_kv)?
            .reshape((total, self.heads, self.nope + self.v_dim))?;
        let k_nope = kv.narrow(2, 0, self.nope)?;
        let v = kv
            .narrow(2, self.nope, self.v_dim)?
            .transpose(0, 1)?
            .contiguous()?; // [heads, total, v]
        let k_pe = k_pe
            .unsqueeze(1)?
            .broadcast_as((total, self.heads, self.rope_dim))?;
        let k = Tensor::cat(&[k_nope, k_pe], 2)?
            .transpose(0, 1)?
            .contiguous()?; // [heads, total, qk]
        let q = Tensor::cat(&[q_nope, q_pe], 2)?
            .transpose(0, 1)?
            .contiguous()?; // [heads, tokens, qk]
        let scores = (q.matmul(&k.t()?)? * self.softmax_scale)?; // [heads, tokens, total]
        let scores = scores.broadcast_add(&causal_mask(tokens, start, total)?)?;
        let out = softmax_last(&scores)?.matmul(&v)?; // [heads, tokens, v]
        Ok(out
            .transpose(0, 1)?
            .reshape((tokens, self.heads * self.v_dim))?)
    }

    /// Decode: attention over the latents themselves, `kv_b_proj` absorbed.
    fn attend_absorbed(
        &self,
        q_nope: &Tensor,
        q_pe: &Tensor,
        cache: &LayerCache,
    ) -> Result<Tensor> {
        let (c_kv, k_pe) = cache.tensors()?; // [total, kv_lora], [total, rope]
        // q_nope [1, heads, nope] → per head [heads, 1, nope] @ w_uk [heads, nope, kv_lora]
        let q_latent = q_nope.transpose(0, 1)?.contiguous()?.matmul(&self.w_uk)?; // [heads, 1, kv_lora]
        let q_latent = q_latent.squeeze(1)?; // [heads, kv_lora]
        let q_pe = q_pe.squeeze(0)?; // [heads, rope]
        let scores = (q_latent.matmul(&c_kv.t()?)? + q_pe.matmul(&k_pe.t()?)?)?; // [heads, total]
        let probs = softmax_last(&(scores * self.softmax_scale)?)?;
        let latent_out = probs.matmul(&c_kv)?; // [heads, kv_lora]
        let out = latent_out.unsqueeze(1)?.matmul(&self.w_uv_t)?; // [heads, 1, v]
        Ok(out.reshape((1, self.heads * self.v_dim))?)
    }
}

/// `[tokens, total]`: 0 where query `t` (at position `start + t`) may see key `s`, −∞ after.
fn causal_mask(tokens: usize, start: usize, total: usize) -> Result<Tensor> {
    let mask: Vec<f32> = (0..tokens)
        .flat_map(|t| {
            (0..total).map(move |s| {
                if s <= start + t {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (tokens, total), &Device::Cpu)?)
}
