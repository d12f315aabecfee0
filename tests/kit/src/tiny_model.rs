//! Tiny random Gemma 1/2/3 models written as HuggingFace folders (config.json plus safetensors,
//! single-file or sharded with an index), deterministic for a seed.
//!
//! The weights come from a SplitMix64 stream (the sampler's) so that a seed means the same model
//! for every version of every dependency.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use gemma_proto::{Architecture, SplitMix64};
use safetensors::tensor::{Dtype, TensorView};

use crate::reference;

/// A model's tensors: HF name, shape, f32 values.
pub type NamedTensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// How the weights are stored on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    F32,
    Bf16,
    F16,
}

/// The shape of a tiny Gemma model and how to write it.
#[derive(Debug, Clone)]
pub struct TinyGemma {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub seed: u64,
    pub storage: Storage,
    /// 1: model.safetensors; more: model-0000i-of-0000n.safetensors plus the index.
    pub files: usize,
    pub architecture: Architecture,
    /// Gemma 2/3: keys a sliding layer sees, and every how many layers one is global.
    pub sliding_window: usize,
    pub sliding_pattern: usize,
    pub query_pre_attn_scalar: f64,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    /// Gemma 3: linear RoPE scaling of the global layers.
    pub rope_scaling_factor: Option<f64>,
}

impl TinyGemma {
    /// Shaped like Gemma 7B: multi-head attention, head_dim * heads != hidden_size.
    pub fn mha_like_7b() -> Self {
        Self {
            vocab_size: 256_000,
            hidden_size: 64,
            intermediate_size: 256,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 4,
            head_dim: 32,
            seed: 7,
            storage: Storage::F32,
            files: 1,
            architecture: Architecture::Gemma,
            sliding_window: 0,
            sliding_pattern: 0,
            query_pre_attn_scalar: 32.0,
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            rope_scaling_factor: None,
        }
    }

    /// Shaped like Gemma 2B: multi-query attention (one KV head), head_dim * heads == hidden.
    pub fn mqa_like_2b() -> Self {
        Self {
            vocab_size: 256_000,
            hidden_size: 64,
            intermediate_size: 192,
            num_hidden_layers: 3,
            num_attention_heads: 4,
            num_key_value_heads: 1,
            head_dim: 16,
            seed: 2,
            storage: Storage::F32,
            files: 1,
            architecture: Architecture::Gemma,
            sliding_window: 0,
            sliding_pattern: 0,
            query_pre_attn_scalar: 16.0,
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            rope_scaling_factor: None,
        }
    }

    /// Shaped like Gemma 2 (grouped-query attention, 2 query heads per KV head): sandwich norms,
    /// soft-capped attention scores and logits (caps low enough to bend them), a
    /// query_pre_attn_scalar that is not head_dim, and a 6-token window on every other layer, so
    /// the test prompts (5, 11, 23 tokens, chunks of 8) cross it while prefilling and decoding.
    pub fn gemma2_like() -> Self {
        Self {
            vocab_size: 256_000,
            hidden_size: 64,
            intermediate_size: 192,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            seed: 21,
            storage: Storage::F32,
            files: 1,
            architecture: Architecture::Gemma2,
            sliding_window: 6,
            sliding_pattern: 2,
            query_pre_attn_scalar: 24.0,
            attn_logit_softcapping: Some(4.0),
            final_logit_softcapping: Some(30.0),
            rope_scaling_factor: None,
        }
    }

    /// Shaped like gemma-3-270m (multi-query, head_dim * heads != hidden): QK-norm, sandwich
    /// norms, two sliding layers per global one with a 5-token window and their own RoPE base,
    /// linear RoPE scaling on the global layers.
    pub fn gemma3_like() -> Self {
        Self {
            vocab_size: 262_144,
            hidden_size: 64,
            intermediate_size: 256,
            num_hidden_layers: 6,
            num_attention_heads: 4,
            num_key_value_heads: 1,
            head_dim: 32,
            seed: 3,
            storage: Storage::F32,
            files: 1,
            architecture: Architecture::Gemma3,
            sliding_window: 5,
            sliding_pattern: 3,
            query_pre_attn_scalar: 32.0,
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            rope_scaling_factor: Some(2.0),
        }
    }

