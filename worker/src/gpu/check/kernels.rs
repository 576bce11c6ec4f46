//! Norms, rope, the MoE gate, MLA decode attention and sampling against the CPU path.

use candle_core::{Device, Tensor};
use half::bf16;

use super::{Check, down, max_diff, relative_diff, sampling_cases, to_bf16, uniform, up};
use crate::config::{Config, Moe};
use crate::error::Result;
use crate::gpu::runtime::{GateRule, Gpu};
use crate::model::moe::route;
use crate::model::ops::{RmsNorm, Rope};
use crate::sampling::{Rng, Sampler, SamplingParams};

pub(super) fn check_rms_norm(gpu: &Gpu) -> Result<Vec<Check>> {
    // rows 160 apart, as the latent sits in kv_a_proj's wider output
    let (rows, cols, stride) = (5, 144, 160);
    let wide = uniform(rows * stride, 1, 2.0);
    let x: Vec<f32> = wide
        .chunks(stride)
        .flat_map(|r| r[..cols].to_vec())
        .collect();
    let weight = to_bf16(&uniform(cols, 2, 1.5));
    let mut y = gpu.stream.alloc_zeros::<f32>(rows * cols)?;
    gpu.rms_norm(
        &up(gpu, &wide)?.as_view(),
        stride,
        &up(gpu, &weight)?,
        &mut y,
        rows,
        1e-6,
    )?;
    let weight_f32: Vec<f32> = weight.iter().map(|w| w.to_f32()).collect();
    let norm = RmsNorm::new(Tensor::from_vec(weight_f32, cols, &Device::Cpu)?, 1e-6);
    let expected = norm
        .forward(&Tensor::from_vec(x, (rows, cols), &Device::Cpu)?)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(vec![Check::new(
        "rms_norm",
        max_diff(&down(gpu, &y)?, &expected),
        1e-5,
        "5×144, rows 160 apart",
    )])
}

pub(super) fn check_silu_mul(gpu: &Gpu) -> Result<Vec<Check>> {
    let (rows, width) = (7, 136);
    let gate_up = to_bf16(&uniform(rows * 2 * width, 3, 4.0));
    let mut h = gpu.stream.alloc_zeros::<bf16>(rows * width)?;
    gpu.silu_mul(&up(gpu, &gate_up)?, &mut h, rows)?;
    let expected: Vec<f32> = (0..rows * width)
        .map(|i| {
            let (row, col) = (i / width, i % width);
            let g = gate_up[row * 2 * width + col].to_f32();
            let u = gate_up[row * 2 * width + width + col].to_f32();
            g / (1.0 + (-g).exp()) * u
        })
        .collect();
    let got: Vec<f32> = down(gpu, &h)?.iter().map(|v| v.to_f32()).collect();
    // one bf16 rounding of the result
    Ok(vec![Check::new(
        "silu_mul",
        relative_diff(&got, &expected),
        1e-2,
        "7×136",
    )])
}

pub(super) fn check_rope(gpu: &Gpu, cfg: &Config) -> Result<Vec<Check>> {
    let (tokens, heads, dim) = (6, 4, cfg.qk_rope_head_dim);
    let positions: Vec<usize> = (0..tokens).map(|t| t * 37 + 3).collect();
    let rope = Rope::new(cfg);
    let (cos, sin) = rope.tables(&positions);
    let x = uniform(tokens * heads * dim, 4, 1.0);
    let expected = rope.apply(&x, (&cos, &sin));
    // each (token, head) row sits after 8 other values, as q_pe does after q_nope
    let wide: Vec<f32> = x
        .chunks(dim)
        .flat_map(|r| [vec![9.0; 8], r.to_vec()].concat())
        .collect();
    let wide = up(gpu, &wide)?;
    let mut y = gpu.stream.alloc_zeros::<f32>(x.len())?;
    gpu.rope(
        &wide.slice(8..),
        dim + 8,
        &up(gpu, &cos)?,
        &up(gpu, &sin)?,
        &mut y,
        (tokens, heads, dim),
    )?;
    Ok(vec![Check::new(
        "rope",
        max_diff(&down(gpu, &y)?, &expected),
        1e-5,
        "YaRN tables of tiny-v3-bf16",
    )])
}

