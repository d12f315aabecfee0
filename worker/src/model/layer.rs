//! One decoder layer: pre-norm attention and pre-norm GeGLU MLP, each followed by the stage's
//! all-reduce and a residual add. Gemma 2 and 3 also normalize each block's output (after the
//! all-reduce, since the norm needs the whole sum) before adding it to the residual stream.

use candle_core::Tensor;
use gemma_proto::{ModelConfig, ShardSpec};

use super::attention::Attention;
use super::context::StepContext;
use super::mlp::Mlp;
use super::norm::RmsNorm;
use super::ShardOptions;
use crate::collective::Collective;
use crate::error::{LoadError, StepError};
use crate::kv_cache::LayerKv;
use crate::weights::WeightFiles;

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    input_norm: RmsNorm,
    attention: Attention,
    /// Gemma 2/3: on the attention output.
    post_attention_norm: Option<RmsNorm>,
    /// Before the MLP (HF: Gemma 1's `post_attention_layernorm`, Gemma 2/3's
    /// `pre_feedforward_layernorm`).
    pre_mlp_norm: RmsNorm,
    mlp: Mlp,
    /// Gemma 2/3: on the MLP output.
    post_mlp_norm: Option<RmsNorm>,
}

impl DecoderLayer {
    pub fn load(
        files: &WeightFiles,
        index: usize,
        cfg: &ModelConfig,
        spec: &ShardSpec,
        opts: &ShardOptions,
    ) -> Result<Self, LoadError> {
        let p = format!("model.layers.{index}");
        let norm = |name: &str| {
            RmsNorm::load(
                files,
                &format!("{p}.{name}.weight"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
                &opts.device,
            )
        };
        let kind = cfg
            .layer_kinds
            .get(index)
            .copied()
            .unwrap_or(gemma_proto::LayerKind::Full);
        let attention = Attention::load(files, &format!("{p}.self_attn"), kind, cfg, spec, opts)?;
        let mlp = Mlp::load(files, &format!("{p}.mlp"), cfg, spec, opts)?;
        if cfg.architecture.has_sandwich_norms() {
            Ok(Self {
                input_norm: norm("input_layernorm")?,
                attention,
                post_attention_norm: Some(norm("post_attention_layernorm")?),
                pre_mlp_norm: norm("pre_feedforward_layernorm")?,
                mlp,
                post_mlp_norm: Some(norm("post_feedforward_layernorm")?),
            })
        } else {
            Ok(Self {
                input_norm: norm("input_layernorm")?,
                attention,
                post_attention_norm: None,
                pre_mlp_norm: norm("post_attention_layernorm")?,
                mlp,
                post_mlp_norm: None,
            })
        }
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
        let x = (x + apply(&self.post_attention_norm, group.all_reduce_sum(&h)?)?)?;
        let h = self.pre_mlp_norm.forward(&x)?;
        let h = self.mlp.forward_partial(&h)?;
        Ok((&x + apply(&self.post_mlp_norm, group.all_reduce_sum(&h)?)?)?)
    }
}

fn apply(norm: &Option<RmsNorm>, x: Tensor) -> candle_core::Result<Tensor> {
    match norm {
        Some(n) => n.forward(&x),
        None => Ok(x),
    }
}
