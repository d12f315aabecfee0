//! Gemma's RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + w), all in f32, cast back at the end.

use candle_core::{DType, Device, Result, Tensor};

use crate::error::LoadError;
use crate::weights::WeightFiles;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// (1 + w) in f32, computed once at load (the reference adds 1 in f32 at every call: same
    /// values).
    scale: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(
        files: &WeightFiles,
        name: &str,
        dim: usize,
        eps: f64,
        device: &Device,
    ) -> std::result::Result<Self, LoadError> {
        Ok(Self {
            scale: files.load_norm_scale(name, dim, device)?,
            eps: eps as f32,
        })
    }

    /// Normalizes over the last dimension (hidden states, or each head for QK-norm).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?.contiguous()?;
        candle_nn::ops::rms_norm(&x32, &self.scale, self.eps)?.to_dtype(dtype)
    }
}
