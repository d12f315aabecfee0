//! The all-reduce among the tensor ranks of one pipeline stage.
//!
//! Every implementation sums the partials **in rank order** (((p0 + p1) + p2) + ...), so every
//! rank holds bit-identical results and a multi-process run reproduces the in-process run of the
//! same plan exactly.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::error::CollectiveError;

/// How long a rank waits for its peers before failing the step.
pub const DEFAULT_COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// One rank's handle on its stage's group.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Sums `partial` over all ranks of the group, in rank order.
    fn all_reduce_sum(&self, partial: &Tensor) -> Result<Tensor, CollectiveError>;
    /// Fails every current and future wait of the group (a rank that errored must not leave its
    /// peers waiting for the timeout).
    fn abort(&self, reason: &str);
}

/// Sums partials in rank order; the one definition every transport uses.
pub fn sum_in_rank_order(parts: &[Tensor]) -> Result<Tensor, CollectiveError> {
    let (first, rest) = parts
        .split_first()
        .ok_or_else(|| CollectiveError::Mismatch("no partials".to_string()))?;
    rest.iter().try_fold(first.clone(), |acc, p| {
        (&acc + p).map_err(|e| CollectiveError::Mismatch(e.to_string()))
    })
}

/// A group of one: the sum is the partial itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct SoloCollective;

impl Collective for SoloCollective {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, partial: &Tensor) -> Result<Tensor, CollectiveError> {
        Ok(partial.clone())
    }
    fn abort(&self, _reason: &str) {}
}

#[derive(Default)]
struct Round {
    parts: Vec<Option<Tensor>>,
    arrived: usize,
    /// Completed rounds; a waiter leaves when this moves past the round it joined.
    generation: u64,
    result: Option<Result<Tensor, CollectiveError>>,
    aborted: Option<String>,
}

struct Shared {
    round: Mutex<Round>,
    done: Condvar,
    world: usize,
    timeout: Duration,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Round> {
        // Every mutation completes before unlock; a panic elsewhere leaves the state usable.
        self.round.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Tensor ranks as threads of one process (tests; TP inside one host without NCCL).
#[derive(Clone)]
pub struct InProcessCollective {
    shared: Arc<Shared>,
    rank: usize,
}

impl InProcessCollective {
    /// One handle per rank of a new group of `world` ranks.
    pub fn group(world: usize, timeout: Duration) -> Vec<Self> {
        let shared = Arc::new(Shared {
            round: Mutex::new(Round {
                parts: vec![None; world],
                ..Round::default()
            }),
            done: Condvar::new(),
            world,
            timeout,
        });
        (0..world)
            .map(|rank| Self {
                shared: shared.clone(),
                rank,
            })
            .collect()
    }
}

impl Collective for InProcessCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, partial: &Tensor) -> Result<Tensor, CollectiveError> {
        let s = &self.shared;
        let mut round = s.lock();
        if let Some(reason) = &round.aborted {
            return Err(CollectiveError::Aborted(reason.clone()));
        }
        let joined = round.generation;
        round.parts[self.rank] = Some(partial.clone());
        round.arrived += 1;
        if round.arrived == s.world {
            let parts: Vec<Tensor> = round.parts.iter_mut().filter_map(Option::take).collect();
            round.result = Some(sum_in_rank_order(&parts));
            round.arrived = 0;
            round.generation += 1;
            s.done.notify_all();
        } else {
            let deadline = Instant::now() + s.timeout;
            while round.generation == joined && round.aborted.is_none() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    let missing = (0..s.world).filter(|&r| round.parts[r].is_none()).collect();
                    return Err(CollectiveError::Timeout {
                        rank: self.rank,
                        missing,
                        waited_ms: s.timeout.as_millis(),
                    });
                }
                round = s
                    .done
                    .wait_timeout(round, left)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            if round.generation == joined {
                let reason = round.aborted.clone().unwrap_or_default();
                return Err(CollectiveError::Aborted(reason));
            }
        }
        // The result stays until the next round completes, which needs this rank: safe to read.
        round
            .result
            .clone()
            .unwrap_or_else(|| Err(CollectiveError::Mismatch("no result".to_string())))
    }

    fn abort(&self, reason: &str) {
        let mut round = self.shared.lock();
        round.aborted = Some(format!("rank {}: {reason}", self.rank));
        self.shared.done.notify_all();
    }
}
