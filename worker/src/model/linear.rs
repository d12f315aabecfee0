//! Projections without bias, stored [out, in] as in HF files; y = x @ w^T.
//!
//! Column-parallel (q, k, v, gate, up) holds rows of w; row-parallel (o, down) holds columns and
//! yields a partial sum that the stage all-reduces. A GGUF weight may stay in its quantized blocks
//! and be multiplied by candle's quantized kernels (which take f32 activations).

use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Result, Tensor};

use super::ShardOptions;
use crate::error::LoadError;
use crate::weights::{Matrix, Slice, WeightFiles};

#[derive(Debug, Clone)]
pub enum Linear {
    Dense(Tensor),
    /// `pad`: zero columns the blocks carry after the real inputs (see `GgufFile::load_quantized`).
    Quantized {
        matmul: QMatMul,
        pad: usize,
    },
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
            Matrix::Quantized(q) => Ok(Self::Quantized {
                matmul: QMatMul::from_arc(q.blocks).map_err(|source| LoadError::Candle {
                    tensor: name.to_string(),
                    source,
                })?,
                pad: q.pad,
            }),
        }
    }

    /// Projections of one input, sharing the input's conversion (f32, zero-padded to the
    /// blocks' width) where their kernels take the same: q, k and v; gate and up. Decoding a
    /// small model is bounded by the number of ops per layer as much as by bandwidth.
    pub fn forward_shared<const N: usize>(x: &Tensor, layers: [&Linear; N]) -> Result<[Tensor; N]> {
        let mut prepared: Vec<(usize, Tensor)> = Vec::new();
        let mut out = Vec::with_capacity(N);
        for layer in layers {
            match layer {
                Self::Dense(_) => out.push(layer.forward(x)?),
                Self::Quantized { matmul, pad } => {
                    let xp = match prepared.iter().find(|(p, _)| p == pad) {
                        Some((_, xp)) => xp.clone(),
                        None => {
                            let xp = padded_f32(x, *pad)?;
                            prepared.push((*pad, xp.clone()));
                            xp
                        }
                    };
                    out.push(matmul.forward(&xp)?.to_dtype(x.dtype())?);
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
            Self::Quantized { matmul, pad } => {
                let dtype = x.dtype();
                matmul.forward(&padded_f32(x, *pad)?)?.to_dtype(dtype)
            }
        }
    }
}

/// `x` in f32, contiguous, with `pad` zero columns appended (what quantized kernels take).
fn padded_f32(x: &Tensor, pad: usize) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    match pad {
        0 => x.contiguous(),
        _ => x.pad_with_zeros(candle_core::D::Minus1, 0, pad),
    }
}
