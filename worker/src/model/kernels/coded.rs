//! bf16 weights in 12 bits, losslessly: a byte with each weight's sign and mantissa, and a
//! 4-bit code for its exponent. Trained and random weight matrices alike keep most rows'
//! exponents within 15 consecutive binades (97% of the trained demo model's rows, 90% of
//! bench-small's random ones), so a row's code picks one of those (1..=15) or exponent 0
//! (zeros and subnormals, code 0); rows that do not fit stay bf16. Decode reads a quarter
//! fewer bytes, and the kernels rebuild each weight's exact bf16 bits in registers: every
//! product is bit for bit the bf16 one.

use rayon::prelude::*;

use super::{Matrix, Packed, Row, Stored, unpack_order, widen};

/// Weights per coded block: one 64-byte line of sign-mantissa bytes and 32 bytes of codes.
pub(super) const BLOCK: usize = 64;

/// Where a block keeps each weight: byte `s` holds weight `STORAGE_ORDER[s]`, the order in
/// which `x86::Lanes::widen_coded_pair`'s unpacks (which interleave within 128-bit lanes)
/// hand the weights back in sequence.
static STORAGE_ORDER: [u8; BLOCK] = unpack_order();

/// Where a block stores weight `i`: the inverse of `STORAGE_ORDER`.
static SLOT_OF: [u8; BLOCK] = slots_of(&STORAGE_ORDER);

const fn slots_of(order: &[u8; BLOCK]) -> [u8; BLOCK] {
    let mut slots = [0; BLOCK];
    let mut s = 0;
    while s < BLOCK {
        slots[order[s] as usize] = s as u8;
        s += 1;
    }
    slots
}

/// A bf16 matrix `[rows, in_dim]` coded as the module describes (`in_dim` a multiple of 64).
pub struct CodedBf16 {
    /// The coded rows, one after another, a block of 64 weights at a time: each weight's
    /// sign and mantissa bits (the bf16 without its exponent), in `STORAGE_ORDER`.
    sign_mantissa: Vec<u8>,
    /// The same rows' codes, 32 bytes a block: byte `s` holds stored weight `s`'s code in its
    /// low nibble and stored weight `32 + s`'s in its high nibble.
    codes: Vec<u8>,
    /// Per coded row, the bf16 exponent bits each code stands for: the exponent's high 7 bits
    /// (the bf16's high byte without the sign), then its low bit (bit 7 of the low byte).
    tables: Vec<CodeTable>,
    /// The rows kept as bf16, one after another.
    raw: Vec<u16>,
    /// Each row: coded (its index among the coded rows) or kept (among the raw ones).
    places: Vec<Place>,
    in_dim: usize,
}

/// A coded row's exponents by code: `[high byte parts; 16]` then `[low byte parts; 16]`.
pub(super) type CodeTable = [u8; 32];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Place {
    Coded(u32),
    Raw(u32),
}

/// Codes 1..=15 stand for 15 consecutive exponents; code 0 for exponent 0.
const BINADES: u16 = 15;

impl CodedBf16 {
    /// Codes `bits` (`[rows, in_dim]`), or None where `in_dim` is not a multiple of 64. Rows
    /// are coded in parallel.
    pub fn encode(bits: &[u16], in_dim: usize) -> Option<Self> {
        if in_dim == 0 || !in_dim.is_multiple_of(BLOCK) || !bits.len().is_multiple_of(in_dim) {
            return None;
        }
        let lowest: Vec<Option<u16>> = bits.par_chunks_exact(in_dim).map(lowest_binade).collect();
        // (row, its lowest binade) of each coded row.
        let (mut coded, mut raw) = (Vec::new(), Vec::new());
        let places = (bits.chunks_exact(in_dim).zip(lowest).enumerate())
            .map(|(r, (row, lowest))| match lowest {
                Some(lowest) => {
                    coded.push((r, lowest));
                    Place::Coded((coded.len() - 1) as u32)
                }
                None => {
                    raw.extend_from_slice(row);
                    Place::Raw((raw.len() / in_dim - 1) as u32)
                }
            })
            .collect();
        let mut sign_mantissa = vec![0; coded.len() * in_dim];
        let mut codes = vec![0; coded.len() * in_dim / 2];
        (sign_mantissa.par_chunks_exact_mut(in_dim))
            .zip(codes.par_chunks_exact_mut(in_dim / 2))
            .zip(&coded)
            .for_each(|((sign_mantissa, codes), &(r, lowest))| {
                let row = &bits[r * in_dim..][..in_dim];
                for ((block, sign_mantissa), codes) in row
                    .chunks_exact(BLOCK)
                    .zip(sign_mantissa.chunks_exact_mut(BLOCK))
                    .zip(codes.chunks_exact_mut(BLOCK / 2))
                {
                    code_block(block, lowest, sign_mantissa, codes);
                }
            });
        Some(CodedBf16 {
            sign_mantissa,
            codes,
            tables: coded
                .iter()
                .map(|&(_, lowest)| code_table(lowest))
                .collect(),
            raw,
            places,
            in_dim,
        })
    }

