//! A safetensors header parsed and checked against its file before any tensor is read:
//! every entry's dtype, shape and data offsets must agree and stay inside the data.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use super::Dtype;

/// Where one tensor lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub(super) shard: usize,
    /// Byte range within the shard's mapping (header already skipped).
    pub(super) start: usize,
    pub(super) end: usize,
}

/// Parses and checks a safetensors header: `u64` little-endian header length, a JSON object
/// of `name → {dtype, shape, data_offsets}`, then the data those offsets index. Errors carry
/// the tensor name where there is one.
pub(super) fn parse_header(
    file: &[u8],
) -> Result<HashMap<String, TensorInfo>, (Option<String>, String)> {
    let whole = |message: String| (None, message);
    let len_bytes: [u8; 8] = file
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            whole(format!(
                "{} bytes is too short for a safetensors header",
                file.len()
            ))
        })?;
    let header_len = u64::from_le_bytes(len_bytes);
    let data_start = usize::try_from(header_len)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&end| end <= file.len())
        .ok_or_else(|| {
            whole(format!(
                "header length {header_len} runs past the end of the file ({} bytes)",
                file.len()
            ))
        })?;
    let header: BTreeMap<String, Value> = serde_json::from_slice(&file[8..data_start])
        .map_err(|e| whole(format!("header is not a JSON object: {e}")))?;
    let data_len = file.len() - data_start;
    let mut tensors = HashMap::new();
    for (name, entry) in header {
        if name == "__metadata__" {
            continue;
        }
        let info = tensor_info(&entry, data_start, data_len)
            .map_err(|message| (Some(name.clone()), message))?;
        tensors.insert(name, info);
    }
    Ok(tensors)
}

fn tensor_info(entry: &Value, data_start: usize, data_len: usize) -> Result<TensorInfo, String> {
    let dtype_name = entry
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or("no dtype")?;
    let dtype = Dtype::parse(dtype_name)
        .ok_or_else(|| format!("dtype {dtype_name} is not supported (F32, F16, BF16, F8_E4M3)"))?;
    let shape: Vec<usize> = entry
        .get("shape")
        .and_then(Value::as_array)
        .ok_or("no shape")?
        .iter()
        .map(|d| {
            d.as_u64()
                .and_then(|d| usize::try_from(d).ok())
                .ok_or_else(|| format!("shape entry {d} is not a size"))
        })
        .collect::<Result<_, _>>()?;
    let offsets = entry
        .get("data_offsets")
        .and_then(Value::as_array)
        .ok_or("no data_offsets")?;
    let offset = |i: usize| {
        offsets
            .get(i)
            .and_then(Value::as_u64)
            .and_then(|o| usize::try_from(o).ok())
    };
    let (Some(begin), Some(end), 2) = (offset(0), offset(1), offsets.len()) else {
        return Err(format!("data_offsets {offsets:?} is not [begin, end]"));
    };
    if begin > end || end > data_len {
        return Err(format!(
            "data_offsets [{begin}, {end}] fall outside the {data_len} data bytes"
        ));
    }
    let bytes = shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    if bytes != end - begin {
        return Err(format!(
            "shape {shape:?} of {dtype_name} needs {bytes} bytes, data_offsets give {}",
            end - begin
        ));
    }
    Ok(TensorInfo {
        dtype,
        shape,
        shard: 0,
        start: data_start + begin,
        end: data_start + end,
    })
}

#[cfg(test)]
mod tests {
    use crate::weights::tests_support::{TempDir, f32_bytes, open, safetensors};
    use crate::weights::{Checkpoint, SINGLE_FILE};

    #[test]
    fn bad_files_are_errors_naming_file_and_tensor() {
        let good = safetensors(&[("t", "F32", vec![2], f32_bytes(&[1.0, 2.0]))]);
        let err = open(&good[..good.len() - 1]).err().unwrap().to_string();
        assert!(
            err.contains(
                "model.safetensors: tensor t: data_offsets [0, 8] fall outside the 7 data bytes"
            ),
            "{err}"
        );
        let err = open(&good[..5]).err().unwrap().to_string();
        assert!(
            err.ends_with("5 bytes is too short for a safetensors header"),
            "{err}"
        );
        let mut huge = good.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(
            open(&huge)
                .err()
                .unwrap()
                .to_string()
                .contains("runs past the end of the file")
        );
        let lying = safetensors(&[("t", "F32", vec![3], f32_bytes(&[1.0, 2.0]))]);
        assert!(
            open(&lying)
                .err()
                .unwrap()
                .to_string()
                .contains("tensor t: shape [3] of F32 needs 12 bytes, data_offsets give 8")
        );
        let odd = safetensors(&[("t", "I64", vec![1], vec![0; 8])]);
        assert!(
            open(&odd)
                .err()
                .unwrap()
                .to_string()
                .contains("tensor t: dtype I64 is not supported")
        );
        let ckpt = open(&good).unwrap();
        let err = ckpt.load_f32("t", &[1, 2]).unwrap_err().to_string();
        assert!(
            err.ends_with("model.safetensors: tensor t: shape [2], expected [1, 2]"),
            "{err}"
        );
        let err = ckpt.load_f32("nope", &[1]).unwrap_err().to_string();
        assert!(
            err.ends_with("tensor nope: not found in the checkpoint"),
            "{err}"
        );
    }

    /// Seeded byte mutations of valid checkpoints: every case must end in Ok or an error.
    #[test]
    fn ten_thousand_mutated_headers_never_panic() {
        let base = safetensors(&[
            ("w.weight", "F8_E4M3", vec![3, 5], vec![0x38u8; 15]),
            (
                "w.weight_scale_inv",
                "F32",
                vec![2, 3],
                f32_bytes(&[1.0; 6]),
            ),
            ("n", "BF16", vec![2, 2], vec![0; 8]),
        ]);
        let dir = TempDir::new("fuzz");
        let mut rng = crate::sampling::Rng::new(0x9e37_79b9_7f4a_7c15);
        let mut next = move || rng.next_u64();
        let mut opened = 0;
        for _ in 0..10_000 {
            let mut bytes = base.clone();
            match next() % 4 {
                0 => bytes.truncate(next() as usize % bytes.len()),
                1 => {
                    let header_end =
                        8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
                    for _ in 0..1 + next() % 4 {
                        let at = next() as usize % header_end;
                        bytes[at] = next() as u8;
                    }
                }
                2 => {
                    // splice digits into the header's numbers
                    let at = 8 + next() as usize % (bytes.len() - 8);
                    let digits = (next() % 100_000_000_000).to_string();
                    bytes.splice(at..at, digits.bytes());
                }
                _ => {
                    let at = next() as usize % bytes.len();
                    bytes[at] ^= 1 << (next() % 8);
                }
            }
            dir.write(SINGLE_FILE, &bytes);
            if let Ok(ckpt) = Checkpoint::open(&dir.0).map(|c| c.with_fp8_block([2, 2])) {
                opened += 1;
                let names: Vec<String> = ckpt.names().map(str::to_string).collect();
                for name in names {
                    let shape = ckpt.info(&name).unwrap().shape.clone();
                    let _ = ckpt.load_f32(&name, &shape);
                }
            }
        }
        assert!(
            opened > 0,
            "some mutations (data bytes) keep the file valid"
        );
    }
}
