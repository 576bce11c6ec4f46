//! Multi-head latent attention (MLA), as DeepSeek-V2/V3 define it.
//!
//! Keys and values are compressed into one latent per token (`c_kv`, `kv_lora_rank` values,
//! normalised) plus a shared roped key (`k_pe`, `qk_rope_head_dim` values): that pair is all
//! the KV cache holds. Prefill expands the latent through `kv_b_proj` into per-head keys and
//! values. Decode uses the weight-absorbed form instead: `kv_b_proj`'s key half is folded into
//! the query and its value half applied after attention, so attention runs directly on the
//! latents.

use std::ops::Range;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::cache::{BLOCK_TOKENS, BlockTable, LayerBlocks};
use super::kernels::{self, Packed, Product, dots_by_key, weighted_sums};
use super::ops::{Linear, RmsNorm, Rope, yarn_mscale};
use crate::config::Config;
use crate::error::Result;
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
    /// Key half of `kv_up` per head, transposed: `[heads × kv_lora_rank, nope]` (absorbed
    /// decode).
    w_uk_t: HeadWeights,
    /// Value half of `kv_up` per head: `[heads × v, kv_lora_rank]`.
    w_uv: HeadWeights,
    o_proj: Linear,
    heads: usize,
    nope: usize,
    rope_dim: usize,
    v_dim: usize,
    kv_lora: usize,
    softmax_scale: f64,
}

