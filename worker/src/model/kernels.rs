//! CPU kernels for bf16 weights with f32 activations: `y = x Wᵀ` for a few tokens (decode),
//! reading each weight once and widening bf16 to f32 in registers, so decode streams half the
//! bytes an f32 copy would and stays within the memory-bandwidth bound.

use rayon::prelude::*;

/// Defines `fn name(args) = portable`: calls `portable` compiled for AVX2 and FMA when the CPU
/// has them (x86-64 builds target the baseline otherwise), else the baseline build. Same
/// source, same operations in the same order, and `mul_add` rounds once either way, so the
/// bits never depend on the path taken.
macro_rules! simd_fn {
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? = $portable:ident
    ) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn fast($($arg: $ty),*) $(-> $ret)? {
                    $portable($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `fast` is compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            $portable($($arg),*)
        }
    };
}

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
    // [out, tokens], as `products` writes it.
    let mut by_row = vec![0f32; out_dim * tokens];
    products(vec![Product {
        weight,
        inputs: x.chunks_exact(in_dim).collect(),
        out: &mut by_row,
    }]);
    if tokens == 1 {
        return by_row;
    }
    transpose(&by_row, tokens)
}

/// `[rows, n]` → `[n, rows]`.
pub fn transpose(a: &[f32], n: usize) -> Vec<f32> {
    let rows = a.len() / n;
    let mut out = vec![0f32; a.len()];
    for (r, row) in a.chunks_exact(n).enumerate() {
        for (t, &v) in row.iter().enumerate() {
            out[t * rows + r] = v;
        }
    }
    out
}

/// One weight matrix (row-major bf16) applied to a few inputs:
/// `out[r · inputs + t] = Σᵢ weight[r][i] · inputs[t][i]`, so `out` is `[rows, inputs]`.
pub struct Product<'a> {
    pub weight: &'a [u16],
    pub inputs: Vec<&'a [f32]>,
    pub out: &'a mut [f32],
}

