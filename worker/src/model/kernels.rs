//! CPU kernels for weights kept as the checkpoint stores them (bf16, or FP8 e4m3 with block
//! scales) and f32 activations: `y = x Wᵀ` for a few tokens (decode), reading each weight once
//! and widening it to f32 in registers, so decode streams a half (bf16) or a quarter (FP8) of
//! the bytes an f32 copy would.

use std::ops::Range;
use std::sync::OnceLock;

use rayon::prelude::*;

mod coded;

pub use self::coded::CodedBf16;
use self::coded::CodedMatrix;

/// The instruction sets the kernels are built for, from the baseline up. Every path does the
/// same operations in the same order (`mul_add` rounds once on each), so results are bit for
/// bit the same whichever runs: the choice is speed only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Isa {
    /// x86-64 baseline (SSE2) or any other architecture.
    Baseline,
    /// AVX2 with FMA (and F16C, which every such CPU has): 8-wide vectors, 16 registers.
    #[value(name = "avx2")]
    Avx2Fma,
    /// AVX-512F (with AVX2, FMA and F16C): 16-wide vectors, 32 registers.
    #[value(name = "avx512")]
    Avx512,
    /// AVX-512F with VBMI (Ice Lake and Zen 4 on): FP8 bytes widen through a byte table
    /// (`vpermi2b`), 64 at a time.
    #[value(name = "avx512vbmi")]
    Avx512Vbmi,
}

/// How the kernels hold bf16 weights, set once per process (`--cpu-decode-weights`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DecodeWeights {
    /// As the checkpoint stores them, read in place from its mapping.
    Stored,
    /// Recoded at load into a lossless 12 bits a weight ([`CodedBf16`]), the checkpoint's
    /// pages given back: a quarter less memory and fewer bytes a decoded token; products
    /// bound by arithmetic (prompts, large batches) run slower decoding it. Needs
    /// `avx512vbmi`.
    Coded,
}

static DECODE_WEIGHTS: OnceLock<DecodeWeights> = OnceLock::new();

impl DecodeWeights {
    /// The choice for this process: `Stored` unless `choose` said otherwise first.
    pub fn selected() -> DecodeWeights {
        *DECODE_WEIGHTS.get_or_init(|| DecodeWeights::Stored)
    }

    /// Sets the choice for this process, before any weights load. `Coded` is refused where
    /// the kernels cannot decode it in registers (a path without the byte table).
    pub fn choose(choice: DecodeWeights) -> Result<(), String> {
        if choice == DecodeWeights::Coded && Isa::selected() < Isa::Avx512Vbmi {
            return Err(format!(
                "coded weights need the avx512vbmi kernels; these run {}",
                Isa::selected().name()
            ));
        }
        match *DECODE_WEIGHTS.get_or_init(|| choice) {
            chosen if chosen == choice => Ok(()),
            chosen => Err(format!("the weights already load {chosen:?}")),
        }
    }
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
            if has!("avx2") && has!("fma") && has!("f16c") {
                return if has!("avx512f") && has!("avx512bw") && has!("avx512vbmi") {
                    Isa::Avx512Vbmi
                } else if has!("avx512f") {
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
        [Isa::Baseline, Isa::Avx2Fma, Isa::Avx512, Isa::Avx512Vbmi]
            .into_iter()
            .filter(move |isa| *isa <= best)
    }

    /// The name logs and benchmarks print.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Baseline => "baseline",
            Isa::Avx2Fma => "avx2+fma",
            Isa::Avx512 => "avx512f",
            Isa::Avx512Vbmi => "avx512f+vbmi",
        }
    }
}

/// Defines `fn name(args)` and `fn name_on(isa, args)` from `fn portable(args)`: `portable`
/// compiled for AVX-512F or AVX2+FMA when `isa` asks for it (x86-64 builds target the
/// baseline otherwise), else the baseline build. Same source, so the same bits on every path;
/// `name` takes the selected path. `= portable, x86: vectorised` compiles `vectorised` for
/// the x86 paths instead (the same operations in the same order, in intrinsics).
macro_rules! simd_fn {
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident / $name_on:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?
            = $portable:ident
    ) => {
        simd_fn! {
            $(#[$attr])*
            $vis fn $name / $name_on($($arg: $ty),*) $(-> $ret)? = $portable, x86: $portable
        }
    };
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident / $name_on:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?
            = $portable:path, x86: $x86:path
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
                #[target_feature(enable = "avx512f,avx2,fma,f16c")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $x86($($arg),*)
                }
                #[target_feature(enable = "avx2,fma,f16c")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $x86($($arg),*)
                }
                match isa {
                    // SAFETY: the CPU has the features (asserted above).
                    Isa::Avx512 | Isa::Avx512Vbmi => return unsafe { avx512($($arg),*) },
                    Isa::Avx2Fma => return unsafe { avx2($($arg),*) },
                    Isa::Baseline => {}
                }
            }
            $portable($($arg),*)
        }
    };
}

/// The unpacks that put 64 bytes' values in the high halves of four registers' f32 lanes
/// (bytes to words, words to dwords) interleave within 128-bit lanes: register k's dword
/// 4l + q comes from byte 16l + 4k + q, which must hold weight 16k + 4l + q. Byte `b` of a
/// block so ordered holds weight `unpack_order()[b]`.
const fn unpack_order() -> [u8; 64] {
    let mut order = [0; 64];
    let mut byte = 0;
    while byte < 64 {
        let (l, k, q) = (byte / 16, byte % 16 / 4, byte % 4);
        order[byte] = (16 * k + 4 * l + q) as u8;
        byte += 1;
    }
    order
}

/// Rows of W per parallel task: large enough to amortise scheduling, small enough to
/// balance two to a few dozen threads.
const ROWS_PER_TASK: usize = 64;

/// A weight matrix `[rows, in_dim]`, row-major, as the checkpoint stores it.
#[derive(Clone, Copy)]
pub enum Packed<'a> {
    /// bf16 bits, widened exactly.
    Bf16(&'a [u16]),
    /// e4m3 bytes, each times its block's scale.
    Fp8(Fp8Matrix<'a>),
    /// f32, as is: weights the model derives at load from FP8 or f32 ones (the absorbed
    /// attention's per-head halves of `kv_b_proj`).
    F32(&'a [f32]),
    /// bf16 coded in 12 bits ([`CodedBf16`]), decoded exactly.
    Coded(CodedMatrix<'a>),
}

/// FP8 weights as `weights::Fp8Weights` holds them.
#[derive(Clone, Copy)]
pub struct Fp8Matrix<'a> {
    bytes: &'a [u8],
    /// `[⌈rows / block_rows⌉, ⌈in_dim / block_cols⌉]`: each block's scale times 2⁸.
    block_scales: &'a [f32],
    /// `[block_rows, block_cols]`.
    block: [usize; 2],
    /// Where `bytes` starts among the rows `block_scales` describes (tasks take slices).
    first_row: usize,
}

impl<'a> Packed<'a> {
    /// e4m3 `bytes` `[rows, in_dim]` with `block_scales` `[⌈rows / block_rows⌉, ⌈in_dim /
    /// block_cols⌉]` (each block's scale times 2⁸, as `weights::Fp8Weights` keeps them) for
    /// `block` `[block_rows, block_cols]`.
    pub fn fp8(bytes: &'a [u8], block_scales: &'a [f32], block: [usize; 2], in_dim: usize) -> Self {
        let rows = bytes.len() / in_dim.max(1);
        let [block_rows, block_cols] = block;
        assert!(
            block_rows > 0
                && block_cols > 0
                && block_scales.len() == rows.div_ceil(block_rows) * in_dim.div_ceil(block_cols)
        );
        Packed::Fp8(Fp8Matrix {
            bytes,
            block_scales,
            block,
            first_row: 0,
        })
    }

    fn elements(self) -> usize {
        match self {
            Packed::Bf16(bits) => bits.len(),
            Packed::Fp8(m) => m.bytes.len(),
            Packed::F32(values) => values.len(),
            Packed::Coded(m) => m.elements(),
        }
    }

    /// Rows `range` of the matrix.
    fn rows(self, range: Range<usize>, in_dim: usize) -> Self {
        let elements = range.start * in_dim..range.end * in_dim;
        match self {
            Packed::Bf16(bits) => Packed::Bf16(&bits[elements]),
            Packed::F32(values) => Packed::F32(&values[elements]),
            Packed::Fp8(m) => Packed::Fp8(Fp8Matrix {
                bytes: &m.bytes[elements],
                first_row: m.first_row + range.start,
                ..m
            }),
            Packed::Coded(m) => Packed::Coded(m.rows(range)),
        }
    }

    /// The matrix widened to f32, as the kernels see it.
    pub fn widen(self, in_dim: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.elements()];
        out.par_chunks_mut(in_dim.max(1))
            .enumerate()
            .for_each(|(r, out)| self.widen_row(Isa::selected(), r, out));
        out
    }

    /// Row `r`, widened into `out` (`in_dim` long) with `isa`'s kernels.
    fn widen_row(self, isa: Isa, r: usize, out: &mut [f32]) {
        fn widen_into(row: impl Row, out: &mut [f32]) {
            for (i, out) in out.iter_mut().enumerate() {
                *out = row.at(i);
            }
        }
        match self {
            Packed::Bf16(m) => widen_into(m.row(r, out.len()), out),
            Packed::Fp8(m) => {
                let (bytes, scales) = m.row(r, out.len());
                let blocks = out.chunks_mut(m.block[1]).zip(bytes.chunks(m.block[1]));
                for ((out, bytes), scale) in blocks.zip(scales) {
                    for (out, &byte) in out.iter_mut().zip(bytes) {
                        // One rounding, of `e4m3 · 2⁻⁸` (exact) times `scale · 2⁸`: the
                        // dequantised f32 weight.
                        *out = E4M3_TIMES_2_POW_MINUS_8[usize::from(byte)] * scale;
                    }
                }
            }
            Packed::F32(m) => widen_into(m.row(r, out.len()), out),
            Packed::Coded(m) => {
                let row = m.row(r, out.len());
                #[cfg(target_arch = "x86_64")]
                if isa == Isa::Avx512Vbmi {
                    // SAFETY: callers pick kernels this CPU runs.
                    return unsafe { x86::decode_row_avx512_vbmi(row, out) };
                }
                widen_into(row, out)
            }
        }
    }
}

/// A matrix the kernels read row by row.
trait Matrix: Copy + Send + Sync {
    type Row: Row;
    /// Whether rows widen a whole block of 64 at a time (coded rows): the kernels then step
    /// 64 elements at a time whatever their shape.
    const WIDENS_IN_PAIRS: bool = false;
    /// Row `r` of `in_dim` elements (bounds-checked).
    fn row(self, r: usize, in_dim: usize) -> Self::Row;
}

/// One row of weights: elements widened one at a time (the portable kernel, the tails), or
/// 32 at a time into registers.
trait Row: Copy {
    fn at(self, i: usize) -> f32;

    /// Elements `i..i + 32` widened, as `at` widens them.
    ///
    /// # Safety
    /// `i + 32` is at most the row's length, and the CPU has the registers' features.
    #[cfg(target_arch = "x86_64")]
    unsafe fn lanes<L: x86::Lanes>(self, i: usize) -> L;

    /// Elements `i..i + 64`, as two `lanes`.
    ///
    /// # Safety
    /// As `lanes`, with `i + 64` at most the row's length.
    #[cfg(target_arch = "x86_64")]
    unsafe fn lanes_pair<L: x86::Lanes>(self, i: usize) -> [L; 2];

    /// The address `elements` past element `i`, to prefetch (it may lie past the row).
    #[cfg(target_arch = "x86_64")]
    fn ahead(self, i: usize, elements: usize) -> *const i8;
}

/// A weight as the kernels read it, widened to f32 exactly, one at a time or 32 at a time.
trait Weight: Copy + Send + Sync {
    fn value(self) -> f32;

    /// The 32 weights from `at`, widened as `value` widens each.
    ///
    /// # Safety
    /// They are in bounds, and the CPU has the registers' features.
    #[cfg(target_arch = "x86_64")]
    unsafe fn lanes<L: x86::Lanes>(at: *const Self) -> L;

    /// The 64 weights from `at`, as two `lanes`.
    ///
    /// # Safety
    /// As `lanes`.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn lanes_pair<L: x86::Lanes>(at: *const Self) -> [L; 2] {
        unsafe { [Self::lanes(at), Self::lanes(at.wrapping_add(LANES))] }
    }
}

