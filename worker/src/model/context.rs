//! What every layer of one step shares: RoPE rows of the step's positions, and per sequence its
//! place in the flattened batch, its cache slots and its causal mask. Built once per step.

use candle_core::{Device, Tensor};
use gemma_proto::{LayerKind, StepBatch};

use super::rope::Rope;
use crate::error::StepError;
use crate::kv_cache::{KvCache, SeqSlots};

/// The keys one layer kind attends to: cache slots, and the additive mask over them.
#[derive(Debug)]
pub struct Keys {
    /// Slots to read, u32 [sequences * len].
    pub slots: Tensor,
    /// Keys per sequence.
    pub len: usize,
    /// f32, 0 where a query may look, -inf elsewhere; None when every key is visible.
    pub mask: Option<Tensor>,
    /// Single-token queries only: each one's visible slots, unpadded, for the attention that
    /// reads the cache in place (made once per step, not per layer). Empty otherwise.
    pub queries: Vec<Vec<u32>>,
}

#[derive(Debug)]
pub struct SeqView {
    /// First row of this sequence in the step's [tokens, hidden] activations.
    pub offset: usize,
    pub len: usize,
    pub slots: SeqSlots,
    /// Full-attention layers: positions [0, end), causally masked.
    pub full: Keys,
    /// Sliding layers, where the context is longer than the window: only the positions a query
    /// of this step can see (the window before the first new token, onwards), so long contexts
    /// cost sliding layers no more than the window.
    pub sliding: Option<Keys>,
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
    /// Each sequence's context padded to the longest with its first slot; mask
    /// [n, 1, 1, len], -inf on padding.
    pub full: Keys,
    /// Sliding layers: each sequence's last `window` positions, padded likewise.
    pub sliding: Option<Keys>,
    pub count: usize,
}

impl DecodeBatch {
    pub fn keys_for(&self, kind: LayerKind) -> &Keys {
        match (kind, &self.sliding) {
            (LayerKind::Sliding, Some(k)) => k,
            _ => &self.full,
        }
    }
}

impl SeqView {
    pub fn keys_for(&self, kind: LayerKind) -> &Keys {
        match (kind, &self.sliding) {
            (LayerKind::Sliding, Some(k)) => k,
            _ => &self.full,
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
            let slots = kv.slots_for(seq, offset, device)?;
            let end = seq.end_pos();
            // A single token sees every key of its context (and of its window).
            let single = |keys: &Tensor| -> Result<Vec<Vec<u32>>, StepError> {
                Ok(match len {
                    1 => vec![keys.to_vec1::<u32>()?],
                    _ => Vec::new(),
                })
            };
            let full = Keys {
                slots: slots.context.clone(),
                len: end,
                mask: match len {
                    1 => None,
                    _ => Some(causal_mask(len, seq.start_pos, 0, None, device)?),
                },
                queries: single(&slots.context)?,
            };
            let sliding = match window {
                Some(w) if end > w => {
                    // The first new token sees back to start + 1 - w; later ones see less.
                    let first = (seq.start_pos + 1).saturating_sub(w);
                    let window_slots = slots.context.narrow(0, first, end - first)?;
                    Some(Keys {
                        queries: single(&window_slots)?,
                        slots: window_slots,
                        len: end - first,
                        mask: match len {
                            1 => None,
                            _ => Some(causal_mask(len, seq.start_pos, first, Some(w), device)?),
                        },
                    })
                }
                _ => None,
            };
            seqs.push(SeqView {
                offset,
                len,
                slots,
                full,
                sliding,
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
    let rows: Vec<u32> = decoding.iter().map(|&i| seqs[i].offset as u32).collect();
    let seq = |i: usize| &batch.seqs[i];
    // Full layers: positions [0, end) of each; sliding layers: its last `window` positions.
    let full = padded_keys(
        decoding.iter().map(|&i| (seq(i), 0)),
        count,
        max_len,
        kv,
        device,
    )?;
    let sliding = match window {
        Some(w) if max_len > w => Some(padded_keys(
            decoding
                .iter()
                .map(|&i| (seq(i), seq(i).end_pos().saturating_sub(w))),
            count,
            w,
            kv,
            device,
        )?),
        _ => None,
    };
    for &i in &decoding {
        seqs[i].batched = true;
    }
    Ok(Some(DecodeBatch {
        rows: Tensor::from_vec(rows, count, device)?,
        full,
        sliding,
        count,
    }))
}

/// Keys of decoding sequences, each from its `first` position to its end, padded to `width`
/// with that first slot and masked there.
fn padded_keys<'a>(
    seqs: impl Iterator<Item = (&'a gemma_proto::SeqStep, usize)>,
    count: usize,
    width: usize,
    kv: &KvCache,
    device: &Device,
) -> Result<Keys, StepError> {
    let mut slots = Vec::with_capacity(count * width);
    let mut mask = Vec::with_capacity(count * width);
    let mut queries = Vec::with_capacity(count);
    for (seq, first) in seqs {
        let n = seq.end_pos() - first;
        let slot = |p: usize| kv.slot(&seq.block_table, first + if p < n { p } else { 0 });
        let at = slots.len();
        slots.extend((0..width).map(slot));
        queries.push(slots[at..at + n].to_vec());
        mask.extend((0..width).map(|p| if p < n { 0.0 } else { f32::NEG_INFINITY }));
    }
    Ok(Keys {
        slots: Tensor::from_vec(slots, count * width, device)?,
        len: width,
        mask: Some(Tensor::from_vec(mask, (count, 1, 1, width), device)?),
        queries,
    })
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

/// Additive causal mask for `n` new tokens starting at position `start` over the keys at
/// positions [first, start + n): [n, start + n - first] f32, 0 where key position <= query
/// position (and, with a sliding `window`, fewer than `window` positions behind it, as HF's
/// sliding layers: the query and the window - 1 keys before it), -inf elsewhere.
fn causal_mask(
    n: usize,
    start: usize,
    first: usize,
    window: Option<usize>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let ctx = start + n;
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| {
            let q = start + i;
            (first..ctx).map(move |j| {
                let visible = j <= q && window.is_none_or(|w| q - j < w);
                if visible {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (n, ctx - first), device)
}
