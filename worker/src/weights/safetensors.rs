//! Weights of a HuggingFace model folder (safetensors), memory-mapped; a shard copies out only its
//! own slices.
//!
//! Only the pages of the requested slice are touched, and they are dropped from the process's
//! resident set right after conversion, so a worker's peak memory is its shard, not the model.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, TensorInfo};
use safetensors::SafeTensors;

use super::mapped::{map_file, ReleaseBehind, RELEASE_EVERY};
use super::{candle_error, check_stored, NormWeights, Slice, TensorSource, EMBED_TOKENS};
use crate::error::LoadError;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section (8 + header length).
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

/// All safetensors files of a model folder, mapped, with a tensor -> file map.
pub struct SafetensorsFiles {
    files: Vec<MappedFile>,
    location: HashMap<String, usize>,
    /// For messages: where a tensor was looked for.
    searched: String,
    /// Bytes copied out of the files so far (for progress reports).
    bytes_read: Arc<AtomicU64>,
}

impl SafetensorsFiles {
    /// Opens `model.safetensors`, or every file named by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        if index.exists() {
            Self::open_indexed(dir, &index)
        } else if single.exists() {
            let file = map_safetensors(&single)?;
            let location = file.tensors.keys().map(|k| (k.clone(), 0)).collect();
            Ok(Self {
                files: vec![file],
                location,
                searched: single.display().to_string(),
                bytes_read: Arc::default(),
            })
        } else {
            Err(LoadError::NoWeights {
                dir: dir.display().to_string(),
            })
        }
    }

    fn open_indexed(dir: &Path, index: &Path) -> Result<Self, LoadError> {
        let bad = |reason: String| LoadError::BadIndex {
            path: index.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(index).map_err(|source| LoadError::Io {
            path: index.display().to_string(),
            source,
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no \"weight_map\" object".to_string()))?;
        let mut names: Vec<&str> = Vec::new();
        let mut wanted: Vec<(String, usize)> = Vec::with_capacity(map.len());
        for (tensor, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("weight_map[{tensor}] is not a file name")))?;
            let idx = match names.iter().position(|n| *n == file) {
                Some(i) => i,
                None => {
                    names.push(file);
                    names.len() - 1
                }
            };
            wanted.push((tensor.clone(), idx));
        }
        let files = names
            .iter()
            .map(|n| map_safetensors(&dir.join(n)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            files,
            location: wanted.into_iter().collect(),
            searched: index.display().to_string(),
            bytes_read: Arc::default(),
        })
    }

    fn find(&self, name: &str) -> Result<(&MappedFile, &TensorInfo), LoadError> {
        let missing = || LoadError::MissingTensor {
            tensor: name.to_string(),
            files: self.searched.clone(),
        };
        let file = self
            .location
            .get(name)
            .and_then(|&i| self.files.get(i))
            .ok_or_else(missing)?;
        // The index may claim a tensor its file does not hold.
        let info = file
            .tensors
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor {
                tensor: name.to_string(),
                files: file.path.display().to_string(),
            })?;
        Ok((file, info))
    }
}

impl TensorSource for SafetensorsFiles {
    /// Reads `slice` of tensor `name`, checking the stored tensor has `shape`, and converts it to
    /// `dtype` on `device`.
    fn load(
        &self,
        name: &str,
        shape: &[usize],
        slice: Slice,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, LoadError> {
        let (file, info) = self.find(name)?;
        let stored_type = stored_elem_size(info.dtype).ok_or_else(|| format!("{:?}", info.dtype));
        let elem = check_stored(&file.path, name, &info.shape, stored_type, shape, &slice)?;
        let base = file.data_start + info.data_offsets.0;
        let (pieces, out_shape) = slice_pieces(base, shape, &slice, elem);
        let tensor = decode(file, &pieces, info.dtype, &out_shape, dtype, device);
        let read: usize = pieces.iter().map(|r| r.len()).sum();
        self.bytes_read.fetch_add(read as u64, Ordering::Relaxed);
        tensor.map_err(candle_error(name))
    }

    fn norm_weights(&self) -> NormWeights {
        NormWeights::Offset
    }

    fn bytes_read(&self) -> &Arc<AtomicU64> {
        &self.bytes_read
    }

    /// The embedding's stored element size: a HuggingFace checkpoint stores its weights in one
    /// dtype.
    fn bytes_per_parameter(&self) -> f64 {
        self.find(EMBED_TOKENS)
            .ok()
            .and_then(|(_, info)| stored_elem_size(info.dtype))
            .unwrap_or(4) as f64
    }
}

fn map_safetensors(path: &Path) -> Result<MappedFile, LoadError> {
    let mmap = map_file(path)?;
    let (header_len, metadata) =
        SafeTensors::read_metadata(&mmap).map_err(|e| LoadError::Corrupt {
            path: path.display().to_string(),
            reason: describe_corruption(&mmap, e),
        })?;
    let tensors = metadata
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.clone()))
        .collect();
    Ok(MappedFile {
        path: path.to_path_buf(),
        mmap,
        data_start: 8 + header_len,
        tensors,
    })
}

