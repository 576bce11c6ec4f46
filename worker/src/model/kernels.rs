//! CPU kernels for bf16 weights with f32 activations: `y = x Wᵀ` for a few tokens (decode),
//! reading each weight once and widening bf16 to f32 in registers, so decode streams half the
//! bytes an f32 copy would and stays within the memory-bandwidth bound.

use rayon::prelude::*;

/// Rows of W per parallel task: large enough to amortise scheduling, small enough to
/// balance two to a few dozen threads.
const ROWS_PER_TASK: usize = 64;

/// `x`: `[tokens, in]`, `weight`: `[out, in]` bf16 bits → `[tokens, out]`.
pub fn matmul_bf16(
    x: &[f32],
    tokens: usize,
    weight: &[u16],
    out_dim: usize,
    in_dim: usize,
) -> Vec<f32> {
    debug_assert_eq!(x.len(), tokens * in_dim);
    debug_assert_eq!(weight.len(), out_dim * in_dim);
    // [out, tokens], so each task writes one contiguous block.
    let mut transposed = vec![0f32; out_dim * tokens];
    transposed
        .par_chunks_mut(ROWS_PER_TASK * tokens)
        .enumerate()
        .for_each(|(task, block)| {
            let first_row = task * ROWS_PER_TASK;
            for (r, outputs) in block.chunks_mut(tokens).enumerate() {
                let row = &weight[(first_row + r) * in_dim..][..in_dim];
                for (t, out) in outputs.iter_mut().enumerate() {
                    *out = dot(row, &x[t * in_dim..][..in_dim]);
                }
            }
        });
    if tokens == 1 {
        return transposed;
    }
    let mut y = vec![0f32; tokens * out_dim];
    for (o, outputs) in transposed.chunks(tokens).enumerate() {
        for (t, &v) in outputs.iter().enumerate() {
            y[t * out_dim + o] = v;
        }
    }
    y
}

/// One matrix-vector product: `out[r] = Σᵢ weight[r][i] · x[i]`, `weight` row-major bf16.
pub struct Gemv<'a> {
    pub weight: &'a [u16],
    pub x: &'a [f32],
    pub out: &'a mut [f32],
}

/// Runs many products as one parallel dispatch: waking the thread pool once per layer step
/// instead of once per matrix matters at decode, where each product takes microseconds.
pub fn gemv_many(jobs: Vec<Gemv<'_>>) {
    let mut tasks = Vec::new();
    for job in jobs {
        let in_dim = job.x.len();
        debug_assert_eq!(job.weight.len(), job.out.len() * in_dim);
        for (rows, out) in job
            .weight
            .chunks(ROWS_PER_TASK * in_dim)
            .zip(job.out.chunks_mut(ROWS_PER_TASK))
        {
            tasks.push((rows, job.x, out));
        }
    }
    tasks.into_par_iter().for_each(|(rows, x, out)| {
        for (row, o) in rows.chunks_exact(x.len()).zip(out) {
            *o = dot(row, x);
        }
    });
}

/// Rows of W widened per GEMM panel: 128 rows × 1024 inputs × 4 bytes = 512 KiB, so a panel
/// stays in a core's L2 while the GEMM reuses it for every token.
const PANEL_ROWS: usize = 128;