/// Runs many products as one parallel dispatch: waking the thread pool once per layer step
/// instead of once per matrix matters at decode, where each product takes microseconds.
/// Every weight row is read once per pair of inputs, and every output is computed exactly as
/// `dot` computes it alone, so no input's result depends on the others.
pub fn products(mut jobs: Vec<Product<'_>>) {
    let mut tasks = Vec::new();
    for Product {
        weight,
        inputs,
        out,
    } in &mut jobs
    {
        let n = inputs.len();
        let Some(in_dim) = inputs.first().map(|x| x.len()) else {
            continue;
        };
        debug_assert_eq!(weight.len() * n, out.len() * in_dim);
        let inputs: &[&[f32]] = inputs;
        for (rows, out) in weight
            .chunks(ROWS_PER_TASK * in_dim)
            .zip(out.chunks_mut(ROWS_PER_TASK * n))
        {
            tasks.push((rows, inputs, out));
        }
    }
    tasks.into_par_iter().for_each(|(rows, inputs, out)| {
        let n = inputs.len();
        let in_dim = inputs[0].len();
        // Input pairs outermost: a pair stays in L1 while the task's rows (in L2) stream past.
        for t in (0..n).step_by(2) {
            for (row, out) in rows.chunks_exact(in_dim).zip(out.chunks_exact_mut(n)) {
                if t + 1 < n {
                    (out[t], out[t + 1]) = dot2(row, inputs[t], inputs[t + 1]);
                } else {
                    out[t] = dot(row, inputs[t]);
                }
            }
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
                    .map(|&b| widen(b)),
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

simd_fn! {
    /// `Σᵢ a[i] · b[i]` in f32 with a fixed order of accumulation, so a row's result never
    /// depends on what else is computed with it.
    pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 = dot_f32_portable
}

#[inline(always)]
fn dot_f32_portable(a: &[f32], b: &[f32]) -> f32 {
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

simd_fn! {
    /// `y += a · x`, element by element (each element's sum keeps its order of terms).
    pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) = axpy_portable
}

#[inline(always)]
fn axpy_portable(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Widens bf16 weights to f32 (exact).
pub fn bf16_to_f32(bits: &[u16]) -> Vec<f32> {
    bits.par_iter().map(|&b| widen(b)).collect()
}

simd_fn! {
    fn dot(weights: &[u16], x: &[f32]) -> f32 = dot_portable
}

/// Lanes of a bf16 dot product: 32 independent accumulators let the compiler keep four
/// 8-wide vectors in flight, enough to cover FMA latency (16 measured 27 GB/s on 65 MB of
/// weights, 32 measured 50).
const LANES: usize = 32;

#[inline(always)]
fn widen(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

#[inline(always)]
fn dot_portable(weights: &[u16], x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = weights.len() / LANES * LANES;
    for (w, v) in weights[..chunks]
        .chunks_exact(LANES)
        .zip(x[..chunks].chunks_exact(LANES))
    {
        for i in 0..LANES {
            acc[i] = widen(w[i]).mul_add(v[i], acc[i]);
        }
    }
    finish_dot(&acc, &weights[chunks..], &x[chunks..])
}

/// Sums the lanes, then the tail past the last whole chunk.
#[inline(always)]
fn finish_dot(acc: &[f32; LANES], weights: &[u16], x: &[f32]) -> f32 {
    let mut sum: f32 = acc.iter().sum();
    for (w, v) in weights.iter().zip(x) {
        sum += widen(*w) * v;
    }
    sum
}

simd_fn! {
    /// `dot` for two inputs at once: each gets exactly `dot`'s arithmetic (same lanes, same
    /// order, so a token's result does not depend on its neighbour), while each weight is
    /// loaded and widened once for both. Sixteen 8-wide accumulators would not fit the 16 AVX2
    /// registers, so pairs it is.
    fn dot2(weights: &[u16], x0: &[f32], x1: &[f32]) -> (f32, f32) = dot2_portable
}

#[inline(always)]
fn dot2_portable(weights: &[u16], x0: &[f32], x1: &[f32]) -> (f32, f32) {
    let (mut acc0, mut acc1) = ([0f32; LANES], [0f32; LANES]);
    let chunks = weights.len() / LANES * LANES;
    for ((w, v0), v1) in weights[..chunks]
        .chunks_exact(LANES)
        .zip(x0[..chunks].chunks_exact(LANES))
        .zip(x1[..chunks].chunks_exact(LANES))
    {
        for i in 0..LANES {
            let w = widen(w[i]);
            acc0[i] = w.mul_add(v0[i], acc0[i]);
            acc1[i] = w.mul_add(v1[i], acc1[i]);
        }
    }
    (
        finish_dot(&acc0, &weights[chunks..], &x0[chunks..]),
        finish_dot(&acc1, &weights[chunks..], &x1[chunks..]),
    )
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
        products(vec![
            Product {
                weight: &weight,
                inputs: vec![&x],
                out: &mut a,
            },
            Product {
                weight: &weight[..150 * 33],
                inputs: vec![&x],
                out: &mut b,
            },
        ]);
        assert_eq!(a, matmul_bf16(&x, 1, &weight, 200, 33));
        assert_eq!(b[..], a[..150]);
    }

    #[test]
    fn every_row_of_a_batch_is_bit_equal_to_that_row_alone() {
        let (tokens, out_dim, in_dim) = (5, 70, 77); // odd sizes: a lone token and lane tails
        let weight: Vec<u16> = (0..out_dim * in_dim)
            .map(|i| half::bf16::from_f32(((i * 7) % 13) as f32 * 0.1 - 0.6).to_bits())
            .collect();
        let x: Vec<f32> = (0..tokens * in_dim)
            .map(|i| ((i * 5) % 11) as f32 * 0.0537 - 0.2)
            .collect();
        let batch = matmul_bf16(&x, tokens, &weight, out_dim, in_dim);
        for t in 0..tokens {
            let alone = matmul_bf16(&x[t * in_dim..][..in_dim], 1, &weight, out_dim, in_dim);
            assert_eq!(batch[t * out_dim..][..out_dim], alone[..], "token {t}");
        }
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
