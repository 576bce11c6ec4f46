//! CPU kernels for bf16 weights with f32 activations: `y = x Wᵀ` for a few tokens (decode),
//! reading each weight once and widening bf16 to f32 in registers, so decode streams half the
//! bytes an f32 copy would and stays within the memory-bandwidth bound.

use std::sync::OnceLock;

use rayon::prelude::*;

/// The instruction sets the kernels are built for, from the baseline up. Every path does the
/// same operations in the same order (`mul_add` rounds once on each), so results are bit for
/// bit the same whichever runs: the choice is speed only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Isa {
    /// x86-64 baseline (SSE2) or any other architecture.
    Baseline,
    /// AVX2 with FMA: 8-wide vectors, 16 registers.
    #[value(name = "avx2")]
    Avx2Fma,
    /// AVX-512F (with AVX2 and FMA): 16-wide vectors, 32 registers, the blocked bf16 kernel.
    #[value(name = "avx512")]
    Avx512,
}

/// The path `Isa::choose` set for this process.
static CHOSEN: OnceLock<Isa> = OnceLock::new();

/// What the CPU has, asked once: every dispatch checks its path against it.
static DETECTED: OnceLock<Isa> = OnceLock::new();

impl Isa {
    /// The path the kernels take: the one chosen for this process, else the best detected.
    pub fn selected() -> Isa {
        *CHOSEN.get_or_init(Isa::detected)
    }

    /// Sets the path for this process (`--cpu-kernels`: to compare paths in a benchmark, or
    /// to keep a CPU whose AVX-512 clocks down on AVX2). Refused if this CPU lacks it, or if
    /// the kernels already ran on another.
    pub fn choose(isa: Isa) -> Result<(), String> {
        if isa > Isa::detected() {
            return Err(format!(
                "{} kernels need a CPU with {}; this one runs up to {}",
                isa.name(),
                isa.name(),
                Isa::detected().name()
            ));
        }
        match *CHOSEN.get_or_init(|| isa) {
            chosen if chosen == isa => Ok(()),
            chosen => Err(format!("the kernels already run on {}", chosen.name())),
        }
    }

    /// The best path this CPU runs.
    pub fn detected() -> Isa {
        *DETECTED.get_or_init(Isa::probe)
    }

    fn probe() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                return if has!("avx512f") {
                    Isa::Avx512
                } else {
                    Isa::Avx2Fma
                };
            }
        }
        Isa::Baseline
    }

    /// Every path this CPU runs, for tests that compare them.
    pub fn available() -> impl Iterator<Item = Isa> {
        let best = Isa::detected();
        [Isa::Baseline, Isa::Avx2Fma, Isa::Avx512]
            .into_iter()
            .filter(move |isa| *isa <= best)
    }

    /// The name logs and benchmarks print.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Baseline => "baseline",
            Isa::Avx2Fma => "avx2+fma",
            Isa::Avx512 => "avx512f",
        }
    }
}

