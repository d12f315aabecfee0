//! What every layer of one step shares: RoPE rows of the step's positions, and per sequence its
//! place in the flattened batch, its cache slots and its causal mask. Built once per step.

use candle_core::{Device, Tensor};
use gemma_proto::{LayerKind, StepBatch};

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
    /// The sliding layers' mask, where it differs from `mask` (the context is longer than the
    /// window).
    pub sliding_mask: Option<Tensor>,
    /// Attended together with the other decoding sequences (see [`DecodeBatch`]).
    pub batched: bool,
}

/// The step's decoding sequences (one new token each), attended in one batched matmul instead
/// of one small matmul chain per sequence: their contexts padded to the longest, the padding
/// masked out (exp(-inf) = 0 adds nothing to the softmax).
#[derive(Debug)]
pub struct DecodeBatch {
    /// Their rows in the step's activations, u32 [n].
    pub rows: Tensor,
    /// Context slots, each sequence's padded to `max_len` with its first slot, u32 [n * max_len].
    pub slots: Tensor,
    pub max_len: usize,
    /// [n, 1, 1, max_len] f32: 0 on real positions, -inf on padding.
    pub mask: Tensor,
    /// The sliding layers' mask (also -inf beyond the window), where it differs from `mask`.
    pub sliding_mask: Option<Tensor>,
    pub count: usize,
}

impl DecodeBatch {
    pub fn mask_for(&self, kind: LayerKind) -> &Tensor {
        match (kind, &self.sliding_mask) {
            (LayerKind::Sliding, Some(m)) => m,
            _ => &self.mask,
        }
    }
}

impl SeqView {
    pub fn mask_for(&self, kind: LayerKind) -> Option<&Tensor> {
        match (kind, &self.sliding_mask) {
            (LayerKind::Sliding, Some(m)) => Some(m),
            _ => self.mask.as_ref(),
        }
    }
}

/// The rotary tables of one step's positions for one RoPE base.
#[derive(Debug)]
pub struct RopeRows {
    pub cos: Tensor,
    pub sin: Tensor,
}

#[derive(Debug)]
pub struct StepContext {
    /// Full-attention layers' RoPE rows.
    pub global: RopeRows,
    /// Sliding layers' RoPE rows, where their base differs (Gemma 3).
    pub local: Option<RopeRows>,
    pub seqs: Vec<SeqView>,
    /// Row of each sequence's last token, u32 [seqs]: where logits are taken.
    pub last_rows: Tensor,
    pub decode: Option<DecodeBatch>,
    /// Attention outputs come out as [decode batch.., other sequences..]; this puts them back
    /// in token order (None when that already is the order).
    pub restore: Option<Tensor>,
}

impl StepContext {
    /// `window`: the sliding layers' window, if the model has any.
    pub fn new(
        batch: &StepBatch,
        ropes: (&Rope, Option<&Rope>),
        window: Option<usize>,
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
                _ => Some(causal_mask(len, seq.start_pos, None, device)?),
            };
            let sliding_mask = match window {
                Some(w) if seq.end_pos() > w => {
                    Some(causal_mask(len, seq.start_pos, Some(w), device)?)
                }
                _ => None,
            };
            seqs.push(SeqView {
                offset,
                len,
                slots: kv.slots_for(seq, offset, device)?,
                mask,
                sliding_mask,
                batched: false,
            });
        }
        let n = positions.len();
        let positions = Tensor::from_vec(positions, n, device)?;
        let rows = |rope: &Rope| -> Result<RopeRows, StepError> {
            let (cos, sin) = rope.tables_for(&positions)?;
            Ok(RopeRows { cos, sin })
        };
        let global = rows(ropes.0)?;
        let local = ropes.1.map(rows).transpose()?;
        let s = last_rows.len();
        let decode = decode_batch(batch, &mut seqs, window, kv, device)?;
        let restore = restore_order(&seqs, n, device)?;
        Ok(Self {
            global,
            local,
            seqs,
            last_rows: Tensor::from_vec(last_rows, s, device)?,
            decode,
            restore,
        })
    }
}

impl StepContext {
    /// The RoPE rows a layer of `kind` rotates with.
    pub fn rope_for(&self, kind: LayerKind) -> &RopeRows {
        match (kind, &self.local) {
            (LayerKind::Sliding, Some(local)) => local,
            _ => &self.global,
        }
    }
}

/// Groups the single-token sequences (two or more) for batched attention.
fn decode_batch(
    batch: &StepBatch,
    seqs: &mut [SeqView],
    window: Option<usize>,
    kv: &KvCache,
    device: &Device,
) -> Result<Option<DecodeBatch>, StepError> {
    let decoding: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].len == 1).collect();
    if decoding.len() < 2 {
        return Ok(None);
    }
    let max_len = decoding
        .iter()
        .map(|&i| batch.seqs[i].end_pos())
        .max()
        .unwrap_or(1);
    let count = decoding.len();
    let mut rows = Vec::with_capacity(count);
    let mut slots = Vec::with_capacity(count * max_len);
    let mut mask = Vec::with_capacity(count * max_len);
    // Sliding layers also hide what lies `window` or more positions behind the new token.
    let window = window.filter(|&w| max_len > w);
    let mut sliding = Vec::with_capacity(if window.is_some() { count * max_len } else { 0 });
    for &i in &decoding {
        let seq = &batch.seqs[i];
        let len = seq.end_pos();
        let slot = |pos: usize| kv.slot(&seq.block_table, pos);
        rows.push(seqs[i].offset as u32);
        slots.extend((0..max_len).map(|p| slot(if p < len { p } else { 0 })));
        mask.extend((0..max_len).map(|p| if p < len { 0.0 } else { f32::NEG_INFINITY }));
        if let Some(w) = window {
            sliding.extend((0..max_len).map(|p| {
                if p < len && len - 1 - p < w {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            }));
        }
        seqs[i].batched = true;
    }
    let sliding_mask = match window {
        Some(_) => Some(Tensor::from_vec(sliding, (count, 1, 1, max_len), device)?),
        None => None,
    };
    Ok(Some(DecodeBatch {
        rows: Tensor::from_vec(rows, count, device)?,
        slots: Tensor::from_vec(slots, count * max_len, device)?,
        max_len,
        mask: Tensor::from_vec(mask, (count, 1, 1, max_len), device)?,
        sliding_mask,
        count,
    }))
}

/// The permutation from [batched decodes.., other sequences' rows..] back to token order.
fn restore_order(
    seqs: &[SeqView],
    tokens: usize,
    device: &Device,
) -> Result<Option<Tensor>, StepError> {
    if !seqs.iter().any(|s| s.batched) {
        return Ok(None);
    }
    let produced: Vec<usize> = seqs
        .iter()
        .filter(|s| s.batched)
        .map(|s| s.offset)
        .chain(
            seqs.iter()
                .filter(|s| !s.batched)
                .flat_map(|s| s.offset..s.offset + s.len),
        )
        .collect();
    if produced.iter().enumerate().all(|(i, &row)| i == row) {
        return Ok(None);
    }
    let mut restore = vec![0u32; tokens];
    for (at, &row) in produced.iter().enumerate() {
        restore[row] = at as u32;
    }
    Ok(Some(Tensor::from_vec(restore, tokens, device)?))
}
