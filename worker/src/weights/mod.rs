//! A model's weights, whatever their file format: safetensors (HuggingFace folders) or GGUF.
//! Layers ask for tensors by their HuggingFace names and for the slice their shard owns; the
//! format decides how those bytes are found, decoded and (for GGUF) kept quantized.

pub mod gguf;
pub mod safetensors;

use std::ops::Range;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use gemma_proto::{Architecture, ModelFiles, ModelFormat};
use memmap2::{Mmap, UncheckedAdvice};

use crate::error::LoadError;
pub use gguf::GgufFile;
pub use safetensors::SafetensorsFiles;

/// Which part of a stored tensor a shard takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slice {
    Whole,
    /// Rows of a 2-D `[out, in]` matrix (column-parallel weights, vocabulary rows).
    Rows(Range<usize>),
    /// Columns of a 2-D `[out, in]` matrix (row-parallel weights).
    Cols(Range<usize>),
}

impl Slice {
    pub fn fits(&self, shape: &[usize]) -> bool {
        match (self, shape) {
            (Slice::Whole, _) => true,
            (Slice::Rows(r), &[rows, _]) => r.start <= r.end && r.end <= rows,
            (Slice::Cols(c), &[_, cols]) => c.start <= c.end && c.end <= cols,
            _ => false,
        }
    }

    /// The shape of this slice of a tensor of `shape`.
    pub fn shape_of(&self, shape: &[usize]) -> Vec<usize> {
        match (self, shape) {
            (Slice::Rows(r), &[_, cols]) => vec![r.len(), cols],
            (Slice::Cols(c), &[rows, _]) => vec![rows, c.len()],
            _ => shape.to_vec(),
        }
    }
}

/// A weight matrix as a layer holds it.
#[derive(Debug, Clone)]
pub enum Matrix {
    /// Decoded to the compute dtype.
    Dense(Tensor),
    /// Kept in its GGUF blocks; multiplied by candle's quantized kernels.
    Quantized(QuantizedMatrix),
}

/// A quantized `[out, in]` matrix whose rows may carry zero blocks after `in`.
#[derive(Debug, Clone)]
pub struct QuantizedMatrix {
    /// `[out, in + pad]`.
    pub blocks: Arc<QTensor>,
    /// Zero columns appended to each row (inputs must be padded with as many zeros).
    pub pad: usize,
}

/// How a shard keeps quantized (GGUF) weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantizedWeights {
    /// In their blocks (a quarter to a half of f32's memory and bandwidth).
    #[default]
    Keep,
    /// Dequantized to the compute dtype at load.
    Dequantize,
}

/// The weights of one model, memory-mapped.
pub enum WeightFiles {
    Safetensors(SafetensorsFiles),
    Gguf(GgufFile),
}

impl WeightFiles {
    pub fn open(files: &ModelFiles, arch: Architecture) -> Result<Self, LoadError> {
        match files.format {
            ModelFormat::HfFolder => Ok(Self::Safetensors(SafetensorsFiles::open(&files.weights)?)),
            ModelFormat::Gguf => Ok(Self::Gguf(GgufFile::open(&files.weights, arch)?)),
        }
    }

    /// Total bytes copied out of the files so far.
    pub fn bytes_read(&self) -> u64 {
        match self {
            Self::Safetensors(f) => f.bytes_read(),
            Self::Gguf(f) => f.bytes_read(),
        }
    }

    /// A live view of [`Self::bytes_read`] for progress reports from another thread.
    pub fn progress(&self) -> Arc<AtomicU64> {
        match self {
            Self::Safetensors(f) => f.progress(),
            Self::Gguf(f) => f.progress(),
        }
    }

    /// Stored bytes per parameter, for progress estimates (the embedding's for safetensors,
    /// the whole file's average for GGUF).
    pub fn bytes_per_parameter(&self) -> f64 {
        match self {
            Self::Safetensors(f) => f
                .stored_elem_size(crate::model::embedding::EMBED_TOKENS)
                .unwrap_or(4) as f64,
            Self::Gguf(f) => f.bytes_per_parameter(),
        }
    }

    /// Reads `slice` of tensor `name` (its HuggingFace name), checking the stored tensor has
    /// `shape`, decoded to `dtype` on `device`.
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        slice: Slice,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, LoadError> {
        match self {
            Self::Safetensors(f) => f.load(name, shape, slice, dtype, device),
            Self::Gguf(f) => f.load(name, shape, slice, dtype, device),
        }
    }

    /// A Gemma RMSNorm's multiplier (1 + w) in f32. llama.cpp's converter stores norms with the
    /// 1 already added, HF files store w.
    pub fn load_norm_scale(
        &self,
        name: &str,
        dim: usize,
        device: &Device,
    ) -> Result<Tensor, LoadError> {
        let w = self.load(name, &[dim], Slice::Whole, DType::F32, device)?;
        match self {
            Self::Safetensors(_) => (w + 1.0).map_err(|source| LoadError::Candle {
                tensor: name.to_string(),
                source,
            }),
            Self::Gguf(_) => Ok(w),
        }
    }

    /// A weight matrix: quantized GGUF tensors stay in their blocks when `quantized` is
    /// [`QuantizedWeights::Keep`] and the slice falls on block boundaries; everything else is
    /// decoded to `dtype`.
    pub fn load_matrix(
        &self,
        name: &str,
        shape: &[usize],
        slice: Slice,
        dtype: DType,
        device: &Device,
        quantized: QuantizedWeights,
    ) -> Result<Matrix, LoadError> {
        match self {
            Self::Gguf(f) if quantized == QuantizedWeights::Keep => {
                if let Some(q) = f.load_quantized(name, shape, &slice, device)? {
                    return Ok(Matrix::Quantized(q));
                }
                Ok(Matrix::Dense(f.load(name, shape, slice, dtype, device)?))
            }
            _ => Ok(Matrix::Dense(self.load(name, shape, slice, dtype, device)?)),
        }
    }
}

/// Bytes decoded between two releases of mapped pages: bounds a load's transient RSS.
pub(crate) const RELEASE_EVERY: usize = 8 << 20;

/// Drops the pages of `[offset, offset+len)` of a read-only map from this process's resident
/// set; they are read again from the file if ever touched.
pub(crate) fn release_pages(mmap: &Mmap, offset: usize, len: usize) {
    if len == 0 || offset.saturating_add(len) > mmap.len() {
        return;
    }
    // SAFETY: the mapping is a read-only private map of a file we never write through, so
    // MADV_DONTNEED cannot discard data: a later access re-reads the same bytes from the file.
    // The range was checked to lie inside the map.
    let _ = unsafe { mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, offset, len) };
}