/// bf16 bits.
impl Weight for u16 {
    #[inline(always)]
    fn value(self) -> f32 {
        widen(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn lanes<L: x86::Lanes>(at: *const Self) -> L {
        unsafe { L::widen_bf16(at) }
    }
}

impl Weight for f32 {
    #[inline(always)]
    fn value(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn lanes<L: x86::Lanes>(at: *const Self) -> L {
        unsafe { L::load(at) }
    }
}

/// An e4m3 byte without its scale, read as its value · 2⁻⁸ (the f16 of its bits):
/// `fp8_rows_times_inputs` puts the block scales on the inputs instead.
impl Weight for u8 {
    #[inline(always)]
    fn value(self) -> f32 {
        E4M3_TIMES_2_POW_MINUS_8[usize::from(self)]
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn lanes<L: x86::Lanes>(at: *const Self) -> L {
        unsafe { L::widen_e4m3(at) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn lanes_pair<L: x86::Lanes>(at: *const Self) -> [L; 2] {
        unsafe { L::widen_e4m3_pair(at) }
    }
}

/// One row of weights as stored.
#[derive(Clone, Copy)]
struct Stored<'a, W>(&'a [W]);

impl<'a, W: Weight> Matrix for &'a [W] {
    type Row = Stored<'a, W>;
    #[inline(always)]
    fn row(self, r: usize, in_dim: usize) -> Self::Row {
        Stored(&self[r * in_dim..][..in_dim])
    }
}

impl<W: Weight> Row for Stored<'_, W> {
    #[inline(always)]
    fn at(self, i: usize) -> f32 {
        self.0[i].value()
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn lanes<L: x86::Lanes>(self, i: usize) -> L {
        debug_assert!(i + LANES <= self.0.len());
        unsafe { W::lanes(self.0.as_ptr().add(i)) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn lanes_pair<L: x86::Lanes>(self, i: usize) -> [L; 2] {
        debug_assert!(i + 2 * LANES <= self.0.len());
        unsafe { W::lanes_pair(self.0.as_ptr().add(i)) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn ahead(self, i: usize, elements: usize) -> *const i8 {
        self.0.as_ptr().wrapping_add(i + elements).cast()
    }
}

impl<'a> Fp8Matrix<'a> {
    /// Row `r`'s e4m3 bytes and the scales (· 2⁸) of their blocks, a block of columns each.
    fn row(self, r: usize, in_dim: usize) -> (&'a [u8], &'a [f32]) {
        (
            &self.bytes[r * in_dim..][..in_dim],
            self.scales(self.first_row + r, in_dim),
        )
    }

    /// The scales (· 2⁸) of the blocks along row `row` (counted from the matrix's first).
    fn scales(self, row: usize, in_dim: usize) -> &'a [f32] {
        let scale_cols = in_dim.div_ceil(self.block[1]);
        &self.block_scales[row / self.block[0] * scale_cols..][..scale_cols]
    }
}

/// Each e4m3 byte's value times 2⁻⁸: the f16 with the same sign, exponent and mantissa bits,
/// which is what the registers decode (`x86::Lanes::widen_e4m3`). NaN bytes are refused when
/// the weights load.
static E4M3_TIMES_2_POW_MINUS_8: [f32; 256] = e4m3_as_f16_values();

const fn e4m3_as_f16_values() -> [f32; 256] {
    let mut values = [0f32; 256];
    let mut byte = 0;
    while byte < 256 {
        let (exponent, mantissa) = ((byte >> 3) & 0xf, byte & 7);
        // f16: 2^(e − 15) · (1 + m/8), or m/8 · 2⁻¹⁴ for e = 0
        let magnitude = if exponent == 0 {
            mantissa as f32 / 131_072.0
        } else {
            f32::from_bits(((exponent + 112) << 23) | (mantissa << 20))
        };
        values[byte as usize] = if byte & 0x80 == 0 {
            magnitude
        } else {
            -magnitude
        };
        byte += 1;
    }
    values
}

/// `x`: `[tokens, in]`, `weight`: `[out, in]` → `[tokens, out]`.
pub fn matmul(
    x: &[f32],
    tokens: usize,
    weight: Packed<'_>,
    out_dim: usize,
    in_dim: usize,
) -> Vec<f32> {
    debug_assert_eq!(x.len(), tokens * in_dim);
    debug_assert_eq!(weight.elements(), out_dim * in_dim);
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

/// `[rows, n]` → `[n, rows]`, a few output rows per task: each task reads `a` front to back
/// and writes its rows in order, so a 32000 × 32 transpose (the head at 32 decodes) streams
/// through the caches on every core instead of writing one line in 32 on one.
pub fn transpose(a: &[f32], n: usize) -> Vec<f32> {
    const OUT_ROWS_PER_TASK: usize = 8;
    let rows = a.len() / n;
    let mut out = vec![0f32; a.len()];
    if rows == 0 {
        return out;
    }
    out.par_chunks_mut(rows * OUT_ROWS_PER_TASK)
        .enumerate()
        .for_each(|(task, chunk)| {
            let first = task * OUT_ROWS_PER_TASK;
            let count = chunk.len() / rows;
            for (r, row) in a.chunks_exact(n).enumerate() {
                for (dt, &v) in row[first..first + count].iter().enumerate() {
                    chunk[dt * rows + r] = v;
                }
            }
        });
    out
}

/// One weight matrix applied to a few inputs:
/// `out[r · inputs + t] = Σᵢ weight[r][i] · inputs[t][i]`, so `out` is `[rows, inputs]`.
pub struct Product<'a> {
    pub weight: Packed<'a>,
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
    // One aligned copy per run of jobs on the same inputs (an MLP's gate and up products).
    let mut copies: Vec<LineAligned> = Vec::new();
    let mut copy_of = Vec::with_capacity(jobs.len());
    for (j, job) in jobs.iter().enumerate() {
        let same = |a: &[&[f32]], b: &[&[f32]]| {
            a.len() == b.len() && a.iter().zip(b).all(|(a, b)| std::ptr::eq(*a, *b))
        };
        if j == 0 || !same(&jobs[j - 1].inputs, &job.inputs) {
            copies.push(LineAligned::copy(&job.inputs));
        }
        copy_of.push(copies.len() - 1);
    }
    let aligned: Vec<Vec<&[f32]>> = copies.iter().map(LineAligned::rows).collect();
    let mut tasks = Vec::new();
    for (Product { weight, out, .. }, &copy) in jobs.iter_mut().zip(&copy_of) {
        let inputs = &aligned[copy];
        let n = inputs.len();
        let Some(in_dim) = inputs.first().map(|x| x.len()) else {
            continue;
        };
        assert_eq!(weight.elements() * n, out.len() * in_dim);
        let inputs: &[&[f32]] = inputs;
        let rows = out.len() / n;
        for (first, out) in (0..rows)
            .step_by(ROWS_PER_TASK)
            .zip(out.chunks_mut(ROWS_PER_TASK * n))
        {
            let task_rows = weight.rows(first..rows.min(first + ROWS_PER_TASK), in_dim);
            tasks.push((task_rows, inputs, out));
        }
    }
    tasks
        .into_par_iter()
        .for_each(|(rows, inputs, out)| match rows {
            Packed::Bf16(m) => rows_times_inputs(isa, m, inputs, out),
            Packed::Fp8(m) => fp8_rows_times_inputs(isa, m, inputs, out),
            Packed::F32(m) => rows_times_inputs(isa, m, inputs, out),
            #[cfg(target_arch = "x86_64")]
            Packed::Coded(m) if isa == Isa::Avx512Vbmi && inputs.len() >= DECODED_ONCE_INPUTS => {
                decoded_rows_times_inputs(m, inputs, out)
            }
            Packed::Coded(m) => rows_times_inputs(isa, m, inputs, out),
        });
}

/// Inputs from which a coded product decodes its task's rows once, to bf16, rather than once
/// per group of inputs.
const DECODED_ONCE_INPUTS: usize = 32;

/// Coded rows times many inputs: the task's rows decoded once into bf16 bits (in L2), then
/// multiplied as bf16 rows, the same bits.
#[cfg(target_arch = "x86_64")]
fn decoded_rows_times_inputs(m: CodedMatrix<'_>, inputs: &[&[f32]], out: &mut [f32]) {
    thread_local! {
        // Each pool thread's buffer, kept: a fresh one per task would fault its pages in anew.
        static DECODED: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let in_dim = inputs[0].len();
    DECODED.with_borrow_mut(|decoded| {
        decoded.resize(out.len() / inputs.len() * in_dim, 0);
        for (r, row) in decoded.chunks_exact_mut(in_dim).enumerate() {
            // SAFETY: `products_on` checked that the CPU has the VBMI kernels' features.
            unsafe { x86::decode_row_avx512_vbmi(m.row(r, in_dim), row) };
        }
        rows_times_inputs(Isa::Avx512Vbmi, decoded.as_slice(), inputs, out)
    })
}

/// A product's inputs copied so that each starts a 64-byte cache line: a vector load that
/// straddles two lines costs two, and activations come at any 4-byte offset (aligning them
/// took the 32-input product from 97 to 145 GFLOP/s here).
struct LineAligned {
    buffer: Vec<f32>,
    start: usize,
    stride: usize,
    in_dim: usize,
    n: usize,
}

impl LineAligned {
    const LINE: usize = 64 / std::mem::size_of::<f32>();

    fn copy(inputs: &[&[f32]]) -> Self {
        Self::filled(inputs, |x, buffer| buffer.extend_from_slice(x))
    }

    /// The inputs times `scales`, one per block of `block_cols` elements.
    fn scaled(inputs: &[&[f32]], scales: &[f32], block_cols: usize) -> Self {
        Self::filled(inputs, |x, buffer| {
            for (x, &scale) in x.chunks(block_cols).zip(scales) {
                buffer.extend(x.iter().map(|x| x * scale));
            }
        })
    }

    /// Each input written by `fill` at the start of a line, in one pass over the buffer.
    fn filled(inputs: &[&[f32]], fill: impl Fn(&[f32], &mut Vec<f32>)) -> Self {
        let in_dim = inputs.first().map_or(0, |x| x.len());
        let stride = in_dim.next_multiple_of(Self::LINE);
        let mut buffer: Vec<f32> = Vec::with_capacity(inputs.len() * stride + Self::LINE);
        let start = buffer.as_ptr().align_offset(64).min(Self::LINE);
        buffer.resize(start, 0.0);
        for x in inputs {
            fill(x, &mut buffer);
            buffer.resize(buffer.len() - in_dim + stride, 0.0);
        }
        LineAligned {
            buffer,
            start,
            stride,
            in_dim,
            n: inputs.len(),
        }
    }

    fn rows(&self) -> Vec<&[f32]> {
        (0..self.n)
            .map(|t| &self.buffer[self.start + t * self.stride..][..self.in_dim])
            .collect()
    }
}

/// Inputs scaled at a time by `fp8_rows_times_inputs`: a few pages of copies per task.
const FP8_INPUTS_PER_COPY: usize = 16;

/// `rows_times_inputs` for FP8 rows: the scales go on the inputs, once per block of rows
/// and input (`x · s · 2⁸`, then the FMA with the byte's `q · 2⁻⁸`), and the kernel widens
/// bare bytes, a multiply per weight fewer than widening `q · s` (the dequantised weight,
/// also one rounding before the FMA). Each result is `dot_portable` of the bytes and the
/// scaled input, on every path and in any batch.
fn fp8_rows_times_inputs(isa: Isa, m: Fp8Matrix<'_>, inputs: &[&[f32]], out: &mut [f32]) {
    let (n, in_dim) = (inputs.len(), inputs[0].len());
    let rows = out.len() / n;
    let mut first = 0;
    while first < rows {
        let block_rows = m.block[0];
        let end = rows.min(((m.first_row + first) / block_rows + 1) * block_rows - m.first_row);
        let scales = m.scales(m.first_row + first, in_dim);
        let bytes = &m.bytes[first * in_dim..end * in_dim];
        let out = &mut out[first * n..end * n];
        for c in (0..n).step_by(FP8_INPUTS_PER_COPY) {
            let group = &inputs[c..n.min(c + FP8_INPUTS_PER_COPY)];
            let scaled = LineAligned::scaled(group, scales, m.block[1]);
            if group.len() == n {
                rows_times_inputs(isa, bytes, &scaled.rows(), out);
                continue;
            }
            let mut part = vec![0f32; (end - first) * group.len()];
            rows_times_inputs(isa, bytes, &scaled.rows(), &mut part);
            for (out, part) in out.chunks_exact_mut(n).zip(part.chunks_exact(group.len())) {
                out[c..][..group.len()].copy_from_slice(part);
            }
        }
        first = end;
    }
}

/// `out[r · n + t] = dot_portable(row r, inputs[t])` for one task's rows and all `n` inputs.
fn rows_times_inputs<M: Matrix>(isa: Isa, rows: M, inputs: &[&[f32]], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: `products_on` checked that the CPU has the features.
        Isa::Avx512Vbmi => {
            return unsafe { x86::rows_times_inputs_avx512_vbmi(rows, inputs, out) };
        }
        Isa::Avx512 => return unsafe { x86::rows_times_inputs_avx512(rows, inputs, out) },
        Isa::Avx2Fma => return unsafe { x86::rows_times_inputs_avx2(rows, inputs, out) },
        Isa::Baseline => {}
    }
    let n = inputs.len();
    let in_dim = inputs[0].len();
    // Input pairs outermost: a pair stays in L1 while the task's rows (in L2) stream past.
    for t in (0..n).step_by(2) {
        for (r, out) in out.chunks_exact_mut(n).enumerate() {
            let row = rows.row(r, in_dim);
            if t + 1 < n {
                (out[t], out[t + 1]) = dot2_portable(row, inputs[t], inputs[t + 1]);
            } else {
                out[t] = dot_portable(row, inputs[t]);
            }
        }
    }
}

/// The products blocked for x86 vector registers: each weight register, widened once,
/// serves several inputs, and each input register several rows. Every (row, input) pair keeps
/// the portable kernel's 32 lanes and order of terms, and sums them as `sum_lanes` does, so
/// each result is bit for bit the one `dot_portable` gives.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{DOT_LANES, LANES, Matrix, Row, add_tail};

    /// Inputs up to which a product reads its weights faster than it multiplies them.
    const MEMORY_BOUND_INPUTS: usize = 4;

    /// AVX-512F: 2 rows × 4 inputs × 2 registers = 16 of the 32 registers accumulate. With
    /// few inputs the weights' reading bounds the product, so rows go one at a time: each
    /// thread then reads one contiguous stream, which the prefetchers follow better than two
    /// rows side by side (a decode step's products read 1.4× as fast from memory).
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) fn rows_times_inputs_avx512<M: Matrix>(rows: M, inputs: &[&[f32]], out: &mut [f32]) {
        if inputs.len() <= MEMORY_BOUND_INPUTS {
            rows_times_inputs::<Zmm2<false>, M, 1, 4>(rows, inputs, out)
        } else {
            rows_times_inputs::<Zmm2<false>, M, 2, 4>(rows, inputs, out)
        }
    }

    /// `rows_times_inputs_avx512` with FP8 bytes widened through a byte table where rows go
    /// one at a time (few inputs: the widening, not the FMAs, bounds FP8 decode on a core),
    /// and coded rows, which only these kernels decode in registers, at any count.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx2,fma,f16c")]
    pub(super) fn rows_times_inputs_avx512_vbmi<M: Matrix>(
        rows: M,
        inputs: &[&[f32]],
        out: &mut [f32],
    ) {
        if inputs.len() <= MEMORY_BOUND_INPUTS {
            rows_times_inputs::<Zmm2<true>, M, 1, 4>(rows, inputs, out)
        } else if M::WIDENS_IN_PAIRS {
            rows_times_inputs::<Zmm2<true>, M, 2, 4>(rows, inputs, out)
        } else {
            rows_times_inputs_avx512(rows, inputs, out)
        }
    }

    /// Rows ahead that `decode_row_avx512_vbmi` prefetches: it reads from memory with no
    /// arithmetic to hide behind (decoding a task's rows to bf16 ran 32 inputs at 0.77 of the
    /// bf16 kernel's rate without, 0.86 with).
    const PREFETCH_ROWS: usize = 8;

    /// Where decoded weights go: f32 (a GEMM panel) or their bf16 bits.
    pub(super) trait Decoded: Copy {
        /// 16 lanes stored at `at`.
        unsafe fn put(lanes: __m512, at: *mut Self);
        fn from_f32(value: f32) -> Self;
    }

    impl Decoded for f32 {
        #[inline(always)]
        unsafe fn put(lanes: __m512, at: *mut Self) {
            unsafe { _mm512_storeu_ps(at, lanes) }
        }
        fn from_f32(value: f32) -> Self {
            value
        }
    }

    impl Decoded for u16 {
        #[inline(always)]
        unsafe fn put(lanes: __m512, at: *mut Self) {
            unsafe {
                let high_halves = _mm512_srli_epi32::<16>(_mm512_castps_si512(lanes));
                _mm256_storeu_si256(at.cast(), _mm512_cvtepi32_epi16(high_halves));
            }
        }
        fn from_f32(value: f32) -> Self {
            (value.to_bits() >> 16) as u16
        }
    }

    /// `row` decoded into `out` (as long as the row), 64 weights at a time through the byte
    /// table's decoders.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx2,fma,f16c")]
    pub(super) fn decode_row_avx512_vbmi<R: Row, D: Decoded>(row: R, out: &mut [D]) {
        let whole = out.len() / (2 * LANES) * (2 * LANES);
        let ahead = PREFETCH_ROWS * out.len();
        for (i, out) in (0..whole)
            .step_by(2 * LANES)
            .zip(out.chunks_exact_mut(2 * LANES))
        {
            // SAFETY: i + 64 ≤ whole ≤ the row's length, and `out` holds the 64 stores.
            unsafe {
                _mm_prefetch::<_MM_HINT_T1>(row.ahead(i, ahead));
                _mm_prefetch::<_MM_HINT_T1>(row.ahead(i + LANES, ahead));
                let pair = row.lanes_pair::<Zmm2<true>>(i);
                // Loops, not iterator adapters: their closures would not take the features.
                for (half, lanes) in pair.iter().enumerate() {
                    for (k, &lanes) in lanes.0.iter().enumerate() {
                        D::put(lanes, out.as_mut_ptr().add(LANES * half + 16 * k));
                    }
                }
            }
        }
        for (i, out) in out.iter_mut().enumerate().skip(whole) {
            *out = D::from_f32(row.at(i));
        }
    }

    /// AVX2: 1 row × 2 inputs × 4 registers = 8 of the 16 registers accumulate.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn rows_times_inputs_avx2<M: Matrix>(rows: M, inputs: &[&[f32]], out: &mut [f32]) {
        rows_times_inputs::<Ymm4, M, 1, 2>(rows, inputs, out)
    }

    /// 32 f32 lanes in registers of one width. The methods are inlined into kernels compiled
    /// for that width; called anywhere else they would be unsound, hence `unsafe`.
    pub(super) trait Lanes: Copy {
        unsafe fn zero() -> Self;
        /// 32 bf16 at `bits`, widened to f32 (exact: the bits shifted into the high half).
        unsafe fn widen_bf16(bits: *const u16) -> Self;
        /// 32 e4m3 at `bytes`, each read as the f16 of its bits: its value · 2⁻⁸, exact.
        unsafe fn widen_e4m3(bytes: *const u8) -> Self;
        /// 64 e4m3 at `bytes`, as two `widen_e4m3`.
        #[inline(always)]
        unsafe fn widen_e4m3_pair(bytes: *const u8) -> [Self; 2] {
            unsafe { [Self::widen_e4m3(bytes), Self::widen_e4m3(bytes.add(32))] }
        }
        /// A coded block's 64 weights (`super::coded`), in order.
        #[inline(always)]
        unsafe fn widen_coded_pair(
            sign_mantissa: *const u8,
            codes: *const u8,
            table: &super::coded::CodeTable,
        ) -> [Self; 2] {
            unsafe { super::coded::decoded_pair(sign_mantissa, codes, table) }
        }
        /// The 32 f32 at `x`.
        unsafe fn load(x: *const f32) -> Self;
        /// `self[i] = w[i] · x[i] + self[i]`, rounded once.
        unsafe fn fma(&mut self, w: Self, x: Self);
        /// `super::sum_lanes`, the same adds in registers.
        unsafe fn sum(self) -> f32;
    }

    /// 16 e4m3 bytes as the f16 of their bits: sign-extended to 16 bits and shifted left by
    /// 7, the sign lands in bit 15, exponent and mantissa in bits 13..7, and the mask clears
    /// bit 14 (the top of f16's 5-bit exponent, which e4m3's 4 bits never reach).
    #[inline(always)]
    unsafe fn e4m3_as_f16(bytes: *const u8) -> __m256i {
        unsafe {
            let signed = _mm256_cvtepi8_epi16(_mm_loadu_si128(bytes.cast()));
            _mm256_and_si256(
                _mm256_slli_epi16::<7>(signed),
                _mm256_set1_epi16(0xbf80_u16 as i16),
            )
        }
    }

    /// Two zmm registers; `BYTE_TABLE` widens FP8 pairs through `E4M3_AS_BF16_BYTES` (the
    /// kernel using it is compiled with VBMI).
    #[derive(Clone, Copy)]
    struct Zmm2<const BYTE_TABLE: bool>([__m512; 2]);

    #[derive(Clone, Copy)]
    struct Ymm4([__m256; 4]);

    impl<const BYTE_TABLE: bool> Zmm2<BYTE_TABLE> {
        /// 64 bf16 as their low and high bytes, in `UNPACK_ORDER`, widened in order: the
        /// unpacks put each pair in the high half of an f32 lane.
        #[inline(always)]
        unsafe fn from_bf16_bytes(low: __m512i, high: __m512i) -> [Self; 2] {
            unsafe {
                let (first, second) = (
                    _mm512_unpacklo_epi8(low, high),
                    _mm512_unpackhi_epi8(low, high),
                );
                let zero = _mm512_setzero_si512();
                [
                    Zmm2([
                        _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, first)),
                        _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, first)),
                    ]),
                    Zmm2([
                        _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, second)),
                        _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, second)),
                    ]),
                ]
            }
        }
    }

    impl<const BYTE_TABLE: bool> Lanes for Zmm2<BYTE_TABLE> {
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { Zmm2([_mm512_setzero_ps(); 2]) }
        }
        #[inline(always)]
        unsafe fn widen_bf16(bits: *const u16) -> Self {
            let widen16 = |p: *const u16| unsafe {
                let halves = _mm256_loadu_si256(p.cast());
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(halves)))
            };
            Zmm2([widen16(bits), widen16(bits.wrapping_add(16))])
        }
        #[inline(always)]
        unsafe fn widen_e4m3(bytes: *const u8) -> Self {
            unsafe {
                Zmm2([
                    _mm512_cvtph_ps(e4m3_as_f16(bytes)),
                    _mm512_cvtph_ps(e4m3_as_f16(bytes.add(16))),
                ])
            }
        }
        /// With the table: the 64 bytes reordered for the unpacks below, then each byte's
        /// magnitude looked up as bf16 high and low bytes (the sign bit copied in), which the
        /// unpacks put in the high half of each f32. 10 vector operations for 64 weights,
        /// against 16 (4 of them conversions) as f16: 1.2× the rate here (AMD Zen 4).
        #[inline(always)]
        unsafe fn widen_e4m3_pair(bytes: *const u8) -> [Self; 2] {
            if !BYTE_TABLE {
                return unsafe { [Self::widen_e4m3(bytes), Self::widen_e4m3(bytes.add(32))] };
            }
            // Straight-line intrinsics: a closure would not take the kernel's features.
            let [high, low] = &E4M3_AS_BF16_BYTES;
            unsafe {
                let order = _mm512_loadu_si512(UNPACK_ORDER.as_ptr().cast());
                let bytes = _mm512_permutexvar_epi8(order, _mm512_loadu_si512(bytes.cast()));
                // Each table in two registers: the index's bit 6 picks the register.
                let high = _mm512_permutex2var_epi8(
                    _mm512_loadu_si512(high.as_ptr().cast()),
                    bytes,
                    _mm512_loadu_si512(high[64..].as_ptr().cast()),
                );
                let low = _mm512_permutex2var_epi8(
                    _mm512_loadu_si512(low.as_ptr().cast()),
                    bytes,
                    _mm512_loadu_si512(low[64..].as_ptr().cast()),
                );
                // Bit for bit: the byte's where the mask is set (its sign), else the table's.
                let high =
                    _mm512_ternarylogic_epi32::<0xCA>(_mm512_set1_epi8(i8::MIN), bytes, high);
                Self::from_bf16_bytes(low, high)
            }
        }
        /// With the byte table's features (BW): each code's exponent bits looked up
        /// (`vpshufb`, the row's 16-entry tables in every 128-bit lane), the sign and
        /// mantissa bits merged in, and the bytes unpacked as `widen_e4m3_pair`'s are (a
        /// block is stored in that order): 12 vector operations for 64 weights.
        #[inline(always)]
        unsafe fn widen_coded_pair(
            sign_mantissa: *const u8,
            codes: *const u8,
            table: &super::coded::CodeTable,
        ) -> [Self; 2] {
            if !BYTE_TABLE {
                return unsafe { super::coded::decoded_pair(sign_mantissa, codes, table) };
            }
            unsafe {
                let bits = _mm512_loadu_si512(sign_mantissa.cast());
                let packed = _mm256_loadu_si256(codes.cast());
                // Byte s: stored weight s's code, from the low nibbles, then the high ones.
                let codes = _mm512_and_si512(
                    _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(packed),
                        _mm256_srli_epi16::<4>(packed),
                    ),
                    _mm512_set1_epi8(0x0f),
                );
                let high = _mm512_shuffle_epi8(
                    _mm512_broadcast_i32x4(_mm_loadu_si128(table.as_ptr().cast())),
                    codes,
                );
                let low = _mm512_shuffle_epi8(
                    _mm512_broadcast_i32x4(_mm_loadu_si128(table[16..].as_ptr().cast())),
                    codes,
                );
                // The stored byte's bits where the mask is set, else the table's.
                let high = _mm512_ternarylogic_epi32::<0xCA>(_mm512_set1_epi8(i8::MIN), bits, high);
                let low = _mm512_ternarylogic_epi32::<0xCA>(_mm512_set1_epi8(0x7f), bits, low);
                Self::from_bf16_bytes(low, high)
            }
        }
        #[inline(always)]
        unsafe fn load(x: *const f32) -> Self {
            unsafe { Zmm2([_mm512_loadu_ps(x), _mm512_loadu_ps(x.add(16))]) }
        }
        #[inline(always)]
        unsafe fn fma(&mut self, w: Self, x: Self) {
            for ((acc, w), x) in self.0.iter_mut().zip(w.0).zip(x.0) {
                unsafe { *acc = _mm512_fmadd_ps(w, x, *acc) };
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
        unsafe fn widen_bf16(bits: *const u16) -> Self {
            let widen8 = |p: *const u16| unsafe {
                let halves = _mm_loadu_si128(p.cast());
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(halves)))
            };
            Ymm4(std::array::from_fn(|k| widen8(bits.wrapping_add(8 * k))))
        }
        #[inline(always)]
        unsafe fn widen_e4m3(bytes: *const u8) -> Self {
            unsafe {
                let (low, high) = (e4m3_as_f16(bytes), e4m3_as_f16(bytes.add(16)));
                Ymm4([
                    _mm256_cvtph_ps(_mm256_castsi256_si128(low)),
                    _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(low)),
                    _mm256_cvtph_ps(_mm256_castsi256_si128(high)),
                    _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(high)),
                ])
            }
        }
        #[inline(always)]
        unsafe fn load(x: *const f32) -> Self {
            unsafe {
                Ymm4([
                    _mm256_loadu_ps(x),
                    _mm256_loadu_ps(x.add(8)),
                    _mm256_loadu_ps(x.add(16)),
                    _mm256_loadu_ps(x.add(24)),
                ])
            }
        }
        #[inline(always)]
        unsafe fn fma(&mut self, w: Self, x: Self) {
            for ((acc, w), x) in self.0.iter_mut().zip(w.0).zip(x.0) {
                unsafe { *acc = _mm256_fmadd_ps(w, x, *acc) };
            }
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            let [a, b, c, d] = self.0;
            // Lanes i + 16 are register i + 2, lanes i + 8 register i + 1.
            unsafe { sum_four(_mm256_add_ps(_mm256_add_ps(a, c), _mm256_add_ps(b, d))) }
        }
    }

    /// The bf16 bits of each e4m3 magnitude's value · 2⁻⁸ (as `widen_e4m3` reads it; bf16's 7
    /// mantissa bits hold e4m3's 3), high bytes then low bytes.
    static E4M3_AS_BF16_BYTES: [[u8; 128]; 2] = e4m3_as_bf16_bytes();

    const fn e4m3_as_bf16_bytes() -> [[u8; 128]; 2] {
        let values = super::e4m3_as_f16_values();
        let mut bytes = [[0; 128]; 2];
        let mut magnitude = 0;
        while magnitude < 128 {
            let bits = values[magnitude].to_bits();
            assert!(bits & 0xffff == 0);
            bytes[0][magnitude] = (bits >> 24) as u8;
            bytes[1][magnitude] = (bits >> 16) as u8;
            magnitude += 1;
        }
        bytes
    }

    /// Where `widen_e4m3_pair` takes each of its 64 bytes from (`super::unpack_order`).
    static UNPACK_ORDER: [u8; 64] = super::unpack_order();

    /// `super::dot_lanes` with each row's 8 lanes in one register: the same products and
    /// adds (the compiler vectorised the portable loop across rows, with shuffles).
    pub(super) struct YmmLanes;

    impl super::DotLanes for YmmLanes {
        #[inline(always)]
        unsafe fn dots<const K: usize>(rows: [&[f32]; K], x: &[f32]) -> [f32; K] {
            assert!(rows.iter().all(|row| row.len() == x.len()));
            let whole = x.len() / DOT_LANES * DOT_LANES;
            // SAFETY: inlined into code compiled for AVX2; every load is 8 floats at c + 8 ≤
            // whole ≤ len.
            unsafe {
                let mut acc = [_mm256_setzero_ps(); K];
                for c in (0..whole).step_by(DOT_LANES) {
                    let y = _mm256_loadu_ps(x.as_ptr().add(c));
                    for (acc, row) in acc.iter_mut().zip(rows) {
                        let a = _mm256_loadu_ps(row.as_ptr().add(c));
                        *acc = _mm256_add_ps(*acc, _mm256_mul_ps(a, y));
                    }
                }
                // A loop, not `array::from_fn`: its closure would not inline the intrinsic.
                let mut dots = [0f32; K];
                for ((dot, acc), row) in dots.iter_mut().zip(acc).zip(rows) {
                    let mut lanes = [0f32; DOT_LANES];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
                    *dot = super::sum_dot_lanes(&lanes, row, x, whole);
                }
                dots
            }
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

    /// Rows per chunk: 64 KiB of bf16 rows of 1024, well within L2. With 32 rows, 12 inputs (a
    /// 128-token prompt's share of an expert) ran at 160 GFLOP/s here, against 125 streaming
    /// all the task's rows past one group at a time; and one input (decode) read its rows
    /// faster prefetching a chunk ahead than a row ahead (`bench/engine/README.md`).
    const CHUNK_ROWS: usize = 32;

    /// `out[r · n + t] = dot_portable(row r, inputs[t])`, a chunk of rows at a time: every
    /// input group goes past the chunk's rows (from L1 and L2) while the prefetches bring the
    /// next chunk from memory into L2 (the first group's; the later groups' find it there),
    /// so reading overlaps multiplying.
    #[inline(always)]
    fn rows_times_inputs<L: Lanes, M: Matrix, const ROWS: usize, const INPUTS: usize>(
        rows: M,
        inputs: &[&[f32]],
        out: &mut [f32],
    ) {
        let n = inputs.len();
        let count = out.len() / n;
        let in_dim = inputs[0].len();
        let prefetch_ahead = CHUNK_ROWS * in_dim;
        for chunk_first in (0..count).step_by(CHUNK_ROWS) {
            let chunk_end = count.min(chunk_first + CHUNK_ROWS);
            for first in (0..n).step_by(INPUTS) {
                let group = &inputs[first..n.min(first + INPUTS)];
                for row in (chunk_first..chunk_end).step_by(ROWS) {
                    let end = chunk_end.min(row + ROWS);
                    let out = &mut out[row * n..end * n];
                    // Blocks of up to ROWS × INPUTS; the match covers the remainders.
                    let at = (rows, row, group, out, first, prefetch_ahead);
                    match (end - row, group.len()) {
                        (2, 4) if ROWS >= 2 && INPUTS >= 4 => block::<L, M, 2, 4>(at),
                        (2, 3) if ROWS >= 2 && INPUTS >= 3 => block::<L, M, 2, 3>(at),
                        (2, 2) if ROWS >= 2 => block::<L, M, 2, 2>(at),
                        (2, _) if ROWS >= 2 => block::<L, M, 2, 1>(at),
                        (_, 4) if INPUTS >= 4 => block::<L, M, 1, 4>(at),
                        (_, 3) if INPUTS >= 3 => block::<L, M, 1, 3>(at),
                        (_, 2) => block::<L, M, 1, 2>(at),
                        _ => block::<L, M, 1, 1>(at),
                    }
                }
            }
        }
    }

    /// `out[r · n + first + t] = dot_portable(row first_row + r, inputs[t])` for `R` rows and
    /// `T` inputs, where `out` holds the `R` rows' outputs for all `n` inputs; each read
    /// prefetches the weights `prefetch_ahead` elements on into L2 (into L1 they evicted the
    /// rows and inputs still in use: 5 to 12 inputs ran 10-30% slower).
    #[inline(always)]
    fn block<L: Lanes, M: Matrix, const R: usize, const T: usize>(
        (weights, first_row, inputs, out, first, prefetch_ahead): (
            M,
            usize,
            &[&[f32]],
            &mut [f32],
            usize,
            usize,
        ),
    ) {
        let in_dim = inputs[0].len();
        assert!(inputs.len() == T && inputs.iter().all(|x| x.len() == in_dim));
        let rows: [M::Row; R] = std::array::from_fn(|r| weights.row(first_row + r, in_dim));
        let whole = in_dim / LANES * LANES;
        // SAFETY (all blocks below): the kernels calling this run on a CPU with the
        // registers' features, and every access stays within the rows and inputs, each
        // in_dim long: i + 32 ≤ whole ≤ in_dim.
        let mut acc = [[unsafe { L::zero() }; T]; R];
        let mut i = 0;
        if R == 1 || M::WIDENS_IN_PAIRS {
            // Weights widened 64 at a time (one row, or coded rows, which decode whole
            // blocks; FP8 through a byte table, where the kernel has one): each row's pair
            // once, then each input register loaded once for all the rows, a half at a time.
            while i + 2 * LANES <= whole {
                let mut pairs = [[unsafe { L::zero() }; 2]; R];
                for (pair, row) in pairs.iter_mut().zip(rows) {
                    *pair = unsafe {
                        _mm_prefetch::<_MM_HINT_T1>(row.ahead(i, prefetch_ahead));
                        _mm_prefetch::<_MM_HINT_T1>(row.ahead(i + LANES, prefetch_ahead));
                        row.lanes_pair::<L>(i)
                    };
                }
                for half in 0..2 {
                    for (t, input) in inputs.iter().enumerate() {
                        let x = unsafe { L::load(input.as_ptr().add(i + half * LANES)) };
                        for (acc, pair) in acc.iter_mut().zip(&pairs) {
                            unsafe { acc[t].fma(pair[half], x) };
                        }
                    }
                }
                i += 2 * LANES;
            }
        }
        for i in (i..whole).step_by(LANES) {
            // Each input loaded once for all the rows (folded into each row's FMAs, the
            // loads, not the FMAs, bound the block).
            let mut xs = [unsafe { L::zero() }; T];
            for (x, input) in xs.iter_mut().zip(inputs) {
                *x = unsafe { L::load(input.as_ptr().add(i)) };
            }
            for (row, acc) in rows.iter().zip(acc.iter_mut()) {
                // The same place in the next chunk's rows: the hardware prefetcher alone left
                // decode at half the memory bandwidth.
                let w = unsafe {
                    _mm_prefetch::<_MM_HINT_T1>(row.ahead(i, prefetch_ahead));
                    row.lanes::<L>(i)
                };
                for (acc, x) in acc.iter_mut().zip(xs) {
                    unsafe { acc.fma(w, x) };
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
        for (row, sums) in rows.iter().zip(sums.iter_mut()) {
            for (sum, x) in sums.iter_mut().zip(inputs) {
                *sum = add_tail(*sum, *row, whole, x);
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

/// `x`: `[tokens, in]`, `weight`: `[out, in]` → `[tokens, out]`, for prefill-sized batches.
/// Each thread widens one panel of rows into its own buffer and multiplies it with all
/// tokens, so the weights cross memory once, as stored.
pub fn matmul_panels(
    x: &[f32],
    tokens: usize,
    weight: Packed<'_>,
    out_dim: usize,
    in_dim: usize,
) -> Vec<f32> {
    assert_eq!(x.len(), tokens * in_dim);
    assert_eq!(weight.elements(), out_dim * in_dim);
    let mut y = vec![0f32; tokens * out_dim];
    let y_ptr = SharedOut(y.as_mut_ptr());
    let panels = out_dim.div_ceil(PANEL_ROWS);
    (0..panels)
        .into_par_iter()
        .for_each_init(Vec::new, |panel, p| {
            let first = p * PANEL_ROWS;
            let rows = PANEL_ROWS.min(out_dim - first);
            panel.resize(rows * in_dim, 0.0);
            for (r, row) in panel.chunks_exact_mut(in_dim).enumerate() {
                weight.widen_row(Isa::selected(), first + r, row);
            }
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

/// A matrix read in place from a slice: element (r, c) is `data[r · row_stride + c · col_stride]`.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl Strided<'_> {
    /// The same elements, rows and columns swapped.
    pub fn transposed(self) -> Self {
        Strided {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Whether every element lies within `data` (no offset overflows on the way).
    fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1)
            .checked_mul(self.row_stride)
            .zip((self.cols - 1).checked_mul(self.col_stride))
            .and_then(|(r, c)| r.checked_add(c));
        last.is_some_and(|last| last < self.data.len())
    }
}

/// `out = a · b`, or `out += a · b` with `accumulate`; `out` is `[a.rows, b.cols]`,
/// row-major. A GEMM on the calling thread, for tasks that already split the work (the
/// prompt's attention, a head per task).
pub fn gemm_on_thread(a: Strided<'_>, b: Strided<'_>, out: &mut [f32], accumulate: bool) {
    assert!(a.cols == b.rows && a.rows.checked_mul(b.cols) == Some(out.len()));
    assert!(a.in_bounds() && b.in_bounds());
    let stride = |s: usize| isize::try_from(s).expect("a stride within isize");
    // SAFETY: the asserts keep every element gemm reads within `a.data` and `b.data`, and
    // every element it writes within `out`, which this call borrows mutably.
    unsafe {
        gemm::gemm(
            a.rows,
            b.cols,
            a.cols,
            out.as_mut_ptr(),
            1,
            stride(b.cols),
            accumulate,
            a.data.as_ptr(),
            stride(a.col_stride),
            stride(a.row_stride),
            b.data.as_ptr(),
            stride(b.col_stride),
            stride(b.row_stride),
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The output buffer shared by panels that write disjoint columns of it.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: only used by `matmul_panels`, whose tasks write disjoint elements.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// A pointer `offset` elements in; a method so closures capture the Sync wrapper.
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// `Σᵢ a[i] · b[i]` in f32 with a fixed order of accumulation, so a row's result never
/// depends on what else is computed with it.
#[cfg(test)]
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let [dot] = dot_lanes([a], b);
    dot
}

simd_fn! {
    /// `out[k] = dot_f32(row k, x)` for the `out.len()` rows of `rows` (each `x.len()` long),
    /// four at a time: each is `dot_f32`'s sum, bit for bit, while four chains of adds run
    /// side by side (one alone waits on each add's latency). The router's logits.
    pub fn dots_f32 / dots_f32_on(rows: &[f32], x: &[f32], out: &mut [f32])
        = dots_f32_with::<PortableLanes>, x86: dots_f32_with::<x86::YmmLanes>
}

#[inline(always)]
fn dots_f32_with<L: DotLanes>(rows: &[f32], x: &[f32], out: &mut [f32]) {
    let n = x.len();
    assert_eq!(rows.len(), out.len() * n);
    if n == 0 {
        return out.fill(0.0);
    }
    for (out, rows) in out.chunks_mut(4).zip(rows.chunks(4 * n)) {
        // SAFETY (both): `simd_fn!` compiles each `L` for the features it needs.
        match out {
            [a, b, c, d] => {
                let four: [&[f32]; 4] = std::array::from_fn(|k| &rows[k * n..][..n]);
                [*a, *b, *c, *d] = unsafe { L::dots(four, x) };
            }
            _ => {
                for (out, row) in out.iter_mut().zip(rows.chunks_exact(n)) {
                    [*out] = unsafe { L::dots([row], x) };
                }
            }
        }
    }
}

simd_fn! {
    /// `out[q · m + j] = dot_f32(query q, key j)` for every query of `queries` and each of the
    /// `m` keys of `keys` (all `n` long): each key is loaded once for four queries, where a
    /// pass per query loaded it once each. Every result is `dots_f32`'s sum, bit for bit.
    pub fn dots_by_key / dots_by_key_on(queries: &[f32], keys: &[f32], n: usize, out: &mut [f32])
        = dots_by_key_with::<PortableLanes>, x86: dots_by_key_with::<x86::YmmLanes>
}

#[inline(always)]
fn dots_by_key_with<L: DotLanes>(queries: &[f32], keys: &[f32], n: usize, out: &mut [f32]) {
    if n == 0 {
        return out.fill(0.0);
    }
    let m = keys.len() / n;
    let queries_count = queries.len() / n;
    assert!(keys.len() == m * n && queries.len() == queries_count * n);
    assert_eq!(out.len(), queries_count * m);
    for (j, key) in keys.chunks_exact(n).enumerate() {
        // x · y and y · x round alike, and the lanes add in the same order either way.
        for (g, group) in queries.chunks(4 * n).enumerate() {
            let first = 4 * g;
            // SAFETY (both): `simd_fn!` compiles each `L` for the features it needs.
            if group.len() == 4 * n {
                let four: [&[f32]; 4] = std::array::from_fn(|k| &group[k * n..][..n]);
                for (k, dot) in unsafe { L::dots(four, key) }.into_iter().enumerate() {
                    out[(first + k) * m + j] = dot;
                }
            } else {
                for (k, query) in group.chunks_exact(n).enumerate() {
                    [out[(first + k) * m + j]] = unsafe { L::dots([query], key) };
                }
            }
        }
    }
}

/// `K` dot products with one vector, as `dot_lanes` computes them.
trait DotLanes {
    /// Unsafe: an implementation may use CPU features, present where it is inlined.
    unsafe fn dots<const K: usize>(rows: [&[f32]; K], x: &[f32]) -> [f32; K];
}

/// `dot_lanes` itself, in any build.
struct PortableLanes;

impl DotLanes for PortableLanes {
    #[inline(always)]
    unsafe fn dots<const K: usize>(rows: [&[f32]; K], x: &[f32]) -> [f32; K] {
        dot_lanes(rows, x)
    }
}

/// Lanes of `dot_lanes`: 8, one AVX register.
const DOT_LANES: usize = 8;

/// `K` dot products with `x` (each row as long as it): each sums its products in 8 lanes
/// (`acc[i] += a[i] · x[i]`, element i, i + 8, … in lane i), adds the lanes in order, then
/// the tail.
#[inline(always)]
fn dot_lanes<const K: usize>(rows: [&[f32]; K], x: &[f32]) -> [f32; K] {
    assert!(rows.iter().all(|row| row.len() == x.len()));
    let mut acc = [[0f32; DOT_LANES]; K];
    let whole = x.len() / DOT_LANES * DOT_LANES;
    for (c, y) in x[..whole].chunks_exact(DOT_LANES).enumerate() {
        for (acc, row) in acc.iter_mut().zip(rows) {
            let a = &row[c * DOT_LANES..][..DOT_LANES];
            for i in 0..DOT_LANES {
                acc[i] += a[i] * y[i];
            }
        }
    }
    std::array::from_fn(|k| sum_dot_lanes(&acc[k], rows[k], x, whole))
}

/// `dot_lanes`' last step for one row: its lanes added in order, then its tail's products
/// (elements `whole..`).
#[inline(always)]
fn sum_dot_lanes(lanes: &[f32; DOT_LANES], row: &[f32], x: &[f32], whole: usize) -> f32 {
    let tail = row[whole..].iter().zip(&x[whole..]);
    lanes.iter().sum::<f32>() + tail.map(|(a, y)| a * y).sum::<f32>()
}

simd_fn! {
    /// `out[h] += Σₚ weights[h][p] · rows[p]` for `out`'s rows (`[heads, n]`), with `weights`
    /// `[heads, count]` and `rows` `[count, n]`: row by row, a multiply then an add per
    /// element, so each sum keeps one order of terms whatever the heads beside it. Four
    /// heads' sums stay in registers while each row is read once for all of them.
    pub fn weighted_sums / weighted_sums_on(
        weights: &[f32],
        rows: &[f32],
        n: usize,
        out: &mut [f32]
    ) = weighted_sums_portable
}

#[inline(always)]
fn weighted_sums_portable(weights: &[f32], rows: &[f32], n: usize, out: &mut [f32]) {
    if n == 0 {
        return;
    }
    let count = rows.len() / n;
    assert!(rows.len() == count * n && weights.len() * n == out.len() * count);
    for (group, out) in out.chunks_mut(4 * n).enumerate() {
        let weights = &weights[4 * group * count..];
        match out.len() / n {
            4 => weighted_sums_of::<4>(weights, rows, n, out),
            3 => weighted_sums_of::<3>(weights, rows, n, out),
            2 => weighted_sums_of::<2>(weights, rows, n, out),
            _ => weighted_sums_of::<1>(weights, rows, n, out),
        }
    }
}

/// `weighted_sums` for `H` heads, `SUM_COLUMNS` columns at a time.
#[inline(always)]
fn weighted_sums_of<const H: usize>(weights: &[f32], rows: &[f32], n: usize, out: &mut [f32]) {
    const SUM_COLUMNS: usize = 32;
    let count = rows.len() / n;
    let weight = |h: usize, p: usize| weights[h * count + p];
    let whole = n / SUM_COLUMNS * SUM_COLUMNS;
    for start in (0..whole).step_by(SUM_COLUMNS) {
        let mut sums = [[0f32; SUM_COLUMNS]; H];
        for (h, sums) in sums.iter_mut().enumerate() {
            sums.copy_from_slice(&out[h * n + start..][..SUM_COLUMNS]);
        }
        for (p, row) in rows.chunks_exact(n).enumerate() {
            let row = &row[start..][..SUM_COLUMNS];
            for (h, sums) in sums.iter_mut().enumerate() {
                for (sum, x) in sums.iter_mut().zip(row) {
                    *sum += weight(h, p) * x;
                }
            }
        }
        for (h, sums) in sums.iter().enumerate() {
            out[h * n + start..][..SUM_COLUMNS].copy_from_slice(sums);
        }
    }
    for (h, out) in out.chunks_exact_mut(n).enumerate() {
        for (p, row) in rows.chunks_exact(n).enumerate() {
            for (sum, x) in out[whole..].iter_mut().zip(&row[whole..]) {
                *sum += weight(h, p) * x;
            }
        }
    }
}

/// Lanes of a weight row's dot product: lane i sums the products of elements i, i + 32, …,
/// so every path keeps enough independent accumulators in flight (two AVX-512 or four AVX2
/// registers) to cover FMA latency, and all of them add in the same order.
const LANES: usize = 32;

#[inline(always)]
fn widen(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

#[inline(always)]
fn dot_portable(row: impl Row, x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let whole = x.len() / LANES * LANES;
    for (c, v) in x[..whole].chunks_exact(LANES).enumerate() {
        for i in 0..LANES {
            acc[i] = row.at(c * LANES + i).mul_add(v[i], acc[i]);
        }
    }
    add_tail(sum_lanes(&acc), row, whole, x)
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

/// `sum` plus the products of the elements from `whole` (past the last whole chunk), in order.
#[inline(always)]
fn add_tail(mut sum: f32, row: impl Row, whole: usize, x: &[f32]) -> f32 {
    for (i, v) in x.iter().enumerate().skip(whole) {
        sum += row.at(i) * v;
    }
    sum
}

/// `dot_portable` for two inputs at once: each gets exactly its arithmetic (same lanes, same
/// order, so a token's result does not depend on its neighbour), while each weight is
/// widened once for both.
fn dot2_portable(row: impl Row, x0: &[f32], x1: &[f32]) -> (f32, f32) {
    let (mut acc0, mut acc1) = ([0f32; LANES], [0f32; LANES]);
    let whole = x0.len() / LANES * LANES;
    for (c, (v0, v1)) in x0[..whole]
        .chunks_exact(LANES)
        .zip(x1[..whole].chunks_exact(LANES))
        .enumerate()
    {
        for i in 0..LANES {
            let w = row.at(c * LANES + i);
            acc0[i] = w.mul_add(v0[i], acc0[i]);
            acc1[i] = w.mul_add(v1[i], acc1[i]);
        }
    }
    (
        add_tail(sum_lanes(&acc0), row, whole, x0),
        add_tail(sum_lanes(&acc1), row, whole, x1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::{E4M3_AS_F16_FACTOR, fp8_e4m3_to_f32};

    #[test]
    fn transpose_moves_every_value_to_its_place() {
        for (rows, n) in [(1, 1), (5, 1), (1, 9), (37, 8), (40, 17), (3, 64)] {
            let a: Vec<f32> = (0..rows * n).map(|i| i as f32).collect();
            let out = transpose(&a, n);
            for r in 0..rows {
                for t in 0..n {
                    assert_eq!(out[t * rows + r], a[r * n + t], "{rows}×{n} at {r}, {t}");
                }
            }
        }
    }

    #[test]
    fn many_products_in_one_dispatch_equal_one_at_a_time() {
        let weight: Vec<u16> = (0..200 * 33)
            .map(|i| half::bf16::from_f32((i % 17) as f32 * 0.01).to_bits())
            .collect();
        let x: Vec<f32> = (0..33).map(|i| i as f32 * 0.1).collect();
        let (mut a, mut b) = (vec![0f32; 200], vec![0f32; 150]);
        products(vec![
            Product {
                weight: Packed::Bf16(&weight),
                inputs: vec![&x],
                out: &mut a,
            },
            Product {
                weight: Packed::Bf16(&weight[..150 * 33]),
                inputs: vec![&x],
                out: &mut b,
            },
        ]);
        assert_eq!(a, matmul(&x, 1, Packed::Bf16(&weight), 200, 33));
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
        let batch = matmul(&x, tokens, Packed::Bf16(&weight), out_dim, in_dim);
        for t in 0..tokens {
            let alone = matmul(
                &x[t * in_dim..][..in_dim],
                1,
                Packed::Bf16(&weight),
                out_dim,
                in_dim,
            );
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

    /// Blocks of `fp8_weights`: 3 rows × 7 columns, which straddle register blocks, tasks and
    /// lanes.
    const FP8_BLOCK: [usize; 2] = [3, 7];

    /// Every finite e4m3 byte in turn (NaN bytes are refused at load), in blocks of
    /// `FP8_BLOCK` scaled by 2⁻¹⁰ to 13 · 2⁻¹⁰.
    fn fp8_weights(rows: usize, in_dim: usize) -> (Vec<u8>, Vec<f32>) {
        let finite = (0..=255u8).filter(|b| b & 0x7f != 0x7f).cycle();
        let bytes = finite.skip(77).take(rows * in_dim).collect();
        let scale_cols = in_dim.div_ceil(FP8_BLOCK[1]);
        let scales = (0..rows.div_ceil(FP8_BLOCK[0]) * scale_cols)
            .map(|k| {
                let (row_block, column_block) = (k / scale_cols, k % scale_cols);
                let scale = (1 + (5 * row_block + column_block) % 13) as f32 / 1024.0;
                scale * E4M3_AS_F16_FACTOR
            })
            .collect();
        (bytes, scales)
    }

    #[test]
    fn coded_bf16_gives_the_bf16_bits_on_every_path() {
        // 1 to 9 inputs cover the memory-bound and the blocked kernels, 32 and 33 the rows
        // decoded once; 83 rows leave a short last task; row 5 spans too many binades and
        // stays bf16.
        let (rows, in_dim) = (83, 192);
        let mut bf16 = weights(rows * in_dim);
        bf16[5 * in_dim + 3] = half::bf16::from_f32(3e9).to_bits();
        let coded = CodedBf16::encode(&bf16, in_dim).unwrap();
        assert_eq!(coded.bytes(), 82 * (in_dim * 3 / 2 + 32) + 2 * in_dim);
        let coded = coded.view();
        let x = activations(33 * in_dim);
        for n in (1..=9).chain([32, 33]) {
            let bf16_bits = product_bits(Isa::Baseline, Packed::Bf16(&bf16), &x, n, rows);
            for isa in Isa::available() {
                let bits = product_bits(isa, coded, &x, n, rows);
                assert_eq!(bits, bf16_bits, "{isa:?}, {n} inputs");
            }
        }
        // A prompt's GEMM panels widen the coded rows to the bf16's f32.
        let as_bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        assert_eq!(
            as_bits(coded.widen(in_dim)),
            as_bits(Packed::Bf16(&bf16).widen(in_dim))
        );
        assert_eq!(
            as_bits(matmul_panels(&x, 33, coded, rows, in_dim)),
            as_bits(matmul_panels(&x, 33, Packed::Bf16(&bf16), rows, in_dim))
        );
    }

    /// `weight` (`rows` of them) times the first `n` inputs of `x` on `isa`, as bits.
    fn product_bits(isa: Isa, weight: Packed<'_>, x: &[f32], n: usize, rows: usize) -> Vec<u32> {
        let in_dim = weight.elements() / rows;
        let mut out = vec![0f32; rows * n];
        products_on(
            isa,
            vec![Product {
                weight,
                inputs: x.chunks_exact(in_dim).take(n).collect(),
                out: &mut out,
            }],
        );
        out.iter().map(|f| f.to_bits()).collect()
    }

    #[test]
    fn every_cpu_path_gives_the_baseline_bits() {
        // 1 to 9 inputs cover every block shape and remainder; 83 rows leave a lone row and a
        // short last task; in_dim 1000 has a lane tail (1000 = 31 · 32 + 8).
        let (rows, in_dim) = (83, 1000);
        let bf16 = weights(rows * in_dim);
        let (bytes, scales) = fp8_weights(rows, in_dim);
        let x = activations(9 * in_dim);
        let f32s = activations(rows * in_dim);
        let formats = [
            ("bf16", Packed::Bf16(&bf16)),
            ("fp8", Packed::fp8(&bytes, &scales, FP8_BLOCK, in_dim)),
            ("f32", Packed::F32(&f32s)),
        ];
        for ((format, weight), n) in formats
            .into_iter()
            .flat_map(|f| (1..=9).map(move |n| (f, n)))
        {
            let baseline = product_bits(Isa::Baseline, weight, &x, n, rows);
            for isa in Isa::available() {
                assert_eq!(
                    product_bits(isa, weight, &x, n, rows),
                    baseline,
                    "{format} on {isa:?}, {n} inputs"
                );
            }
        }
        let (a, b) = (&x[..in_dim], &x[in_dim..2 * in_dim]);
        // 7 rows: a group of four and three alone; rows of 125 have a lane tail.
        let (rows, row) = (&x[..7 * 125], &x[7 * 125..8 * 125]);
        let alone: Vec<u32> = (rows.chunks_exact(125))
            .map(|r| dot_f32(r, row).to_bits())
            .collect();
        for isa in Isa::available() {
            let name = isa.name();
            let mut dots = [0f32; 7];
            dots_f32_on(isa, rows, row, &mut dots);
            assert_eq!(dots.map(f32::to_bits)[..], alone[..], "dots_f32 on {name}");
            // The 7 rows as queries against 2 keys (`row` and the first row).
            let keys = [row, &rows[..125]].concat();
            let mut by_key = [0f32; 14];
            dots_by_key_on(isa, rows, &keys, 125, &mut by_key);
            let each: Vec<u32> = (rows.chunks_exact(125))
                .flat_map(|q| keys.chunks_exact(125).map(|k| dot_f32(q, k).to_bits()))
                .collect();
            assert_eq!(
                by_key.map(f32::to_bits)[..],
                each[..],
                "dots_by_key on {name}"
            );
            // 1 to 7 heads (groups of four and the rest) over 3 rows of 125: `y += a · x` row
            // by row.
            for heads in 1..=7 {
                let (weights, start) = (&x[2000..2000 + 3 * heads], &b[..125 * heads]);
                let mut each = start.to_vec();
                for (h, out) in each.chunks_exact_mut(125).enumerate() {
                    for (p, row) in a[..3 * 125].chunks_exact(125).enumerate() {
                        for (y, x) in out.iter_mut().zip(row) {
                            *y += weights[h * 3 + p] * x;
                        }
                    }
                }
                let mut sums = start.to_vec();
                weighted_sums_on(isa, weights, &a[..3 * 125], 125, &mut sums);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&sums),
                    bits(&each),
                    "weighted_sums, {heads} heads, on {name}"
                );
            }
        }
    }

    #[test]
    fn the_baseline_matches_a_plain_sum() {
        // More inputs than FP8 scales in one copy, in rows of three blocks.
        let (rows, in_dim, n) = (7, 1000, FP8_INPUTS_PER_COPY + 4);
        let bf16 = weights(rows * in_dim);
        let (bytes, scales) = fp8_weights(rows, in_dim);
        let x = activations(n * in_dim);
        // The weights as the checkpoint loader dequantises them.
        let bf16_values: Vec<f64> = bf16.iter().map(|&b| f64::from(widen(b))).collect();
        let fp8_values: Vec<f64> = (0..rows * in_dim)
            .map(|k| {
                let (row, column) = (k / in_dim, k % in_dim);
                let scale_cols = in_dim.div_ceil(FP8_BLOCK[1]);
                let block = row / FP8_BLOCK[0] * scale_cols + column / FP8_BLOCK[1];
                let scale = scales[block] / E4M3_AS_F16_FACTOR;
                f64::from(fp8_e4m3_to_f32(bytes[k]) * scale)
            })
            .collect();
        let f32s = activations(rows * in_dim);
        let f32_values = f32s.iter().map(|&v| f64::from(v)).collect();
        let formats = [
            (Packed::Bf16(&bf16), bf16_values),
            (Packed::fp8(&bytes, &scales, FP8_BLOCK, in_dim), fp8_values),
            (Packed::F32(&f32s), f32_values),
        ];
        for (weight, values) in formats {
            let mut out = vec![0f32; rows * n];
            products_on(
                Isa::Baseline,
                vec![Product {
                    weight,
                    inputs: x.chunks_exact(in_dim).collect(),
                    out: &mut out,
                }],
            );
            assert_eq!(
                weight.widen(in_dim),
                values.iter().map(|&v| v as f32).collect::<Vec<_>>()
            );
            for (row, got) in values.chunks_exact(in_dim).zip(out.chunks_exact(n)) {
                for (x, got) in x.chunks_exact(in_dim).zip(got) {
                    let plain: f64 = row.iter().zip(x).map(|(w, x)| w * f64::from(*x)).sum();
                    assert!((f64::from(*got) - plain).abs() < 1e-4, "{got} vs {plain}");
                }
            }
        }
    }

    #[test]
    fn e4m3_reads_as_the_f16_of_its_bits() {
        for byte in (0..=255u8).filter(|b| b & 0x7f != 0x7f) {
            let value = E4M3_TIMES_2_POW_MINUS_8[usize::from(byte)];
            assert_eq!(
                value * E4M3_AS_F16_FACTOR,
                fp8_e4m3_to_f32(byte),
                "{byte:#04x}"
            );
            let f16_bits = (u16::from(byte & 0x80) << 8) | (u16::from(byte & 0x7f) << 7);
            assert_eq!(
                value,
                half::f16::from_bits(f16_bits).to_f32(),
                "{byte:#04x}"
            );
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
        let a = matmul_panels(&x, tokens, Packed::Bf16(&weight), out_dim, in_dim);
        let b = matmul(&x, tokens, Packed::Bf16(&weight), out_dim, in_dim);
        assert!(a.iter().zip(&b).all(|(p, q)| (p - q).abs() < 1e-4));
    }

    #[test]
    fn a_strided_gemm_reads_its_views_in_place() {
        // a: 3 × 5 every other column of a [3, 10] buffer; b: 5 × 4 read transposed from a
        // [4, 6] buffer (its rows 6 apart); then the same product again, accumulated.
        let (m, k, n) = (3, 5, 4);
        let a_data: Vec<f32> = (0..30).map(|i| (i % 7) as f32 - 3.0).collect();
        let b_data: Vec<f32> = (0..24).map(|i| (i % 5) as f32 * 0.5).collect();
        let a = Strided {
            data: &a_data,
            rows: m,
            cols: k,
            row_stride: 10,
            col_stride: 2,
        };
        let b = Strided {
            data: &b_data,
            rows: n,
            cols: k,
            row_stride: 6,
            col_stride: 1,
        }
        .transposed();
        let plain: Vec<f32> = (0..m * n)
            .map(|e| {
                let (i, j) = (e / n, e % n);
                (0..k)
                    .map(|p| a_data[i * 10 + p * 2] * b_data[j * 6 + p])
                    .sum()
            })
            .collect();
        let mut out = vec![f32::NAN; m * n];
        gemm_on_thread(a, b, &mut out, false);
        assert_eq!(out, plain);
        gemm_on_thread(a, b, &mut out, true);
        assert_eq!(out, plain.iter().map(|v| 2.0 * v).collect::<Vec<_>>());
    }

    #[test]
    #[should_panic]
    fn a_strided_view_whose_offsets_overflow_is_refused() {
        let data = [1f32; 4];
        let wrapping = Strided {
            data: &data,
            rows: 2,
            cols: 2,
            row_stride: usize::MAX,
            col_stride: 1,
        };
        gemm_on_thread(wrapping, wrapping, &mut [0f32; 4], false);
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
        let w = Packed::Bf16(&weight).widen(in_dim);
        let y = matmul(&x, tokens, Packed::Bf16(&weight), out_dim, in_dim);
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
