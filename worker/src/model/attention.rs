//! Self-attention over this rank's query heads and their KV heads, reading and writing the paged
//! cache; the o_proj output is a partial sum.

use candle_core::{DType, Device, Result, Tensor};
use gemma_proto::{ModelConfig, ShardSpec};

use super::context::{DecodeBatch, StepContext};
use super::linear::Linear;
use super::rope::Rope;
use crate::error::LoadError;
use crate::kv_cache::LayerKv;
use crate::weights::{Slice, WeightFiles};

#[derive(Debug, Clone)]
pub struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    pub fn load(
        files: &WeightFiles,
        prefix: &str,
        cfg: &ModelConfig,
        spec: &ShardSpec,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, LoadError> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let q_rows = spec.q_heads.start * hd..spec.q_heads.end * hd;
        let kv_rows = spec.kv_heads.start * hd..spec.kv_heads.end * hd;
        let q_out = cfg.num_attention_heads * hd;
        let kv_out = cfg.num_key_value_heads * hd;
        let load = |name: &str, shape: [usize; 2], slice: Slice| {
            Linear::load(
                files,
                &format!("{prefix}.{name}.weight"),
                shape,
                slice,
                dtype,
                device,
            )
        };
        Ok(Self {
            q: load("q_proj", [q_out, h], Slice::Rows(q_rows.clone()))?,
            k: load("k_proj", [kv_out, h], Slice::Rows(kv_rows.clone()))?,
            v: load("v_proj", [kv_out, h], Slice::Rows(kv_rows))?,
            o: load("o_proj", [h, q_out], Slice::Cols(q_rows))?,
            q_heads: spec.q_heads.len(),
            kv_heads: spec.kv_heads.len(),
            head_dim: hd,
            scale: 1.0 / (hd as f64).sqrt(),
        })
    }

    /// x: [tokens, hidden] of the whole batch -> this rank's partial of the attention output.
    pub fn forward_partial(&self, x: &Tensor, ctx: &StepContext, kv: &LayerKv) -> Result<Tensor> {
        let t = x.dim(0)?;
        let q = self
            .q
            .forward(x)?
            .reshape((t, self.q_heads, self.head_dim))?;
        let k = self
            .k
            .forward(x)?
            .reshape((t, self.kv_heads, self.head_dim))?;
        let v = self
            .v
            .forward(x)?
            .reshape((t, self.kv_heads, self.head_dim))?;
        let q = Rope::apply(&q, &ctx.cos, &ctx.sin)?;
        let k = Rope::apply(&k, &ctx.cos, &ctx.sin)?;
        let v = v.contiguous()?;
        // Every new K/V first: sequences own disjoint blocks, so no read below sees a stale one.
        for seq in &ctx.seqs {
            kv.write(&k, &v, &seq.slots.writes)?;
        }
        let mut outs = Vec::with_capacity(ctx.seqs.len() + 1);
        if let Some(d) = &ctx.decode {
            outs.push(self.attend_decodes(&q, d, kv)?);
        }
        for seq in ctx.seqs.iter().filter(|s| !s.batched) {
            let (keys, values) = kv.read(&seq.slots.context)?;
            let q_s = q.narrow(0, seq.offset, seq.len)?;
            outs.push(self.attend(&q_s, &keys, &values, seq.mask.as_ref())?);
        }
        let attn = Tensor::cat(&outs, 0)?;
        let attn = match &ctx.restore {
            Some(order) => attn.index_select(order, 0)?,
            None => attn,
        };
        self.o.forward(&attn)
    }

    /// All decoding sequences at once: q [n, hq, hd] against their padded contexts.
    fn attend_decodes(&self, q: &Tensor, d: &DecodeBatch, kv: &LayerKv) -> Result<Tensor> {
        let (n, len) = (d.count, d.max_len);
        let q = q.index_select(&d.rows, 0)?.unsqueeze(2)?; // [n, hq, 1, hd]
        let (k, v) = kv.read(&d.slots)?; // [n * len, hkv, hd]
        let per_seq = |t: Tensor| -> Result<Tensor> {
            let t = t
                .reshape((n, len, self.kv_heads, self.head_dim))?
                .transpose(1, 2)?; // [n, hkv, len, hd]
            let group = self.q_heads / self.kv_heads;
            t.unsqueeze(2)?
                .broadcast_as((n, self.kv_heads, group, len, self.head_dim))?
                .reshape((n, self.q_heads, len, self.head_dim))
        };
        let (k, v) = (per_seq(k)?, per_seq(v)?);
        let scores = (q.matmul(&k.t()?)? * self.scale)?.to_dtype(DType::F32)?;
        let scores = scores.broadcast_add(&d.mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(q.dtype())?;
        probs
            .matmul(&v)? // [n, hq, 1, hd]
            .reshape((n, self.q_heads * self.head_dim))
    }

    /// One sequence: q [n, hq, hd], keys/values [ctx, hkv, hd] -> [n, hq * hd].
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let n = q.dim(0)?;
        let q = q.transpose(0, 1)?.contiguous()?; // [hq, n, hd]
        let k = self.repeat_kv(k.transpose(0, 1)?)?; // [hq, ctx, hd]
        let v = self.repeat_kv(v.transpose(0, 1)?)?;
        let scores = (q.matmul(&k.t()?)? * self.scale)?.to_dtype(DType::F32)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(q.dtype())?;
        probs
            .matmul(&v)? // [hq, n, hd]
            .transpose(0, 1)?
            .reshape((n, self.q_heads * self.head_dim))
    }

    /// [hkv, ctx, hd] -> [hq, ctx, hd], each KV head repeated for the query heads that read it
    /// (consecutive query heads share a KV head, as in HF's repeat_kv).
    fn repeat_kv(&self, x: Tensor) -> Result<Tensor> {
        let group = self.q_heads / self.kv_heads;
        if group == 1 {
            return x.contiguous();
        }
        let (hkv, ctx, hd) = x.dims3()?;
        x.unsqueeze(1)?
            .broadcast_as((hkv, group, ctx, hd))?
            .reshape((hkv * group, ctx, hd))
    }
}

/// Additive causal mask for `n` new tokens starting at position `start`: [n, start + n] f32,
/// 0 where key position <= query position, -inf after.
pub fn causal_mask(n: usize, start: usize, device: &Device) -> Result<Tensor> {
    let ctx = start + n;
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..ctx).map(move |j| {
                if j <= start + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (n, ctx), device)
}
