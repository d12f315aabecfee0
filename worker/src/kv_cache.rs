//! The paged KV cache of one shard: a pool of fixed-size blocks per layer for this rank's KV
//! heads. The coordinator owns the block tables; the shard only checks them and writes/reads the
//! slots they name (slot = block * block_size + position % block_size).

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

    /// Keys and values of the given slots, [slots, kv_heads, head_dim].
    pub fn read(&self, slots: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.k.index_select(slots, 0)?,
            self.v.index_select(slots, 0)?,
        ))
    }
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
        let shape = (num_blocks * block_size, kv_heads, head_dim);
        // Zeroed pages are only committed when first written, so an idle pool costs no RSS.
        let layers = (0..num_layers)
            .map(|_| {
                Ok(LayerKv {
                    k: Tensor::zeros(shape, dtype, device)?,
                    v: Tensor::zeros(shape, dtype, device)?,
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
