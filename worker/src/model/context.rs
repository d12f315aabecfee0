//! What every layer of one step shares: RoPE rows of the step's positions, and per sequence its
//! place in the flattened batch, its cache slots and its causal mask. Built once per step.

use candle_core::{Device, Tensor};
use gemma_proto::StepBatch;

use super::attention::causal_mask;
use super::rope::Rope;
use crate::error::StepError;
use crate::kv_cache::{KvCache, SeqSlots};

#[derive(Debug)]
pub struct SeqView {
    /// First row of this sequence in the step's [tokens, hidden] activations.
    pub offset: usize,
    pub len: usize,
    pub slots: SeqSlots,
    /// None for a single new token (it may see everything before it).
    pub mask: Option<Tensor>,
}

#[derive(Debug)]
pub struct StepContext {
    pub cos: Tensor,
    pub sin: Tensor,
    pub seqs: Vec<SeqView>,
    /// Row of each sequence's last token, u32 [seqs]: where logits are taken.
    pub last_rows: Tensor,
}

impl StepContext {
    pub fn new(
        batch: &StepBatch,
        rope: &Rope,
        kv: &KvCache,
        device: &Device,
    ) -> Result<Self, StepError> {
        let mut positions = Vec::with_capacity(batch.num_tokens());
        let mut seqs = Vec::with_capacity(batch.seqs.len());
        let mut last_rows = Vec::with_capacity(batch.seqs.len());
        for seq in &batch.seqs {
            let offset = positions.len();
            let len = seq.tokens.len();
            positions.extend((seq.start_pos..seq.end_pos()).map(|p| p as u32));
            last_rows.push((offset + len - 1) as u32);
            let mask = match len {
                1 => None,
                _ => Some(causal_mask(len, seq.start_pos, device)?),
            };
            seqs.push(SeqView {
                offset,
                len,
                slots: kv.slots_for(seq, offset, device)?,
                mask,
            });
        }
        let n = positions.len();
        let (cos, sin) = rope.tables_for(&Tensor::from_vec(positions, n, device)?)?;
        let s = last_rows.len();
        Ok(Self {
            cos,
            sin,
            seqs,
            last_rows: Tensor::from_vec(last_rows, s, device)?,
        })
    }
}