/// Defines `fn name(args)` and `fn name_on(isa, args)` from `fn portable(args)`: `portable`
/// compiled for AVX-512F or AVX2+FMA when `isa` asks for it (x86-64 builds target the
/// baseline otherwise), else the baseline build. Same source, so the same bits on every path;
/// `name` takes the selected path.
macro_rules! simd_fn {
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident / $name_on:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?
            = $portable:ident
    ) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            $name_on(Isa::selected(), $($arg),*)
        }

        $(#[$attr])*
        $vis fn $name_on(isa: Isa, $($arg: $ty),*) $(-> $ret)? {
            assert!(isa <= Isa::detected(), "{isa:?} is not available on this CPU");
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $portable($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $portable($($arg),*)
                }
                match isa {
                    // SAFETY: the CPU has the features (asserted above).
                    Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    Isa::Avx2Fma => return unsafe { avx2($($arg),*) },
                    Isa::Baseline => {}
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
/// Every output is computed exactly as `dot_portable` computes it alone, so no input's result
/// depends on the others, while each weight is read once per block of inputs.
pub fn products(jobs: Vec<Product<'_>>) {
    products_on(Isa::selected(), jobs)
}

fn products_on(isa: Isa, mut jobs: Vec<Product<'_>>) {
    assert!(
        isa <= Isa::detected(),
        "{isa:?} is not available on this CPU"
    );
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
    tasks
        .into_par_iter()
        .for_each(|(rows, inputs, out)| rows_times_inputs(isa, rows, inputs, out));
}

/// `out[r · n + t] = dot_portable(row r, inputs[t])` for one task's rows and all `n` inputs.
fn rows_times_inputs(isa: Isa, rows: &[u16], inputs: &[&[f32]], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: `products_on` checked that the CPU has the features.
        Isa::Avx512 => return unsafe { x86::rows_times_inputs_avx512(rows, inputs, out) },
        Isa::Avx2Fma => return unsafe { x86::rows_times_inputs_avx2(rows, inputs, out) },
        Isa::Baseline => {}
    }
    let n = inputs.len();
    let in_dim = inputs[0].len();
    // Input pairs outermost: a pair stays in L1 while the task's rows (in L2) stream past.
    for t in (0..n).step_by(2) {
        for (row, out) in rows.chunks_exact(in_dim).zip(out.chunks_exact_mut(n)) {
            if t + 1 < n {
                (out[t], out[t + 1]) = dot2_portable(row, inputs[t], inputs[t + 1]);
            } else {
                out[t] = dot_portable(row, inputs[t]);
            }
        }
    }
}

/// The bf16 products blocked for x86 vector registers: each weight register, widened once,
/// serves several inputs, and each input register several rows. Every (row, input) pair keeps
/// the portable kernel's 32 lanes and order of terms, and sums them as `sum_lanes` does, so
/// each result is bit for bit the one `dot_portable` gives.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{LANES, add_tail};

    /// AVX-512F: 2 rows × 4 inputs × 2 registers = 16 of the 32 registers accumulate.
    #[target_feature(enable = "avx512f")]
    pub(super) fn rows_times_inputs_avx512(rows: &[u16], inputs: &[&[f32]], out: &mut [f32]) {
        rows_times_inputs::<Zmm2, 2, 4>(rows, inputs, out)
    }

    /// AVX2: 1 row × 2 inputs × 4 registers = 8 of the 16 registers accumulate.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn rows_times_inputs_avx2(rows: &[u16], inputs: &[&[f32]], out: &mut [f32]) {
        rows_times_inputs::<Ymm4, 1, 2>(rows, inputs, out)
    }

    /// 32 f32 lanes in registers of one width. The methods are inlined into kernels compiled
    /// for that width; called anywhere else they would be unsound, hence `unsafe`.
    trait Lanes: Copy {
        unsafe fn zero() -> Self;
        /// 32 bf16 at `bits`, widened to f32 (exact: the bits shifted into the high half).
        unsafe fn widen(bits: *const u16) -> Self;
        /// `self[i] = w[i] · x[i] + self[i]`, rounded once, for the 32 f32 at `x`.
        unsafe fn fma(&mut self, w: Self, x: *const f32);
        /// `super::sum_lanes`, the same adds in registers.
        unsafe fn sum(self) -> f32;
    }

    #[derive(Clone, Copy)]
    struct Zmm2([__m512; 2]);

    #[derive(Clone, Copy)]
    struct Ymm4([__m256; 4]);

    impl Lanes for Zmm2 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { Zmm2([_mm512_setzero_ps(); 2]) }
        }
        #[inline(always)]
        unsafe fn widen(bits: *const u16) -> Self {
            let widen16 = |p: *const u16| unsafe {
                let halves = _mm256_loadu_si256(p.cast());
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(halves)))
            };
            Zmm2([widen16(bits), widen16(bits.wrapping_add(16))])
        }
        #[inline(always)]
        unsafe fn fma(&mut self, w: Self, x: *const f32) {
            for (k, (acc, w)) in self.0.iter_mut().zip(w.0).enumerate() {
                unsafe { *acc = _mm512_fmadd_ps(w, _mm512_loadu_ps(x.add(16 * k)), *acc) };
            }
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            unsafe {
                let sixteen = _mm512_add_ps(self.0[0], self.0[1]);
                let high = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(sixteen));
                let eight = _mm256_add_ps(_mm512_castps512_ps256(sixteen), _mm256_castpd_ps(high));
                sum_four(eight)
            }
        }
    }

    impl Lanes for Ymm4 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { Ymm4([_mm256_setzero_ps(); 4]) }
        }
        #[inline(always)]
        unsafe fn widen(bits: *const u16) -> Self {
            let widen8 = |p: *const u16| unsafe {
                let halves = _mm_loadu_si128(p.cast());
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(halves)))
            };
            Ymm4(std::array::from_fn(|k| widen8(bits.wrapping_add(8 * k))))
        }
        #[inline(always)]
        unsafe fn fma(&mut self, w: Self, x: *const f32) {
            for (k, (acc, w)) in self.0.iter_mut().zip(w.0).enumerate() {
                unsafe { *acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(x.add(8 * k)), *acc) };
            }
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            let [a, b, c, d] = self.0;
            // Lanes i + 16 are register i + 2, lanes i + 8 register i + 1.
            unsafe { sum_four(_mm256_add_ps(_mm256_add_ps(a, c), _mm256_add_ps(b, d))) }
        }
    }

    /// The last steps of `super::sum_lanes`: eight lanes to four, then `(0 + 2) + (1 + 3)`.
    #[inline(always)]
    unsafe fn sum_four(eight: __m256) -> f32 {
        let mut four = [0f32; 4];
        unsafe {
            let halves = _mm_add_ps(
                _mm256_castps256_ps128(eight),
                _mm256_extractf128_ps::<1>(eight),
            );
            _mm_storeu_ps(four.as_mut_ptr(), halves);
        }
        (four[0] + four[2]) + (four[1] + four[3])
    }

    /// `out[r · n + t] = dot_portable(row r, inputs[t])`: input groups outermost, so a group stays in
    /// L1 while the task's rows (in L2) stream past.
    #[inline(always)]
    fn rows_times_inputs<L: Lanes, const ROWS: usize, const INPUTS: usize>(
        rows: &[u16],
        inputs: &[&[f32]],
        out: &mut [f32],
    ) {
        let n = inputs.len();
        let in_dim = inputs[0].len();
        for first in (0..n).step_by(INPUTS) {
            let group = &inputs[first..n.min(first + INPUTS)];
            let blocks = rows.chunks(ROWS * in_dim).zip(out.chunks_mut(ROWS * n));
            for (w, out) in blocks {
                // Blocks of up to ROWS × INPUTS; the match covers the remainders.
                match (w.len() / in_dim, group.len()) {
                    (2, 4) if ROWS >= 2 && INPUTS >= 4 => block::<L, 2, 4>(w, group, out, first),
                    (2, 3) if ROWS >= 2 && INPUTS >= 3 => block::<L, 2, 3>(w, group, out, first),
                    (2, 2) if ROWS >= 2 => block::<L, 2, 2>(w, group, out, first),
                    (2, _) if ROWS >= 2 => block::<L, 2, 1>(w, group, out, first),
                    (_, 4) if INPUTS >= 4 => block::<L, 1, 4>(w, group, out, first),
                    (_, 3) if INPUTS >= 3 => block::<L, 1, 3>(w, group, out, first),
                    (_, 2) => block::<L, 1, 2>(w, group, out, first),
                    _ => block::<L, 1, 1>(w, group, out, first),
                }
            }
        }
    }

    /// `out[r · n + first + t] = dot_portable(row r, inputs[t])` for `R` rows of `weights`
    /// and `T` inputs, where `out` holds the rows' outputs for all `n` inputs.
    #[inline(always)]
    fn block<L: Lanes, const R: usize, const T: usize>(
        weights: &[u16],
        inputs: &[&[f32]],
        out: &mut [f32],
        first: usize,
    ) {
        let in_dim = inputs[0].len();
        assert!(weights.len() == R * in_dim && inputs.len() == T);
        assert!(inputs.iter().all(|x| x.len() == in_dim));
        let whole = in_dim / LANES * LANES;
        // SAFETY (all blocks below): the kernels calling this run on a CPU with the
        // registers' features, and every pointer stays within the asserted lengths: weights
        // r · in_dim + i + 32 ≤ R · in_dim and inputs i + 32 ≤ in_dim, as i + 32 ≤ whole.
        let mut acc = [[unsafe { L::zero() }; T]; R];
        for i in (0..whole).step_by(LANES) {
            for (r, acc) in acc.iter_mut().enumerate() {
                let w = weights[r * in_dim..].as_ptr().wrapping_add(i);
                // The same place in the next block's rows, one block ahead: the hardware
                // prefetcher alone left decode at half the memory bandwidth.
                let w = unsafe {
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(R * in_dim).cast());
                    L::widen(w)
                };
                for (acc, x) in acc.iter_mut().zip(inputs) {
                    unsafe { acc.fma(w, x.as_ptr().add(i)) };
                }
            }
        }
        // Every register summed in straight-line code: a loop with the tails in it would
        // index `acc` at run time, and keep it on the stack through the loop above.
        let mut sums = [[0f32; T]; R];
        for r in 0..R {
            for t in 0..T {
                sums[r][t] = unsafe { acc[r][t].sum() };
            }
        }
        for (r, sums) in sums.iter_mut().enumerate() {
            let row = &weights[r * in_dim..][..in_dim];
            for (sum, x) in sums.iter_mut().zip(inputs) {
                *sum = add_tail(*sum, &row[whole..], &x[whole..]);
            }
        }
        let n = out.len() / R;
        for (r, sums) in sums.iter().enumerate() {
            out[r * n + first..][..T].copy_from_slice(sums);
        }
    }
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
    pub fn dot_f32 / dot_f32_on(a: &[f32], b: &[f32]) -> f32 = dot_f32_portable
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
    pub fn axpy / axpy_on(a: f32, x: &[f32], y: &mut [f32]) = axpy_portable
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

