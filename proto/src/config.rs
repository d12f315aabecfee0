//! The model's architecture as read from a HuggingFace `config.json`, validated once so that
//! nothing downstream has to second-guess it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::gguf::GgufHeader;

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
    /// Gemma 2: norms after attention and MLP too, logit soft-capping, alternating
    /// sliding-window layers.
    Gemma2,
    /// Gemma 3 (text): Gemma 2's layout plus QK-norm, five sliding layers per global one, and a
    /// RoPE base of its own for the sliding layers.
    Gemma3,
}

impl Architecture {
    /// RMSNorm after attention and after the MLP, before each residual add (Gemma 2 and 3).
    pub fn has_sandwich_norms(self) -> bool {
        !matches!(self, Architecture::Gemma)
    }

    /// RMSNorm over each query and key head before RoPE (Gemma 3).
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Architecture::Gemma3)
    }
}

/// Which keys a layer attends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerKind {
    /// Every earlier position (global attention).
    Full,
    /// Only the last `sliding_window` positions, the query's own included.
    Sliding,
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
    /// From the file, or HF's default (256); never hidden / heads: Gemma 7B has 16 heads x 256 =
    /// 4096 != hidden 3072.
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub activation: Activation,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
    /// Attention scores are scaled by 1/sqrt(this) (Gemma 1: head_dim).
    pub query_pre_attn_scalar: f64,
    /// Scores become tanh(s / cap) * cap before the mask (Gemma 2).
    pub attn_logit_softcapping: Option<f64>,
    /// Logits become tanh(l / cap) * cap (Gemma 2).
    pub final_logit_softcapping: Option<f64>,
    /// Keys a sliding layer sees, the query's own included (None: no sliding layers).
    pub sliding_window: Option<usize>,
    /// One entry per layer.
    pub layer_kinds: Vec<LayerKind>,
    /// RoPE base of the sliding layers (Gemma 3: its own; otherwise `rope_theta`).
    pub rope_local_theta: f64,
    /// Linear RoPE scaling of the full-attention layers (1: none): positions are divided by it.
    pub rope_scaling_factor: f64,
}