/// `x`: `[tokens, in]`, `weight`: `[out, in]` bf16 → `[tokens, out]`, for prefill-sized
/// batches. Each thread widens one panel of rows into its own buffer and multiplies it with
/// all tokens, so the weights cross memory once, as bf16.
pub fn matmul_bf16_panels(
    x: &[f32],
    tokens: usize,
    weight: &[u16],
    out_dim: usize,
    in_dim: usize,
) -> Vec<f32> {
    assert_eq!(x.len(), tokens * in_dim);
    assert_eq!(weight.len(), out_dim * in_dim);
    let mut y = vec![0f32; tokens * out_dim];
    let y_ptr = SharedOut(y.as_mut_ptr());
    let panels = out_dim.div_ceil(PANEL_ROWS);
    (0..panels)
        .into_par_iter()
        .for_each_init(Vec::new, |panel, p| {
            let first = p * PANEL_ROWS;
            let rows = PANEL_ROWS.min(out_dim - first);
            panel.clear();
            panel.extend(
                weight[first * in_dim..(first + rows) * in_dim]
                    .iter()
                    .map(|&b| f32::from_bits(u32::from(b) << 16)),
            );
            // SAFETY: panel p writes only columns first..first + rows of y ([tokens, out_dim]
            // row-major), disjoint from every other panel's, and y outlives the loop. The strides
            // describe the buffers exactly: dst(r, t) = y[t·out_dim + first + r], lhs(r, i) =
            // panel[r·in_dim + i], rhs(i, t) = x[t·in_dim + i].
            unsafe {
                gemm::gemm(
                    rows,
                    tokens,
                    in_dim,
                    y_ptr.at(first),
                    out_dim as isize,
                    1,
                    false,
                    panel.as_ptr(),
                    1,
                    in_dim as isize,
                    x.as_ptr(),
                    in_dim as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
    y
}

/// The output buffer shared by panels that write disjoint columns of it.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: only used by `matmul_bf16_panels`, whose tasks write disjoint elements.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// A pointer `offset` elements in; a method so closures capture the Sync wrapper.
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// `Σᵢ a[i] · b[i]` in f32 with a fixed order of accumulation, so a row's result never depends
/// on what else is computed with it.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0f32; LANES];
    let whole = a.len().min(b.len()) / LANES * LANES;
    for (x, y) in a[..whole]
        .chunks_exact(LANES)
        .zip(b[..whole].chunks_exact(LANES))
    {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = a[whole..].iter().zip(&b[whole..]).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Widens bf16 weights to f32 (exact).
pub fn bf16_to_f32(bits: &[u16]) -> Vec<f32> {
    bits.par_iter()
        .map(|&b| f32::from_bits(u32::from(b) << 16))
        .collect()
}

fn dot(weights: &[u16], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { dot_avx2_fma(weights, x) };
    }
    dot_portable(weights, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2_fma(weights: &[u16], x: &[f32]) -> f32 {
    // The same code, compiled with 8-wide FMA.
    dot_portable(weights, x)
}

/// 32 independent accumulators let the compiler keep four 8-wide vectors in flight, enough
/// to cover FMA latency (16 measured 27 GB/s on 65 MB of weights, 32 measured 50).
#[inline(always)]
fn dot_portable(weights: &[u16], x: &[f32]) -> f32 {
    const LANES: usize = 32;
    let mut acc = [0f32; LANES];
    let chunks = weights.len() / LANES * LANES;
    for (w, v) in weights[..chunks]
        .chunks_exact(LANES)
        .zip(x[..chunks].chunks_exact(LANES))
    {
        for i in 0..LANES {
            acc[i] = f32::from_bits(u32::from(w[i]) << 16).mul_add(v[i], acc[i]);
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (w, v) in weights[chunks..].iter().zip(&x[chunks..]) {
        sum += f32::from_bits(u32::from(*w) << 16) * v;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_products_in_one_dispatch_equal_one_at_a_time() {
        let weight: Vec<u16> = (0..200 * 33)
            .map(|i| half::bf16::from_f32((i % 17) as f32 * 0.01).to_bits())
            .collect();
        let x: Vec<f32> = (0..33).map(|i| i as f32 * 0.1).collect();
        let (mut a, mut b) = (vec![0f32; 200], vec![0f32; 150]);
        gemv_many(vec![
            Gemv {
                weight: &weight,
                x: &x,
                out: &mut a,
            },
            Gemv {
                weight: &weight[..150 * 33],
                x: &x,
                out: &mut b,
            },
        ]);
        assert_eq!(a, matmul_bf16(&x, 1, &weight, 200, 33));
        assert_eq!(b[..], a[..150]);
    }

    #[test]
    fn panel_gemm_matches_the_decode_kernel() {
        let (tokens, out_dim, in_dim) = (9, 300, 70);
        let weight: Vec<u16> = (0..out_dim * in_dim)
            .map(|i| half::bf16::from_f32(((i * 7) % 13) as f32 * 0.1 - 0.6).to_bits())
            .collect();
        let x: Vec<f32> = (0..tokens * in_dim)
            .map(|i| ((i * 5) % 11) as f32 * 0.05 - 0.2)
            .collect();
        let a = matmul_bf16_panels(&x, tokens, &weight, out_dim, in_dim);
        let b = matmul_bf16(&x, tokens, &weight, out_dim, in_dim);
        assert!(a.iter().zip(&b).all(|(p, q)| (p - q).abs() < 1e-4));
    }

    #[test]
    fn matches_a_plain_f32_product() {
        let (tokens, out_dim, in_dim) = (3, 130, 37);
        let weight: Vec<u16> = (0..out_dim * in_dim)
            .map(|i| half::bf16::from_f32(((i * 7) % 13) as f32 * 0.1 - 0.6).to_bits())
            .collect();
        let x: Vec<f32> = (0..tokens * in_dim)
            .map(|i| ((i * 5) % 11) as f32 * 0.05 - 0.2)
            .collect();
        let w = bf16_to_f32(&weight);
        let y = matmul_bf16(&x, tokens, &weight, out_dim, in_dim);
        for t in 0..tokens {
            for o in 0..out_dim {
                let expected: f32 = (0..in_dim)
                    .map(|i| x[t * in_dim + i] * w[o * in_dim + i])
                    .sum();
                assert!((y[t * out_dim + o] - expected).abs() < 1e-4, "{t} {o}");
            }
        }
    }
}
