//! A model's weights, whatever their file format: safetensors (HuggingFace folders) or GGUF.
//! Layers ask for tensors by their HuggingFace names and for the slice their shard owns; the
//! format decides how those bytes are found, decoded and (for GGUF) kept quantized.

pub mod gguf;
mod mapped;
pub mod safetensors;

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use gemma_proto::{Architecture, ModelFiles, ModelFormat};

use crate::error::LoadError;
use crate::q8_matmul::Q8Matrix;
pub use gguf::GgufFile;
pub use safetensors::SafetensorsFiles;

/// The HuggingFace name of the token embedding (tied to the lm_head in every Gemma).
pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";

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

/// A quantized `[out, in]` matrix, in the form its kernels take.
#[derive(Debug, Clone)]
pub enum QuantizedMatrix {
    /// GGUF blocks, multiplied by candle's quantized kernels.
    Blocks(Arc<QTensor>),
    /// Q8_0 (and Q5_0, whose values Q8_0 holds exactly) repacked for the VNNI kernel of
    /// `q8_matmul`, which quantizes activations per 32 inputs as llama.cpp does.
    Q8(Arc<Q8Matrix>),
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

/// Checks a stored tensor (`stored_shape`; `stored_type`: how its format will read it, or the
/// type's name where it cannot) against what a layer asked for, in one order for every format:
/// the shape, then the type, then whether `slice` fits.
fn check_stored<T>(
    path: &Path,
    tensor: &str,
    stored_shape: &[usize],
    stored_type: Result<T, String>,
    shape: &[usize],
    slice: &Slice,
) -> Result<T, LoadError> {
    let path = path.display().to_string();
    if stored_shape != shape {
        return Err(LoadError::Shape {
            path,
            tensor: tensor.to_string(),
            expected: shape.to_vec(),
            found: stored_shape.to_vec(),
        });
    }
    let ty = stored_type.map_err(|found| LoadError::Dtype {
        path: path.clone(),
        tensor: tensor.to_string(),
        found,
    })?;
    if !slice.fits(shape) {
        return Err(LoadError::Slice {
            path,
            tensor: tensor.to_string(),
            shape: shape.to_vec(),
            slice: format!("{slice:?}"),
        });
    }
    Ok(ty)
}

/// Names the tensor a candle error came from.
fn candle_error(tensor: &str) -> impl FnOnce(candle_core::Error) -> LoadError + '_ {
    move |source| LoadError::Candle {
        tensor: tensor.to_string(),
        source,
    }
}

/// How a format stores a Gemma RMSNorm's weight; the layer multiplies by (1 + w) either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormWeights {
    /// w, as HuggingFace files do.
    Offset,
    /// 1 + w, as llama.cpp's converter writes it.
    Multiplier,
}

/// One weight file format: finds a tensor by its HuggingFace name and reads the slice a shard
/// owns. Adding a format means implementing this trait (and naming it in [`WeightFiles::open`]).
pub trait TensorSource: Send + Sync {
    /// Reads `slice` of tensor `name`, checking the stored tensor has `shape`, decoded to
    /// `dtype` on `device`.
    fn load(
        &self,
        name: &str,
        shape: &[usize],
        slice: Slice,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, LoadError>;

    /// `slice` of tensor `name` in its quantized blocks, or None where it is better decoded
    /// (the format has no blocks, the tensor is stored as floats, or the slice cuts blocks).
    fn load_quantized(
        &self,
        _name: &str,
        _shape: &[usize],
        _slice: &Slice,
        _device: &Device,
    ) -> Result<Option<QuantizedMatrix>, LoadError> {
        Ok(None)
    }

    /// What this format stores for a Gemma RMSNorm's weight.
    fn norm_weights(&self) -> NormWeights;

    /// Bytes copied out of the files so far, shared for progress reports from another thread.
    fn bytes_read(&self) -> &Arc<AtomicU64>;

    /// Stored bytes per parameter, for progress estimates.
    fn bytes_per_parameter(&self) -> f64;
}

/// The weights of one model, memory-mapped, in whichever format they came.
pub struct WeightFiles {
    source: Box<dyn TensorSource>,
}

impl WeightFiles {
    pub fn open(files: &ModelFiles, arch: Architecture) -> Result<Self, LoadError> {
        let source: Box<dyn TensorSource> = match files.format {
            ModelFormat::HfFolder => Box::new(SafetensorsFiles::open(&files.weights)?),
            ModelFormat::Gguf => Box::new(GgufFile::open(&files.weights, arch)?),
        };
        Ok(Self { source })
    }

    /// Total bytes copied out of the files so far.
    pub fn bytes_read(&self) -> u64 {
        self.source.bytes_read().load(Ordering::Relaxed)
    }

    /// A live view of [`Self::bytes_read`] for progress reports from another thread.
    pub fn progress(&self) -> Arc<AtomicU64> {
        self.source.bytes_read().clone()
    }

    /// Stored bytes per parameter, for progress estimates (the embedding's for safetensors,
    /// the whole file's average for GGUF).
    pub fn bytes_per_parameter(&self) -> f64 {
        self.source.bytes_per_parameter()
    }

    /// A Gemma RMSNorm's multiplier (1 + w) in f32.
    pub fn load_norm_scale(
        &self,
        name: &str,
        dim: usize,
        device: &Device,
    ) -> Result<Tensor, LoadError> {
        let w = self
            .source
            .load(name, &[dim], Slice::Whole, DType::F32, device)?;
        match self.source.norm_weights() {
            NormWeights::Offset => (w + 1.0).map_err(candle_error(name)),
            NormWeights::Multiplier => Ok(w),
        }
    }

    /// A weight matrix: quantized tensors stay in their blocks when `quantized` is
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
        if quantized == QuantizedWeights::Keep {
            if let Some(q) = self.source.load_quantized(name, shape, &slice, device)? {
                return Ok(Matrix::Quantized(q));
            }
        }
        Ok(Matrix::Dense(
            self.source.load(name, shape, slice, dtype, device)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(
        stored_shape: &[usize],
        stored_type: Result<usize, String>,
        slice: Slice,
    ) -> Result<usize, String> {
        check_stored(
            Path::new("/m/model.safetensors"),
            "w",
            stored_shape,
            stored_type,
            &[8, 4],
            &slice,
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn a_tensor_as_asked_passes_with_its_stored_type() {
        assert_eq!(check(&[8, 4], Ok(2), Slice::Rows(2..6)), Ok(2));
        assert_eq!(check(&[8, 4], Ok(4), Slice::Cols(0..4)), Ok(4));
    }

    #[test]
    fn the_shape_is_checked_before_the_type_and_the_type_before_the_slice() {
        let both = check(&[4, 8], Err("I32".into()), Slice::Rows(0..9));
        assert_eq!(
            both,
            Err("/m/model.safetensors: tensor w has shape [4, 8], expected [8, 4]".into())
        );
        let e = check(&[8, 4], Err("I32".into()), Slice::Rows(0..9)).unwrap_err();
        assert!(
            e.starts_with("/m/model.safetensors: tensor w is stored as I32; supported:"),
            "{e}"
        );
        let e = check(&[8, 4], Ok(4), Slice::Rows(0..9)).unwrap_err();
        assert_eq!(
            e,
            "/m/model.safetensors: tensor w of shape [8, 4] cannot be sliced as Rows(0..9)"
        );
    }
}
