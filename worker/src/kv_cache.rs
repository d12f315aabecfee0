//! The paged KV cache of one shard: a pool of fixed-size blocks per layer for this rank's KV
//! heads. The coordinator owns the block tables; the shard only checks them and writes/reads the
//! slots they name (slot = block * block_size + position % block_size).

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Device, Result, Tensor};
use gemma_proto::SeqStep;

use crate::error::StepError;

/// Tokens [src, src + len) of the step go to slots [slot, slot + len) (one block at most).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteRun {
    pub src: usize,
    pub slot: usize,
    pub len: usize,
}

/// Where one sequence's new K/V go and which slots its attention reads.
#[derive(Debug, Clone)]
pub struct SeqSlots {
    pub writes: Vec<WriteRun>,
    /// Slots of positions [0, end_pos) in order, u32 [end_pos].
    pub context: Tensor,
}

/// K and V of one layer: [num_blocks * block_size, kv_heads, head_dim] each.
#[derive(Debug)]
pub struct LayerKv {
    k: Tensor,
    v: Tensor,
}

impl LayerKv {
    /// Writes the step's new keys and values ([tokens, kv_heads, head_dim]) into their slots.
    pub fn write(&self, k: &Tensor, v: &Tensor, writes: &[WriteRun]) -> Result<()> {
        for w in writes {
            self.k.slice_set(&k.narrow(0, w.src, w.len)?, 0, w.slot)?;
            self.v.slice_set(&v.narrow(0, w.src, w.len)?, 0, w.slot)?;
        }
        Ok(())
    }

    /// The layer's K and V as f32 slices ([slots, kv_heads, head_dim] row-major), read in
    /// place by `f`, where the cache is f32 on the CPU; None elsewhere. Both are views of the
    /// one pool buffer `KvCache::new` made, so one read lock covers both.
    pub fn with_f32<R>(&self, f: impl FnOnce(&[f32], &[f32]) -> R) -> Option<R> {
        let (storage, k_layout) = self.k.storage_and_layout();
        let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(pool)) = &*storage else {
            return None;
        };
        let (k0, k1) = k_layout.contiguous_offsets()?;
        let (v0, v1) = self.v.layout().contiguous_offsets()?;
        Some(f(pool.get(k0..k1)?, pool.get(v0..v1)?))
    }

    /// Keys and values of the given slots, [slots, kv_heads, head_dim].
    pub fn read(&self, slots: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.k.index_select(slots, 0)?,
            self.v.index_select(slots, 0)?,
        ))
    }
}

/// Checks how the step's sequences share blocks: sequences may read the same blocks (a cached
/// prefix), but a block that a sequence writes in this step (one holding a position in
/// `[start_pos, end_pos)`) belongs to that sequence alone, and no table names a block twice.
/// Otherwise one sequence's K/V could overwrite what another reads.
pub fn check_block_sharing(
    seqs: &[SeqStep],
    block_size: usize,
) -> std::result::Result<(), StepError> {
    let invalid = |m: String| Err(StepError::Invalid(m));
    // Block -> index of the sequence that writes it.
    let mut writer: HashMap<u32, usize> = HashMap::new();
    for (i, seq) in seqs.iter().enumerate() {
        let mut own = HashSet::with_capacity(seq.block_table.len());
        if let Some(b) = seq.block_table.iter().find(|&&b| !own.insert(b)) {
            return invalid(format!(
                "KV block {b} appears twice in the block table of sequence {}",
                seq.seq_id
            ));
        }
        for &b in written_blocks(seq, block_size) {
            if let Some(other) = writer.insert(b, i) {
                return invalid(format!(
                    "KV block {b} is written by sequences {} and {} in one step",
                    seqs[other].seq_id, seq.seq_id
                ));
            }
        }
    }
    for (i, seq) in seqs.iter().enumerate() {
        let foreign = |b: &u32| writer.get(b).filter(|&&w| w != i).map(|&w| (*b, w));
        if let Some((b, other)) = seq.block_table.iter().find_map(foreign) {
            return invalid(format!(
                "KV block {b} is read by sequence {} while sequence {} writes it",
                seq.seq_id, seqs[other].seq_id
            ));
        }
    }
    Ok(())
}

/// The blocks of `seq`'s table that its step writes (as far as the table reaches; a table too
/// short for the step is refused by [`KvCache::slots_for`]).
fn written_blocks(seq: &SeqStep, block_size: usize) -> &[u32] {
    let table = &seq.block_table;
    let first = (seq.start_pos / block_size).min(table.len());
    let end = seq.end_pos().div_ceil(block_size).clamp(first, table.len());
    &table[first..end]
}

#[derive(Debug)]
pub struct KvCache {
    block_size: usize,
    num_blocks: usize,
    layers: Vec<LayerKv>,
}

