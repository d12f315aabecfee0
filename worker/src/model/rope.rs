//! Rotary position embedding, rotate-half layout (HF checkpoints), tables built in f32 because
//! bf16 positions lose integers above 256.

use candle_core::{DType, Device, Result, Tensor};

#[derive(Debug, Clone)]
pub struct Rope {
    /// [max_positions, head_dim / 2] in the compute dtype.
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// `scaling`: linear RoPE scaling (Gemma 3's global layers), 1 for none: the frequencies are
    /// divided by it, as HF's "linear" rope type does.
    pub fn new(
        head_dim: usize,
        theta: f64,
        scaling: f64,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
            .map(|f| {
                if scaling == 1.0 {
                    f
                } else {
                    f / scaling as f32
                }
            })
            .collect();
        let mut angles = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            // position (exact in f32 up to 2^24) times frequency, in f32 as the reference does.
            angles.extend(inv_freq.iter().map(|f| pos as f32 * f));
        }
        let angles = Tensor::from_vec(angles, (max_positions, half), device)?;
        Ok(Self {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// The tables' rows for `positions` ([tokens] u32): what every layer of one step uses.
    pub fn tables_for(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?,
            self.sin.index_select(positions, 0)?,
        ))
    }

    /// Rotates `x` of shape [tokens, heads, head_dim], token i by the angle of row i of `cos`/`sin`.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x = x.unsqueeze(0)?.contiguous()?;
        candle_nn::rotary_emb::rope_thd(&x, cos, sin)?.squeeze(0)
    }
}