/// Lanes of a bf16 dot product: lane i sums the products of elements i, i + 32, i + 64, …,
/// so every path keeps enough independent accumulators in flight (two AVX-512 or four AVX2
/// registers) to cover FMA latency, and all of them add in the same order.
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

/// Sums the lanes, then adds the tail past the last whole chunk.
#[inline(always)]
fn finish_dot(acc: &[f32; LANES], weights: &[u16], x: &[f32]) -> f32 {
    add_tail(sum_lanes(acc), weights, x)
}

/// Sums 32 lanes pairwise, lane i with lane i + 16, then i + 8, and so on down to one: the
/// order a vector reduction takes (so the AVX-512 kernel does it in registers), five
/// dependent adds where a running sum took 32.
#[inline(always)]
fn sum_lanes(acc: &[f32; LANES]) -> f32 {
    let sixteen: [f32; 16] = std::array::from_fn(|i| acc[i] + acc[i + 16]);
    let eight: [f32; 8] = std::array::from_fn(|i| sixteen[i] + sixteen[i + 8]);
    let four: [f32; 4] = std::array::from_fn(|i| eight[i] + eight[i + 4]);
    (four[0] + four[2]) + (four[1] + four[3])
}

/// `sum` plus the products of the elements past the last whole chunk, in order.
#[inline(always)]
fn add_tail(mut sum: f32, weights: &[u16], x: &[f32]) -> f32 {
    for (w, v) in weights.iter().zip(x) {
        sum += widen(*w) * v;
    }
    sum
}