/// DeepSeek-V3's router: 256 experts in 8 groups, 4 groups kept, top-8.
pub(super) fn v3_moe(tiny_v3: &Moe) -> Moe {
    Moe {
        n_routed_experts: 256,
        n_group: 8,
        topk_group: 4,
        num_experts_per_tok: 8,
        routed_scaling_factor: 2.5,
        ..tiny_v3.clone()
    }
}

pub(super) fn check_moe_gate(gpu: &Gpu, configs: &[(String, Config)]) -> Result<Vec<Check>> {
    let mut cases: Vec<(String, Moe)> = configs
        .iter()
        .map(|(n, c)| (n.clone(), c.moe.clone()))
        .collect();
    cases.push(("deepseek-v3".into(), v3_moe(&configs[0].1.moe)));
    let tokens = 33;
    cases
        .into_iter()
        .enumerate()
        .map(|(i, (name, moe))| {
            let experts = moe.n_routed_experts;
            let logits = uniform(tokens * experts, 10 + i as u64, 4.0);
            let bias = (moe.topk_method == crate::config::TopkMethod::NoauxTc)
                .then(|| uniform(experts, 20 + i as u64, 0.5));
            let rule = GateRule::of(&moe);
            let mut chosen = gpu.stream.alloc_zeros::<i32>(tokens * rule.topk)?;
            let mut weights = gpu.stream.alloc_zeros::<f32>(tokens * rule.topk)?;
            let bias_device = bias.as_ref().map(|b| up(gpu, b)).transpose()?;
            gpu.moe_gate(
                &up(gpu, &logits)?,
                bias_device.as_ref(),
                experts,
                rule,
                &mut chosen,
                &mut weights,
            )?;
            let (chosen, weights) = (down(gpu, &chosen)?, down(gpu, &weights)?);
            let mut wrong_experts = 0;
            let mut weight_error = 0f64;
            for t in 0..tokens {
                let (e, w) = route(&logits[t * experts..][..experts], bias.as_deref(), &moe);
                let got = &chosen[t * rule.topk..][..rule.topk];
                wrong_experts += e.iter().zip(got).filter(|(a, b)| **a as i32 != **b).count();
                weight_error =
                    weight_error.max(max_diff(&weights[t * rule.topk..][..rule.topk], &w));
            }
            Ok(Check::new(
                format!("moe_gate/{name}"),
                if wrong_experts > 0 {
                    f64::INFINITY
                } else {
                    weight_error
                },
                1e-5,
                format!("{tokens} tokens, {experts} experts; experts that differ: {wrong_experts}"),
            ))
        })
        .collect()
}

