//! Projections without bias, stored [out, in] as in HF files; y = x @ w^T.
//!
//! Column-parallel (q, k, v, gate, up) holds rows of w; row-parallel (o, down) holds columns and
//! yields a partial sum that the stage all-reduces.

use candle_core::{DType, Device, Result, Tensor};

use crate::error::LoadError;
use crate::weights::{Slice, WeightFiles};

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
}

impl Linear {
    /// Loads `slice` of weight `name`, whose full stored shape is `[out, in]`.
    pub fn load(
        files: &WeightFiles,
        name: &str,
        shape: [usize; 2],
        slice: Slice,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, LoadError> {
        Ok(Self {
            weight: files.load(name, &shape, slice, dtype, device)?,
        })
    }

    /// x: [tokens, in] -> [tokens, out].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.weight.t()?)
    }
}
