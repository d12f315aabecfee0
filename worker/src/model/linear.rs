//! Projections without bias, stored [out, in] as in HF files; y = x @ w^T.
//!
//! Column-parallel (q, k, v, gate, up) holds rows of w; row-parallel (o, down) holds columns and
//! yields a partial sum that the stage all-reduces. A GGUF weight may stay in its quantized blocks
//! and be multiplied by candle's quantized kernels (which take f32 activations), or, Q8_0 on
//! AVX512-VNNI CPUs, by `q8_matmul`'s.

use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Result, Tensor};

use super::ShardOptions;
use crate::error::LoadError;
use crate::q8_matmul::{Layout, Q8Matrix, QuantizedRows};
use crate::weights::{Matrix, QuantizedMatrix, Slice, WeightFiles};

#[derive(Debug, Clone)]
pub enum Linear {
    Dense(Tensor),
    Quantized(QMatMul),
    Q8(Arc<Q8Matrix>),
}

impl Linear {
    /// Loads `slice` of weight `name`, whose full stored shape is `[out, in]`.
    pub fn load(
        files: &WeightFiles,
        name: &str,
        shape: [usize; 2],
        slice: Slice,
        opts: &ShardOptions,
    ) -> std::result::Result<Self, LoadError> {
        let matrix = files.load_matrix(
            name,
            &shape,
            slice,
            opts.dtype,
            &opts.device,
            opts.quantized,
        )?;
        Self::from_matrix(name, matrix)
    }

    /// The projection by `matrix` (tensor `name`, for messages).
    pub fn from_matrix(name: &str, matrix: Matrix) -> std::result::Result<Self, LoadError> {
        match matrix {
            Matrix::Dense(w) => Ok(Self::Dense(w)),
            Matrix::Quantized(QuantizedMatrix::Blocks(blocks)) => Ok(Self::Quantized(
                QMatMul::from_arc(blocks).map_err(|source| LoadError::Candle {
                    tensor: name.to_string(),
                    source,
                })?,
            )),
            Matrix::Quantized(QuantizedMatrix::Q8(q8)) => Ok(Self::Q8(q8)),
        }
    }

    /// Projections of one input, sharing the input's conversion where their kernels take the
    /// same (f32 for candle's; the quantized rows for Q8_0): q, k and v; gate and up. Decoding
    /// a small model is bounded by the number of ops per layer as much as by bandwidth.
    pub fn forward_shared<const N: usize>(x: &Tensor, layers: [&Linear; N]) -> Result<[Tensor; N]> {
        let mut as_f32: Option<Tensor> = None;
        let mut as_q8: Option<QuantizedRows> = None;
        let mut out = Vec::with_capacity(N);
        for layer in layers {
            match layer {
                Self::Dense(_) => out.push(layer.forward(x)?),
                Self::Quantized(matmul) => {
                    let xf = match &as_f32 {
                        Some(xf) => xf.clone(),
                        None => as_f32.insert(contiguous_f32(x)?).clone(),
                    };
                    out.push(matmul.forward(&xf)?.to_dtype(x.dtype())?);
                }
                Self::Q8(w) => {
                    let xq = match &as_q8 {
                        Some(xq) => xq,
                        None => &*as_q8.insert(quantize_rows(x, w.cols())?),
                    };
                    out.push(q8_forward(w, xq, x)?);
                }
            }
        }
        out.try_into()
            .map_err(|_| candle_core::Error::Msg("projection count".to_string()))
    }

    /// x: [tokens, in] -> [tokens, out] in x's dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) => x.matmul(&w.t()?),
            Self::Quantized(matmul) => matmul.forward(&contiguous_f32(x)?)?.to_dtype(x.dtype()),
            Self::Q8(w) => q8_forward(w, &quantize_rows(x, w.cols())?, x),
        }
    }
}

/// `x` in f32 and contiguous (what candle's quantized kernels take).
fn contiguous_f32(x: &Tensor) -> Result<Tensor> {
    x.to_dtype(DType::F32)?.contiguous()
}

/// `x` [tokens, k] quantized per 32 inputs for `q8_matmul`.
pub fn quantize_rows(x: &Tensor, k: usize) -> Result<QuantizedRows> {
    let (m, width) = x.dims2()?;
    if width != k {
        return Err(candle_core::Error::Msg(format!(
            "a Q8_0 projection of {k} inputs got {width}"
        )));
    }
    let values = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(QuantizedRows::quantize(&values, m, k))
}

/// `xq` (the quantized `x`) times `w`: [tokens, out] in x's dtype and on its device.
fn q8_forward(w: &Q8Matrix, xq: &QuantizedRows, x: &Tensor) -> Result<Tensor> {
    let out = w.matmul(xq, Layout::RowMajor);
    Tensor::from_vec(out, (xq.rows(), w.rows()), x.device())?.to_dtype(x.dtype())
}
