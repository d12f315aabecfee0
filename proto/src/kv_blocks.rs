//! The cluster's one KV block manager (as in vLLM): the coordinator decides which cache blocks a
//! sequence owns and every worker writes its own heads' K and V into the same block numbers.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::KvError;

/// Tokens per KV block unless configured otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

#[derive(Debug)]
struct FreeList {
    free: Vec<u32>,
    total: usize,
}

/// Hands out KV blocks; blocks come back when their [`KvAllocation`] is dropped.
#[derive(Debug, Clone)]
pub struct KvBlockManager {
    pool: Arc<Mutex<FreeList>>,
    block_size: usize,
}

impl KvBlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        // Lowest block numbers first, so a fresh cluster fills its pool from the start.
        let free = (0..num_blocks as u32).rev().collect();
        Self {
            pool: Arc::new(Mutex::new(FreeList {
                free,
                total: num_blocks,
            })),
            block_size,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total_blocks(&self) -> usize {
        self.lock().total
    }

    pub fn used_blocks(&self) -> usize {
        let pool = self.lock();
        pool.total - pool.free.len()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// A new, empty allocation for one sequence.
    pub fn allocation(&self) -> KvAllocation {
        KvAllocation {
            blocks: Vec::new(),
            manager: self.clone(),
        }
    }

    /// An allocation holding room for `tokens` tokens, or an error and nothing taken.
    pub fn allocate(&self, tokens: usize) -> Result<KvAllocation, KvError> {
        let mut a = self.allocation();
        a.ensure_capacity(tokens)?;
        Ok(a)
    }

    fn lock(&self) -> MutexGuard<'_, FreeList> {
        // A panic elsewhere while holding the lock leaves the free list consistent (every
        // mutation is a single push/pop), so a poisoned lock is still usable.
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The blocks of one sequence, in position order; returned to the pool on drop, so no error path
/// can leak them.
#[derive(Debug)]
pub struct KvAllocation {
    blocks: Vec<u32>,
    manager: KvBlockManager,
}

impl KvAllocation {
    /// The block table to send with a step: block `i` holds positions `[i*bs, (i+1)*bs)`.
    pub fn block_table(&self) -> &[u32] {
        &self.blocks
    }

    /// Grows to hold `tokens` tokens; all or nothing.
    pub fn ensure_capacity(&mut self, tokens: usize) -> Result<(), KvError> {
        let needed = self
            .manager
            .blocks_for(tokens)
            .saturating_sub(self.blocks.len());
        if needed == 0 {
            return Ok(());
        }
        let mut pool = self.manager.lock();
        if pool.free.len() < needed {
            return Err(KvError::OutOfBlocks {
                needed,
                free: pool.free.len(),
                total: pool.total,
                block_size: self.manager.block_size,
            });
        }
        let at = pool.free.len() - needed;
        self.blocks.extend(pool.free.drain(at..).rev());
        Ok(())
    }
}

impl Drop for KvAllocation {
    fn drop(&mut self) {
        let mut pool = self.manager.lock();
        pool.free.extend(self.blocks.drain(..).rev());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_return_on_drop_and_growth_is_all_or_nothing() {
        let m = KvBlockManager::new(4, 16);
        let mut a = m.allocate(17).expect("2 blocks fit");
        assert_eq!(a.block_table(), &[0, 1]);
        assert_eq!(m.used_blocks(), 2);
        let err = a
            .ensure_capacity(16 * 5)
            .expect_err("5 blocks do not fit in 4");
        assert_eq!(
            err,
            KvError::OutOfBlocks {
                needed: 3,
                free: 2,
                total: 4,
                block_size: 16
            }
        );
        assert_eq!(m.used_blocks(), 2, "a failed growth takes nothing");
        a.ensure_capacity(64).expect("4 blocks fit");
        assert_eq!(a.block_table(), &[0, 1, 2, 3]);
        drop(a);
        assert_eq!(m.used_blocks(), 0);
    }
}
