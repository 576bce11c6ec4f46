//! The routed experts' kernels: permutation, grouped GEMMs (bf16 and FP8), FP8 dequantisation;
//! and the FP8 linear layers, the grouped GEMM's one-expert case.

use half::bf16;

use super::{Check, down, max_diff, relative_diff, to_bf16, uniform, up};
use crate::error::Result;
use crate::gpu::runtime::{Fp8GemmInput, Gpu, MoeOrder};
use crate::sampling::Rng;
use crate::weights::fp8_e4m3_to_f32;

pub(super) fn check_permute(gpu: &Gpu) -> Result<Vec<Check>> {
    let (tokens, topk, experts, hidden) = (37, 8, 64, 144);
    let mut rng = Rng::new(5);
    let chosen: Vec<i32> = (0..tokens * topk)
        .map(|_| (rng.next_u64() % experts as u64) as i32)
        .collect();
    let order = gpu.moe_sort(&up(gpu, &chosen)?, topk, experts)?;
    let sorted = SortedOnHost::download(gpu, &order)?;
    let sort = Check::new(
        "moe_sort",
        sorted.rows_out_of_place(&chosen, topk, experts) as f64,
        0.0,
        "37 tokens × top-8 over 64 experts: rows out of place",
    );
    let x = uniform(tokens * hidden, 6, 3.0);
    let permute = check_permute_bf16(gpu, &order, &sorted.source, &x, hidden)?;
    let unpermute = check_unpermute(gpu, &order, &sorted.row_of, tokens, hidden)?;
    let fp8 = check_permute_fp8(gpu, &order, &sorted.source, &x, hidden)?;
    Ok(vec![sort, permute, unpermute, fp8])
}

/// `moe_sort`'s layout, copied to the host.
struct SortedOnHost {
    offsets: Vec<i32>,
    tile_start: Vec<i32>,
    source: Vec<i32>,
    row_of: Vec<i32>,
}

impl SortedOnHost {
    fn download(gpu: &Gpu, order: &MoeOrder) -> Result<Self> {
        Ok(SortedOnHost {
            offsets: down(gpu, &order.offsets)?,
            tile_start: down(gpu, &order.tile_start)?,
            source: down(gpu, &order.source)?,
            row_of: down(gpu, &order.row_of)?,
        })
    }

    /// Segments of the wrong size (in rows or in GEMM tiles), and `(token, k)` choices whose
    /// row is outside their expert's segment or does not point back at the token.
    fn rows_out_of_place(&self, chosen: &[i32], topk: usize, experts: usize) -> usize {
        let (offsets, tile_start) = (&self.offsets, &self.tile_start);
        let mut counts = vec![0i32; experts];
        chosen.iter().for_each(|&e| counts[e as usize] += 1);
        let mut bad = 0usize;
        for e in 0..experts {
            bad += usize::from(offsets[e + 1] - offsets[e] != counts[e]);
            let tiles = (counts[e] as usize).div_ceil(crate::gpu::runtime::GEMM_TILE_ROWS) as i32;
            bad += usize::from(tile_start[e + 1] - tile_start[e] != tiles);
        }
        for (p, &row) in self.row_of.iter().enumerate() {
            let e = chosen[p] as usize;
            let in_segment = offsets[e] <= row && row < offsets[e + 1];
            bad += usize::from(!in_segment || self.source[row as usize] != (p / topk) as i32);
        }
        bad
    }
}

/// `moe_permute`: each row is its source token's `x`, rounded to bf16.
fn check_permute_bf16(
    gpu: &Gpu,
    order: &MoeOrder,
    source: &[i32],
    x: &[f32],
    hidden: usize,
) -> Result<Check> {
    let mut permuted = gpu.stream.alloc_zeros::<bf16>(order.rows * hidden)?;
    gpu.moe_permute(&up(gpu, x)?, order, &mut permuted, hidden)?;
    let permuted = down(gpu, &permuted)?;
    let expected: Vec<f32> = (0..order.rows * hidden)
        .map(|i| bf16::from_f32(x[source[i / hidden] as usize * hidden + i % hidden]).to_f32())
        .collect();
    let got: Vec<f32> = permuted.iter().map(|v| v.to_f32()).collect();
    Ok(Check::new(
        "moe_permute",
        max_diff(&got, &expected),
        0.0,
        "bf16 gather",
    ))
}