impl Attention {
    /// Whether the projections a pass's rows go through are kept as stored (`kv_up` runs on
    /// each sequence's own latents).
    pub fn is_packed(&self) -> bool {
        let q = match &self.q {
            QProj::Plain(proj) => proj.is_packed(),
            QProj::LowRank { down, up, .. } => down.is_packed() && up.is_packed(),
        };
        q && self.kv_down.is_packed() && self.o_proj.is_packed()
    }

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
        let (w_uk_t, w_uv) = match kv_up.fp8_weights() {
            // FP8 stays FP8: a quarter of f32's bytes read at every decode step.
            Some(w) => {
                let source = Fp8Source {
                    bytes: w.bytes(),
                    block_scales: w.block_scales(),
                    block: w.block(),
                    cols: kv_lora,
                };
                let stride = nope + v_dim;
                (
                    HeadWeights::fp8(&source, heads, stride, 0..nope, true),
                    HeadWeights::fp8(&source, heads, stride, nope..stride, false),
                )
            }
            None => {
                let per_head = kv_up.weight()?.reshape((heads, nope + v_dim, kv_lora))?;
                let flat = |t: Tensor| -> Result<HeadWeights> {
                    Ok(HeadWeights::new(t.contiguous()?.flatten_all()?.to_vec1()?))
                };
                (
                    flat(per_head.narrow(1, 0, nope)?.transpose(1, 2)?)?,
                    flat(per_head.narrow(1, nope, v_dim)?)?,
                )
            }
        };
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
            w_uk_t,
            w_uv,
            o_proj: Linear::load(ckpt, &format!("{prefix}.o_proj"), hidden, heads * v_dim)?,
            heads,
            nope,
            rope_dim,
            v_dim,
            kv_lora,
            softmax_scale: softmax_scale(cfg),
        })
    }

    /// `x`: `[tokens, hidden]`, the rows of one or more sequences: `segments` gives each
    /// sequence's row count and block table, in row order. Each sequence's rows sit at
    /// positions `table.tokens()..`, for which its table has reserved blocks; their latents
    /// are written to `store` and `[tokens, hidden]` returned. `per_row` computes every row
    /// independently of the others (batched decode).
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        store: &mut LayerBlocks,
        segments: &[(usize, &BlockTable)],
        per_row: bool,
    ) -> Result<Tensor> {
        let tokens = x.dim(0)?;
        let q = match &self.q {
            QProj::Plain(proj) => proj.forward_with(x, per_row)?,
            QProj::LowRank { down, norm, up } => {
                up.forward_with(&norm.forward(&down.forward_with(x, per_row)?)?, per_row)?
            }
        };
        // [tokens, heads, nope + rope] and [tokens, kv_lora + rope]
        let q = q.flatten_all()?.to_vec1::<f32>()?;
        let kv = self.kv_down.forward_with(x, per_row)?;
        let new_c_kv = self
            .kv_norm
            .forward(&kv.narrow(1, 0, self.kv_lora)?)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let kv = kv.flatten_all()?.to_vec1::<f32>()?;

        // Each row's table and position.
        let rows: Vec<(&BlockTable, usize)> = segments
            .iter()
            .flat_map(|&(len, table)| {
                (table.tokens()..table.tokens() + len).map(move |p| (table, p))
            })
            .collect();
        let positions: Vec<usize> = rows.iter().map(|&(_, p)| p).collect();
        let (cos, sin) = rope.tables(&positions);
        let head_dim = self.nope + self.rope_dim;
        let q_nope = columns(&q, head_dim, 0..self.nope);
        let q_pe = rope.apply(&columns(&q, head_dim, self.nope..head_dim), (&cos, &sin));
        let kv_width = self.kv_lora + self.rope_dim;
        let new_k_pe = rope.apply(
            &columns(&kv, kv_width, self.kv_lora..kv_width),
            (&cos, &sin),
        );
        for (row, &(table, position)) in rows.iter().enumerate() {
            store.write(
                table,
                position,
                &new_c_kv[row * self.kv_lora..][..self.kv_lora],
                &new_k_pe[row * self.rope_dim..][..self.rope_dim],
            );
        }

        // Single-token steps after a prompt attend over the latents directly; the rest
        // (prompts, prompt chunks) expand them.
        let width = self.heads * self.v_dim;
        let mut out = vec![0f32; tokens * width];
        let mut decode_rows = Vec::new();
        let mut row = 0;
        for &(len, table) in segments {
            let start = table.tokens();
            if len == 1 && start > 0 {
                decode_rows.push((row, table));
            } else {
                let rows = row * self.heads..(row + len) * self.heads;
                self.attend_expanded(
                    (
                        &q_nope[rows.start * self.nope..rows.end * self.nope],
                        &q_pe[rows.start * self.rope_dim..rows.end * self.rope_dim],
                    ),
                    store,
                    table,
                    start,
                    &mut out[row * width..(row + len) * width],
                )?;
            }
            row += len;
        }
        if !decode_rows.is_empty() {
            self.attend_absorbed(&q_nope, &q_pe, store, &decode_rows, &mut out);
        }
        let out = Tensor::from_vec(out, (tokens, width), &Device::Cpu)?;
        self.o_proj.forward_with(&out, per_row)
    }

    /// Prefill: expand every cached latent into per-head keys and values, then attend one
    /// head per task, reading the queries, keys and values where they lie: `out`
    /// (`[tokens, heads × v]`) gets the segment's rows. `q_nope`: `[tokens, heads, nope]`,
    /// `q_pe`: `[tokens, heads, rope]` (roped).
    fn attend_expanded(
        &self,
        (q_nope, q_pe): (&[f32], &[f32]),
        store: &LayerBlocks,
        table: &BlockTable,
        start: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let (heads, nope, rope, v_dim) = (self.heads, self.nope, self.rope_dim, self.v_dim);
        let tokens = out.len() / (heads * v_dim);
        let total = start + tokens;
        let (c_kv, k_pe) = store.gather(table, total);
        let c_kv = Tensor::from_vec(c_kv, (total, self.kv_lora), &Device::Cpu)?;
        // [total, heads, nope + v]
        let kv = self.kv_up.forward(&c_kv)?.flatten_all()?.to_vec1::<f32>()?;
        let kv_row = heads * (nope + v_dim);
        let scale = self.softmax_scale as f32;
        let by_head: Vec<Vec<f32>> = (0..heads)
            .into_par_iter()
            .map(|h| {
                let matrix = |data, rows, cols, row_stride| kernels::Strided {
                    data,
                    rows,
                    cols,
                    row_stride,
                    col_stride: 1,
                };
                // Scores, [tokens, total]: q_nope · k_nopeᵀ + q_pe · k_peᵀ.
                let mut scores = vec![0f32; tokens * total];
                let keys_nope = matrix(&kv[h * (nope + v_dim)..], total, nope, kv_row);
                kernels::gemm_on_thread(
                    matrix(&q_nope[h * nope..], tokens, nope, heads * nope),
                    keys_nope.transposed(),
                    &mut scores,
                    false,
                );
                kernels::gemm_on_thread(
                    matrix(&q_pe[h * rope..], tokens, rope, heads * rope),
                    matrix(&k_pe, total, rope, rope).transposed(),
                    &mut scores,
                    true,
                );
                // Query t sees positions up to start + t; the rest weigh nothing.
                for (t, row) in scores.chunks_exact_mut(total).enumerate() {
                    let (seen, unseen) = row.split_at_mut(start + t + 1);
                    softmax_scaled(seen, scale);
                    unseen.fill(0.0);
                }
                let mut values = vec![0f32; tokens * v_dim];
                kernels::gemm_on_thread(
                    matrix(&scores, tokens, total, total),
                    matrix(&kv[h * (nope + v_dim) + nope..], total, v_dim, kv_row),
                    &mut values,
                    false,
                );
                values
            })
            .collect();
        for (h, values) in by_head.iter().enumerate() {
            for (out, values) in out
                .chunks_exact_mut(heads * v_dim)
                .zip(values.chunks_exact(v_dim))
            {
                out[h * v_dim..][..v_dim].copy_from_slice(values);
            }
        }
        Ok(())
    }

    /// Decode: attention straight over the paged latents, `kv_b_proj` absorbed, for each
    /// `(row, table)`; writes the row of `out` (`[tokens, heads × v]`). The absorbed
    /// weights go through the blocked kernel, one product per head over every row, so each
    /// head's W_UK and W_UV are read once a step; every (row, head) then attends in its own
    /// task of fixed-order dot products. No row depends on the others.
    /// `q_nope`: `[tokens, heads, nope]`, `q_pe`: `[tokens, heads, rope]` (roped).
    fn attend_absorbed(
        &self,
        q_nope: &[f32],
        q_pe: &[f32],
        store: &LayerBlocks,
        rows: &[(usize, &BlockTable)],
        out: &mut [f32],
    ) {
        let (heads, nope, rope, v_dim, kv_lora) = (
            self.heads,
            self.nope,
            self.rope_dim,
            self.v_dim,
            self.kv_lora,
        );
        let n = rows.len();
        let scale = self.softmax_scale as f32;
        // The queries in latent space, W_UKᵀ q_nope: [heads, kv_lora, rows].
        let q_latent = self.per_head(&self.w_uk_t, (kv_lora, nope), n, |h| {
            rows.iter()
                .map(|&(row, _)| &q_nope[(row * heads + h) * nope..][..nope])
                .collect()
        });
        // Each row's attention over its latents, a few heads a task: [rows, heads, kv_lora].
        let mut latent_out = vec![0f32; n * heads * kv_lora];
        latent_out
            .par_chunks_mut(heads * kv_lora)
            .zip(rows)
            .enumerate()
            .for_each(|(t, (row_out, &(row, table)))| {
                row_out
                    .par_chunks_mut(HEADS_PER_TASK * kv_lora)
                    .enumerate()
                    .for_each(|(group, out)| {
                        let first_head = group * HEADS_PER_TASK;
                        let group_heads = out.len() / kv_lora;
                        // The group's queries one after another, [group_heads, kv_lora].
                        let q_latent: Vec<f32> = (first_head..first_head + group_heads)
                            .flat_map(|h| {
                                q_latent[h * kv_lora * n..][..kv_lora * n]
                                    .iter()
                                    .skip(t)
                                    .step_by(n)
                                    .copied()
                            })
                            .collect();
                        let q_pe = &q_pe[(row * heads + first_head) * rope..][..group_heads * rope];
                        attend_latents(store, table, group_heads, (&q_latent, q_pe), scale, out);
                    });
            });
        // Back out of latent space, W_UV · latent: [heads, v, rows].
        let results = self.per_head(&self.w_uv, (v_dim, kv_lora), n, |h| {
            (0..n)
                .map(|t| &latent_out[(t * heads + h) * kv_lora..][..kv_lora])
                .collect()
        });
        let width = heads * v_dim;
        for (h, head) in results.chunks_exact(v_dim * n).enumerate() {
            for (t, &(row, _)) in rows.iter().enumerate() {
                let out = &mut out[row * width + h * v_dim..][..v_dim];
                for (v, out) in out.iter_mut().enumerate() {
                    *out = head[v * n + t];
                }
            }
        }
    }

    /// One product per head in one dispatch: head `h`'s matrix of `weights`
    /// (`[rows, width]`) times `inputs(h)`, `n` vectors `width` long; `[heads, rows, n]`.
    fn per_head<'a>(
        &self,
        weights: &HeadWeights,
        (rows, width): (usize, usize),
        n: usize,
        inputs: impl Fn(usize) -> Vec<&'a [f32]>,
    ) -> Vec<f32> {
        let mut out = vec![0f32; self.heads * rows * n];
        kernels::products(
            out.chunks_mut(rows * n)
                .enumerate()
                .map(|(h, out)| Product {
                    weight: weights.head(h, (rows, width)),
                    inputs: inputs(h),
                    out,
                })
                .collect(),
        );
        out
    }
}