    /// `gemma2_like` with the two settings candle-transformers' gemma2 does not implement put
    /// where they cannot matter: query_pre_attn_scalar = head_dim (candle scales scores by
    /// 1/sqrt(head_dim)) and the real models' 4096-token window, longer than any test sequence
    /// (candle windows every layer, one key wider than HF, and only while prefilling). Seed 26:
    /// with 21, one greedy choice of the test prompts is 0.0002 from a tie.
    pub fn gemma2_within_candle() -> Self {
        Self {
            query_pre_attn_scalar: 16.0,
            sliding_window: 4096,
            seed: 26,
            ..Self::gemma2_like()
        }
    }

    /// `gemma3_like` without RoPE scaling, which candle-transformers' gemma3 does not read.
    pub fn gemma3_unscaled() -> Self {
        Self {
            rope_scaling_factor: None,
            ..Self::gemma3_like()
        }
    }

    /// The tiny model called `name` (see [`TinyGemma::VARIANTS`]), as the `gemma-tiny-model`
    /// binary and the golden files name them.
    pub fn variant(name: &str) -> Option<Self> {
        Some(match name {
            "mha" => Self::mha_like_7b(),
            "mqa" => Self::mqa_like_2b(),
            "gemma2" => Self::gemma2_like(),
            "gemma2-within-candle" => Self::gemma2_within_candle(),
            "gemma3" => Self::gemma3_like(),
            "gemma3-unscaled" => Self::gemma3_unscaled(),
            _ => return None,
        })
    }

