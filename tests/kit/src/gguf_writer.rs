//! Writes tiny models as GGUF files the way llama.cpp's converter lays them out (llama.cpp tensor
//! names, norms stored as 1 + w, metadata under the architecture's prefix), with each tensor in
//! the quantization the test asks for.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use gemma_proto::Architecture;

use crate::{NamedTensors, TinyGemma};

enum Meta {
    U32(u32),
    F32(f32),
    Str(String),
}

/// A tensor of the file, already encoded.
struct Encoded {
    name: String,
    /// [out, in] (row-major, HF order).
    shape: Vec<usize>,
    type_id: u32,
    bytes: Vec<u8>,
}

impl TinyGemma {
    /// Writes this model as one GGUF file; `quant` picks each tensor's type from its HF name
    /// (norms are always F32, as llama.cpp keeps them). Returns the values the file holds, by HF
    /// name and with HF semantics (norm weights w), for a reference model of exactly the file.
    pub fn write_gguf(
        &self,
        path: &Path,
        quant: impl Fn(&str) -> GgmlDType,
    ) -> Result<NamedTensors> {
        let arch = match self.architecture {
            Architecture::Gemma => "gemma",
            Architecture::Gemma2 => "gemma2",
            Architecture::Gemma3 => "gemma3",
        };
        let mut held = Vec::new();
        let mut encoded = Vec::new();
        for (name, shape, values) in self.tensors() {
            let gguf = gemma_worker::weights::gguf::gguf_name(&name, self.architecture)
                .with_context(|| format!("no GGUF name for {name}"))?;
            let is_norm = name.ends_with("norm.weight");
            let (ty, stored) = if is_norm {
                (GgmlDType::F32, values.iter().map(|w| 1.0 + w).collect())
            } else {
                (quant(&name), values)
            };
            let (bytes, decoded) = encode(&stored, &shape, ty)?;
            let hf_values = if is_norm {
                decoded.iter().map(|v| v - 1.0).collect()
            } else {
                decoded
            };
            held.push((name, shape.clone(), hf_values));
            encoded.push(Encoded {
                name: gguf,
                shape,
                type_id: type_id(ty),
                bytes,
            });
        }
        let key = |k: &str| format!("{arch}.{k}");
        let mut meta = vec![
            (
                "general.architecture".to_string(),
                Meta::Str(arch.to_string()),
            ),
            (key("context_length"), Meta::U32(8192)),
            (key("embedding_length"), Meta::U32(self.hidden_size as u32)),
            (key("block_count"), Meta::U32(self.num_hidden_layers as u32)),
            (
                key("feed_forward_length"),
                Meta::U32(self.intermediate_size as u32),
            ),
            (
                key("attention.head_count"),
                Meta::U32(self.num_attention_heads as u32),
            ),
            (
                key("attention.head_count_kv"),
                Meta::U32(self.num_key_value_heads as u32),
            ),
            (key("attention.key_length"), Meta::U32(self.head_dim as u32)),
            (
                key("attention.value_length"),
                Meta::U32(self.head_dim as u32),
            ),
            (key("attention.layer_norm_rms_epsilon"), Meta::F32(1e-6)),
            (
                key("rope.freq_base"),
                Meta::F32(match self.architecture {
                    Architecture::Gemma3 => 1_000_000.0,
                    _ => 10_000.0,
                }),
            ),
            ("tokenizer.ggml.bos_token_id".to_string(), Meta::U32(2)),
            ("tokenizer.ggml.eos_token_id".to_string(), Meta::U32(1)),
        ];
        if self.architecture != Architecture::Gemma {
            meta.push((
                key("attention.sliding_window"),
                Meta::U32(self.sliding_window as u32),
            ));
        }
        if let Some(f) = self.rope_scaling_factor {
            meta.push((key("rope.scaling.type"), Meta::Str("linear".to_string())));
            meta.push((key("rope.scaling.factor"), Meta::F32(f as f32)));
        }
        for (k, cap) in [
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("final_logit_softcapping", self.final_logit_softcapping),
        ] {
            if let Some(c) = cap {
                meta.push((key(k), Meta::F32(c as f32)));
            }
        }
        write_file(path, &meta, &encoded)?;
        Ok(held)
    }
}

/// The tensor's bytes in `ty` and the values they decode to.
fn encode(values: &[f32], shape: &[usize], ty: GgmlDType) -> Result<(Vec<u8>, Vec<f32>)> {
    if ty == GgmlDType::F32 {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        return Ok((bytes, values.to_vec()));
    }
    let t = Tensor::from_vec(values.to_vec(), shape, &Device::Cpu)?;
    let q = QTensor::quantize(&t, ty)?;
    let decoded = q
        .dequantize(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok((q.data()?.to_vec(), decoded))
}

fn type_id(ty: GgmlDType) -> u32 {
    match ty {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
        GgmlDType::Q8_1 => 9,
    }
}

const ALIGNMENT: usize = 32;

fn write_file(path: &Path, meta: &[(String, Meta)], tensors: &[Encoded]) -> Result<()> {
    let mut out: Vec<u8> = Vec::new();
    let string = |out: &mut Vec<u8>, s: &str| {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    };
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        string(&mut out, k);
        match v {
            Meta::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::Str(s) => {
                out.extend(8u32.to_le_bytes());
                string(&mut out, s);
            }
        }
    }
    let mut offset = 0usize;
    for t in tensors {
        string(&mut out, &t.name);
        out.extend((t.shape.len() as u32).to_le_bytes());
        // GGUF lists dimensions fastest-varying first.
        for d in t.shape.iter().rev() {
            out.extend((*d as u64).to_le_bytes());
        }
        out.extend(t.type_id.to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offset += t.bytes.len().next_multiple_of(ALIGNMENT);
    }
    out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
    for t in tensors {
        out.extend(&t.bytes);
        out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
    }
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(&out)?;
    Ok(())
}
