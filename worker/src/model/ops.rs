//! Shared building blocks: linear layers, RMSNorm, SwiGLU MLPs and YaRN rotary embeddings.
//! Activations are f32 throughout (see the numerics contract in ARCHITECTURE.md).

use candle_core::{D, Device, Tensor};
use rayon::prelude::*;

use super::kernels;
use crate::config::{Config, Yarn};
use crate::error::Result;
use crate::weights::{Bf16Weights, Checkpoint, Dtype, Fp8Weights};

/// `y = x Wᵀ`. Weights stored as bf16 or FP8 stay so in memory, read in place from the
/// checkpoint's mapping (a half or a quarter of f32's bytes); decode steps and short prompts
/// read them through [`kernels::matmul`], which widens them in registers, longer prompts
/// through [`kernels::matmul_panels`], which widens them an L2-sized panel at a time for a
/// GEMM. f32 and f16 weights are kept as f32, transposed for the GEMM.
pub struct Linear {
    storage: Storage,
}

enum Storage {
    F32 {
        weight_t: Tensor,
    },
    Packed {
        weights: PackedWeights,
        out_dim: usize,
        in_dim: usize,
    },
}

/// Weights the kernels read as the checkpoint stores them.
enum PackedWeights {
    Bf16(Bf16Weights),
    Fp8(Fp8Weights),
    /// bf16 coded in 12 bits (`--cpu-decode-weights coded`), the checkpoint's pages given
    /// back.
    Coded(kernels::CodedBf16),
}

/// Up to this many tokens the blocked kernel is as fast as widening the weight for a GEMM or
/// faster (measured with bf16 weights on 32-, 128- and 1024-token prompts:
/// `bench/engine/README.md`).
pub const KERNEL_MAX_TOKENS: usize = 64;

impl Linear {
    pub fn load(ckpt: &Checkpoint, name: &str, out_dim: usize, in_dim: usize) -> Result<Self> {
        let name = format!("{name}.weight");
        let shape = [out_dim, in_dim];
        let packed = |weights| Storage::Packed {
            weights,
            out_dim,
            in_dim,
        };
        let storage = match ckpt.info(&name)?.dtype {
            Dtype::Bf16 => {
                let stored = ckpt.load_bf16(&name, &shape)?;
                let coded = (kernels::DecodeWeights::selected() == kernels::DecodeWeights::Coded)
                    .then(|| kernels::CodedBf16::encode(stored.bits(), in_dim))
                    .flatten();
                packed(match coded {
                    Some(coded) => {
                        stored.release();
                        PackedWeights::Coded(coded)
                    }
                    None => PackedWeights::Bf16(stored),
                })
            }
            Dtype::F8E4M3 => packed(PackedWeights::Fp8(ckpt.load_fp8_in_place(&name, &shape)?)),
            Dtype::F32 | Dtype::F16 => Storage::F32 {
                weight_t: load(ckpt, &name, &shape)?.t()?.contiguous()?,
            },
        };
        Ok(Linear { storage })
    }

    /// `x`: `[tokens, in]` → `[tokens, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, false)
    }

    /// Like `forward`; with `per_row` every row's result is computed exactly as it would be
    /// alone (a batched decode step must not change any sequence's numbers).
    pub fn forward_with(&self, x: &Tensor, per_row: bool) -> Result<Tensor> {
        let tokens = x.dim(0)?;
        match &self.storage {
            Storage::F32 { .. } if per_row && tokens > 1 => each_row(x, |row| self.forward(row)),
            Storage::F32 { weight_t } => Ok(x.matmul(weight_t)?),
            Storage::Packed {
                weights,
                out_dim,
                in_dim,
            } => {
                let input = x.flatten_all()?.to_vec1::<f32>()?;
                let weight = weights.view(*in_dim);
                let y = if per_row || tokens <= KERNEL_MAX_TOKENS {
                    kernels::matmul(&input, tokens, weight, *out_dim, *in_dim)
                } else {
                    kernels::matmul_panels(&input, tokens, weight, *out_dim, *in_dim)
                };
                Ok(Tensor::from_vec(y, (tokens, *out_dim), &Device::Cpu)?)
            }
        }
    }

    /// Whether the weight is kept as stored (bf16 or FP8): products of up to
    /// [`KERNEL_MAX_TOKENS`] rows, or of any rows in a batch-invariant pass, then take the
    /// blocked kernel, where each row computes what it would alone.
    pub fn is_packed(&self) -> bool {
        self.packed().is_some()
    }

    /// The weights as stored and the output rows, when kept as stored.
    fn packed(&self) -> Option<(kernels::Packed<'_>, usize)> {
        match &self.storage {
            Storage::Packed {
                weights,
                out_dim,
                in_dim,
            } => Some((weights.view(*in_dim), *out_dim)),
            Storage::F32 { .. } => None,
        }
    }

    /// The weight's e4m3 bytes and block scales, where it is kept as FP8.
    pub fn fp8_weights(&self) -> Option<&Fp8Weights> {
        match &self.storage {
            Storage::Packed {
                weights: PackedWeights::Fp8(w),
                ..
            } => Some(w),
            _ => None,
        }
    }

    /// The weight as stored in the checkpoint, `[out, in]`, in f32.
    pub fn weight(&self) -> Result<Tensor> {
        match &self.storage {
            Storage::F32 { weight_t } => Ok(weight_t.t()?),
            Storage::Packed {
                weights,
                out_dim,
                in_dim,
            } => Ok(Tensor::from_vec(
                weights.view(*in_dim).widen(*in_dim),
                (*out_dim, *in_dim),
                &Device::Cpu,
            )?),
        }
    }
}