    pub const VARIANTS: &'static [&'static str] = &[
        "mha",
        "mqa",
        "gemma2",
        "gemma2-within-candle",
        "gemma3",
        "gemma3-unscaled",
    ];

    /// What a file computed from this model (HF transformers' golden logits) must record so that
    /// a later kit can tell whether it still writes the same model: the seed, the storage, the
    /// config.json and a fingerprint of every stored weight.
    pub fn provenance(&self) -> serde_json::Value {
        serde_json::json!({
            "seed": self.seed,
            "storage": format!("{:?}", self.storage).to_lowercase(),
            "config": self.config_json(),
            "weights_fnv1a64": format!("{:016x}", self.weights_fingerprint()),
        })
    }

    /// FNV-1a (64 bit) over every tensor's name, shape and stored little-endian bytes, in the
    /// order they are written.
    pub fn weights_fingerprint(&self) -> u64 {
        let mut hash = Fnv1a64::new();
        for (name, shape, values) in self.tensors() {
            hash.write(name.as_bytes());
            shape
                .iter()
                .for_each(|&d| hash.write(&(d as u64).to_le_bytes()));
            hash.write(&encode(&values, self.storage));
        }
        hash.finish()
    }

    pub fn with_storage(mut self, storage: Storage) -> Self {
        self.storage = storage;
        self
    }

    pub fn with_files(mut self, files: usize) -> Self {
        self.files = files;
        self
    }

    /// The config.json a HuggingFace checkpoint of this shape would carry.
    pub fn config_json(&self) -> serde_json::Value {
        match self.architecture {
            Architecture::Gemma => self.gemma1_config(),
            Architecture::Gemma2 => self.gemma2_config(),
            Architecture::Gemma3 => self.gemma3_config(),
        }
    }

    fn gemma2_config(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["Gemma2ForCausalLM"],
            "attention_bias": false,
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "bos_token_id": 2,
            "cache_implementation": "hybrid",
            "eos_token_id": 1,
            "final_logit_softcapping": self.final_logit_softcapping,
            "head_dim": self.head_dim,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": 8192,
            "model_type": "gemma2",
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "pad_token_id": 0,
            "query_pre_attn_scalar": json_number(self.query_pre_attn_scalar),
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "sliding_window": self.sliding_window,
            "torch_dtype": "float32",
            "vocab_size": self.vocab_size
        })
    }

    /// Written with `layer_types` (what current transformers saves) and the older
    /// `sliding_window_pattern` beside it, which candle-transformers' gemma3 requires; both say
    /// the same.
    fn gemma3_config(&self) -> serde_json::Value {
        let layer_types: Vec<&str> = self
            .layer_is_sliding()
            .into_iter()
            .map(|s| {
                if s {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
            })
            .collect();
        let rope_scaling = self
            .rope_scaling_factor
            .map(|f| serde_json::json!({"rope_type": "linear", "factor": f}));
        serde_json::json!({
            "architectures": ["Gemma3ForCausalLM"],
            "attention_bias": false,
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "bos_token_id": 2,
            "eos_token_id": [1, 106],
            "final_logit_softcapping": self.final_logit_softcapping,
            "head_dim": self.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "layer_types": layer_types,
            "max_position_embeddings": 32768,
            "model_type": "gemma3_text",
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "pad_token_id": 0,
            "query_pre_attn_scalar": json_number(self.query_pre_attn_scalar),
            "rms_norm_eps": 1e-6,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": rope_scaling,
            "rope_theta": 1000000.0,
            "sliding_window": self.sliding_window,
            "sliding_window_pattern": self.sliding_pattern,
            "torch_dtype": "float32",
            "vocab_size": self.vocab_size
        })
    }

    /// Which layers slide: all but every `sliding_pattern`-th (HF's rule).
    pub fn layer_is_sliding(&self) -> Vec<bool> {
        (0..self.num_hidden_layers)
            .map(|i| self.sliding_pattern > 0 && (i + 1) % self.sliding_pattern != 0)
            .collect()
    }

    fn gemma1_config(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["GemmaForCausalLM"],
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": 2,
            "eos_token_id": 1,
            "head_dim": self.head_dim,
            "hidden_act": "gelu",
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": 8192,
            "model_type": "gemma",
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "pad_token_id": 0,
            "rms_norm_eps": 1e-6,
            "rope_scaling": null,
            "rope_theta": 10000.0,
            "torch_dtype": "float32",
            "vocab_size": self.vocab_size
        })
    }

    /// Every tensor of the model: name, shape, f32 values (before storage rounding).
    pub fn tensors(&self) -> NamedTensors {
        let mut rng = SplitMix64::new(self.seed);
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let q = self.num_attention_heads * hd;
        let kv = self.num_key_value_heads * hd;
        let mut out = Vec::new();
        let mut add = |name: String, shape: Vec<usize>, scale: f32| {
            let n = shape.iter().product();
            let values = (0..n).map(|_| scale * rng.symmetric()).collect();
            out.push((name, shape, values));
        };
        // Embedding entries of about 2/sqrt(h): scaled by sqrt(h) they are O(1), and the tied
        // logits spread wide enough that greedy choices are clear.
        add(
            "model.embed_tokens.weight".into(),
            vec![self.vocab_size, h],
            3.5 / (h as f32).sqrt(),
        );
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let lin = |fan_in: usize| 1.7 / (fan_in as f32).sqrt();
            // Output projections strong enough that the layers, not the input embedding, dominate
            // the residual stream: otherwise tied logits just echo the last token.
            let out_proj = |fan_in: usize| 12.0 / (fan_in as f32).sqrt();
            add(format!("{p}.input_layernorm.weight"), vec![h], 0.2);
            add(format!("{p}.self_attn.q_proj.weight"), vec![q, h], lin(h));
            add(format!("{p}.self_attn.k_proj.weight"), vec![kv, h], lin(h));
            if self.architecture == Architecture::Gemma3 {
                add(format!("{p}.self_attn.q_norm.weight"), vec![hd], 0.3);
                add(format!("{p}.self_attn.k_norm.weight"), vec![hd], 0.3);
            }
            add(format!("{p}.self_attn.v_proj.weight"), vec![kv, h], lin(h));
            add(
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, q],
                out_proj(q),
            );
            add(format!("{p}.post_attention_layernorm.weight"), vec![h], 0.2);
            if self.architecture != Architecture::Gemma {
                add(
                    format!("{p}.pre_feedforward_layernorm.weight"),
                    vec![h],
                    0.2,
                );
                add(
                    format!("{p}.post_feedforward_layernorm.weight"),
                    vec![h],
                    0.2,
                );
            }
            add(format!("{p}.mlp.gate_proj.weight"), vec![i, h], lin(h));
            add(format!("{p}.mlp.up_proj.weight"), vec![i, h], lin(h));
            add(format!("{p}.mlp.down_proj.weight"), vec![h, i], out_proj(i));
        }
        add("model.norm.weight".into(), vec![h], 0.2);
        out
    }

    /// Writes a folder a coordinator can serve: the model and the real Gemma tokenizer.
    pub fn write_servable(&self, dir: &Path) -> Result<()> {
        self.write(dir)?;
        crate::add_tokenizer(dir)
    }

    /// Writes the model folder (config.json and the weights) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&self.config_json())?,
        )?;
        let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .tensors()
            .into_iter()
            .map(|(name, shape, values)| (name, shape, encode(&values, self.storage)))
            .collect();
        let dtype = match self.storage {
            Storage::F32 => Dtype::F32,
            Storage::Bf16 => Dtype::BF16,
            Storage::F16 => Dtype::F16,
        };
        if self.files <= 1 {
            return write_safetensors(&dir.join("model.safetensors"), &tensors, dtype);
        }
        let n = self.files;
        let mut weight_map = serde_json::Map::new();
        let per_file = tensors.len().div_ceil(n);
        for (f, chunk) in tensors.chunks(per_file).enumerate() {
            let name = format!("model-{:05}-of-{:05}.safetensors", f + 1, n);
            for (t, _, _) in chunk {
                weight_map.insert(t.clone(), name.clone().into());
            }
            write_safetensors(&dir.join(&name), chunk, dtype)?;
        }
        let total: usize = tensors.iter().map(|(_, _, b)| b.len()).sum();
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index)?,
        )?;
        Ok(())
    }

    /// The plain reference model of these weights as the file stores them.
    pub fn reference(&self) -> reference::NaiveGemma {
        let cfg = gemma_proto::ModelConfig::from_json(&self.config_json().to_string())
            .expect("the tiny model's own config is valid");
        let tensors = self
            .tensors()
            .into_iter()
            .map(|(n, s, v)| (n, s, stored_values(&v, self.storage)))
            .collect();
        reference::NaiveGemma::new(cfg, tensors)
    }

    /// Bytes of all weights in f32.
    pub fn f32_bytes(&self) -> usize {
        self.tensors().iter().map(|(_, _, v)| v.len() * 4).sum()
    }
}

/// A config number as HF writes it: an integer when it is one (candle-transformers reads
/// `query_pre_attn_scalar` as an integer), else a float.
fn json_number(v: f64) -> serde_json::Value {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        serde_json::json!(v as i64)
    } else {
        serde_json::json!(v)
    }
}

/// The 64-bit FNV-1a hash: a few lines, the same in any language, enough to notice that a
/// generator or a scale changed.
struct Fnv1a64(u64);

impl Fnv1a64 {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// `values` as `storage` would hold them, back in f32 (what a reader of the file sees).
pub fn stored_values(values: &[f32], storage: Storage) -> Vec<f32> {
    match storage {
        Storage::F32 => values.to_vec(),
        Storage::Bf16 => values
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect(),
        Storage::F16 => values
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect(),
    }
}

fn encode(values: &[f32], storage: Storage) -> Vec<u8> {
    match storage {
        Storage::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Storage::Bf16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        Storage::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

/// Writes tensors with the given raw little-endian bytes as one safetensors file.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<u8>)],
    dtype: Dtype,
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            Ok((name.clone(), TensorView::new(dtype, shape.clone(), bytes)?))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None::<HashMap<String, String>>, path)
        .with_context(|| format!("writing {}", path.display()))
}
