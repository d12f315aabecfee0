//! How many KV blocks a shard's cache holds: an exact count (a re-assignment keeps the pool the
//! cluster already schedules), a budget in bytes (`--kv-budget-mib`), or by default a share of
//! the memory its host can give, as vLLM's `gpu_memory_utilization` sizes its cache: a fraction
//! of what is available, split over the cluster's workers on this host, less the weights.
//!
//! The worker decides because only it knows the host it runs on (its memory, its container's
//! limit) and its shard's weights; the coordinator says how many of its workers share the host
//! and the most tokens worth holding (every running sequence at the model's whole context).

use std::path::Path;

use crate::error::AssignError;

/// What the assignment asks of the KV pool, in order of precedence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvSizing {
    /// Exactly this many blocks.
    Blocks(usize),
    /// As many blocks as this many bytes hold.
    Budget(u64),
    /// A share of the host's available memory.
    FromMemory(MemoryShare),
}

/// The default sizing's parameters, from the coordinator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryShare {
    /// Of the memory available to the host's workers, the part they may fill with weights and
    /// KV cache, in (0, 1].
    pub fraction: f64,
    /// The cluster's workers on this host (at least 1): each counts on an equal part.
    pub host_share: u32,
    /// More tokens than this are never useful (0: no cap).
    pub max_tokens: u64,
}

/// One shard's KV geometry and weights, what every sizing turns into blocks.
#[derive(Debug, Clone, Copy)]
pub struct ShardFootprint {
    /// Bytes of one block (every layer's K and V of this shard).
    pub per_block: u64,
    pub block_size: usize,
    /// Bytes the shard's weights take (or will take, once loaded).
    pub weight_bytes: u64,
    /// Of those, bytes already resident in this process (weights kept from the previous
    /// assignment): the host's available memory no longer counts them.
    pub resident_weight_bytes: u64,
}

impl KvSizing {
    /// The pool's block count on this shard. `available` is read only for `FromMemory`.
    pub fn blocks(
        self,
        shard: ShardFootprint,
        available: impl FnOnce() -> std::io::Result<u64>,
    ) -> Result<usize, AssignError> {
        let per_block = shard.per_block.max(1);
        let budget = match self {
            KvSizing::Blocks(0) => 0,
            KvSizing::Blocks(n) => return Ok(n),
            KvSizing::Budget(bytes) => bytes,
            KvSizing::FromMemory(share) => {
                let available = available().map_err(|e| AssignError::HostMemory(e.to_string()))?;
                let budget = share.budget(available, shard);
                tracing::info!(
                    available_mib = available >> 20,
                    fraction = share.fraction,
                    host_share = share.host_share,
                    weight_mib = shard.weight_bytes >> 20,
                    budget_mib = budget >> 20,
                    "KV budget from the host's memory"
                );
                budget
            }
        };
        match (budget / per_block) as usize {
            0 => Err(AssignError::NoKvBlock {
                budget,
                block_size: shard.block_size,
                per_block,
            }),
            blocks => Ok(blocks),
        }
    }
}

impl MemoryShare {
    /// Bytes of KV cache: `fraction` of this worker's part of the memory (available now, plus
    /// its own weights if they are already resident), less the weights; at most `max_tokens`
    /// tokens' worth, rounded down to whole blocks by the caller.
    pub fn budget(&self, available: u64, shard: ShardFootprint) -> u64 {
        let usable =
            (available + shard.resident_weight_bytes) as f64 * self.fraction.clamp(0.0, 1.0);
        let ours = usable / f64::from(self.host_share.max(1));
        let budget = (ours as u64).saturating_sub(shard.weight_bytes);
        match self.max_tokens {
            0 => budget,
            tokens => {
                let blocks = tokens.div_ceil(shard.block_size.max(1) as u64);
                budget.min(blocks.saturating_mul(shard.per_block))
            }
        }
    }
}

/// Memory this process can still take: the kernel's `MemAvailable`, or less when the process's
/// cgroup (v2) limits it more tightly (a container: /proc/meminfo shows the whole host).
pub fn available_memory() -> std::io::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let host = mem_available(&meminfo).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no MemAvailable in /proc/meminfo",
        )
    })?;
    Ok(match cgroup_room(Path::new("/sys/fs/cgroup")) {
        Some(room) => host.min(room),
        None => host,
    })
}

/// `MemAvailable` of /proc/meminfo, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut fields = line.split_whitespace().skip(1);
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") => Some(value * 1024),
        None => Some(value),
        Some(_) => None,
    }
}

/// What the cgroup v2 at `root` still lets its processes take (`memory.max` less
/// `memory.current`); None without a limit or without cgroup v2.
fn cgroup_room(root: &Path) -> Option<u64> {
    let read = |name: &str| std::fs::read_to_string(root.join(name)).ok();
    cgroup_room_of(&read("memory.max")?, &read("memory.current")?)
}

