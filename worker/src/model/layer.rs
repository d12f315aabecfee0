//! One decoder layer: pre-norm attention and pre-norm GeGLU MLP, each followed by the stage's
//! all-reduce and a residual add.

use candle_core::{DType, Device, Tensor};
use gemma_proto::{ModelConfig, ShardSpec};

use super::attention::Attention;
use super::context::StepContext;
use super::mlp::Mlp;
use super::norm::RmsNorm;
use crate::collective::Collective;
use crate::error::{LoadError, StepError};
use crate::kv_cache::LayerKv;
use crate::weights::WeightFiles;

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    input_norm: RmsNorm,
    attention: Attention,
    post_attention_norm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    pub fn load(
        files: &WeightFiles,
        index: usize,
        cfg: &ModelConfig,
        spec: &ShardSpec,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let p = format!("model.layers.{index}");
        let norm = |name: &str| {
            RmsNorm::load(
                files,
                &format!("{p}.{name}.weight"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
                device,
            )
        };
        Ok(Self {
            input_norm: norm("input_layernorm")?,
            attention: Attention::load(files, &format!("{p}.self_attn"), cfg, spec, dtype, device)?,
            post_attention_norm: norm("post_attention_layernorm")?,
            mlp: Mlp::load(files, &format!("{p}.mlp"), cfg, spec, dtype, device)?,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &StepContext,
        kv: &LayerKv,
        group: &dyn Collective,
    ) -> Result<Tensor, StepError> {
        let h = self.input_norm.forward(x)?;
        let h = self.attention.forward_partial(&h, ctx, kv)?;
        let x = (x + group.all_reduce_sum(&h)?)?;
        let h = self.post_attention_norm.forward(&x)?;
        let h = self.mlp.forward_partial(&h)?;
        Ok((&x + group.all_reduce_sum(&h)?)?)
    }
}