impl KvCache {
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let slots = num_blocks * block_size;
        // One zeroed buffer for the whole pool, every layer's K and V a view of it. Zeroed pages
        // are committed only when first written, so an idle pool costs no RSS, but only if the
        // buffer is fresh from the kernel: a pool made of one small buffer per layer comes from
        // the allocator's arenas, and on a re-assignment calloc zeroes the recycled memory by
        // hand, committing the whole pool at once (the soak saw a re-assigned worker grow by its
        // KV budget). One buffer is past the allocator's mmap threshold for any real budget.
        let pool = Tensor::zeros((2 * num_layers * slots, kv_heads, head_dim), dtype, device)?;
        let layers = (0..num_layers)
            .map(|l| {
                Ok(LayerKv {
                    k: pool.narrow(0, 2 * l * slots, slots)?,
                    v: pool.narrow(0, (2 * l + 1) * slots, slots)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            block_size,
            num_blocks,
            layers,
        })
    }

    /// Bytes one block takes across all of a shard's layers (K and V).
    pub fn bytes_per_block(
        num_layers: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
    ) -> usize {
        2 * num_layers * block_size * kv_heads * head_dim * dtype.size_in_bytes()
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn layer(&self, i: usize) -> Option<&LayerKv> {
        self.layers.get(i)
    }

    /// The cache slot of position `pos` of a sequence with this block table (checked by
    /// [`Self::slots_for`] first).
    pub fn slot(&self, block_table: &[u32], pos: usize) -> u32 {
        let bs = self.block_size;
        (block_table[pos / bs] as usize * bs + pos % bs) as u32
    }

    /// Checks `seq`'s block table against this pool and maps its positions to slots; the step's
    /// tokens of this sequence start at `src` in the flattened batch.
    pub fn slots_for(
        &self,
        seq: &SeqStep,
        src: usize,
        device: &Device,
    ) -> std::result::Result<SeqSlots, StepError> {
        let bs = self.block_size;
        let end = seq.end_pos();
        if seq.block_table.len() * bs < end {
            return Err(StepError::Invalid(format!(
                "sequence {}: block table of {} blocks holds {} positions, the step needs {end}",
                seq.seq_id,
                seq.block_table.len(),
                seq.block_table.len() * bs
            )));
        }
        if let Some(&b) = seq
            .block_table
            .iter()
            .find(|&&b| b as usize >= self.num_blocks)
        {
            return Err(StepError::Invalid(format!(
                "sequence {}: block {b} is outside this shard's pool of {} blocks",
                seq.seq_id, self.num_blocks
            )));
        }
        let slot = |pos: usize| self.slot(&seq.block_table, pos) as usize;
        let mut writes = Vec::new();
        let mut pos = seq.start_pos;
        while pos < end {
            let len = (bs - pos % bs).min(end - pos);
            writes.push(WriteRun {
                src: src + pos - seq.start_pos,
                slot: slot(pos),
                len,
            });
            pos += len;
        }
        let context: Vec<u32> = (0..end).map(|p| slot(p) as u32).collect();
        Ok(SeqSlots {
            writes,
            context: Tensor::from_vec(context, end, device)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(seq_id: u64, start_pos: usize, len: usize, block_table: Vec<u32>) -> SeqStep {
        SeqStep {
            seq_id,
            tokens: vec![0; len],
            start_pos,
            block_table,
            top_candidates: 0,
            log_probs: false,
            sampling: None,
        }
    }

    fn refusal(seqs: &[SeqStep]) -> String {
        match check_block_sharing(seqs, 4) {
            Err(StepError::Invalid(m)) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn read_only_blocks_may_be_shared_written_ones_may_not() {
        // Both read cached blocks 0 and 1 and write their own third block.
        let a = seq(1, 8, 3, vec![0, 1, 2]);
        let b = seq(2, 8, 1, vec![0, 1, 3]);
        assert!(check_block_sharing(&[a.clone(), b], 4).is_ok());
        // Writing a block another sequence reads: refused.
        let writes_0 = seq(3, 0, 4, vec![0]);
        assert!(refusal(&[a.clone(), writes_0]).contains("read by sequence 1 while sequence 3"));
        // Two writers of one block.
        let also_2 = seq(4, 10, 1, vec![5, 6, 2]);
        assert!(refusal(&[a.clone(), also_2]).contains("written by sequences 1 and 4"));
        // A table naming a block twice.
        let twice = seq(5, 0, 1, vec![7, 7]);
        assert!(refusal(&[twice]).contains("twice in the block table of sequence 5"));
        // Blocks past the step's positions are not written: sharing them is only reading.
        let spare = seq(6, 0, 2, vec![8, 9]);
        let reads_9 = seq(7, 4, 1, vec![9, 10]);
        assert!(check_block_sharing(&[spare, reads_9], 4).is_ok());
        // The same seq_id twice is still two sequences.
        let (c, d) = (seq(9, 0, 1, vec![12]), seq(9, 0, 1, vec![12]));
        assert!(refusal(&[c, d]).contains("written by sequences 9 and 9"));
    }
}