/// `moe_unpermute`: each token's rows, weighted, summed in k order.
fn check_unpermute(
    gpu: &Gpu,
    order: &MoeOrder,
    row_of: &[i32],
    tokens: usize,
    hidden: usize,
) -> Result<Check> {
    let topk = order.topk;
    let expert_out = to_bf16(&uniform(order.rows * hidden, 7, 2.0));
    let weights = uniform(tokens * topk, 8, 1.0);
    let mut y = gpu.stream.alloc_zeros::<f32>(tokens * hidden)?;
    gpu.moe_unpermute(
        &up(gpu, &expert_out)?,
        order,
        &up(gpu, &weights)?,
        &mut y,
        hidden,
    )?;
    let expected: Vec<f32> = (0..tokens * hidden)
        .map(|i| {
            let (t, c) = (i / hidden, i % hidden);
            (0..topk).fold(0.0, |sum, k| {
                let row = row_of[t * topk + k] as usize;
                sum + weights[t * topk + k] * expert_out[row * hidden + c].to_f32()
            })
        })
        .collect();
    Ok(Check::new(
        "moe_unpermute",
        max_diff(&down(gpu, &y)?, &expected),
        1e-5,
        "weighted combine in k order",
    ))
}

/// `moe_permute_fp8`: the permuted rows quantised to e4m3 with one scale per 128 columns.
fn check_permute_fp8(
    gpu: &Gpu,
    order: &MoeOrder,
    source: &[i32],
    x: &[f32],
    hidden: usize,
) -> Result<Check> {
    let mut quantised = gpu.stream.alloc_zeros::<u8>(order.rows * hidden)?;
    let groups = hidden.div_ceil(128);
    let mut scales = gpu.stream.alloc_zeros::<f32>(order.rows * groups)?;
    gpu.moe_permute_fp8(&up(gpu, x)?, order, &mut quantised, &mut scales, hidden)?;
    let (quantised, scales) = (down(gpu, &quantised)?, down(gpu, &scales)?);
    let mut error = 0f64;
    for row in 0..order.rows {
        let from = &x[source[row] as usize * hidden..][..hidden];
        for g in 0..groups {
            let cols = g * 128..((g + 1) * 128).min(hidden);
            let amax = from[cols.clone()].iter().fold(0f32, |m, v| m.max(v.abs()));
            for c in cols {
                let value = fp8_e4m3_to_f32(quantised[row * hidden + c]) * scales[row * groups + g];
                error = error.max(f64::from((value - from[c]).abs() / amax));
            }
        }
    }
    // e4m3 keeps 3 mantissa bits: half an ulp is 1/16 of the value, at most of amax
    Ok(Check::new(
        "moe_permute_fp8",
        error,
        1.0 / 16.0,
        "1×128 scales; error relative to the group's max",
    ))
}

/// Expert segments of uneven sizes (none, under one tile, several tiles) with
/// shapes that are not multiples of the tile, as the tiny fixtures have.
pub(super) fn uneven_routing(gpu: &Gpu) -> Result<(MoeOrder, Vec<usize>)> {
    let counts = [130usize, 0, 3, 64, 257];
    let chosen: Vec<i32> = counts
        .iter()
        .enumerate()
        .flat_map(|(e, &n)| std::iter::repeat_n(e as i32, n))
        .collect();
    let order = gpu.moe_sort(&up(gpu, &chosen)?, 1, counts.len())?;
    let expert_of_row: Vec<usize> = {
        let offsets = down(gpu, &order.offsets)?;
        (0..order.rows)
            .map(|r| {
                offsets
                    .iter()
                    .rposition(|&o| o as usize <= r)
                    .unwrap()
                    .min(counts.len() - 1)
            })
            .collect()
    };
    Ok((order, expert_of_row))
}

