//! The model's architecture as read from a HuggingFace `config.json`, validated once so that
//! nothing downstream has to second-guess it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// The GeGLU activation applied to the gate projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// gelu with the tanh approximation (`gelu_pytorch_tanh`): what every Gemma checkpoint uses.
    GeluTanh,
    /// exact (erf) gelu: only when a config asks for it through `hidden_activation: gelu`.
    GeluErf,
}

/// Which Gemma generation a config describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    /// Gemma 1 and 1.1 (`model_type: gemma`).
    Gemma,
}

/// A validated Gemma model configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Read from the file, never derived: Gemma 7B has 16 heads x 256 = 4096 != hidden 3072.
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub activation: Activation,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
}

/// `config.json` as HuggingFace writes it; every field optional so that a missing one gets a
/// message naming it instead of serde's generic one.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    max_position_embeddings: Option<usize>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    attention_bias: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    pad_token_id: Option<u32>,
}

impl ModelConfig {
    /// Reads and validates `config.json` (or any file in its format).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| e.in_file(path))
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let raw: HfConfig = serde_json::from_str(text).map_err(|e| ConfigError::Json {
            path: String::new(),
            message: e.to_string(),
        })?;
        Self::from_hf(raw)
    }

    fn from_hf(raw: HfConfig) -> Result<Self, ConfigError> {
        let architecture = match raw.model_type.as_deref() {
            Some("gemma") => Architecture::Gemma,
            Some(other) => {
                return Err(ConfigError::invalid(
                    "model_type",
                    other,
                    "\"gemma\" (Gemma 1 and 1.1)",
                ))
            }
            None => return Err(ConfigError::Missing("model_type")),
        };
        if raw.attention_bias == Some(true) {
            return Err(ConfigError::invalid(
                "attention_bias",
                "true",
                "false (Gemma projections have no bias)",
            ));
        }
        if let Some(scaling) = raw.rope_scaling.filter(|v| !v.is_null()) {
            return Err(ConfigError::invalid(
                "rope_scaling",
                &scaling.to_string(),
                "null (Gemma 1 uses plain RoPE)",
            ));
        }
        let cfg = ModelConfig {
            architecture,
            vocab_size: required(raw.vocab_size, "vocab_size")?,
            hidden_size: required(raw.hidden_size, "hidden_size")?,
            intermediate_size: required(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers: required(raw.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads: required(raw.num_attention_heads, "num_attention_heads")?,
            num_key_value_heads: required(raw.num_key_value_heads, "num_key_value_heads")?,
            head_dim: raw.head_dim.ok_or(ConfigError::MissingHeadDim)?,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(8192),
            activation: activation(raw.hidden_activation.as_deref(), raw.hidden_act.as_deref())?,
            bos_token_id: raw.bos_token_id.unwrap_or(2),
            eos_token_id: raw.eos_token_id.unwrap_or(1),
            pad_token_id: raw.pad_token_id.unwrap_or(0),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(name, "0", "a positive integer"));
            }
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ConfigError::invalid(
                "head_dim",
                &self.head_dim.to_string(),
                "an even number (RoPE rotates pairs)",
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(ConfigError::invalid(
                "num_key_value_heads",
                &self.num_key_value_heads.to_string(),
                &format!(
                    "a divisor of num_attention_heads ({})",
                    self.num_attention_heads
                ),
            ));
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !positive(self.rms_norm_eps) || !positive(self.rope_theta) {
            return Err(ConfigError::invalid(
                "rms_norm_eps/rope_theta",
                &format!("{}/{}", self.rms_norm_eps, self.rope_theta),
                "positive numbers",
            ));
        }
        Ok(())
    }

    /// Query heads per key-value head (1 for MHA, num_attention_heads for MQA).
    pub fn queries_per_kv_head(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Number of weight parameters (embedding counted once: the lm_head is tied to it).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let per_layer = h * q * 2 + h * kv * 2 + 3 * h * self.intermediate_size + 2 * h;
        self.vocab_size * h + self.num_hidden_layers * per_layer + h
    }
}

fn required(value: Option<usize>, field: &'static str) -> Result<usize, ConfigError> {
    value.ok_or(ConfigError::Missing(field))
}

/// design.md: `hidden_activation` wins when present; Gemma 1.0 configs only say `hidden_act: gelu`
/// and the reference implementation still uses the tanh approximation for them.
fn activation(
    hidden_activation: Option<&str>,
    hidden_act: Option<&str>,
) -> Result<Activation, ConfigError> {
    const ALLOWED: &str = "gelu_pytorch_tanh, gelu_tanh, gelu_new or gelu";
    match (hidden_activation, hidden_act) {
        (Some("gelu_pytorch_tanh" | "gelu_tanh" | "gelu_new"), _) => Ok(Activation::GeluTanh),
        (Some("gelu"), _) => Ok(Activation::GeluErf),
        (Some(other), _) => Err(ConfigError::invalid("hidden_activation", other, ALLOWED)),
        (None, None | Some("gelu" | "gelu_pytorch_tanh" | "gelu_tanh" | "gelu_new")) => {
            Ok(Activation::GeluTanh)
        }
        (None, Some(other)) => Err(ConfigError::invalid("hidden_act", other, ALLOWED)),
    }
}
