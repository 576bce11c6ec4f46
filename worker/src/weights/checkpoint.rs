//! An opened checkpoint: its files (one, or the shards `model.safetensors.index.json`
//! names) mapped, their headers checked, and tensors loaded from them by name.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde_json::Value;

use super::dtype::to_f32;
use super::fp8::{E4M3_AS_F16_FACTOR, Fp8Weights};
use super::header::{TensorInfo, parse_header};
use super::progress::Progress;
use super::{Bf16Weights, DEFAULT_FP8_BLOCK, Dtype, INDEX_FILE, LoadError, SINGLE_FILE};

struct Shard {
    path: PathBuf,
    map: Arc<Mmap>,
}

/// An opened checkpoint: every shard mapped and its header checked.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    tensors: HashMap<String, TensorInfo>,
    /// FP8 block shape (`quantization_config.weight_block_size`).
    pub(super) fp8_block: [usize; 2],
    pub(super) progress: Option<Progress>,
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or every shard that `dir/model.safetensors.index.json`
    /// names.
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        let index_path = dir.join(INDEX_FILE);
        let files: Vec<(PathBuf, Option<Vec<String>>)> = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| file_error(&index_path, e))?;
            shards_of_index(&text)
                .map_err(|message| LoadError {
                    file: index_path.clone(),
                    tensor: None,
                    message,
                })?
                .into_iter()
                .map(|(file, names)| (dir.join(file), Some(names)))
                .collect()
        } else {
            vec![(dir.join(SINGLE_FILE), None)]
        };
        let mut checkpoint = Checkpoint {
            dir: dir.to_path_buf(),
            shards: Vec::new(),
            tensors: HashMap::new(),
            fp8_block: DEFAULT_FP8_BLOCK,
            progress: None,
        };
        for (path, expected) in files {
            let (map, tensors) = map_checked(&path)?;
            let shard = checkpoint.shards.len();
            let missing = expected
                .and_then(|names| names.into_iter().find(|name| !tensors.contains_key(name)));
            if let Some(missing) = missing {
                return Err(LoadError {
                    file: path,
                    tensor: Some(missing),
                    message: format!("listed in {INDEX_FILE} but not in this file"),
                });
            }
            for (name, mut info) in tensors {
                info.shard = shard;
                checkpoint.tensors.insert(name, info);
            }
            checkpoint.shards.push(Shard { path, map });
        }
        Ok(checkpoint)
    }

    /// Sets the FP8 block shape from the model config.
    pub fn with_fp8_block(mut self, block: [usize; 2]) -> Self {
        self.fp8_block = block;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn info(&self, name: &str) -> Result<&TensorInfo, LoadError> {
        self.tensors.get(name).ok_or_else(|| LoadError {
            file: self.dir.clone(),
            tensor: Some(name.to_string()),
            message: "not found in the checkpoint".into(),
        })
    }

    /// Total bytes of the named tensors (for progress reporting).
    pub fn bytes_of<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> usize {
        names
            .into_iter()
            .filter_map(|n| self.tensors.get(n))
            .map(|t| t.end - t.start)
            .sum()
    }

    /// The tensor as f32 in row-major order, checked to have `shape`. FP8 tensors are
    /// dequantised with `{name}_scale_inv`.
    pub fn load_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, LoadError> {
        let info = self.info(name)?;
        if info.shape != shape {
            return Err(self.error(
                info,
                name,
                format!("shape {:?}, expected {shape:?}", info.shape),
            ));
        }
        let bytes = self.bytes(info);
        self.advance(bytes.len());
        let mut values = to_f32(info.dtype, bytes);
        if info.dtype == Dtype::F8E4M3 {
            self.apply_block_scales(name, info, &mut values)?;
        }
        Ok(values)
    }

    /// A BF16 tensor checked to have `shape`, kept in bf16 (for weights used as stored).
    pub fn load_bf16(&self, name: &str, shape: &[usize]) -> Result<Bf16Weights, LoadError> {
        let info = self.info(name)?;
        if info.shape != shape || info.dtype != Dtype::Bf16 {
            let message = format!("{:?} {:?}, expected BF16 {shape:?}", info.dtype, info.shape);
            return Err(self.error(info, name, message));
        }
        self.advance(info.end - info.start);
        Ok(Bf16Weights::mapped(
            &self.shards[info.shard].map,
            info.start,
            info.end,
        ))
    }

    /// An FP8 tensor checked to have `shape`, kept as its e4m3 bytes, with its block scales
    /// (`{name}_scale_inv`, [⌈rows/block⌉, ⌈cols/block⌉] as f32): for FP8 tensor cores.
    pub fn load_fp8(&self, name: &str, shape: &[usize]) -> Result<(Vec<u8>, Vec<f32>), LoadError> {
        let info = self.fp8_info(name, shape)?;
        let bytes = self.bytes(info).to_vec();
        self.advance(bytes.len());
        let scales = self.block_scales(name, info)?;
        Ok((bytes, scales))
    }

    /// An FP8 tensor checked to have `shape` and finite values, read in place from the
    /// mapping, with its block scales spread over the columns: for the CPU kernels.
    pub fn load_fp8_in_place(&self, name: &str, shape: &[usize]) -> Result<Fp8Weights, LoadError> {
        let info = self.fp8_info(name, shape)?;
        let bytes = self.bytes(info);
        if let Some(i) = first_nan(bytes) {
            let message = format!("element {i} is NaN (e4m3 byte {:#04x})", bytes[i]);
            return Err(self.error(info, name, message));
        }
        self.advance(bytes.len());
        let scales = self.block_scales(name, info)?;
        // The kernels multiply by scale · 2⁸, which must stay finite (and 0 · scale zero).
        let usable = |s: &f32| s.is_finite() && s.abs() < f32::MAX / E4M3_AS_F16_FACTOR;
        if let Some(bad) = scales.iter().find(|s| !usable(s)) {
            let message = format!("block scale {bad} is not a finite scale below 2^120");
            return Err(self.error(info, &format!("{name}_scale_inv"), message));
        }
        Ok(Fp8Weights::new(
            &self.shards[info.shard].map,
            info.start..info.end,
            &scales,
            self.fp8_block,
        ))
    }

    fn fp8_info(&self, name: &str, shape: &[usize]) -> Result<&TensorInfo, LoadError> {
        let info = self.info(name)?;
        if info.shape != shape || info.dtype != Dtype::F8E4M3 {
            let message = format!(
                "{:?} {:?}, expected F8E4M3 {shape:?}",
                info.dtype, info.shape
            );
            return Err(self.error(info, name, message));
        }
        Ok(info)
    }

    pub(super) fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.shards[info.shard].map[info.start..info.end]
    }

    pub(super) fn error(&self, info: &TensorInfo, name: &str, message: String) -> LoadError {
        LoadError {
            file: self.shards[info.shard].path.clone(),
            tensor: Some(name.to_string()),
            message,
        }
    }
}