impl PackedWeights {
    fn view(&self, in_dim: usize) -> kernels::Packed<'_> {
        match self {
            PackedWeights::Bf16(w) => kernels::Packed::Bf16(w.bits()),
            PackedWeights::Coded(coded) => coded.view(),
            PackedWeights::Fp8(w) => {
                kernels::Packed::fp8(w.bytes(), w.block_scales(), w.block(), in_dim)
            }
        }
    }
}

/// Token embeddings, kept as stored when bf16 (only looked-up rows are widened).
pub enum Embedding {
    F32(Tensor),
    Bf16 { bits: Bf16Weights, hidden: usize },
}

impl Embedding {
    pub fn load(ckpt: &Checkpoint, name: &str, vocab: usize, hidden: usize) -> Result<Self> {
        Ok(if ckpt.info(name)?.dtype == Dtype::Bf16 {
            Embedding::Bf16 {
                bits: ckpt.load_bf16(name, &[vocab, hidden])?,
                hidden,
            }
        } else {
            Embedding::F32(load(ckpt, name, &[vocab, hidden])?)
        })
    }

    /// `[ids.len(), hidden]`; ids must be in the vocabulary.
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        match self {
            Embedding::F32(table) => {
                let ids = Tensor::from_vec(ids.to_vec(), ids.len(), &Device::Cpu)?;
                Ok(table.index_select(&ids, 0)?)
            }
            Embedding::Bf16 { bits, hidden } => {
                let rows: Vec<f32> = ids
                    .iter()
                    .flat_map(|&id| &bits.bits()[id as usize * hidden..][..*hidden])
                    .map(|&b| f32::from_bits(u32::from(b) << 16))
                    .collect();
                Ok(Tensor::from_vec(rows, (ids.len(), *hidden), &Device::Cpu)?)
            }
        }
    }
}

