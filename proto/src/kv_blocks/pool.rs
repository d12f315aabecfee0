//! The block pool behind [`super::KvBlockManager`]: every block's reference count, the free
//! list, and the prefix cache (an exact index from content to block, and an LRU of the cached
//! blocks no sequence references).
//!
//! A block is in exactly one of three states:
//! - referenced (`refs > 0`), by one sequence or, when it holds cached content, by several;
//! - idle: unreferenced but cached, in `idle` (evicted oldest first when the free list is empty);
//! - free: unreferenced and without content, in `free`.

use std::collections::{BTreeMap, HashMap};

/// What a full block holds, exactly: the content id of the block before it (0 for the first
/// block of a sequence) and its own token ids. Content ids are never reused, so a key whose
/// parent was evicted (and whose block number now holds something else) can never match again:
/// such blocks are unreachable and age out of the LRU.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct BlockKey {
    pub parent: u64,
    pub tokens: Box<[u32]>,
}

/// The content id that no block has: the parent of a sequence's first block.
pub(super) const ROOT: u64 = 0;

#[derive(Debug)]
struct Cached {
    /// Fresh for every registration, so a child's key names this content, not this block.
    id: u64,
    key: BlockKey,
    /// Some(stamp) while idle: its key in `Pool::idle`.
    idle_since: Option<u64>,
}

#[derive(Debug, Default)]
struct Block {
    refs: u32,
    cached: Option<Cached>,
}

#[derive(Debug)]
pub(super) struct Pool {
    blocks: Vec<Block>,
    /// Unreferenced blocks without content; popped from the end (lowest numbers first).
    free: Vec<u32>,
    /// Unreferenced cached blocks by the time they became so: the first is the least recently
    /// used.
    idle: BTreeMap<u64, u32>,
    index: HashMap<BlockKey, u32>,
    next_content_id: u64,
    next_stamp: u64,
    /// Bumped by [`Pool::clear_cache`]: allocations of an older generation register nothing.
    pub generation: u64,
    pub prefix_caching: bool,
}

impl Pool {
    pub fn new(num_blocks: usize) -> Self {
        Self {
            blocks: (0..num_blocks).map(|_| Block::default()).collect(),
            free: (0..num_blocks as u32).rev().collect(),
            idle: BTreeMap::new(),
            index: HashMap::new(),
            next_content_id: ROOT + 1,
            next_stamp: 0,
            generation: 0,
            prefix_caching: false,
        }
    }