/// `dot_portable` for two inputs at once: each gets exactly its arithmetic (same lanes, same
/// order, so a token's result does not depend on its neighbour), while each weight is loaded
/// and widened once for both.
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

    /// bf16 bits of a deterministic pseudo-random matrix in [-0.6, 0.6).
    fn weights(len: usize) -> Vec<u16> {
        (0..len)
            .map(|i| half::bf16::from_f32(((i * 7919) % 1201) as f32 / 1000.0 - 0.6).to_bits())
            .collect()
    }

    fn activations(len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 104_729) % 2003) as f32 / 1000.0 - 1.0)
            .collect()
    }

    #[test]
    fn every_cpu_path_gives_the_baseline_bits() {
        // 1 to 9 inputs cover every block shape and remainder; 83 rows leave a lone row and a
        // short last task; in_dim 1000 has a lane tail (1000 = 31 · 32 + 8).
        let (rows, in_dim) = (83, 1000);
        let weight = weights(rows * in_dim);
        let x = activations(9 * in_dim);
        for n in 1..=9 {
            let run = |isa| {
                let mut out = vec![0f32; rows * n];
                products_on(
                    isa,
                    vec![Product {
                        weight: &weight,
                        inputs: x.chunks_exact(in_dim).take(n).collect(),
                        out: &mut out,
                    }],
                );
                out
            };
            let baseline = run(Isa::Baseline);
            for isa in Isa::available() {
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&run(isa)), bits(&baseline), "{isa:?}, {n} inputs");
            }
        }
        let (a, b) = (&x[..in_dim], &x[in_dim..2 * in_dim]);
        for isa in Isa::available() {
            let name = isa.name();
            let (dot, base) = (dot_f32_on(isa, a, b), dot_f32_on(Isa::Baseline, a, b));
            assert_eq!(dot.to_bits(), base.to_bits(), "dot_f32 on {name}");
            let (mut y, mut base) = (b.to_vec(), b.to_vec());
            axpy_on(isa, 0.37, a, &mut y);
            axpy_on(Isa::Baseline, 0.37, a, &mut base);
            assert_eq!(y, base, "axpy on {name}");
        }
    }

    #[test]
    fn the_baseline_matches_a_plain_sum() {
        let (rows, in_dim) = (5, 1000);
        let (weight, x) = (weights(rows * in_dim), activations(in_dim));
        let mut out = vec![0f32; rows];
        products_on(
            Isa::Baseline,
            vec![Product {
                weight: &weight,
                inputs: vec![&x],
                out: &mut out,
            }],
        );
        for (row, got) in weight.chunks_exact(in_dim).zip(out) {
            let plain: f64 = row
                .iter()
                .zip(&x)
                .map(|(w, x)| f64::from(widen(*w)) * f64::from(*x))
                .sum();
            assert!((f64::from(got) - plain).abs() < 1e-4, "{got} vs {plain}");
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
