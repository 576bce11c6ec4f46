//! The element types a checkpoint may hold, their conversion to f32, and BF16 weights read
//! in place from the mapping.

use std::sync::Arc;

use memmap2::Mmap;

use super::fp8::fp8_e4m3_to_f32;

/// Element types a checkpoint may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
    F8E4M3,
}

impl Dtype {
    pub(super) fn parse(name: &str) -> Option<Self> {
        match name {
            "F32" => Some(Dtype::F32),
            "F16" => Some(Dtype::F16),
            "BF16" => Some(Dtype::Bf16),
            "F8_E4M3" => Some(Dtype::F8E4M3),
            _ => None,
        }
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::F8E4M3 => 1,
        }
    }
}

/// A BF16 tensor's elements, borrowed from the checkpoint's mapping when it is aligned (no
/// copy, no extra memory: the page cache holds the weights), copied otherwise.
pub struct Bf16Weights(Bf16Storage);

enum Bf16Storage {
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    Owned(Vec<u16>),
}

impl Bf16Weights {
    pub fn bits(&self) -> &[u16] {
        match &self.0 {
            Bf16Storage::Mapped { map, start, len } => {
                let bytes = &map[*start..*start + 2 * len];
                // SAFETY: `mapped` checked that these bytes are 2-aligned and the target is
                // little-endian, so they are `len` valid u16 in place; the mapping is
                // read-only and lives as long as `self`.
                unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<u16>(), *len) }
            }
            Bf16Storage::Owned(bits) => bits,
        }
    }

    /// Gives the tensor's pages back once nothing reads them (its weights were copied into
    /// another form): a mapped tensor's leave this process's resident memory, the file's
    /// page cache keeps them while the kernel finds room.
    pub fn release(self) {
        #[cfg(target_os = "linux")]
        if let Bf16Storage::Mapped { map, start, len } = &self.0 {
            // SAFETY: the mapping is shared and read-only, so dropped pages read back from
            // the file unchanged if anything (a tensor sharing a page) touches them again.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, *start, 2 * len)
            };
        }
    }

    pub(super) fn mapped(map: &Arc<Mmap>, start: usize, end: usize) -> Self {
        let bytes = &map[start..end];
        if cfg!(target_endian = "little") && bytes.as_ptr().align_offset(2) == 0 {
            // Map the pages now, at load, rather than fault them in one by one inside the
            // first request's kernels. A kernel without MADV_POPULATE_READ (before Linux
            // 5.14) refuses the advice, and the pages fault in on first use as before.
            #[cfg(target_os = "linux")]
            let _ = map.advise_range(memmap2::Advice::PopulateRead, start, end - start);
            Bf16Weights(Bf16Storage::Mapped {
                map: Arc::clone(map),
                start,
                len: bytes.len() / 2,
            })
        } else {
            Bf16Weights(Bf16Storage::Owned(
                bytes
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .collect(),
            ))
        }
    }
}

pub(super) fn to_f32(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::Bf16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F8E4M3 => bytes.iter().map(|&b| fp8_e4m3_to_f32(b)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use crate::weights::tests_support::{f32_bytes, open, safetensors};

    #[test]
    fn loads_each_dtype_as_f32() {
        let bf16: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let f16: Vec<u8> = [0.25f32]
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let ckpt = open(&safetensors(&[
            ("a", "F32", vec![2], f32_bytes(&[1.0, 2.0])),
            ("b", "BF16", vec![1, 2], bf16),
            ("c", "F16", vec![1], f16),
        ]))
        .unwrap();
        assert_eq!(ckpt.load_f32("a", &[2]).unwrap(), [1.0, 2.0]);
        assert_eq!(ckpt.load_f32("b", &[1, 2]).unwrap(), [1.5, -2.0]);
        assert_eq!(ckpt.load_f32("c", &[1]).unwrap(), [0.25]);
    }

    #[test]
    fn bf16_weights_are_read_in_place_or_copied_when_unaligned() {
        let bits: Vec<u8> = [1.5f32, -2.0, 0.25]
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        // a one-byte tensor first leaves the bf16 one at an odd offset: it must be copied
        for tensors in [
            vec![("b", "BF16", vec![3], bits.clone())],
            vec![
                ("pad", "F8_E4M3", vec![1], vec![0]),
                ("b", "BF16", vec![3], bits.clone()),
            ],
        ] {
            let ckpt = open(&safetensors(&tensors)).unwrap();
            let weights = ckpt.load_bf16("b", &[3]).unwrap();
            let values: Vec<f32> = weights
                .bits()
                .iter()
                .map(|&b| half::bf16::from_bits(b).to_f32())
                .collect();
            assert_eq!(values, [1.5, -2.0, 0.25]);
        }
        let ckpt = open(&safetensors(&[("f", "F32", vec![1], f32_bytes(&[1.0]))])).unwrap();
        assert!(
            ckpt.load_bf16("f", &[1])
                .is_err_and(|e| e.to_string().ends_with("F32 [1], expected BF16 [1]"))
        );
    }
}