pub(super) fn check_grouped_gemm_bf16(gpu: &Gpu) -> Result<Vec<Check>> {
    let (order, expert_of_row) = uneven_routing(gpu)?;
    [(272usize, 136usize), (256, 512)]
        .into_iter()
        .map(|(n, k)| {
            let x = to_bf16(&uniform(order.rows * k, 30, 1.0));
            let w = to_bf16(&uniform(order.experts * n * k, 31, 1.0));
            let mut y = gpu.stream.alloc_zeros::<bf16>(order.rows * n)?;
            gpu.grouped_gemm_bf16(&up(gpu, &x)?, &up(gpu, &w)?, &mut y, &order, n, k)?;
            let got: Vec<f32> = down(gpu, &y)?.iter().map(|v| v.to_f32()).collect();
            let expected = reference_gemm(
                order.rows,
                n,
                k,
                &expert_of_row,
                |r, i| x[r * k + i].to_f32(),
                |e, j, i| w[(e * n + j) * k + i].to_f32(),
            );
            Ok(Check::new(
                format!("grouped_gemm_bf16/n{n}k{k}"),
                relative_diff(&got, &expected),
                1e-2,
                "segments of 130, 0, 3, 64, 257 rows; bf16 output",
            ))
        })
        .collect()
}

/// y[r, j] = Σ_i x(r, i) · w(expert of r, j, i), in f64.
pub(super) fn reference_gemm(
    rows: usize,
    n: usize,
    k: usize,
    expert_of_row: &[usize],
    x: impl Fn(usize, usize) -> f32,
    w: impl Fn(usize, usize, usize) -> f32,
) -> Vec<f32> {
    (0..rows * n)
        .map(|o| {
            let (r, j) = (o / n, o % n);
            (0..k)
                .map(|i| f64::from(x(r, i)) * f64::from(w(expert_of_row[r], j, i)))
                .sum::<f64>() as f32
        })
        .collect()
}

/// Random e4m3 bytes, never NaN (0x7f, 0xff).
pub(super) fn random_fp8(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| match (rng.next_u64() & 0xff) as u8 {
            b @ (0x7f | 0xff) => b - 1,
            b => b,
        })
        .collect()
}

pub(super) fn check_grouped_gemm_fp8(gpu: &Gpu) -> Result<Vec<Check>> {
    let (order, expert_of_row) = uneven_routing(gpu)?;
    [(272usize, 144usize), (256, 512)]
        .into_iter()
        .map(|(n, k)| {
            let (kb, nb) = (k.div_ceil(128), n.div_ceil(128));
            let x = random_fp8(order.rows * k, 40);
            let x_scale: Vec<f32> = uniform(order.rows * kb, 41, 1.0)
                .iter()
                .map(|v| v.abs() + 0.01)
                .collect();
            let w = random_fp8(order.experts * n * k, 42);
            let w_scale: Vec<f32> = uniform(order.experts * nb * kb, 43, 1.0)
                .iter()
                .map(|v| v.abs() + 0.01)
                .collect();
            let mut y = gpu.stream.alloc_zeros::<bf16>(order.rows * n)?;
            gpu.grouped_gemm_fp8(
                Fp8GemmInput::Fp8(&up(gpu, &x)?, &up(gpu, &x_scale)?),
                (&up(gpu, &w)?, &up(gpu, &w_scale)?),
                &mut y,
                &order,
                n,
                k,
            )?;
            let got: Vec<f32> = down(gpu, &y)?.iter().map(|v| v.to_f32()).collect();
            let expected = reference_gemm(
                order.rows,
                n,
                k,
                &expert_of_row,
                |r, i| fp8_e4m3_to_f32(x[r * k + i]) * x_scale[r * kb + i / 128],
                |e, j, i| {
                    fp8_e4m3_to_f32(w[(e * n + j) * k + i])
                        * w_scale[(e * nb + j / 128) * kb + i / 128]
                },
            );
            Ok(Check::new(
                format!("grouped_gemm_fp8/n{n}k{k}"),
                relative_diff(&got, &expected),
                1e-2,
                "128×128 weight and 1×128 activation scales; bf16 output",
            ))
        })
        .collect()
}