/// Turns safetensors' terse error into expected vs found where we can.
fn describe_corruption(bytes: &[u8], err: safetensors::SafeTensorError) -> String {
    if let safetensors::SafeTensorError::MetadataIncompleteBuffer = err {
        if let Some(expected) = declared_size(bytes) {
            return format!(
                "truncated or padded: its header describes {expected} bytes but the file has {}",
                bytes.len()
            );
        }
    }
    format!("{err} (file of {} bytes)", bytes.len())
}

/// The file size a safetensors header declares: 8 + header + the end of the last tensor.
fn declared_size(bytes: &[u8]) -> Option<usize> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    let end = header
        .as_object()?
        .values()
        .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    Some(8 + n + end as usize)
}

fn stored_elem_size(dtype: StDtype) -> Option<usize> {
    match dtype {
        StDtype::F32 => Some(4),
        StDtype::BF16 | StDtype::F16 => Some(2),
        _ => None,
    }
}

/// The byte ranges of `slice` inside the file, in order, and the slice's shape.
fn slice_pieces(
    base: usize,
    shape: &[usize],
    slice: &Slice,
    elem: usize,
) -> (Vec<Range<usize>>, Vec<usize>) {
    let numel: usize = shape.iter().product();
    match (slice, shape) {
        (Slice::Rows(r), &[_, cols]) => (
            std::iter::once(base + r.start * cols * elem..base + r.end * cols * elem).collect(),
            vec![r.len(), cols],
        ),
        (Slice::Cols(c), &[rows, cols]) => (
            (0..rows)
                .map(|row| {
                    let at = base + (row * cols + c.start) * elem;
                    at..at + c.len() * elem
                })
                .collect(),
            vec![rows, c.len()],
        ),
        _ => (
            std::iter::once(base..base + numel * elem).collect(),
            shape.to_vec(),
        ),
    }
}

/// Decodes little-endian elements straight out of the map (no intermediate byte copy, so the
/// transient memory of a load is one slice), then converts to the compute dtype: bf16/f16 -> f32
/// is exact; f32 -> bf16/f16 rounds to nearest even, as torch's `.to()` does.
fn decode(
    file: &MappedFile,
    pieces: &[Range<usize>],
    from: StDtype,
    shape: &[usize],
    to: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let stored = match from {
        StDtype::BF16 => {
            Tensor::from_vec(decode_le(file, pieces, bf16::from_le_bytes), shape, device)?
        }
        StDtype::F16 => {
            Tensor::from_vec(decode_le(file, pieces, f16::from_le_bytes), shape, device)?
        }
        _ => Tensor::from_vec(decode_le(file, pieces, f32::from_le_bytes), shape, device)?,
    };
    stored.to_dtype(to)
}

fn decode_le<T, const N: usize>(
    file: &MappedFile,
    pieces: &[Range<usize>],
    from_le: fn([u8; N]) -> T,
) -> Vec<T> {
    let total: usize = pieces.iter().map(|r| r.len() / N).sum();
    let mut out = Vec::with_capacity(total);
    // Pieces are in file order.
    let mut release = ReleaseBehind::new(&file.mmap);
    for r in pieces {
        let mut at = r.start;
        while at < r.end {
            let end = (at + RELEASE_EVERY).min(r.end);
            let (elems, _) = file.mmap[at..end].as_chunks::<N>();
            out.extend(elems.iter().map(|&b| from_le(b)));
            release.read(at..end);
            at = end;
        }
    }
    out
}