    pub fn total(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks no sequence references: free or idle, all of them takeable.
    pub fn available(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// Blocks referenced by at least one sequence.
    pub fn used(&self) -> usize {
        self.total() - self.available()
    }

    /// Cached blocks no sequence references.
    pub fn idle(&self) -> usize {
        self.idle.len()
    }

    /// The cached block holding `key`, and its content id.
    pub fn find(&self, key: &BlockKey) -> Option<(u32, u64)> {
        let &b = self.index.get(key)?;
        let id = self.blocks[b as usize].cached.as_ref()?.id;
        Some((b, id))
    }

    /// Whether block `b` is idle (so taking a reference to it takes it out of the LRU).
    pub fn is_idle(&self, b: u32) -> bool {
        self.blocks[b as usize].refs == 0
    }

    /// One more reader of cached block `b`.
    pub fn share(&mut self, b: u32) {
        let block = &mut self.blocks[b as usize];
        if block.refs == 0 {
            if let Some(stamp) = block.cached.as_mut().and_then(|c| c.idle_since.take()) {
                self.idle.remove(&stamp);
            }
        }
        block.refs += 1;
    }

    /// `n` blocks for one owner: free ones first, then the least recently used idle ones
    /// (evicted from the cache). The caller checked `available() >= n`.
    pub fn take(&mut self, n: usize) -> Vec<u32> {
        let mut taken = Vec::with_capacity(n);
        while taken.len() < n {
            let b = match self.free.pop() {
                Some(b) => b,
                None => match self.idle.pop_first() {
                    Some((_, b)) => {
                        self.forget(b);
                        b
                    }
                    None => break,
                },
            };
            self.blocks[b as usize].refs = 1;
            taken.push(b);
        }
        debug_assert_eq!(
            taken.len(),
            n,
            "take() was asked for more than is available"
        );
        taken
    }

    /// Drops one reference to `b`; its last reader sends it to the LRU if it is cached, else to
    /// the free list.
    pub fn release(&mut self, b: u32) {
        let block = &mut self.blocks[b as usize];
        debug_assert!(block.refs > 0, "block {b} released more often than taken");
        block.refs = block.refs.saturating_sub(1);
        if block.refs > 0 {
            return;
        }
        match block.cached.as_mut() {
            Some(c) => {
                let stamp = self.next_stamp;
                self.next_stamp += 1;
                c.idle_since = Some(stamp);
                self.idle.insert(stamp, b);
            }
            None => self.free.push(b),
        }
    }

    /// Registers the content of referenced block `b` (full, its K/V computed); returns the
    /// content id its successor names as parent. Content already cached elsewhere is not
    /// registered twice: `b` stays private and the existing content's id is returned.
    pub fn register(&mut self, b: u32, key: BlockKey) -> u64 {
        if let Some((_, id)) = self.find(&key) {
            return id;
        }
        let id = self.next_content_id;
        self.next_content_id += 1;
        self.index.insert(key.clone(), b);
        self.blocks[b as usize].cached = Some(Cached {
            id,
            key,
            idle_since: None,
        });
        id
    }

    /// Forgets every cached content (the workers lost their KV): idle blocks become free,
    /// referenced ones private to their holders, and older allocations register nothing more.
    pub fn clear_cache(&mut self) {
        for block in &mut self.blocks {
            block.cached = None;
        }
        let idle = std::mem::take(&mut self.idle);
        self.free.extend(idle.into_values());
        self.index.clear();
        self.generation += 1;
    }

    /// Takes block `b`'s content out of the index.
    fn forget(&mut self, b: u32) {
        if let Some(c) = self.blocks[b as usize].cached.take() {
            self.index.remove(&c.key);
        }
    }

    /// Checks the pool's bookkeeping (tests): every block in exactly one state, the index and
    /// the blocks agreeing, and `refs` equal to what the holders say.
    #[cfg(test)]
    pub fn check(&self, expected_refs: &HashMap<u32, u32>) {
        let mut seen = vec![0u32; self.total()];
        for &b in &self.free {
            seen[b as usize] += 1;
            let block = &self.blocks[b as usize];
            assert_eq!(block.refs, 0, "free block {b} is referenced");
            assert!(block.cached.is_none(), "free block {b} has content");
        }
        for (&stamp, &b) in &self.idle {
            seen[b as usize] += 1;
            let block = &self.blocks[b as usize];
            assert_eq!(block.refs, 0, "idle block {b} is referenced");
            let c = block.cached.as_ref().expect("an idle block is cached");
            assert_eq!(c.idle_since, Some(stamp));
        }
        for (b, block) in self.blocks.iter().enumerate() {
            let want = expected_refs.get(&(b as u32)).copied().unwrap_or(0);
            assert_eq!(block.refs, want, "refcount of block {b}");
            if block.refs > 0 {
                seen[b] += 1;
                if let Some(c) = &block.cached {
                    assert_eq!(c.idle_since, None, "referenced block {b} is in the LRU");
                }
            }
            assert_eq!(seen[b], 1, "block {b} is in {} states", seen[b]);
            if let Some(c) = &block.cached {
                assert_eq!(
                    self.index.get(&c.key),
                    Some(&(b as u32)),
                    "block {b} indexed"
                );
            }
        }
        assert_eq!(
            self.index.len(),
            self.blocks.iter().filter(|b| b.cached.is_some()).count()
        );
    }
}