/// The weight-only FP8 GEMM against the bf16 GEMM on `dequant_fp8`'s weights: the same
/// bf16 values in the same MMAs, so the same bits; and both against an f64 sum.
pub(super) fn check_grouped_gemm_fp8_weights(gpu: &Gpu) -> Result<Vec<Check>> {
    let (order, expert_of_row) = uneven_routing(gpu)?;
    let per_shape = [(272usize, 144usize), (256, 512)]
        .into_iter()
        .map(|(n, k)| -> Result<[Check; 2]> {
            let (kb, nb) = (k.div_ceil(128), n.div_ceil(128));
            let x = to_bf16(&uniform(order.rows * k, 60, 1.0));
            let w = random_fp8(order.experts * n * k, 61);
            let w_scale: Vec<f32> = uniform(order.experts * nb * kb, 62, 1e-2)
                .iter()
                .map(|v| v.abs() + 1e-4)
                .collect();
            let (x_dev, w_dev, scale_dev) = (up(gpu, &x)?, up(gpu, &w)?, up(gpu, &w_scale)?);
            let mut y = gpu.stream.alloc_zeros::<bf16>(order.rows * n)?;
            let (input, w8) = (Fp8GemmInput::Bf16(&x_dev), (&w_dev, &scale_dev));
            gpu.grouped_gemm_fp8(input, w8, &mut y, &order, n, k)?;
            let mut dequantized = gpu.stream.alloc_zeros::<bf16>(w.len())?;
            gpu.dequant_fp8(&w_dev, &scale_dev, &mut dequantized, (order.experts, n, k))?;
            let mut y_bf16 = gpu.stream.alloc_zeros::<bf16>(order.rows * n)?;
            gpu.grouped_gemm_bf16(&x_dev, &dequantized, &mut y_bf16, &order, n, k)?;
            let got: Vec<f32> = down(gpu, &y)?.iter().map(|v| v.to_f32()).collect();
            let bf16_path: Vec<f32> = down(gpu, &y_bf16)?.iter().map(|v| v.to_f32()).collect();
            let expected = reference_gemm(
                order.rows,
                n,
                k,
                &expert_of_row,
                |r, i| x[r * k + i].to_f32(),
                |e, j, i| {
                    let scale = w_scale[(e * nb + j / 128) * kb + i / 128];
                    bf16::from_f32(fp8_e4m3_to_f32(w[(e * n + j) * k + i]) * scale).to_f32()
                },
            );
            Ok([
                Check::new(
                    format!("grouped_gemm_fp8_weights/n{n}k{k}/vs_bf16_on_dequantised"),
                    max_diff(&got, &bf16_path),
                    0.0,
                    "the same bf16 weights in the same MMAs: bit for bit",
                ),
                Check::new(
                    format!("grouped_gemm_fp8_weights/n{n}k{k}"),
                    relative_diff(&got, &expected),
                    1e-2,
                    "bf16 activations, 128×128 weight scales; bf16 output",
                ),
            ])
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(per_shape.into_iter().flatten().collect())
}

/// The FP8 linear kernels over 300 rows (two full row tiles and a partial one) against an
/// f64 sum: weight-only on any GPU, and with FP8 activations where the GPU has FP8 tensor
/// cores. f32 out, so only the sums' rounding is left.
pub(super) fn check_linear_fp8(gpu: &Gpu) -> Result<Vec<Check>> {
    let rows = 300;
    let one_expert = vec![0; rows];
    let mut checks = Vec::new();
    for (n, k) in [(272usize, 144usize), (256, 512)] {
        let (kb, nb) = (k.div_ceil(128), n.div_ceil(128));
        let w = random_fp8(n * k, 70);
        let w_scale: Vec<f32> = uniform(nb * kb, 71, 1e-2)
            .iter()
            .map(|v| v.abs() + 1e-4)
            .collect();
        let weight =
            |j: usize, i: usize| fp8_e4m3_to_f32(w[j * k + i]) * w_scale[j / 128 * kb + i / 128];
        let (w_dev, scale_dev) = (up(gpu, &w)?, up(gpu, &w_scale)?);
        // The kernel on `input` against an f64 sum of `x(r, i) · w(j, i)`.
        let against_f64 = |input: Fp8GemmInput<'_>,
                           x: &dyn Fn(usize, usize) -> f32,
                           w: &dyn Fn(usize, usize) -> f32|
         -> Result<f64> {
            let mut y = gpu.stream.alloc_zeros::<f32>(rows * n)?;
            gpu.linear_fp8(input, (&w_dev, &scale_dev), &mut y, (rows, n, k))?;
            let expected = reference_gemm(rows, n, k, &one_expert, x, |_, j, i| w(j, i));
            Ok(relative_diff(&down(gpu, &y)?, &expected))
        };

        let x = to_bf16(&uniform(rows * k, 72, 1.0));
        let error = against_f64(
            Fp8GemmInput::Bf16(&up(gpu, &x)?),
            &|r, i| x[r * k + i].to_f32(),
            &|j, i| bf16::from_f32(weight(j, i)).to_f32(),
        )?;
        checks.push(Check::new(
            format!("linear_fp8_weights/n{n}k{k}"),
            error,
            1e-4,
            "300 rows, bf16 activations, weights dequantised to bf16 in the kernel; f32 output",
        ));

        if gpu.has_fp8_tensor_cores() {
            let x8 = random_fp8(rows * k, 73);
            let x_scale: Vec<f32> = uniform(rows * kb, 74, 1.0)
                .iter()
                .map(|v| v.abs() + 0.01)
                .collect();
            let error = against_f64(
                Fp8GemmInput::Fp8(&up(gpu, &x8)?, &up(gpu, &x_scale)?),
                &|r, i| fp8_e4m3_to_f32(x8[r * k + i]) * x_scale[r * kb + i / 128],
                &weight,
            )?;
            checks.push(Check::new(
                format!("linear_fp8/n{n}k{k}"),
                error,
                1e-4,
                "300 rows, 128×128 weight and 1×128 activation scales; f32 output",
            ));
        }
    }
    Ok(checks)
}

pub(super) fn check_dequant_fp8(gpu: &Gpu) -> Result<Vec<Check>> {
    let (matrices, rows, cols) = (3, 200, 136);
    let q = random_fp8(matrices * rows * cols, 50);
    let (rb, cb) = (rows.div_ceil(128), cols.div_ceil(128));
    let scale_inv = uniform(matrices * rb * cb, 51, 0.01);
    let mut out = gpu.stream.alloc_zeros::<bf16>(q.len())?;
    gpu.dequant_fp8(
        &up(gpu, &q)?,
        &up(gpu, &scale_inv)?,
        &mut out,
        (matrices, rows, cols),
    )?;
    let got: Vec<f32> = down(gpu, &out)?.iter().map(|v| v.to_f32()).collect();
    let expected: Vec<f32> = (0..q.len())
        .map(|i| {
            let (m, r, c) = (i / (rows * cols), i / cols % rows, i % cols);
            bf16::from_f32(fp8_e4m3_to_f32(q[i]) * scale_inv[(m * rb + r / 128) * cb + c / 128])
                .to_f32()
        })
        .collect();
    Ok(vec![Check::new(
        "dequant_fp8",
        max_diff(&got, &expected),
        0.0,
        "3 × [200, 136], partial edge blocks",
    )])
}