/// Columns `columns` of `x`'s rows (`width` long), one row after another.
fn columns(x: &[f32], width: usize, columns: Range<usize>) -> Vec<f32> {
    x.chunks_exact(width)
        .flat_map(|row| &row[columns.clone()])
        .copied()
        .collect()
}

/// Heads attended together in decode: each pass over a sequence's latents serves them all
/// (a pass per head read them 16 times a step on bench-small).
const HEADS_PER_TASK: usize = 4;

/// One row's attention for a group of heads over the latents in `store`: `q_latent`
/// (`[heads, kv_lora]`, W_UKᵀ q_nope) and `q_pe` (`[heads, rope]`, roped) against every
/// cached position, then the probabilities' weighted sum of latents into `out`
/// (`[heads, kv_lora]`). Each head's scores and sums keep one order of terms whatever the
/// group, so a head's result never depends on the others.
fn attend_latents(
    store: &LayerBlocks,
    table: &BlockTable,
    heads: usize,
    (q_latent, q_pe): (&[f32], &[f32]),
    scale: f32,
    out: &mut [f32],
) {
    let (kv_lora, rope) = (q_latent.len() / heads, q_pe.len() / heads);
    let total = table.tokens() + 1;
    // [heads, total]
    let mut probs = vec![0f32; heads * total];
    let mut latent_scores = [0f32; HEADS_PER_TASK * BLOCK_TOKENS];
    let mut pe_scores = [0f32; HEADS_PER_TASK * BLOCK_TOKENS];
    // Scores a block of positions at a time (their latents lie together).
    for (first, c_kv, k_pe) in store.runs(table, total) {
        let count = c_kv.len() / kv_lora;
        let latent_scores = &mut latent_scores[..heads * count];
        let pe_scores = &mut pe_scores[..heads * count];
        dots_by_key(q_latent, c_kv, kv_lora, latent_scores);
        dots_by_key(q_pe, k_pe, rope, pe_scores);
        for ((probs, latent), pe) in probs
            .chunks_exact_mut(total)
            .zip(latent_scores.chunks_exact(count))
            .zip(pe_scores.chunks_exact(count))
        {
            for ((p, latent), pe) in probs[first..first + count].iter_mut().zip(latent).zip(pe) {
                *p = latent + pe;
            }
        }
    }
    for probs in probs.chunks_exact_mut(total) {
        softmax_scaled(probs, scale);
    }
    let mut run_probs = [0f32; HEADS_PER_TASK * BLOCK_TOKENS];
    for (first, c_kv, _) in store.runs(table, total) {
        let count = c_kv.len() / kv_lora;
        let run_probs = &mut run_probs[..heads * count];
        for (run, probs) in run_probs
            .chunks_exact_mut(count)
            .zip(probs.chunks_exact(total))
        {
            run.copy_from_slice(&probs[first..first + count]);
        }
        weighted_sums(run_probs, c_kv, kv_lora, out);
    }
}