    /// The kernels' view of the matrix.
    pub fn view(&self) -> Packed<'_> {
        Packed::Coded(CodedMatrix {
            sign_mantissa: &self.sign_mantissa,
            codes: &self.codes,
            tables: &self.tables,
            raw: &self.raw,
            places: &self.places,
            in_dim: self.in_dim,
        })
    }

    /// Bytes held: 1.5 a coded weight, 2 a kept one, 32 a coded row's table.
    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.sign_mantissa.len() + self.codes.len() + 32 * self.tables.len() + 2 * self.raw.len()
    }
}

/// One block of a row whose exponents lie in the 15 binades from `lowest`, in
/// `STORAGE_ORDER`.
fn code_block(block: &[u16], lowest: u16, sign_mantissa: &mut [u8], codes: &mut [u8]) {
    let code = |w: u16| match exponent(w) {
        0 => 0,
        e => (e - lowest + 1) as u8,
    };
    let stored = STORAGE_ORDER.map(|i| block[usize::from(i)]);
    for (out, &w) in sign_mantissa.iter_mut().zip(&stored) {
        *out = (w >> 8) as u8 & 0x80 | w as u8 & 0x7f;
    }
    let (low, high) = stored.split_at(BLOCK / 2);
    for ((out, &l), &h) in codes.iter_mut().zip(low).zip(high) {
        *out = code(l) | code(h) << 4;
    }
}

fn exponent(w: u16) -> u16 {
    w >> 7 & 0xff
}

/// The first of the 15 binades a row's nonzero exponents fit in, if they do (1 for a row
/// of zeros).
fn lowest_binade(row: &[u16]) -> Option<u16> {
    let nonzero = row.iter().map(|&w| exponent(w)).filter(|&e| e != 0);
    let (low, high) = nonzero.fold((u16::MAX, 0), |(l, h), e| (l.min(e), h.max(e)));
    let lowest = high.saturating_sub(BINADES - 1).max(1);
    (lowest <= low).then_some(lowest)
}

fn code_table(lowest: u16) -> CodeTable {
    let mut table = [0; 32];
    for code in 1..=BINADES {
        let e = lowest + code - 1;
        table[usize::from(code)] = (e >> 1) as u8;
        table[16 + usize::from(code)] = ((e & 1) << 7) as u8;
    }
    table
}

/// Stored weight `s`'s code in a block's code bytes.
#[inline(always)]
fn code_of(codes: &[u8], s: usize) -> u8 {
    codes[s % 32] >> (4 * (s / 32)) & 0x0f
}

/// The bf16 bits of the weight stored with sign and mantissa `sign_mantissa` and `code`.
#[inline(always)]
fn decode(sign_mantissa: u8, code: u8, table: &CodeTable) -> u16 {
    let (high, low) = (table[usize::from(code)], table[16 + usize::from(code)]);
    u16::from_be_bytes([sign_mantissa & 0x80 | high, sign_mantissa & 0x7f | low])
}

/// A block's 64 weights as bf16 bits, in order: the portable route to what the vector kernels
/// decode.
pub(super) fn decode_block(sign_mantissa: &[u8], codes: &[u8], table: &CodeTable) -> [u16; 64] {
    let mut block = [0; BLOCK];
    for (s, &i) in STORAGE_ORDER.iter().enumerate() {
        block[usize::from(i)] = decode(sign_mantissa[s], code_of(codes, s), table);
    }
    block
}

/// A block's 64 weights decoded one at a time to bf16, then widened 32 at a time.
///
/// # Safety
/// 64 sign-mantissa bytes and 32 code bytes are readable there, and the CPU has the
/// registers' features.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn decoded_pair<L: super::x86::Lanes>(
    sign_mantissa: *const u8,
    codes: *const u8,
    table: &CodeTable,
) -> [L; 2] {
    let block = unsafe {
        decode_block(
            std::slice::from_raw_parts(sign_mantissa, BLOCK),
            std::slice::from_raw_parts(codes, BLOCK / 2),
            table,
        )
    };
    unsafe {
        [
            L::widen_bf16(block.as_ptr()),
            L::widen_bf16(block.as_ptr().add(32)),
        ]
    }
}

/// `CodedBf16` as the kernels read it; tasks take rows of it.
#[derive(Clone, Copy)]
pub struct CodedMatrix<'a> {
    sign_mantissa: &'a [u8],
    codes: &'a [u8],
    tables: &'a [CodeTable],
    raw: &'a [u16],
    places: &'a [Place],
    in_dim: usize,
}

impl<'a> CodedMatrix<'a> {
    pub(super) fn elements(self) -> usize {
        self.places.len() * self.in_dim
    }

    pub(super) fn rows(self, range: std::ops::Range<usize>) -> Self {
        CodedMatrix {
            places: &self.places[range],
            ..self
        }
    }
}

/// A row of a `CodedMatrix`.
#[derive(Clone, Copy)]
pub(super) enum CodedRow<'a> {
    Coded {
        sign_mantissa: &'a [u8],
        codes: &'a [u8],
        table: &'a CodeTable,
    },
    Raw(Stored<'a, u16>),
}