pub(super) fn check_mla_decode(gpu: &Gpu) -> Result<Vec<Check>> {
    const BLOCK: usize = crate::model::cache::BLOCK_TOKENS;
    let (heads, rank, rope) = (4, 136, 16);
    let lengths = [1usize, 17, 40, 0];
    let seqs = lengths.len();
    let max_blocks = 3;
    let pool = 12;
    // blocks handed out in a shuffled order, as a pool does after some churn
    let mut free: Vec<i32> = (0..pool as i32).rev().collect();
    let mut rng = Rng::new(60);
    for i in (1..free.len()).rev() {
        free.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let table: Vec<i32> = (0..seqs * max_blocks)
        .map(|_| free.pop().unwrap())
        .collect();
    let c_kv = to_bf16(&uniform(pool * BLOCK * rank, 61, 1.0));
    let k_pe = to_bf16(&uniform(pool * BLOCK * rope, 62, 1.0));
    let q_lat = uniform(seqs * heads * rank, 63, 0.3);
    let q_pe = uniform(seqs * heads * rope, 64, 0.3);
    let scale = 0.12;
    let lengths_i32: Vec<i32> = lengths.iter().map(|&l| l as i32).collect();
    let mut out = gpu.stream.alloc_zeros::<f32>(q_lat.len())?;
    gpu.mla_decode(
        &up(gpu, &q_lat)?,
        &up(gpu, &q_pe)?,
        &up(gpu, &c_kv)?,
        &up(gpu, &k_pe)?,
        (&up(gpu, &table)?, max_blocks),
        &up(gpu, &lengths_i32)?,
        &mut out,
        (seqs, heads, rank, rope),
        scale,
    )?;
    let mut expected = vec![0f32; q_lat.len()];
    for s in 0..seqs {
        let slot = |j: usize| table[s * max_blocks + j / BLOCK] as usize * BLOCK + j % BLOCK;
        for h in 0..heads {
            let q = (s * heads + h) * rank;
            let p = (s * heads + h) * rope;
            let scores: Vec<f64> = (0..lengths[s])
                .map(|j| {
                    let latent: f64 = (0..rank)
                        .map(|d| {
                            f64::from(q_lat[q + d]) * f64::from(c_kv[slot(j) * rank + d].to_f32())
                        })
                        .sum();
                    let positional: f64 = (0..rope)
                        .map(|d| {
                            f64::from(q_pe[p + d]) * f64::from(k_pe[slot(j) * rope + d].to_f32())
                        })
                        .sum();
                    (latent + positional) * f64::from(scale)
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for d in 0..rank {
                let value: f64 = weights
                    .iter()
                    .enumerate()
                    .map(|(j, w)| w * f64::from(c_kv[slot(j) * rank + d].to_f32()))
                    .sum();
                expected[q + d] = if total > 0.0 {
                    (value / total) as f32
                } else {
                    0.0
                };
            }
        }
    }
    Ok(vec![Check::new(
        "mla_decode",
        max_diff(&down(gpu, &out)?, &expected),
        1e-4,
        "lengths 1, 17, 40, 0 over shuffled 16-token blocks",
    )])
}

pub(super) fn check_sample(gpu: &Gpu) -> Result<Vec<Check>> {
    let vocab = 129_280;
    let cases = sampling_cases();
    let draws = 8;
    let rows = cases.len() * draws;
    let logits = uniform(rows * vocab, 70, 6.0);
    let params: Vec<SamplingParams> = (0..rows)
        .map(|r| SamplingParams {
            seed: Some(100 + r as u64),
            ..cases[r / draws].clone()
        })
        .collect();
    let column = |f: &dyn Fn(&SamplingParams) -> f32| params.iter().map(f).collect::<Vec<f32>>();
    let uniform_draws: Vec<f64> = params
        .iter()
        .map(|p| Rng::new(p.seed.unwrap()).next_f64())
        .collect();
    let top_k: Vec<i32> = params.iter().map(|p| p.top_k as i32).collect();
    let mut probs = gpu.stream.alloc_zeros::<f64>(rows * vocab)?;
    let mut tokens = gpu.stream.alloc_zeros::<i32>(rows)?;
    gpu.sample(
        &up(gpu, &logits)?,
        &mut probs,
        vocab,
        &up(gpu, &column(&|p| p.temperature))?,
        &up(gpu, &top_k)?,
        &up(gpu, &column(&|p| p.top_p))?,
        &up(gpu, &column(&|p| p.min_p))?,
        &up(gpu, &uniform_draws)?,
        &mut tokens,
    )?;
    let tokens = down(gpu, &tokens)?;
    let differing = params
        .iter()
        .enumerate()
        .filter(|(r, p)| {
            let cpu = Sampler::new((*p).clone()).sample(&logits[r * vocab..][..vocab], &[]);
            cpu as i32 != tokens[*r]
        })
        .count();
    Ok(vec![Check::new(
        "sample",
        differing as f64,
        0.0,
        format!(
            "{rows} rows of {vocab} logits, greedy and top-k/top-p/min-p, each seed's first draw: tokens that differ from the CPU sampler"
        ),
    )])
}