fn cgroup_room_of(max: &str, current: &str) -> Option<u64> {
    let max: u64 = max.trim().parse().ok()?; // "max": unlimited
    let current: u64 = current.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// gemma-3-270m in f32 at tp=1: 18 layers, one KV head of 256: 36 KiB a token.
    fn gemma_270m() -> ShardFootprint {
        ShardFootprint {
            per_block: 2 * 18 * 16 * 256 * 4,
            block_size: 16,
            weight_bytes: 300 * MIB,
            resident_weight_bytes: 0,
        }
    }

    fn share(fraction: f64, host_share: u32, max_tokens: u64) -> MemoryShare {
        MemoryShare {
            fraction,
            host_share,
            max_tokens,
        }
    }

    #[test]
    fn a_fraction_of_the_workers_part_less_the_weights() {
        let shard = gemma_270m();
        let budget = share(0.5, 1, 0).budget(20 * GIB, shard);
        assert_eq!(budget, 10 * GIB - 300 * MIB);
        let two = share(0.5, 2, 0).budget(20 * GIB, shard);
        assert_eq!(two, 5 * GIB - 300 * MIB, "two workers on the host");
    }

    #[test]
    fn weights_already_resident_count_as_available() {
        let kept = ShardFootprint {
            resident_weight_bytes: 300 * MIB,
            ..gemma_270m()
        };
        let fresh = share(0.5, 1, 0).budget(20 * GIB, gemma_270m());
        let rejoined = share(0.5, 1, 0).budget(20 * GIB - 300 * MIB, kept);
        assert_eq!(fresh, rejoined);
    }

    #[test]
    fn capped_at_the_useful_tokens() {
        let shard = gemma_270m();
        let cap = share(0.5, 1, 1000).budget(20 * GIB, shard);
        assert_eq!(cap, 63 * shard.per_block, "1000 tokens: 63 blocks of 16");
    }

    #[test]
    fn too_little_memory_holds_no_block_and_says_so() {
        let sizing = KvSizing::FromMemory(share(0.5, 1, 0));
        let e = sizing.blocks(gemma_270m(), || Ok(500 * MIB)).unwrap_err();
        assert!(matches!(e, AssignError::NoKvBlock { budget: 0, .. }), "{e}");
    }

    /// The target on a 24 GiB host (about 23 GiB available): gemma-3-270m's whole
    /// context (32k tokens) and 64 concurrent 2k-token streams fit by default, at one process
    /// and at two (tp=2 or pp=2 halve the per-token bytes as they halve the share).
    #[test]
    fn the_default_holds_64_streams_of_2k_tokens_of_gemma_270m_on_24_gib() {
        let context: usize = 32_768;
        let cap = 64 * context as u64;
        for workers in [1u32, 2] {
            let shard = ShardFootprint {
                per_block: gemma_270m().per_block / u64::from(workers),
                weight_bytes: gemma_270m().weight_bytes / u64::from(workers),
                ..gemma_270m()
            };
            let sizing = KvSizing::FromMemory(share(0.5, workers, cap));
            let blocks = sizing.blocks(shard, || Ok(23 * GIB)).expect("blocks");
            let tokens = blocks * 16;
            assert!(tokens >= 64 * 2048, "{workers} workers: {tokens} tokens");
            assert!(tokens >= context);
        }
    }

    #[test]
    fn explicit_counts_and_budgets_ignore_the_memory() {
        let unread = || -> std::io::Result<u64> { panic!("memory read") };
        let shard = gemma_270m();
        let exact = KvSizing::Blocks(7).blocks(shard, unread).expect("blocks");
        assert_eq!(exact, 7);
        let budget = KvSizing::Budget(10 * shard.per_block + 1);
        assert_eq!(budget.blocks(shard, unread).expect("blocks"), 10);
    }

    #[test]
    fn meminfo_and_cgroup_files_are_read_as_the_kernel_writes_them() {
        let meminfo = "MemTotal:       24683784 kB\nMemFree:        17105212 kB\n\
                       MemAvailable:   23896464 kB\nBuffers: 1 kB\n";
        assert_eq!(mem_available(meminfo), Some(23_896_464 * 1024));
        assert_eq!(mem_available("MemFree: 1 kB\n"), None);
        assert_eq!(cgroup_room_of("max\n", "123\n"), None);
        assert_eq!(cgroup_room_of("1000\n", "300\n"), Some(700));
        assert_eq!(cgroup_room_of("1000\n", "3000\n"), Some(0));
        assert!(available_memory().expect("this host's memory") > 0);
    }
}
