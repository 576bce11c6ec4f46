//! FP8 e4m3 weights: the byte decoding, and dequantisation with the `weight_scale_inv`
//! block scales (`w[i][j] = f32(q[i][j]) * scale_inv[i / block_rows][j / block_cols]`).

use std::ops::Range;
use std::sync::Arc;

use memmap2::Mmap;

use super::dtype::to_f32;
use super::{Checkpoint, Dtype, LoadError, TensorInfo};

/// The CPU kernels read an e4m3 byte as the f16 with the same sign, exponent and mantissa
/// bits (a shift and a mask, then the hardware's f16 conversion), which is its value times
/// 2⁻⁸ for normal and subnormal numbers alike: the scales they multiply by carry the 2⁸.
pub const E4M3_AS_F16_FACTOR: f32 = 256.0;

/// An FP8 weight matrix `[rows, cols]`: its e4m3 bytes read in place from the checkpoint's
/// mapping (the page cache holds them, one byte per weight), and its block scales
/// `[⌈rows / block_rows⌉, ⌈cols / block_cols⌉]`, each times [`E4M3_AS_F16_FACTOR`].
pub struct Fp8Weights {
    map: Arc<Mmap>,
    bytes: Range<usize>,
    block_scales: Vec<f32>,
    block: [usize; 2],
}

impl Fp8Weights {
    /// `scales` as the checkpoint stores them (`weight_scale_inv`), for `block`
    /// `[block_rows, block_cols]`.
    pub(super) fn new(
        map: &Arc<Mmap>,
        bytes: Range<usize>,
        scales: &[f32],
        block: [usize; 2],
    ) -> Self {
        Fp8Weights {
            map: Arc::clone(map),
            bytes,
            // Exact: a power of two.
            block_scales: scales.iter().map(|s| s * E4M3_AS_F16_FACTOR).collect(),
            block,
        }
    }

    /// The e4m3 bytes, row-major.
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.bytes.clone()]
    }

    /// `[⌈rows / block_rows⌉, ⌈cols / block_cols⌉]`: element (i, j)'s scale times 2⁸ is at
    /// `(i / block_rows) · ⌈cols / block_cols⌉ + j / block_cols`.
    pub fn block_scales(&self) -> &[f32] {
        &self.block_scales
    }

    /// `[block_rows, block_cols]`.
    pub fn block(&self) -> [usize; 2] {
        self.block
    }
}

impl Checkpoint {
    pub(super) fn apply_block_scales(
        &self,
        name: &str,
        info: &TensorInfo,
        values: &mut [f32],
    ) -> Result<(), LoadError> {
        let scales = self.block_scales(name, info)?;
        if !values.is_empty() {
            let [block_rows, block_cols] = self.fp8_block;
            let scale_cols = info.shape[1].div_ceil(block_cols);
            dequantise_blocks(
                values,
                info.shape[1],
                &scales,
                scale_cols,
                [block_rows, block_cols],
            );
        }
        Ok(())
    }

    /// The checked block scales of FP8 weight `name` (empty for an empty matrix).
    pub(super) fn block_scales(
        &self,
        name: &str,
        info: &TensorInfo,
    ) -> Result<Vec<f32>, LoadError> {
        let [rows, cols] = info.shape[..] else {
            return Err(self.error(
                info,
                name,
                format!("FP8 weights must be 2-D, got shape {:?}", info.shape),
            ));
        };
        let scale_name = format!("{name}_scale_inv");
        let scale_info = self.info(&scale_name).map_err(|mut e| {
            e.message = format!("missing: FP8 weight {name} needs its block scales");
            e
        })?;
        let [scale_rows, scale_cols] = scale_info.shape[..] else {
            return Err(self.error(
                scale_info,
                &scale_name,
                format!("shape {:?} is not 2-D", scale_info.shape),
            ));
        };
        if rows == 0 || cols == 0 {
            return Ok(Vec::new());
        }
        if scale_info.dtype == Dtype::F8E4M3 || scale_rows == 0 || scale_cols == 0 {
            return Err(self.error(
                scale_info,
                &scale_name,
                "block scales must be f32, bf16 or f16 and non-empty".into(),
            ));
        }
        // Blocks cover the matrix with partial blocks at the edges: ceil(rows / block).
        let [block_rows, block_cols] = self.fp8_block;
        let expected = [rows.div_ceil(block_rows), cols.div_ceil(block_cols)];
        if [scale_rows, scale_cols] != expected {
            return Err(self.error(
                scale_info,
                &scale_name,
                format!(
                    "shape {:?}, expected {expected:?} for a {rows}×{cols} weight in {block_rows}×{block_cols} blocks",
                    scale_info.shape
                ),
            ));
        }
        Ok(to_f32(scale_info.dtype, self.bytes(scale_info)))
    }
}

/// `values` is a row-major matrix with `cols` columns; multiplies each element by the scale
/// of its block.
fn dequantise_blocks(
    values: &mut [f32],
    cols: usize,
    scales: &[f32],
    scale_cols: usize,
    block: [usize; 2],
) {
    for (i, row) in values.chunks_exact_mut(cols).enumerate() {
        let scale_row = &scales[(i / block[0]) * scale_cols..][..scale_cols];
        for (j, value) in row.iter_mut().enumerate() {
            *value *= scale_row[j / block[1]];
        }
    }
}