/// A checkpoint tensor as an f32 tensor of the given shape.
pub fn load(ckpt: &Checkpoint, name: &str, shape: &[usize]) -> Result<Tensor> {
    let values = ckpt.load_f32(name, shape)?;
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        RmsNorm { weight, eps }
    }

    pub fn load(ckpt: &Checkpoint, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: load(ckpt, &format!("{name}.weight"), &[dim])?,
            eps,
        })
    }

    /// Normalises the last dimension: `x / sqrt(mean(x²) + eps) * weight`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        Ok(normed.broadcast_mul(&self.weight)?)
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`. Dense MLPs, routed and shared experts.
pub struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    pub fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        hidden: usize,
        intermediate: usize,
    ) -> Result<Self> {
        Ok(Mlp {
            gate: Linear::load(ckpt, &format!("{prefix}.gate_proj"), intermediate, hidden)?,
            up: Linear::load(ckpt, &format!("{prefix}.up_proj"), intermediate, hidden)?,
            down: Linear::load(ckpt, &format!("{prefix}.down_proj"), hidden, intermediate)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, false)
    }

    /// Like `forward`; with `per_row` every row is computed exactly as it would be alone.
    pub fn forward_with(&self, x: &Tensor, per_row: bool) -> Result<Tensor> {
        let (tokens, hidden) = x.dims2()?;
        if per_row && tokens > 1 && !self.is_packed() {
            return each_row(x, |row| self.forward(row));
        }
        if (per_row || tokens <= KERNEL_MAX_TOKENS) && self.is_packed() {
            let x = x.flatten_all()?.to_vec1::<f32>()?;
            let out = mlps_packed(&[(self, x.chunks_exact(hidden).collect())]).remove(0);
            return Ok(Tensor::from_vec(out, (tokens, hidden), &Device::Cpu)?);
        }
        let gated = (self.gate.forward(x)?.silu()? * self.up.forward(x)?)?;
        self.down.forward(&gated)
    }

    /// Whether all three weights are kept as stored (bf16 or FP8).
    pub fn is_packed(&self) -> bool {
        self.packed().is_some()
    }

    fn packed(&self) -> Option<[(kernels::Packed<'_>, usize); 3]> {
        Some([self.gate.packed()?, self.up.packed()?, self.down.packed()?])
    }
}

/// Applies `f` to each row of `x` on its own and stacks the results.
pub fn each_row(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let rows = (0..x.dim(0)?)
        .map(|t| f(&x.narrow(0, t, 1)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 0)?)
}

/// MLPs whose elementwise work `mlps_packed` gives one task.
const MLPS_PER_TASK: usize = 8;

/// `mlp(x)` for each `(mlp, inputs)` pair, every MLP kept as stored (check with
/// [`Mlp::is_packed`]): all gate and up products in one dispatch, all down products in a
/// second; each MLP's weights are read once for all its inputs. Returns `[inputs, hidden]`
/// per pair. The routed experts of a decode step go through here together.
pub fn mlps_packed(items: &[(&Mlp, Vec<&[f32]>)]) -> Vec<Vec<f32>> {
    let weights: Vec<[(kernels::Packed<'_>, usize); 3]> = items
        .iter()
        .map(|(mlp, _)| mlp.packed().expect("MLP kept as stored"))
        .collect();
    let buffers = |which: usize| -> Vec<Vec<f32>> {
        weights
            .iter()
            .zip(items)
            .map(|(w, (_, xs))| vec![0f32; w[which].1 * xs.len()])
            .collect()
    };
    // [intermediate, inputs] each
    let (mut gates, mut ups) = (buffers(0), buffers(1));
    let mut jobs = Vec::with_capacity(2 * items.len());
    for (((w, (_, xs)), gate), up) in weights.iter().zip(items).zip(&mut gates).zip(&mut ups) {
        for (weight, out) in [(w[0].0, gate), (w[1].0, up)] {
            jobs.push(kernels::Product {
                weight,
                inputs: xs.clone(),
                out,
            });
        }
    }
    kernels::products(jobs);
    // silu(gate) · up, as x / (1 + e^−x), written one row per input for the down products;
    // MLPS_PER_TASK at a time (a prompt's experts together are a pass over megabytes, a
    // decode step's few are not worth waking another thread for).
    let hidden: Vec<Vec<f32>> = gates
        .par_iter()
        .with_min_len(MLPS_PER_TASK)
        .zip(&ups)
        .zip(items)
        .map(|((gate, up), (_, xs))| {
            let (n, rows) = (xs.len(), gate.len() / xs.len());
            let mut hidden = vec![0f32; gate.len()];
            for (r, (gate, up)) in gate.chunks_exact(n).zip(up.chunks_exact(n)).enumerate() {
                for (t, (&g, &u)) in gate.iter().zip(up).enumerate() {
                    hidden[t * rows + r] = g / (1.0 + (-g).exp()) * u;
                }
            }
            hidden
        })
        .collect();
    let mut outs = buffers(2);
    let jobs = weights
        .iter()
        .zip(&hidden)
        .zip(items)
        .zip(&mut outs)
        .map(|(((w, h), (_, xs)), out)| kernels::Product {
            weight: w[2].0,
            inputs: h.chunks_exact(h.len() / xs.len()).collect(),
            out,
        })
        .collect();
    kernels::products(jobs);
    outs.par_iter()
        .with_min_len(MLPS_PER_TASK)
        .zip(items)
        .map(|(out, (_, xs))| kernels::transpose(out, xs.len()))
        .collect()
}

/// Rotary embedding of the decoupled `qk_rope_head_dim` dims, with YaRN when configured.
pub struct Rope {
    /// `[rope_dim / 2]` inverse frequencies.
    inv_freq: Vec<f32>,
    /// YaRN's magnitude correction of cos/sin.
    attention_factor: f32,
}

/// YaRN's attention magnitude scale (`yarn_get_mscale` in the reference).
pub fn yarn_mscale(factor: f64, mscale: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * mscale * factor.ln() + 1.0
    }
}

impl Rope {
    pub fn new(cfg: &Config) -> Self {
        let dim = cfg.qk_rope_head_dim;
        let base = cfg.rope_theta;
        // base^(2i/dim), in f32 as the reference computes it
        let pos_freqs: Vec<f32> = (0..dim / 2)
            .map(|i| (base as f32).powf((2 * i) as f32 / dim as f32))
            .collect();
        let Some(yarn) = &cfg.yarn else {
            return Rope {
                inv_freq: pos_freqs.iter().map(|p| 1.0 / p).collect(),
                attention_factor: 1.0,
            };
        };
        let (low, high) = yarn_correction_range(yarn, dim, base);
        let inv_freq = pos_freqs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let extrapolation = 1.0 / p;
                let interpolation = 1.0 / (yarn.factor as f32 * p);
                // Fast-rotating dims (below `low`) keep their frequency, slow ones are
                // interpolated, with a linear ramp between.
                let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                let keep = 1.0 - ramp;
                interpolation * (1.0 - keep) + extrapolation * keep
            })
            .collect();
        let attention_factor = if yarn.mscale != 0.0 && yarn.mscale_all_dim != 0.0 {
            yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
        } else {
            yarn_mscale(yarn.factor, 1.0)
        };
        Rope {
            inv_freq,
            attention_factor: attention_factor as f32,
        }
    }

    /// `cos` and `sin` tables, `[positions, rope_dim / 2]` each.
    pub fn tables(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let (len, half) = (positions.len(), self.inv_freq.len());
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for &pos in positions {
            for f in &self.inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos() * self.attention_factor);
                sin.push(angle.sin() * self.attention_factor);
            }
        }
        (cos, sin)
    }

    /// Rotates `x` (`[tokens, heads, rope_dim]`, pairs interleaved as the checkpoints store
    /// them: (x0, x1), (x2, x3), …) by each token's angles (`tables` of the tokens'
    /// positions). The result is in half-split layout (all first elements, then all second
    /// elements); queries and keys get the same layout, so their dot products are unchanged.
    /// Plain loops over slices: the multiplies, subtractions and adds of the tensor ops
    /// (views, broadcasts, a concatenation) they replace, so the same bits, with no tensor
    /// built for a decode step's few rows.
    pub fn apply(&self, x: &[f32], (cos, sin): (&[f32], &[f32])) -> Vec<f32> {
        let half = self.inv_freq.len();
        let tokens = cos.len() / half;
        assert!(sin.len() == cos.len() && cos.len() == tokens * half);
        let mut out = vec![0f32; x.len()];
        if tokens == 0 {
            return out;
        }
        let per_token = x.len() / tokens;
        assert_eq!(per_token * tokens, x.len());
        let token_rows = x
            .chunks_exact(per_token)
            .zip(out.chunks_exact_mut(per_token));
        for ((x, out), (cos, sin)) in
            token_rows.zip(cos.chunks_exact(half).zip(sin.chunks_exact(half)))
        {
            for (x, out) in x.chunks_exact(2 * half).zip(out.chunks_exact_mut(2 * half)) {
                let (first, second) = out.split_at_mut(half);
                for (i, pair) in x.chunks_exact(2).enumerate() {
                    let (even, odd) = (pair[0], pair[1]);
                    first[i] = even * cos[i] - odd * sin[i];
                    second[i] = odd * cos[i] + even * sin[i];
                }
            }
        }
        out
    }
}

/// Dims whose rotation count over the original context falls between `beta_fast` and
/// `beta_slow` get the ramp (`find_correction_range`, truncated to whole dims).
fn yarn_correction_range(yarn: &Yarn, dim: usize, base: f64) -> (f32, f32) {
    let correction_dim = |rotations: f64| {
        dim as f64
            * (yarn.original_max_position_embeddings as f64
                / (rotations * 2.0 * std::f64::consts::PI))
                .ln()
            / (2.0 * base.ln())
    };
    let low = correction_dim(yarn.beta_fast).floor().max(0.0);
    let high = correction_dim(yarn.beta_slow).ceil().min(dim as f64 - 1.0);
    // equal ends would divide by zero in the ramp
    let high = if low == high { high + 0.001 } else { high };
    (low as f32, high as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yarn_mscale_matches_the_reference_formula() {
        assert_eq!(yarn_mscale(1.0, 1.0), 1.0);
        assert!((yarn_mscale(40.0, 1.0) - (0.1 * 40f64.ln() + 1.0)).abs() < 1e-12);
        assert!((yarn_mscale(40.0, 0.707) - 1.2608).abs() < 1e-4);
    }

    #[test]
    fn rotation_of_pairs_preserves_norms_and_dot_products_shift_with_position() {
        let mut cfg = crate::config::tests_support::tiny_config();
        cfg.yarn = None;
        let rope = Rope::new(&cfg);
        let dim = cfg.qk_rope_head_dim;
        let x: Vec<f32> = (0..dim).map(|i| (i as f32 * 0.37).sin()).collect();
        let (cos, sin) = rope.tables(&[5]);
        let r = rope.apply(&x, (&cos, &sin));
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&r) - norm(&x)).abs() < 1e-5);
        // position 0 is the identity (in half-split layout)
        let (cos0, sin0) = rope.tables(&[0]);
        let r0 = rope.apply(&x, (&cos0, &sin0));
        let split: Vec<f32> = x
            .iter()
            .step_by(2)
            .chain(x.iter().skip(1).step_by(2))
            .copied()
            .collect();
        assert_eq!(r0, split);
    }
}
