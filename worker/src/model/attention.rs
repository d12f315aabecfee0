//! Self-attention over this rank's query heads and their KV heads, reading and writing the paged
//! cache; the o_proj output is a partial sum.

use candle_core::{DType, Result, Tensor};
use gemma_proto::{LayerKind, ModelConfig, ShardSpec};

use super::context::{DecodeBatch, StepContext};
use super::decode_attention::{self, Heads, Query};
use super::linear::Linear;
use super::norm::RmsNorm;
use super::rope::Rope;
use super::ShardOptions;
use crate::error::LoadError;
use crate::kv_cache::LayerKv;
use crate::weights::{Slice, WeightFiles};

#[derive(Debug, Clone)]
pub struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// Gemma 3's RMSNorm over each query and key head, before RoPE.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// 1/sqrt(query_pre_attn_scalar).
    scale: f64,
    /// Gemma 2: scores become tanh(s / cap) * cap.
    softcap: Option<f64>,
    kind: LayerKind,
}

impl Attention {
    pub fn load(
        files: &WeightFiles,
        prefix: &str,
        kind: LayerKind,
        cfg: &ModelConfig,
        spec: &ShardSpec,
        opts: &ShardOptions,
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
                opts,
            )
        };
        let head_norm = |name: &str| {
            RmsNorm::load(
                files,
                &format!("{prefix}.{name}.weight"),
                hd,
                cfg.rms_norm_eps,
                &opts.device,
            )
        };
        let qk_norm = match cfg.architecture.has_qk_norm() {
            true => Some((head_norm("q_norm")?, head_norm("k_norm")?)),
            false => None,
        };
        Ok(Self {
            q: load("q_proj", [q_out, h], Slice::Rows(q_rows.clone()))?,
            k: load("k_proj", [kv_out, h], Slice::Rows(kv_rows.clone()))?,
            v: load("v_proj", [kv_out, h], Slice::Rows(kv_rows))?,
            o: load("o_proj", [h, q_out], Slice::Cols(q_rows))?,
            qk_norm,
            q_heads: spec.q_heads.len(),
            kv_heads: spec.kv_heads.len(),
            head_dim: hd,
            scale: cfg.attention_scale(),
            softcap: cfg.attn_logit_softcapping,
            kind,
        })
    }

    /// x: [tokens, hidden] of the whole batch -> this rank's partial of the attention output.
    pub fn forward_partial(&self, x: &Tensor, ctx: &StepContext, kv: &LayerKv) -> Result<Tensor> {
        let t = x.dim(0)?;
        let [q, k, v] = Linear::forward_shared(x, [&self.q, &self.k, &self.v])?;
        let q = q.reshape((t, self.q_heads, self.head_dim))?;
        let k = k.reshape((t, self.kv_heads, self.head_dim))?;
        let v = v.reshape((t, self.kv_heads, self.head_dim))?;
        let (q, k) = match &self.qk_norm {
            Some((qn, kn)) => (qn.forward(&q)?, kn.forward(&k)?),
            None => (q, k),
        };
        let rope = ctx.rope_for(self.kind);
        let q = Rope::apply(&q, &rope.cos, &rope.sin)?;
        let k = Rope::apply(&k, &rope.cos, &rope.sin)?;
        let v = v.contiguous()?;
        // Every new K/V first: sequences own disjoint blocks, so no read below sees a stale one.
        for seq in &ctx.seqs {
            kv.write(&k, &v, &seq.slots.writes)?;
        }
        let mut outs = Vec::with_capacity(ctx.seqs.len() + 1);
        if let Some(d) = &ctx.decode {
            let out = match self.attend_decodes_in_place(&q, d, kv)? {
                Some(out) => out,
                None => self.attend_decodes(&q, d, kv)?,
            };
            outs.push(out);
        }
        for seq in ctx.seqs.iter().filter(|s| !s.batched) {
            if seq.len == 1 {
                let q_s = q.narrow(0, seq.offset, 1)?;
                let seen = &seq.keys_for(self.kind).queries;
                if let Some(out) = self.attend_in_place(&q_s, seen, kv)? {
                    outs.push(out);
                    continue;
                }
            }
            let keys_of = seq.keys_for(self.kind);
            let (keys, values) = kv.read(&keys_of.slots)?;
            let q_s = q.narrow(0, seq.offset, seq.len)?;
            outs.push(self.attend(&q_s, &keys, &values, keys_of.mask.as_ref())?);
        }
        let attn = match outs.len() {
            1 => outs.remove(0),
            _ => Tensor::cat(&outs, 0)?,
        };
        let attn = match &ctx.restore {
            Some(order) => attn.index_select(order, 0)?,
            None => attn,
        };
        self.o.forward(&attn)
    }

    /// Single-token queries (q [n, hq, hd], each seeing `slots[i]`) read from the cache in
    /// place (`decode_attention`), where the cache is f32 on the CPU; None elsewhere.
    fn attend_in_place(
        &self,
        q: &Tensor,
        slots: &[Vec<u32>],
        kv: &LayerKv,
    ) -> Result<Option<Tensor>> {
        if q.dtype() != DType::F32 || !q.device().is_cpu() {
            return Ok(None);
        }
        let q = q.flatten_all()?.to_vec1::<f32>()?;
        let width = self.q_heads * self.head_dim;
        let queries: Vec<Query> = slots
            .iter()
            .enumerate()
            .map(|(i, s)| Query {
                q: &q[i * width..(i + 1) * width],
                slots: s.as_slice(),
            })
            .collect();
        let heads = Heads {
            q_heads: self.q_heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            scale: self.scale as f32,
            softcap: self.softcap.map(|c| c as f32),
        };
        kv.with_f32(|k, v| decode_attention::attend(heads, &queries, k, v))
            .transpose()
    }

    /// The batched decodes in place: each sequence's own keys, without the padding.
    fn attend_decodes_in_place(
        &self,
        q: &Tensor,
        d: &DecodeBatch,
        kv: &LayerKv,
    ) -> Result<Option<Tensor>> {
        let seen = &d.keys_for(self.kind).queries;
        self.attend_in_place(&q.index_select(&d.rows, 0)?, seen, kv)
    }

    /// All decoding sequences at once: q [n, hq, hd] against their padded contexts.
    fn attend_decodes(&self, q: &Tensor, d: &DecodeBatch, kv: &LayerKv) -> Result<Tensor> {
        let keys_of = d.keys_for(self.kind);
        let (n, len) = (d.count, keys_of.len);
        let group = self.q_heads / self.kv_heads;
        // Query heads grouped under the KV head they read: no copy of K or V per query head.
        let q = q
            .index_select(&d.rows, 0)?
            .reshape((n, self.kv_heads, group, self.head_dim))?;
        let (k, v) = kv.read(&keys_of.slots)?; // [n * len, hkv, hd]
        let per_seq = |t: Tensor| -> Result<Tensor> {
            t.reshape((n, len, self.kv_heads, self.head_dim))?
                .transpose(1, 2)? // [n, hkv, len, hd]
                .contiguous()
        };
        let (k, v) = (per_seq(k)?, per_seq(v)?);
        let scores = self
            .scores(&q, &k)? // [n, hkv, group, len]
            .broadcast_add(keys_of.mask.as_ref().ok_or_else(|| {
                candle_core::Error::Msg("a decode batch always has a mask".to_string())
            })?)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(q.dtype())?;
        probs
            .matmul(&v)? // [n, hkv, group, hd]
            .reshape((n, self.q_heads * self.head_dim))
    }

    /// One sequence: q [n, hq, hd], keys/values [ctx, hkv, hd] -> [n, hq * hd].
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let n = q.dim(0)?;
        let group = self.q_heads / self.kv_heads;
        // [n, hkv, group, hd] -> [hkv, group * n, hd]: each KV head's query heads become rows
        // of one matmul against that head's keys, so K and V are never repeated.
        let q = q
            .reshape((n, self.kv_heads, group, self.head_dim))?
            .permute((1, 2, 0, 3))?
            .contiguous()?
            .reshape((self.kv_heads, group * n, self.head_dim))?;
        let k = k.transpose(0, 1)?.contiguous()?; // [hkv, ctx, hd]
        let v = v.transpose(0, 1)?.contiguous()?;
        let scores = self.scores(&q, &k)?; // [hkv, group * n, ctx]
        let scores = match mask {
            Some(m) => {
                let ctx = m.dim(1)?;
                scores
                    .reshape((self.kv_heads, group, n, ctx))?
                    .broadcast_add(m)?
                    .reshape((self.kv_heads, group * n, ctx))?
            }
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(q.dtype())?;
        probs
            .matmul(&v)? // [hkv, group * n, hd]
            .reshape((self.kv_heads, group, n, self.head_dim))?
            .permute((2, 0, 1, 3))? // [n, hkv, group, hd]
            .contiguous()?
            .reshape((n, self.q_heads * self.head_dim))
    }

    /// Scaled (and, for Gemma 2, soft-capped) q @ k^T in f32, before the mask.
    fn scores(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        let scores = (q.matmul(&k.t()?)? * self.scale)?.to_dtype(DType::F32)?;
        match self.softcap {
            Some(cap) => (scores / cap)?.tanh()? * cap,
            None => Ok(scores),
        }
    }
}
