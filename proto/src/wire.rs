//! Conversions between the contract's Rust types and the generated wire types.

use crate::error::WireError;
use crate::pb;
use crate::plan::ShardSpec;
use crate::step::{SeqStep, StepBatch};

fn span(r: &std::ops::Range<usize>) -> Option<pb::Span> {
    Some(pb::Span {
        start: r.start as u64,
        end: r.end as u64,
    })
}

fn range(s: Option<pb::Span>, field: &'static str) -> Result<std::ops::Range<usize>, WireError> {
    let s = s.ok_or(WireError::Missing(field))?;
    if s.start > s.end {
        return Err(WireError::Invalid(format!(
            "{field} {}..{} is reversed",
            s.start, s.end
        )));
    }
    Ok(s.start as usize..s.end as usize)
}

impl From<&ShardSpec> for pb::ShardSpec {
    fn from(s: &ShardSpec) -> Self {
        Self {
            stage: s.stage as u32,
            rank: s.rank as u32,
            tp: s.tp as u32,
            pp: s.pp as u32,
            layers: span(&s.layers),
            q_heads: span(&s.q_heads),
            kv_heads: span(&s.kv_heads),
            mlp_cols: span(&s.mlp_cols),
            vocab_rows: span(&s.vocab_rows),
        }
    }
}

impl TryFrom<pb::ShardSpec> for ShardSpec {
    type Error = WireError;
    fn try_from(s: pb::ShardSpec) -> Result<Self, WireError> {
        Ok(Self {
            stage: s.stage as usize,
            rank: s.rank as usize,
            tp: s.tp as usize,
            pp: s.pp as usize,
            layers: range(s.layers, "layers")?,
            q_heads: range(s.q_heads, "q_heads")?,
            kv_heads: range(s.kv_heads, "kv_heads")?,
            mlp_cols: range(s.mlp_cols, "mlp_cols")?,
            vocab_rows: range(s.vocab_rows, "vocab_rows")?,
        })
    }
}

impl From<&SeqStep> for pb::SeqStep {
    fn from(s: &SeqStep) -> Self {
        Self {
            seq_id: s.seq_id,
            tokens: s.tokens.clone(),
            start_pos: s.start_pos as u64,
            block_table: s.block_table.clone(),
            top_candidates: s.top_candidates,
            log_probs: s.log_probs,
        }
    }
}

impl From<pb::SeqStep> for SeqStep {
    fn from(s: pb::SeqStep) -> Self {
        Self {
            seq_id: s.seq_id,
            tokens: s.tokens,
            start_pos: s.start_pos as usize,
            block_table: s.block_table,
            top_candidates: s.top_candidates,
            log_probs: s.log_probs,
        }
    }
}

impl StepBatch {
    pub fn to_wire(&self, step_id: u64) -> pb::StepRequest {
        pb::StepRequest {
            step_id,
            seqs: self.seqs.iter().map(pb::SeqStep::from).collect(),
        }
    }

    pub fn from_wire(req: pb::StepRequest) -> Self {
        Self {
            seqs: req.seqs.into_iter().map(SeqStep::from).collect(),
        }
    }
}

impl pb::TensorData {
    /// An f32 tensor from its values.
    pub fn from_f32(shape: &[usize], values: &[f32]) -> Self {
        let mut data = Vec::with_capacity(values.len() * 4);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        Self {
            dtype: pb::DType::DtypeF32 as i32,
            shape: shape.iter().map(|&d| d as u64).collect(),
            data: data.into(),
        }
    }

    pub fn dims(&self) -> Vec<usize> {
        self.shape.iter().map(|&d| d as usize).collect()
    }

    /// The values of an f32 tensor, checked against its shape.
    pub fn to_f32(&self) -> Result<Vec<f32>, WireError> {
        if self.dtype != pb::DType::DtypeF32 as i32 {
            return Err(WireError::Invalid(format!(
                "expected an f32 tensor, got dtype {}",
                self.dtype
            )));
        }
        let numel: usize = self.dims().iter().product();
        if self.data.len() != numel * 4 {
            return Err(WireError::Invalid(format!(
                "tensor of shape {:?} needs {} bytes, got {}",
                self.shape,
                numel * 4,
                self.data.len()
            )));
        }
        let (elems, _) = self.data.as_chunks::<4>();
        Ok(elems.iter().map(|&b| f32::from_le_bytes(b)).collect())
    }
}