impl<'a> Matrix for CodedMatrix<'a> {
    type Row = CodedRow<'a>;
    const WIDENS_IN_PAIRS: bool = true;

    #[inline(always)]
    fn row(self, r: usize, in_dim: usize) -> Self::Row {
        debug_assert_eq!(in_dim, self.in_dim);
        match self.places[r] {
            Place::Coded(k) => {
                let k = k as usize;
                CodedRow::Coded {
                    sign_mantissa: &self.sign_mantissa[k * in_dim..][..in_dim],
                    codes: &self.codes[k * in_dim / 2..][..in_dim / 2],
                    table: &self.tables[k],
                }
            }
            Place::Raw(k) => CodedRow::Raw(Stored(&self.raw[k as usize * in_dim..][..in_dim])),
        }
    }
}

impl Row for CodedRow<'_> {
    #[inline(always)]
    fn at(self, i: usize) -> f32 {
        match self {
            CodedRow::Coded {
                sign_mantissa,
                codes,
                table,
            } => {
                let (first, s) = (i / BLOCK * BLOCK, usize::from(SLOT_OF[i % BLOCK]));
                let code = code_of(&codes[first / 2..], s);
                widen(decode(sign_mantissa[first + s], code, table))
            }
            CodedRow::Raw(row) => row.at(i),
        }
    }

    /// Half of the block `lanes_pair` decodes: the AVX-512 kernels take coded rows 64 at a
    /// time; the AVX2 one, which only tests give coded rows, 32.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn lanes<L: super::x86::Lanes>(self, i: usize) -> L {
        let first = i / BLOCK * BLOCK;
        unsafe { self.lanes_pair::<L>(first)[(i - first) / super::LANES] }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn lanes_pair<L: super::x86::Lanes>(self, i: usize) -> [L; 2] {
        match self {
            CodedRow::Coded {
                sign_mantissa,
                codes,
                table,
            } => {
                debug_assert!(i.is_multiple_of(BLOCK) && i + BLOCK <= sign_mantissa.len());
                unsafe {
                    L::widen_coded_pair(
                        sign_mantissa.as_ptr().add(i),
                        codes.as_ptr().add(i / 2),
                        table,
                    )
                }
            }
            CodedRow::Raw(row) => unsafe { row.lanes_pair(i) },
        }
    }

    /// The sign-mantissa bytes ahead for the first half of a block, the codes for the
    /// second: both streams are prefetched.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn ahead(self, i: usize, elements: usize) -> *const i8 {
        match self {
            CodedRow::Coded {
                sign_mantissa,
                codes,
                ..
            } => {
                if (i / super::LANES).is_multiple_of(2) {
                    sign_mantissa.as_ptr().wrapping_add(i + elements).cast()
                } else {
                    codes.as_ptr().wrapping_add((i + elements) / 2).cast()
                }
            }
            CodedRow::Raw(row) => row.ahead(i, elements),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows with exponents across 15 binades and zeros, subnormals and both signs code; a row
    /// spanning 16 binades stays bf16; every weight decodes to its own bits.
    #[test]
    fn coding_keeps_every_bit() {
        let in_dim = 128;
        let mut bits: Vec<u16> = (0..3 * in_dim)
            .map(|i| {
                let e = 100 + (i * 7 % 15) as u16;
                (i as u16 & 1) << 15 | e << 7 | (i * 13 % 128) as u16
            })
            .collect();
        bits[5] = 0;
        bits[6] = 0x8001; // −subnormal
        bits[in_dim + 9] = 99 << 7; // row 1 now spans 16 binades
        let coded = CodedBf16::encode(&bits, in_dim).unwrap();
        assert_eq!(
            coded.places,
            [Place::Coded(0), Place::Raw(0), Place::Coded(1)]
        );
        assert_eq!(coded.bytes(), 2 * (in_dim * 3 / 2 + 32) + 2 * in_dim);
        let Packed::Coded(m) = coded.view() else {
            unreachable!()
        };
        for (r, row) in bits.chunks_exact(in_dim).enumerate() {
            let got: Vec<u32> = (0..in_dim)
                .map(|i| m.row(r, in_dim).at(i).to_bits())
                .collect();
            let want: Vec<u32> = row.iter().map(|&w| widen(w).to_bits()).collect();
            assert_eq!(got, want, "row {r}");
        }
        assert!(CodedBf16::encode(&bits, 96).is_none());
    }

    #[test]
    fn a_row_takes_the_binades_its_exponents_span() {
        let row = |exponents: &[u16]| exponents.iter().map(|e| e << 7).collect::<Vec<u16>>();
        assert_eq!(lowest_binade(&row(&[0, 0])), Some(1));
        assert_eq!(lowest_binade(&row(&[3, 0, 9])), Some(1));
        assert_eq!(lowest_binade(&row(&[120, 134, 0])), Some(120));
        assert_eq!(lowest_binade(&row(&[120, 130])), Some(116));
        assert_eq!(lowest_binade(&row(&[119, 134])), None);
        assert_eq!(lowest_binade(&row(&[1, 15])), Some(1));
        assert_eq!(lowest_binade(&row(&[1, 16])), None);
    }
}