/// Per-head matrices the model derives from a checkpoint weight: bf16 when every value is
/// one (as a bf16 checkpoint's are: half the bytes, read exactly), f32 otherwise.
enum HeadWeights {
    Bf16(Vec<u16>),
    F32(Vec<f32>),
    Fp8(Fp8Heads),
}

/// Every head's matrix as e4m3 bytes, `[heads, rows, width]`, with its own block scales
/// (· 2⁸), `[heads, ⌈rows / block_rows⌉ · ⌈width / block_cols⌉]`.
struct Fp8Heads {
    bytes: Vec<u8>,
    block_scales: Vec<f32>,
    block: [usize; 2],
}

/// An FP8 matrix as the checkpoint stores it: `[rows, cols]` e4m3 bytes and block scales
/// (· 2⁸) `[⌈rows / block_rows⌉, ⌈cols / block_cols⌉]` for `block` `[block_rows, block_cols]`.
struct Fp8Source<'a> {
    bytes: &'a [u8],
    block_scales: &'a [f32],
    block: [usize; 2],
    cols: usize,
}

impl HeadWeights {
    fn new(values: Vec<f32>) -> Self {
        let bf16: Vec<half::bf16> = values.iter().map(|&v| half::bf16::from_f32(v)).collect();
        if bf16.iter().zip(&values).all(|(b, &v)| b.to_f32() == v) {
            HeadWeights::Bf16(bf16.iter().map(|b| b.to_bits()).collect())
        } else {
            HeadWeights::F32(values)
        }
    }

