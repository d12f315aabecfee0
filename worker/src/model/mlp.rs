//! GeGLU MLP over this rank's intermediate columns; the output is a partial sum.

use candle_core::{Result, Tensor};
use gemma_proto::{Activation, ModelConfig, ShardSpec};

use super::activation::gelu_tanh_times;

use super::linear::Linear;
use super::ShardOptions;
use crate::error::LoadError;
use crate::weights::{Slice, WeightFiles};

#[derive(Debug, Clone)]
pub struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
    activation: Activation,
}

impl Mlp {
    pub fn load(
        files: &WeightFiles,
        prefix: &str,
        cfg: &ModelConfig,
        spec: &ShardSpec,
        opts: &ShardOptions,
    ) -> std::result::Result<Self, LoadError> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let cols = spec.mlp_cols.clone();
        let col = |name: &str| {
            Linear::load(
                files,
                &format!("{prefix}.{name}.weight"),
                [i, h],
                Slice::Rows(cols.clone()),
                opts,
            )
        };
        Ok(Self {
            gate: col("gate_proj")?,
            up: col("up_proj")?,
            down: Linear::load(
                files,
                &format!("{prefix}.down_proj.weight"),
                [h, i],
                Slice::Cols(cols.clone()),
                opts,
            )?,
            activation: cfg.activation,
        })
    }

    /// x: [tokens, hidden] -> this rank's partial of the MLP output.
    pub fn forward_partial(&self, x: &Tensor) -> Result<Tensor> {
        let [gate, up] = Linear::forward_shared(x, [&self.gate, &self.up])?;
        let hidden = match self.activation {
            Activation::GeluTanh => gelu_tanh_times(&gate, &up)?,
            Activation::GeluErf => (gate.gelu_erf()? * up)?,
        };
        self.down.forward(&hidden)
    }
}