/// The first e4m3 NaN (`S.1111.111`): whole pages are tested without a branch per byte,
/// which the compiler vectorises, so the check costs little more than reading the bytes.
fn first_nan(bytes: &[u8]) -> Option<usize> {
    let is_nan = |b: &u8| b & 0x7f == 0x7f;
    let page = bytes
        .chunks(4096)
        .position(|page| page.iter().fold(false, |nan, b| nan | is_nan(b)))?;
    Some(page * 4096 + bytes[page * 4096..].iter().position(is_nan)?)
}

/// A safetensors file mapped, with its header parsed and checked against its data.
fn map_checked(path: &Path) -> Result<(Arc<Mmap>, HashMap<String, TensorInfo>), LoadError> {
    let file = File::open(path).map_err(|e| file_error(path, e))?;
    // SAFETY: the mapping is read-only and every access is bounds-checked against its
    // length; a file truncated by someone else while mapped is outside what any loader can
    // defend against.
    let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| file_error(path, e))?);
    let tensors = parse_header(&map).map_err(|(tensor, message)| LoadError {
        file: path.to_path_buf(),
        tensor,
        message,
    })?;
    Ok((map, tensors))
}

/// Checks a safetensors file's header against its data without reading a tensor: what a
/// download verifies before it calls a file done.
pub fn check_safetensors(path: &Path) -> Result<(), LoadError> {
    map_checked(path).map(|_| ())
}

fn file_error(path: &Path, err: std::io::Error) -> LoadError {
    LoadError {
        file: path.to_path_buf(),
        tensor: None,
        message: err.to_string(),
    }
}

/// `weight_map` of an index file grouped by shard file name, in name order.
fn shards_of_index(text: &str) -> Result<BTreeMap<String, Vec<String>>, String> {
    let index: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or("no \"weight_map\" object")?;
    let mut shards: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| format!("weight_map[{tensor:?}] is not a file name"))?;
        // Shards live beside the index; a path elsewhere is not a shard of this checkpoint.
        if file.is_empty() || file.contains('/') || file.contains('\\') || file == ".." {
            return Err(format!(
                "weight_map[{tensor:?}] = {file:?} is not a file name in this directory"
            ));
        }
        shards
            .entry(file.to_string())
            .or_default()
            .push(tensor.clone());
    }
    if shards.is_empty() {
        return Err("weight_map is empty".into());
    }
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::tests_support::{TempDir, f32_bytes, safetensors};

    #[test]
    fn sharded_checkpoints_follow_their_index() {
        let dir = TempDir::new("shards");
        dir.write(
            "a.safetensors",
            &safetensors(&[("x", "F32", vec![1], f32_bytes(&[1.0]))]),
        );
        dir.write(
            "b.safetensors",
            &safetensors(&[("y", "F32", vec![1], f32_bytes(&[2.0]))]),
        );
        dir.write(
            INDEX_FILE,
            br#"{"metadata": {}, "weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}"#,
        );
        let ckpt = Checkpoint::open(&dir.0).unwrap();
        assert_eq!(ckpt.load_f32("y", &[1]).unwrap(), [2.0]);
        assert_eq!(ckpt.bytes_of(["x", "y"]), 8);

        dir.write(
            INDEX_FILE,
            br#"{"weight_map": {"x": "a.safetensors", "z": "a.safetensors"}}"#,
        );
        let err = Checkpoint::open(&dir.0).err().unwrap().to_string();
        assert!(err.ends_with("a.safetensors: tensor z: listed in model.safetensors.index.json but not in this file"), "{err}");
        dir.write(INDEX_FILE, br#"{"weight_map": {"x": "../a.safetensors"}}"#);
        assert!(
            Checkpoint::open(&dir.0)
                .err()
                .unwrap()
                .to_string()
                .contains("is not a file name in this directory")
        );
        dir.write(
            INDEX_FILE,
            br#"{"weight_map": {"x": "missing.safetensors"}}"#,
        );
        assert!(
            Checkpoint::open(&dir.0)
                .err()
                .unwrap()
                .to_string()
                .contains("missing.safetensors: No such file")
        );
    }
}
