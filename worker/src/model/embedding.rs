//! Vocabulary-parallel embedding, tied to the lm_head: rank t holds rows [v0, v1) of the one
//! matrix that both embeds tokens and produces logits. Never scaled in place: the sqrt(hidden)
//! normalizer applies to the embedded activations only.

use std::ops::Range;

use candle_core::{DType, Device, Result, Tensor};

use crate::error::LoadError;
use crate::weights::{Slice, WeightFiles};

pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";

#[derive(Debug, Clone)]
pub struct VocabParallelEmbedding {
    /// [v1 - v0, hidden] in the compute dtype.
    weight: Tensor,
    rows: Range<usize>,
}

impl VocabParallelEmbedding {
    pub fn load(
        files: &WeightFiles,
        vocab: usize,
        hidden: usize,
        rows: Range<usize>,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, LoadError> {
        let weight = files.load(
            EMBED_TOKENS,
            &[vocab, hidden],
            Slice::Rows(rows.clone()),
            dtype,
            device,
        )?;
        Ok(Self { weight, rows })
    }

    /// This rank's partial embedding of `tokens`: its rows for tokens in [v0, v1), exact zeros
    /// elsewhere, so the stage's all-reduce reassembles the full embedding bit-exactly.
    pub fn embed_partial(&self, tokens: &[u32]) -> Result<Tensor> {
        let device = self.weight.device();
        let (v0, v1) = (self.rows.start as u32, self.rows.end as u32);
        let local: Vec<u32> = tokens
            .iter()
            .map(|&t| if (v0..v1).contains(&t) { t - v0 } else { 0 })
            .collect();
        let keep: Vec<f32> = tokens
            .iter()
            .map(|t| f32::from(u8::from((v0..v1).contains(t))))
            .collect();
        let n = tokens.len();
        let rows = self
            .weight
            .index_select(&Tensor::from_vec(local, n, device)?, 0)?;
        let keep = Tensor::from_vec(keep, (n, 1), device)?.to_dtype(self.weight.dtype())?;
        rows.broadcast_mul(&keep)
    }

    /// Logits of this rank's vocabulary slice, vocabulary-major, in f32:
    /// hidden [seqs, hidden] -> [v1 - v0, seqs].
    ///
    /// Computed as weight @ hidden^T so the vocabulary is gemm's long side and each weight
    /// element is packed once (hidden @ weight^T re-packed the hidden rows for every slice of the
    /// vocabulary: a quarter of a 64-sequence step went to packing), and left vocabulary-major
    /// because the candidate selection reads it in that order anyway.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.weight.matmul(&hidden.t()?)?.to_dtype(DType::F32)
    }
}