/// OCP FP8 E4M3 ("fn": no infinities; S.1111.111 is NaN), exponent bias 7.
pub fn fp8_e4m3_to_f32(byte: u8) -> f32 {
    let sign = if byte & 0x80 != 0 { -1.0 } else { 1.0 };
    let exponent = i32::from((byte >> 3) & 0x0f);
    let mantissa = f32::from(byte & 0x07);
    match exponent {
        0 => sign * mantissa / 8.0 * 2f32.powi(-6),
        15 if mantissa == 7.0 => f32::NAN,
        _ => sign * (1.0 + mantissa / 8.0) * 2f32.powi(exponent - 7),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::tests_support::{f32_bytes, open, safetensors};

    #[test]
    fn fp8_e4m3_decodes_like_the_ocp_spec() {
        assert_eq!(fp8_e4m3_to_f32(0x00), 0.0);
        assert_eq!(fp8_e4m3_to_f32(0x38), 1.0);
        assert_eq!(fp8_e4m3_to_f32(0xb8), -1.0);
        assert_eq!(fp8_e4m3_to_f32(0x7e), 448.0);
        assert_eq!(fp8_e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(fp8_e4m3_to_f32(0x3c), 1.5);
        assert!(fp8_e4m3_to_f32(0x7f).is_nan() && fp8_e4m3_to_f32(0xff).is_nan());
        // every byte agrees with an independent enumeration of the value grid
        for byte in 0..=255u8 {
            let ours = fp8_e4m3_to_f32(byte);
            let theirs = float8_reference(byte);
            assert!(
                ours == theirs || (ours.is_nan() && theirs.is_nan()),
                "{byte:#04x}: {ours} vs {theirs}"
            );
        }
    }

    /// Independent decoding: enumerate the value grid directly.
    fn float8_reference(byte: u8) -> f32 {
        let magnitude = byte & 0x7f;
        let value = if magnitude == 0x7f {
            f32::NAN
        } else if magnitude < 8 {
            f32::from(magnitude) * 2f32.powi(-9)
        } else {
            let e = (magnitude >> 3) as i32 - 7;
            (8.0 + f32::from(magnitude & 7)) * 2f32.powi(e - 3)
        };
        if byte & 0x80 != 0 { -value } else { value }
    }

    #[test]
    fn fp8_weights_use_their_block_scales_with_partial_edge_blocks() {
        // a 3×5 weight in 2×2 blocks → a 2×3 scale grid; every q is 1.0 (0x38)
        let q = vec![0x38u8; 15];
        let scales = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let ckpt = open(&safetensors(&[
            ("w.weight", "F8_E4M3", vec![3, 5], q),
            ("w.weight_scale_inv", "F32", vec![2, 3], f32_bytes(&scales)),
        ]))
        .unwrap();
        let w = ckpt.load_f32("w.weight", &[3, 5]).unwrap();
        assert_eq!(
            w,
            [1., 1., 2., 2., 3., 1., 1., 2., 2., 3., 4., 4., 5., 5., 6.]
        );
    }

    #[test]
    fn fp8_weights_in_place_carry_each_elements_block_scale_and_refuse_nan() {
        // the 3×5 weight of the test above, q = 1.0 except element 6 (0xc0: −2.0)
        let mut q = vec![0x38u8; 15];
        q[6] = 0xc0;
        let tensors = |q: Vec<u8>, scales: [f32; 6]| {
            safetensors(&[
                ("w.weight", "F8_E4M3", vec![3, 5], q),
                ("w.weight_scale_inv", "F32", vec![2, 3], f32_bytes(&scales)),
            ])
        };
        let scales = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let ckpt = open(&tensors(q.clone(), scales)).unwrap();
        let dequantised = ckpt.load_f32("w.weight", &[3, 5]).unwrap();
        let w = ckpt.load_fp8_in_place("w.weight", &[3, 5]).unwrap();
        assert_eq!(w.bytes(), q);
        assert_eq!(w.block(), [2, 2]);
        let in_place: Vec<f32> = (0..15)
            .map(|k| {
                let scale = w.block_scales()[(k / 5) / 2 * 3 + k % 5 / 2] / E4M3_AS_F16_FACTOR;
                fp8_e4m3_to_f32(w.bytes()[k]) * scale
            })
            .collect();
        assert_eq!(in_place, dequantised);
        let refusal = |q: Vec<u8>, scales| {
            let ckpt = open(&tensors(q, scales)).unwrap();
            ckpt.load_fp8_in_place("w.weight", &[3, 5])
                .err()
                .unwrap()
                .to_string()
        };
        let infinite = [1.0, 2.0, f32::INFINITY, 4.0, 5.0, 6.0];
        let err = refusal(q.clone(), infinite);
        assert!(
            err.ends_with("block scale inf is not a finite scale below 2^120"),
            "{err}"
        );
        q[7] = 0xff;
        let err = refusal(q, scales);
        assert!(
            err.ends_with("tensor w.weight: element 7 is NaN (e4m3 byte 0xff)"),
            "{err}"
        );
    }

    #[test]
    fn fp8_without_scales_or_with_a_wrong_grid_is_an_error() {
        let q = ("w.weight", "F8_E4M3", vec![3, 5], vec![0x38u8; 15]);
        let err = open(&safetensors(std::slice::from_ref(&q)))
            .unwrap()
            .load_f32("w.weight", &[3, 5])
            .unwrap_err();
        assert!(
            err.to_string().ends_with(
                "tensor w.weight_scale_inv: missing: FP8 weight w.weight needs its block scales"
            ),
            "{err}"
        );
        let bad_grid = (
            "w.weight_scale_inv",
            "F32",
            vec![2, 2],
            f32_bytes(&[1.0; 4]),
        );
        let err = open(&safetensors(&[q, bad_grid]))
            .unwrap()
            .load_f32("w.weight", &[3, 5])
            .unwrap_err();
        assert!(
            err.to_string()
                .ends_with("shape [2, 2], expected [2, 3] for a 3×5 weight in 2×2 blocks"),
            "{err}"
        );
    }
}