/// `config.json` as HuggingFace writes it: every field optional, because HF's config classes
/// fill absent keys with their defaults and Google's multimodal Gemma 3 configs rely on that
/// (gemma-3-4b-it's `text_config` gives six keys). A default that does not fit the weights is
/// caught when the shards are loaded: every stored tensor's shape is checked against this config.
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
    max_position_embeddings: Option<usize>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    attention_bias: Option<bool>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    pad_token_id: Option<u32>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    sliding_window: Option<usize>,
    /// transformers 4.x: every how many layers one is global (4.55+ writes `_sliding_window_pattern`
    /// next to `layer_types`, which wins).
    sliding_window_pattern: Option<usize>,
    layer_types: Option<Vec<String>>,
    /// transformers 4.x RoPE keys: the global base, Gemma 3's local base, the global scaling.
    rope_theta: Option<f64>,
    rope_local_base_freq: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers 5: `{rope_type, rope_theta, factor?}`, or one such entry per layer kind
    /// (`full_attention`, `sliding_attention`) for Gemma 3.
    rope_parameters: Option<serde_json::Value>,
    /// EmbeddingGemma's bidirectional attention (bool; a string in later families).
    use_bidirectional_attention: Option<serde_json::Value>,
    /// The multimodal Gemma 3 config nests the language model's.
    text_config: Option<serde_json::Value>,
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
            Some("gemma2") => Architecture::Gemma2,
            Some("gemma3_text") => Architecture::Gemma3,
            Some("gemma3") => {
                // The multimodal checkpoint: serve its language model.
                let text = raw.text_config.ok_or(ConfigError::Missing("text_config"))?;
                let mut inner: HfConfig =
                    serde_json::from_value(text).map_err(|e| ConfigError::Json {
                        path: String::new(),
                        message: format!("text_config: {e}"),
                    })?;
                inner.model_type = Some("gemma3_text".to_string());
                // The token ids live at the top level of the multimodal config.
                inner.bos_token_id = inner.bos_token_id.or(raw.bos_token_id);
                inner.eos_token_id = inner.eos_token_id.or(raw.eos_token_id);
                inner.pad_token_id = inner.pad_token_id.or(raw.pad_token_id);
                return Self::from_hf(inner);
            }
            Some(other) => {
                return Err(ConfigError::invalid(
                    "model_type",
                    other,
                    "\"gemma\" (Gemma 1 and 1.1), \"gemma2\", \"gemma3_text\" or \"gemma3\"",
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
        if let Some(v) = raw
            .use_bidirectional_attention
            .as_ref()
            .filter(|v| !matches!(v, serde_json::Value::Null | serde_json::Value::Bool(false)))
        {
            return Err(ConfigError::invalid(
                "use_bidirectional_attention",
                &v.to_string(),
                "false or absent (an embedding model, not a causal language model)",
            ));
        }
        let defaults = ArchDefaults::of(architecture);
        let num_hidden_layers = raw.num_hidden_layers.unwrap_or(defaults.num_hidden_layers);
        let head_dim = raw.head_dim.unwrap_or(defaults.head_dim);
        let layer_kinds = match raw.layer_types {
            Some(ref types) => layer_kinds_from_names(types, num_hidden_layers)?,
            None => defaults.layer_kinds(
                num_hidden_layers,
                raw.sliding_window_pattern
                    .unwrap_or(defaults.sliding_pattern),
            ),
        };
        let rope = RopeSettings::read(&raw, architecture, &defaults)?;
        let cfg = ModelConfig {
            architecture,
            vocab_size: raw.vocab_size.unwrap_or(defaults.vocab_size),
            hidden_size: raw.hidden_size.unwrap_or(defaults.hidden_size),
            intermediate_size: raw.intermediate_size.unwrap_or(defaults.intermediate_size),
            num_hidden_layers,
            num_attention_heads: raw
                .num_attention_heads
                .unwrap_or(defaults.num_attention_heads),
            num_key_value_heads: raw
                .num_key_value_heads
                .unwrap_or(defaults.num_key_value_heads),
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: rope.global_theta,
            max_position_embeddings: raw
                .max_position_embeddings
                .unwrap_or(defaults.max_position_embeddings),
            activation: activation(raw.hidden_activation.as_deref(), raw.hidden_act.as_deref())?,
            bos_token_id: first_id(raw.bos_token_id.as_ref()).unwrap_or(2),
            eos_token_id: first_id(raw.eos_token_id.as_ref()).unwrap_or(1),
            pad_token_id: raw.pad_token_id.unwrap_or(0),
            query_pre_attn_scalar: raw
                .query_pre_attn_scalar
                .unwrap_or(defaults.query_pre_attn_scalar.unwrap_or(head_dim as f64)),
            attn_logit_softcapping: match architecture {
                Architecture::Gemma2 => raw.attn_logit_softcapping.or(Some(50.0)),
                _ => raw.attn_logit_softcapping,
            },
            final_logit_softcapping: match architecture {
                Architecture::Gemma2 => raw.final_logit_softcapping.or(Some(30.0)),
                _ => raw.final_logit_softcapping,
            },
            sliding_window: match architecture {
                Architecture::Gemma => None,
                _ => Some(raw.sliding_window.unwrap_or(4096)),
            },
            layer_kinds,
            rope_local_theta: rope.local_theta,
            rope_scaling_factor: rope.global_linear_factor,
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
        if self.layer_kinds.len() != self.num_hidden_layers {
            return Err(ConfigError::invalid(
                "layer_types",
                &format!("{} entries", self.layer_kinds.len()),
                &format!("one per layer ({})", self.num_hidden_layers),
            ));
        }
        if self.layer_kinds.contains(&LayerKind::Sliding) && self.sliding_window.unwrap_or(0) == 0 {
            return Err(ConfigError::invalid(
                "sliding_window",
                "0 or none",
                "a positive window for the sliding_attention layers",
            ));
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        for (name, value) in [
            ("query_pre_attn_scalar", Some(self.query_pre_attn_scalar)),
            ("rope_local_base_freq", Some(self.rope_local_theta)),
            ("rope_scaling.factor", Some(self.rope_scaling_factor)),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("final_logit_softcapping", self.final_logit_softcapping),
        ] {
            if let Some(v) = value.filter(|v| !positive(*v)) {
                return Err(ConfigError::invalid(
                    name,
                    &v.to_string(),
                    "a positive number",
                ));
            }
        }
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

    /// The attention score scale: 1/sqrt(query_pre_attn_scalar).
    pub fn attention_scale(&self) -> f64 {
        1.0 / self.query_pre_attn_scalar.sqrt()
    }

    /// Number of weight parameters (embedding counted once: the lm_head is tied to it).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let norms = if self.architecture.has_sandwich_norms() {
            4 * h
        } else {
            2 * h
        };
        let qk_norms = if self.architecture.has_qk_norm() {
            2 * self.head_dim
        } else {
            0
        };
        let per_layer = h * q * 2 + h * kv * 2 + 3 * h * self.intermediate_size + norms + qk_norms;
        self.vocab_size * h + self.num_hidden_layers * per_layer + h
    }
}

/// What HF's config classes (GemmaConfig, Gemma2Config, Gemma3TextConfig) assume when a key is
/// absent.
struct ArchDefaults {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
    max_position_embeddings: usize,
    rope_theta: f64,
    query_pre_attn_scalar: Option<f64>,
    /// Every `sliding_pattern`-th layer is global; 0: none slide.
    sliding_pattern: usize,
}

impl ArchDefaults {
    fn of(arch: Architecture) -> Self {
        match arch {
            Architecture::Gemma => Self {
                vocab_size: 256_000,
                hidden_size: 3072,
                intermediate_size: 24_576,
                num_hidden_layers: 28,
                num_attention_heads: 16,
                num_key_value_heads: 16,
                head_dim: 256,
                max_position_embeddings: 8192,
                rope_theta: 10_000.0,
                query_pre_attn_scalar: None,
                sliding_pattern: 0,
            },
            Architecture::Gemma2 => Self {
                vocab_size: 256_000,
                hidden_size: 2304,
                intermediate_size: 9216,
                num_hidden_layers: 26,
                num_attention_heads: 8,
                num_key_value_heads: 4,
                head_dim: 256,
                max_position_embeddings: 8192,
                rope_theta: 10_000.0,
                query_pre_attn_scalar: Some(256.0),
                sliding_pattern: 2,
            },
            // Gemma3TextConfig's shape defaults are Gemma2Config's.
            Architecture::Gemma3 => Self {
                vocab_size: 262_208,
                max_position_embeddings: 131_072,
                rope_theta: 1_000_000.0,
                sliding_pattern: 6,
                ..Self::of(Architecture::Gemma2)
            },
        }
    }

    /// HF's rule: layer i slides unless (i + 1) is a multiple of the pattern (Gemma 2: layers
    /// 0, 2, 4.. slide; Gemma 3: five sliding, then one global).
    fn layer_kinds(&self, layers: usize, pattern: usize) -> Vec<LayerKind> {
        (0..layers)
            .map(|i| {
                if pattern > 0 && !(i + 1).is_multiple_of(pattern) {
                    LayerKind::Sliding
                } else {
                    LayerKind::Full
                }
            })
            .collect()
    }
}

fn layer_kinds_from_names(types: &[String], layers: usize) -> Result<Vec<LayerKind>, ConfigError> {
    if types.len() != layers {
        return Err(ConfigError::invalid(
            "layer_types",
            &format!("{} entries", types.len()),
            &format!("one per layer ({layers})"),
        ));
    }
    types
        .iter()
        .map(|t| match t.as_str() {
            "full_attention" => Ok(LayerKind::Full),
            "sliding_attention" => Ok(LayerKind::Sliding),
            other => Err(ConfigError::invalid(
                "layer_types",
                other,
                "\"full_attention\" or \"sliding_attention\"",
            )),
        })
        .collect()
}

/// The RoPE of both layer kinds, from either key style: transformers 4.x (`rope_theta`,
/// `rope_local_base_freq`, `rope_scaling`) or transformers 5 (`rope_parameters`, flat or one
/// entry per layer kind). When a file gives both styles they must agree.
struct RopeSettings {
    global_theta: f64,
    local_theta: f64,
    /// Gemma 3's larger models divide the global layers' positions by this (1: no scaling).
    global_linear_factor: f64,
}

/// One `rope_parameters` entry: `{rope_type, rope_theta, factor?}`.
struct RopeEntry {
    theta: Option<f64>,
    linear_factor: Option<f64>,
}

impl RopeSettings {
    fn read(
        raw: &HfConfig,
        arch: Architecture,
        defaults: &ArchDefaults,
    ) -> Result<Self, ConfigError> {
        let (global, local) = match raw.rope_parameters.as_ref().filter(|v| !v.is_null()) {
            None => (None, None),
            Some(v)
                if v.get("full_attention").is_some() || v.get("sliding_attention").is_some() =>
            {
                (
                    RopeEntry::parse(
                        v.get("full_attention"),
                        "rope_parameters.full_attention",
                        true,
                    )?,
                    RopeEntry::parse(
                        v.get("sliding_attention"),
                        "rope_parameters.sliding_attention",
                        false,
                    )?,
                )
            }
            // One flat entry: the global layers' RoPE (Gemma 1 and 2 have no other; a flat
            // Gemma 3 entry leaves the local base to `rope_local_base_freq`).
            Some(v) => {
                let scaling_allowed = arch == Architecture::Gemma3;
                let entry = RopeEntry::parse(Some(v), "rope_parameters", scaling_allowed)?;
                (entry, None)
            }
        };
        let legacy_factor = legacy_rope_scaling(raw.rope_scaling.as_ref(), arch)?;
        let global_theta = agree(
            "rope_theta",
            raw.rope_theta,
            "rope_parameters (global layers) rope_theta",
            global.as_ref().and_then(|e| e.theta),
        )?
        .unwrap_or(defaults.rope_theta);
        let local_theta = match arch {
            Architecture::Gemma3 => agree(
                "rope_local_base_freq",
                raw.rope_local_base_freq,
                "rope_parameters.sliding_attention.rope_theta",
                local.as_ref().and_then(|e| e.theta),
            )?
            .unwrap_or(10_000.0),
            // One RoPE: the sliding layers of Gemma 2 use the global base.
            _ => global_theta,
        };
        let global_linear_factor = agree(
            "rope_scaling.factor",
            legacy_factor,
            "rope_parameters (global layers) factor",
            global.as_ref().and_then(|e| e.linear_factor),
        )?
        .unwrap_or(1.0);
        Ok(Self {
            global_theta,
            local_theta,
            global_linear_factor,
        })
    }
}

impl RopeEntry {
    /// `None` for an absent or null entry. Only "default" and (where `scaling_allowed`) "linear"
    /// are supported: every published Gemma uses nothing else.
    fn parse(
        value: Option<&serde_json::Value>,
        field: &'static str,
        scaling_allowed: bool,
    ) -> Result<Option<Self>, ConfigError> {
        let Some(v) = value.filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let refuse = || {
            let allowed = if scaling_allowed {
                "{\"rope_type\": \"default\", \"rope_theta\": T} or {\"rope_type\": \"linear\", \"rope_theta\": T, \"factor\": F}"
            } else {
                "{\"rope_type\": \"default\", \"rope_theta\": T} (no scaling on these layers)"
            };
            ConfigError::invalid(field, &v.to_string(), allowed)
        };
        let theta = match v.get("rope_theta") {
            None => None,
            Some(t) => Some(t.as_f64().ok_or_else(refuse)?),
        };
        let kind = v.get("rope_type").or_else(|| v.get("type"));
        let linear_factor = match kind.and_then(|k| k.as_str()) {
            None | Some("default") => None,
            Some("linear") if scaling_allowed => Some(
                v.get("factor")
                    .and_then(|f| f.as_f64())
                    .ok_or_else(refuse)?,
            ),
            Some(_) => return Err(refuse()),
        };
        Ok(Some(Self {
            theta,
            linear_factor,
        }))
    }
}

/// transformers 4.x `rope_scaling`: Gemma 3's larger models scale the global layers' RoPE
/// linearly; nothing else is supported.
fn legacy_rope_scaling(
    value: Option<&serde_json::Value>,
    arch: Architecture,
) -> Result<Option<f64>, ConfigError> {
    let Some(v) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str());
    match (arch, kind, v.get("factor").and_then(|f| f.as_f64())) {
        (_, Some("default"), _) => Ok(None),
        (Architecture::Gemma3, Some("linear"), Some(factor)) => Ok(Some(factor)),
        _ => Err(ConfigError::invalid(
            "rope_scaling",
            &v.to_string(),
            "null, or {\"rope_type\": \"linear\", \"factor\": F} on Gemma 3",
        )),
    }
}

/// The one value two key styles give for the same setting; refused when they differ.
fn agree(
    legacy_key: &'static str,
    legacy: Option<f64>,
    new_key: &'static str,
    new: Option<f64>,
) -> Result<Option<f64>, ConfigError> {
    match (legacy, new) {
        (Some(a), Some(b)) if a != b => Err(ConfigError::invalid(
            legacy_key,
            &a.to_string(),
            &format!("the same value as {new_key} ({b}), or only one of the two"),
        )),
        (a, b) => Ok(b.or(a)),
    }
}

/// A token id given as a number or as a list of numbers (Gemma 3: eos [1, 106]).
fn first_id(value: Option<&serde_json::Value>) -> Option<u32> {
    match value? {
        serde_json::Value::Array(ids) => ids.first()?.as_u64().map(|v| v as u32),
        v => v.as_u64().map(|v| v as u32),
    }
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

impl ModelConfig {
    /// The config of a GGUF file, from llama.cpp's metadata keys (`{arch}.embedding_length`,
    /// ...). What llama.cpp derives rather than stores is derived the same way: Gemma 2 and 3's
    /// query_pre_attn_scalar (hidden / heads for the 27B models, head_dim otherwise), the
    /// sliding-layer pattern, and Gemma 3's local RoPE base (10000).
    pub fn from_gguf(header: &GgufHeader) -> Result<Self, ConfigError> {
        let arch_name = header
            .get_str("general.architecture")
            .ok_or(ConfigError::Missing("general.architecture"))?;
        let architecture = match arch_name {
            "gemma" => Architecture::Gemma,
            "gemma2" => Architecture::Gemma2,
            "gemma3" => Architecture::Gemma3,
            other => {
                return Err(ConfigError::invalid(
                    "general.architecture",
                    other,
                    "gemma, gemma2 or gemma3",
                ))
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let int = |k: &'static str| -> Result<usize, ConfigError> {
            match header.get_int(&key(k)) {
                Some(v) if v >= 0 => Ok(v as usize),
                Some(v) => Err(ConfigError::invalid(
                    k,
                    &v.to_string(),
                    "a positive integer",
                )),
                None => Err(ConfigError::Missing(k)),
            }
        };
        let hidden_size = int("embedding_length")?;
        let num_hidden_layers = int("block_count")?;
        let num_attention_heads = int("attention.head_count")?;
        let head_dim = int("attention.key_length")
            .or_else(|_| Ok::<_, ConfigError>(hidden_size / num_attention_heads.max(1)))?;
        let vocab_size = header
            .tensor("token_embd.weight")
            .and_then(|t| t.shape.first().copied())
            .or_else(|| header.array_len("tokenizer.ggml.tokens"))
            .ok_or(ConfigError::Missing("token_embd.weight"))?;
        let defaults = ArchDefaults::of(architecture);
        // llama.cpp: the 27B models scale by hidden / heads, the others by head_dim.
        let is_27b = matches!(
            (architecture, num_hidden_layers),
            (Architecture::Gemma2, 46) | (Architecture::Gemma3, 62)
        );
        let query_pre_attn_scalar = if is_27b {
            (hidden_size / num_attention_heads.max(1)) as f64
        } else {
            head_dim as f64
        };
        let rope_theta = header
            .get_float(&key("rope.freq_base"))
            .unwrap_or(defaults.rope_theta);
        let rope_scaling_factor = match header.get_str(&key("rope.scaling.type")) {
            None | Some("none") => 1.0,
            Some("linear") => header.get_float(&key("rope.scaling.factor")).unwrap_or(1.0),
            Some(other) => {
                return Err(ConfigError::invalid(
                    "rope.scaling.type",
                    other,
                    "none or linear",
                ))
            }
        };
        let token = |k: &str, default: u32| {
            header
                .get_int(&format!("tokenizer.ggml.{k}"))
                .map_or(default, |v| v as u32)
        };
        let cfg = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: int("feed_forward_length")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: int("attention.head_count_kv").unwrap_or(num_attention_heads),
            head_dim,
            rms_norm_eps: header
                .get_float(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-6),
            rope_theta,
            max_position_embeddings: int("context_length").unwrap_or(8192),
            activation: Activation::GeluTanh,
            bos_token_id: token("bos_token_id", 2),
            eos_token_id: token("eos_token_id", 1),
            pad_token_id: token("padding_token_id", 0),
            query_pre_attn_scalar,
            attn_logit_softcapping: header.get_float(&key("attn_logit_softcapping")),
            final_logit_softcapping: header.get_float(&key("final_logit_softcapping")),
            sliding_window: match architecture {
                Architecture::Gemma => None,
                _ => Some(int("attention.sliding_window").unwrap_or(4096)),
            },
            layer_kinds: defaults.layer_kinds(num_hidden_layers, defaults.sliding_pattern),
            rope_local_theta: match architecture {
                Architecture::Gemma3 => 10_000.0,
                _ => rope_theta,
            },
            rope_scaling_factor,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