    /// Rows `rows` of each head's `stride` rows of `source`, transposed when `transpose`
    /// (`[cols, rows.len()]`, else `[rows.len(), cols]`), each weight keeping its own scale:
    /// a head's rows are cut in blocks of g = gcd(stride, rows.start, block_rows), which
    /// start at multiples of g and so never straddle two of the source's blocks of rows.
    fn fp8(
        source: &Fp8Source<'_>,
        heads: usize,
        stride: usize,
        rows: Range<usize>,
        transpose: bool,
    ) -> Self {
        let [block_rows, block_cols] = source.block;
        let g = gcd(gcd(stride, rows.start), block_rows);
        let (height, width, block) = if transpose {
            (source.cols, rows.len(), [block_cols, g])
        } else {
            (rows.len(), source.cols, [g, block_cols])
        };
        let scale_cols = source.cols.div_ceil(block_cols);
        let mut bytes = Vec::with_capacity(heads * height * width);
        let mut block_scales = Vec::new();
        for h in 0..heads {
            let first = h * stride + rows.start;
            // (row, column) of `source` for the head matrix's element (i, j).
            let at = |i: usize, j: usize| {
                if transpose {
                    (first + j, i)
                } else {
                    (first + i, j)
                }
            };
            for i in 0..height {
                for j in 0..width {
                    let (r, c) = at(i, j);
                    bytes.push(source.bytes[r * source.cols + c]);
                }
            }
            for i in (0..height).step_by(block[0]) {
                for j in (0..width).step_by(block[1]) {
                    let (r, c) = at(i, j);
                    block_scales
                        .push(source.block_scales[r / block_rows * scale_cols + c / block_cols]);
                }
            }
        }
        HeadWeights::Fp8(Fp8Heads {
            bytes,
            block_scales,
            block,
        })
    }

