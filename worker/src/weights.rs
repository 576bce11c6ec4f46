//! Checkpoint loading: safetensors files (single or sharded through
//! `model.safetensors.index.json`), memory-mapped, read as f32.
//!
//! Every header is checked against its file before any tensor is read: a missing tensor, a
//! wrong shape or dtype, a truncated file or offsets that point outside the data are errors
//! naming the tensor and the file, never a panic or an out-of-bounds read. FP8 e4m3 weights
//! are dequantised with their `weight_scale_inv` block scales:
//! `w[i][j] = f32(q[i][j]) * scale_inv[i / block_rows][j / block_cols]`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use memmap2::Mmap;
use serde_json::Value;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Element types a checkpoint may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
    F8E4M3,
}

impl Dtype {
    fn parse(name: &str) -> Option<Self> {
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

/// Where one tensor lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    shard: usize,
    /// Byte range within the shard's mapping (header already skipped).
    start: usize,
    end: usize,
}

/// A load failure, naming the file and, where there is one, the tensor.
#[derive(Debug)]
pub struct LoadError {
    pub file: PathBuf,
    pub tensor: Option<String>,
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.tensor {
            Some(tensor) => write!(
                f,
                "{}: tensor {tensor}: {}",
                self.file.display(),
                self.message
            ),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for LoadError {}

struct Shard {
    path: PathBuf,
    map: Arc<Mmap>,
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

    fn mapped(map: &Arc<Mmap>, start: usize, end: usize) -> Self {
        let bytes = &map[start..end];
        if cfg!(target_endian = "little") && bytes.as_ptr().align_offset(2) == 0 {
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

/// An opened checkpoint: every shard mapped and its header checked.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    tensors: HashMap<String, TensorInfo>,
    /// FP8 block shape (`quantization_config.weight_block_size`).
    fp8_block: [usize; 2],
    progress: Option<Progress>,
}

/// A one-line progress report on a terminal while a large checkpoint loads.
struct Progress {
    total: usize,
    loaded: AtomicUsize,
    shown_percent: AtomicUsize,
}

/// Below this a load is quick enough to need no progress line.
const PROGRESS_MIN_BYTES: usize = 256 << 20;

/// DeepSeek-V3's block size, used unless the config says otherwise.
pub const DEFAULT_FP8_BLOCK: [usize; 2] = [128, 128];

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
            let file = File::open(&path).map_err(|e| file_error(&path, e))?;
            // SAFETY: the mapping is read-only and every access below is bounds-checked
            // against its length; a file truncated by someone else while mapped is outside
            // what any loader can defend against.
            let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| file_error(&path, e))?);
            let shard = checkpoint.shards.len();
            let tensors = parse_header(&map).map_err(|(tensor, message)| LoadError {
                file: path.clone(),
                tensor,
                message,
            })?;
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

    /// Shows progress on stderr while `total` bytes load, when stderr is a terminal and the
    /// load is large; quiet otherwise.
    pub fn with_progress(mut self, total: usize) -> Self {
        if total >= PROGRESS_MIN_BYTES && std::io::stderr().is_terminal() {
            self.progress = Some(Progress {
                total,
                loaded: AtomicUsize::new(0),
                shown_percent: AtomicUsize::new(0),
            });
        }
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
        let info = self.info(name)?;
        if info.shape != shape || info.dtype != Dtype::F8E4M3 {
            let message = format!(
                "{:?} {:?}, expected F8E4M3 {shape:?}",
                info.dtype, info.shape
            );
            return Err(self.error(info, name, message));
        }
        let bytes = self.bytes(info).to_vec();
        self.advance(bytes.len());
        let scales = self.block_scales(name, info)?;
        Ok((bytes, scales))
    }

    fn apply_block_scales(
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
    fn block_scales(&self, name: &str, info: &TensorInfo) -> Result<Vec<f32>, LoadError> {
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

    fn advance(&self, bytes: usize) {
        let Some(p) = &self.progress else { return };
        let loaded = p.loaded.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let percent = (loaded * 100 / p.total).min(100);
        if p.shown_percent.swap(percent, Ordering::Relaxed) != percent {
            let gb = |b: usize| b as f64 / 1e9;
            eprint!(
                "\rloading weights {percent:3}% ({:.1}/{:.1} GB)",
                gb(loaded),
                gb(p.total)
            );
            if percent == 100 {
                eprintln!();
            }
        }
    }

    fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.shards[info.shard].map[info.start..info.end]
    }

    fn error(&self, info: &TensorInfo, name: &str, message: String) -> LoadError {
        LoadError {
            file: self.shards[info.shard].path.clone(),
            tensor: Some(name.to_string()),
            message,
        }
    }
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

/// Parses and checks a safetensors header: `u64` little-endian header length, a JSON object
/// of `name → {dtype, shape, data_offsets}`, then the data those offsets index. Errors carry
/// the tensor name where there is one.
fn parse_header(file: &[u8]) -> Result<HashMap<String, TensorInfo>, (Option<String>, String)> {
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

fn to_f32(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
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
pub mod tests {
    use super::*;

    /// Writes a safetensors file from `(name, dtype, shape, bytes)`.
    pub fn safetensors(tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in tensors {
            let begin = data.len();
            data.extend_from_slice(bytes);
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, data.len()]}),
            );
        }
        let header = serde_json::to_vec(&header).unwrap();
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend(header);
        out.extend(data);
        out
    }

    pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    pub struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> Self {
            static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("dsd-{tag}-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        pub fn write(&self, name: &str, bytes: &[u8]) {
            std::fs::write(self.0.join(name), bytes).unwrap();
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Opens one file as a checkpoint with 2×2 FP8 blocks, so small tensors have several.
    fn open(bytes: &[u8]) -> Result<Checkpoint, LoadError> {
        let dir = TempDir::new("ckpt");
        dir.write(SINGLE_FILE, bytes);
        Ok(Checkpoint::open(&dir.0)?.with_fp8_block([2, 2]))
    }

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
