//! The cluster's one KV block manager (as in vLLM): the coordinator decides which cache blocks a
//! sequence owns and every worker writes its own heads' K and V into the same block numbers.
//!
//! With prefix caching on, a full block whose K/V is computed is registered by its exact content
//! (the content id of the block before it and its own token ids; see `pool::BlockKey`), and
//! stays cached after its sequence ends, until its space is needed (least recently used first,
//! after the free blocks). A new sequence reuses the longest cached run of its leading blocks and
//! computes only the rest. Cached blocks are read-only: a sequence only ever writes into blocks
//! past the ones it reused or registered, so a shared block is never written.

mod pool;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::KvError;
use pool::{BlockKey, Pool, ROOT};

/// Tokens per KV block unless configured otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Hands out KV blocks; blocks come back when their [`KvAllocation`] is dropped.
#[derive(Debug, Clone)]
pub struct KvBlockManager {
    pool: Arc<Mutex<Pool>>,
    block_size: usize,
}

impl KvBlockManager {
    /// A pool without prefix caching: every allocation's blocks are its own.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            pool: Arc::new(Mutex::new(Pool::new(num_blocks))),
            block_size,
        }
    }

    /// Turns prefix caching on or off (off: nothing is registered or reused).
    pub fn with_prefix_caching(self, on: bool) -> Self {
        self.lock().prefix_caching = on;
        self
    }

    pub fn prefix_caching(&self) -> bool {
        self.lock().prefix_caching
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total_blocks(&self) -> usize {
        self.lock().total()
    }

    /// Blocks referenced by at least one sequence (a shared block counts once).
    pub fn used_blocks(&self) -> usize {
        self.lock().used()
    }

    /// Cached blocks that no sequence references: reusable by a later prefix, evicted when the
    /// free blocks run out.
    pub fn cached_blocks(&self) -> usize {
        self.lock().idle()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// A new, empty allocation for one sequence.
    pub fn allocation(&self) -> KvAllocation {
        let generation = self.lock().generation;
        KvAllocation {
            blocks: Vec::new(),
            sealed: 0,
            reused: 0,
            parent: ROOT,
            generation,
            manager: self.clone(),
        }
    }

    /// An allocation holding room for `tokens` tokens, or an error and nothing taken.
    pub fn allocate(&self, tokens: usize) -> Result<KvAllocation, KvError> {
        let mut a = self.allocation();
        a.ensure_capacity(tokens)?;
        Ok(a)
    }

    /// The most leading blocks of `context` a sequence may reuse: full blocks only, and never the
    /// one holding its last token, which it must compute to get its logits.
    pub fn reusable_blocks(&self, context: &[u32]) -> usize {
        context.len().saturating_sub(1) / self.block_size
    }

    /// How many leading blocks of `context` the cache holds now (at most
    /// [`Self::reusable_blocks`]); takes nothing.
    pub fn cached_prefix_blocks(&self, context: &[u32]) -> usize {
        let pool = self.lock();
        self.lookup(&pool, context).len()
    }

    /// An allocation for a sequence whose tokens are `context`, holding room for `tokens`
    /// tokens: its longest cached prefix shared (see [`KvAllocation::reused_tokens`]), fresh
    /// blocks for the rest. All or nothing.
    pub fn allocate_for(&self, context: &[u32], tokens: usize) -> Result<KvAllocation, KvError> {
        let mut pool = self.lock();
        let hits = self.lookup(&pool, context);
        let needed = self.blocks_for(tokens).saturating_sub(hits.len());
        // Idle hits stop being available once shared.
        let idle_hits = hits.iter().filter(|&&(b, _)| pool.is_idle(b)).count();
        let available = pool.available() - idle_hits;
        if available < needed {
            return Err(self.out_of_blocks(needed, available, &pool));
        }
        let mut blocks = Vec::with_capacity(hits.len() + needed);
        for &(b, _) in &hits {
            pool.share(b);
            blocks.push(b);
        }
        blocks.extend(pool.take(needed));
        Ok(KvAllocation {
            sealed: hits.len(),
            reused: hits.len(),
            parent: hits.last().map_or(ROOT, |&(_, id)| id),
            generation: pool.generation,
            blocks,
            manager: self.clone(),
        })
    }

    /// Forgets the whole prefix cache: the workers' KV is gone (a re-assignment, a restarted
    /// worker). Live allocations keep their blocks but register nothing more.
    pub fn clear_cache(&self) {
        self.lock().clear_cache();
    }

    /// The cached blocks (and their content ids) of `context`'s longest cached prefix.
    fn lookup(&self, pool: &Pool, context: &[u32]) -> Vec<(u32, u64)> {
        let mut hits = Vec::new();
        if !pool.prefix_caching {
            return hits;
        }
        let mut parent = ROOT;
        for tokens in context
            .chunks_exact(self.block_size)
            .take(self.reusable_blocks(context))
        {
            let key = BlockKey {
                parent,
                tokens: tokens.into(),
            };
            let Some((b, id)) = pool.find(&key) else {
                break;
            };
            hits.push((b, id));
            parent = id;
        }
        hits
    }

    fn out_of_blocks(&self, needed: usize, available: usize, pool: &Pool) -> KvError {
        KvError::OutOfBlocks {
            needed,
            free: available,
            total: pool.total(),
            block_size: self.block_size,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pool> {
        // Every mutation keeps the pool consistent between single statements that cannot panic,
        // so a lock poisoned by a panic elsewhere is still usable.
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The blocks of one sequence, in position order; its references are dropped on drop, so no
/// error path can leak them. Its leading `sealed` blocks hold known content (reused or
/// registered) and are never written again; it writes only past them.
#[derive(Debug)]
pub struct KvAllocation {
    blocks: Vec<u32>,
    sealed: usize,
    /// Leading blocks taken from the prefix cache at allocation.
    reused: usize,
    /// The content id of the last sealed block: the parent of the next one.
    parent: u64,
    /// The pool's generation at allocation: after a cache clear this allocation's K/V may be
    /// gone, so it registers nothing.
    generation: u64,
    manager: KvBlockManager,
}

impl KvAllocation {
    /// The block table to send with a step: block `i` holds positions `[i*bs, (i+1)*bs)`.
    pub fn block_table(&self) -> &[u32] {
        &self.blocks
    }

    /// Leading tokens whose K/V came from the prefix cache: the sequence starts computing here.
    pub fn reused_tokens(&self) -> usize {
        self.reused * self.manager.block_size
    }

    /// Leading blocks that hold known content and are never written again.
    pub fn sealed_blocks(&self) -> usize {
        self.sealed
    }

    /// Grows to hold `tokens` tokens; all or nothing. Free blocks are taken first, then the
    /// least recently used cached ones.
    pub fn ensure_capacity(&mut self, tokens: usize) -> Result<(), KvError> {
        let needed = self
            .manager
            .blocks_for(tokens)
            .saturating_sub(self.blocks.len());
        if needed == 0 {
            return Ok(());
        }
        let mut pool = self.manager.lock();
        if pool.available() < needed {
            return Err(self.manager.out_of_blocks(needed, pool.available(), &pool));
        }
        self.blocks.extend(pool.take(needed));
        Ok(())
    }

    /// Registers the full blocks of `computed` (the sequence's tokens whose K/V the cluster has
    /// written, from position 0) in the prefix cache. Call it only after the step that wrote them
    /// returned: a registered block may be read by another sequence from the next step on.
    pub fn commit(&mut self, computed: &[u32]) {
        let bs = self.manager.block_size;
        let full = (computed.len() / bs).min(self.blocks.len());
        if full <= self.sealed {
            return;
        }
        let mut pool = self.manager.lock();
        if pool.prefix_caching && pool.generation == self.generation {
            for i in self.sealed..full {
                let key = BlockKey {
                    parent: self.parent,
                    tokens: computed[i * bs..(i + 1) * bs].into(),
                };
                self.parent = pool.register(self.blocks[i], key);
            }
        }
        self.sealed = full;
    }
}

impl Drop for KvAllocation {
    fn drop(&mut self) {
        let mut pool = self.manager.lock();
        // Last block first: a sequence's tail becomes least recently used before its head, so
        // eviction takes leaves before the prefixes other sequences share.
        for b in self.blocks.drain(..).rev() {
            pool.release(b);
        }
    }
}