    /// Head `h`'s matrix, `[rows, width]`.
    fn head(&self, h: usize, (rows, width): (usize, usize)) -> Packed<'_> {
        let elements = rows * width;
        match self {
            HeadWeights::Bf16(bits) => Packed::Bf16(&bits[h * elements..][..elements]),
            HeadWeights::F32(values) => Packed::F32(&values[h * elements..][..elements]),
            HeadWeights::Fp8(m) => {
                let scales = rows.div_ceil(m.block[0]) * width.div_ceil(m.block[1]);
                Packed::fp8(
                    &m.bytes[h * elements..][..elements],
                    &m.block_scales[h * scales..][..scales],
                    m.block,
                    width,
                )
            }
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The attention logits' scale: 1/√(qk head dim), times YaRN's mscale² when it applies.
pub fn softmax_scale(cfg: &Config) -> f64 {
    let mut scale = 1.0 / (cfg.qk_head_dim() as f64).sqrt();
    if let Some(yarn) = cfg.yarn.as_ref().filter(|y| y.mscale_all_dim != 0.0) {
        let m = yarn_mscale(yarn.factor, yarn.mscale_all_dim);
        scale *= m * m;
    }
    scale
}

/// `scores` times `scale`, then softmax: `exp(s − max) / Σ exp(s − max)`.
fn softmax_scaled(scores: &mut [f32], scale: f32) {
    let mut max = f32::NEG_INFINITY;
    for s in scores.iter_mut() {
        *s *= scale;
        max = max.max(*s);
    }
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    for s in scores.iter_mut() {
        *s /= sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_weights_are_bf16_only_where_that_is_exact() {
        let exact = HeadWeights::new(vec![1.0, -0.5, 0.375, 96.0]);
        let HeadWeights::Bf16(bits) = &exact else {
            panic!("bf16 values kept as f32");
        };
        assert_eq!(bits[1], half::bf16::from_f32(-0.5).to_bits());
        assert!(matches!(exact.head(1, (1, 2)), Packed::Bf16(&[_, b]) if b == 0x42c0));
        let inexact = HeadWeights::new(vec![1.0, 0.1]);
        assert!(matches!(inexact.head(0, (1, 2)), Packed::F32(&[1.0, v]) if v == 0.1));
    }

    /// Each head's FP8 rows, transposed or not, widen to the same weights as the whole
    /// matrix widened and then cut, including where a head's rows start inside a block.
    #[test]
    fn fp8_heads_keep_every_weights_scale() {
        let (heads, stride, cols, block): (usize, usize, usize, [usize; 2]) = (3, 6, 7, [4, 3]);
        let rows = heads * stride;
        // Every byte but the NaNs (0x7f, 0xff), and a distinct scale per block.
        let bytes: Vec<u8> = (0..rows * cols)
            .map(|i| (i * 37 % 127) as u8 | (i as u8 & 0x80))
            .collect();
        let scale_count = rows.div_ceil(block[0]) * cols.div_ceil(block[1]);
        let block_scales: Vec<f32> = (0..scale_count).map(|i| 1.5 + i as f32 * 0.25).collect();
        let whole = Packed::fp8(&bytes, &block_scales, block, cols).widen(cols);
        let source = Fp8Source {
            bytes: &bytes,
            block_scales: &block_scales,
            block,
            cols,
        };
        for (range, transpose) in [(0..4, true), (4..6, false), (1..5, false), (3..6, true)] {
            let weights = HeadWeights::fp8(&source, heads, stride, range.clone(), transpose);
            for h in 0..heads {
                let shape = if transpose {
                    (cols, range.len())
                } else {
                    (range.len(), cols)
                };
                let got = weights.head(h, shape).widen(shape.1);
                let want: Vec<f32> = (0..shape.0)
                    .flat_map(|i| (0..shape.1).map(move |j| (i, j)))
                    .map(|(i, j)| {
                        let (r, c) = if transpose { (j, i) } else { (i, j) };
                        whole[(h * stride + range.start + r) * cols + c]
                    })
                    .collect();
                assert_eq!(got, want, "head {h}, rows {range:?}, transpose {transpose}");
            }
        }
    }
}
