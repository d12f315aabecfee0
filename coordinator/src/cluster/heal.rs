//! Healing: while the cluster is down, dial every worker again with backoff (respawning local
//! ones that died); once every one answers, at its old address or a restarted process there,
//! re-assign the whole group under the next epoch. Workers that survived keep their process
//! and, when their shard is unchanged, their weights. The same path assigns the group at start,
//! where it also waits out a predecessor's lease.

use std::time::{Duration, Instant};

use gemma_proto::pb;

use super::assign::assign_group;
use super::link::WorkerLink;
use super::{dial_all, reachable_data_addr, shard_name, Cluster, ClusterError};

/// Retry intervals: 100 ms doubling to 2 s. Short enough that a restarted worker is used within
/// 2 s of answering; long enough that a dead address costs nothing.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_secs(2);

    pub fn new() -> Self {
        Self { next: Self::FIRST }
    }

    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (wait * 2).min(Self::CAP);
        wait
    }
}

impl Cluster {
    /// Brings a down cluster back; returns once it serves again. It never gives up: a lost
    /// worker may come back at any time, and until then `/ready` says what is missing.
    pub async fn heal(&mut self) {
        if self.status.outage().is_none() {
            return;
        }
        let started = Instant::now();
        let lost = self
            .lost
            .clone()
            .or_else(|| self.status.outage())
            .unwrap_or_default();
        self.streams.clear();
        let mut backoff = Backoff::new();
        for attempt in 1u64.. {
            match self.reassign().await {
                Ok(()) => {
                    tracing::info!(
                        attempt,
                        session = %self.session,
                        healed_ms = started.elapsed().as_millis() as u64,
                        "healed: every shard is re-assigned"
                    );
                    self.lost = None;
                    return;
                }
                Err(e) => {
                    let wait = backoff.next_wait();
                    tracing::warn!(attempt, error = %e, retry_in = ?wait, "healing: not yet");
                    self.status.set_healing(format!(
                        "{lost}; healing, attempt {attempt}: {e}; next attempt in {wait:?}"
                    ));
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// The first assignment: as healing, but a worker that cannot be reached or refuses ends
    /// the start, except one held by another coordinator, which is waited for (bounded by the
    /// load timeout): its lease runs out, or its coordinator releases it.
    pub(super) async fn assign_at_start(
        &mut self,
        load_timeout_s: u64,
    ) -> Result<(), ClusterError> {
        let deadline = Instant::now() + Duration::from_secs(load_timeout_s);
        let mut backoff = Backoff::new();
        loop {
            match self.reassign().await {
                Ok(()) => return Ok(()),
                Err(e @ ClusterError::Held { .. }) if Instant::now() < deadline => {
                    let wait = backoff.next_wait();
                    tracing::warn!(error = %e, retry_in = ?wait, "waiting for the worker's lease");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One attempt: respawn dead local workers, dial every worker, and re-assign the group under
    /// the next epoch.
    async fn reassign(&mut self) -> Result<(), ClusterError> {
        self.respawn_dead_local().await?;
        let dialled = dial_all(&self.addrs, &self.plan, &self.dialer).await;
        let mut links = Vec::with_capacity(dialled.len());
        let mut infos = Vec::with_capacity(dialled.len());
        let mut missing = Vec::new();
        for (r, spec) in dialled.into_iter().zip(&self.plan.shards) {
            match r {
                Ok((link, info)) => {
                    links.push(link);
                    infos.push(info);
                }
                Err(ClusterError::Unreachable { addr, reason }) => missing.push(format!(
                    "{}: unreachable: {reason}",
                    shard_name(&addr, spec)
                )),
                Err(e) => return Err(e),
            }
        }
        if !missing.is_empty() {
            return Err(ClusterError::Lost(missing.join("; ")));
        }
        self.check_holders(&links, &infos)?;
        let data_addrs: Vec<String> = infos
            .iter()
            .zip(&links)
            .map(|(info, link)| reachable_data_addr(&info.data_addr, &link.addr))
            .collect();
        // Every attempt takes a new epoch: a worker that took a failed attempt's assignment
        // holds that one, and only a newer epoch replaces it.
        self.session = self.session.next_epoch();
        self.roster.replace(self.session, links.clone());
        let assigned = assign_group(
            &self.template,
            &self.plan,
            &links,
            &data_addrs,
            self.session,
        )
        .await?;
        if !self.assigned_once {
            self.kv_blocks = assigned.kv_blocks;
            self.assigned_once = true;
            self.template.keep_kv_blocks(assigned.kv_blocks);
        } else if assigned.kv_blocks < self.kv_blocks {
            return Err(ClusterError::KvShrunk {
                before: self.kv_blocks,
                now: assigned.kv_blocks,
            });
        }
        self.streams = assigned.streams;
        self.status.set_serving(self.session.epoch);
        Ok(())
    }

    /// A worker another coordinator holds, with lease left, cannot be assigned yet.
    fn check_holders(
        &self,
        links: &[WorkerLink],
        infos: &[pb::InfoResponse],
    ) -> Result<(), ClusterError> {
        for (link, info) in links.iter().zip(infos) {
            let Some(holder) = info.holder.clone() else {
                continue;
            };
            let Ok(holder) = gemma_proto::Session::try_from(holder) else {
                continue;
            };
            if !holder.same_cluster(&self.session) && info.lease_left_ms > 0 {
                return Err(ClusterError::Held {
                    addr: link.addr.clone(),
                    stage: link.spec.stage,
                    rank: link.spec.rank,
                    reason: format!("{holder}; its lease expires in {} ms", info.lease_left_ms),
                });
            }
        }
        Ok(())
    }

    /// Local workers whose process exited are started again (at a new address).
    async fn respawn_dead_local(&mut self) -> Result<(), ClusterError> {
        let Some(local) = &self.local else {
            return Ok(());
        };
        for (index, addr) in self.addrs.iter_mut().enumerate() {
            if let Some(new) = local.respawn_if_dead(index).await? {
                tracing::info!(worker = index, old = %addr, new = %new, "respawned local worker");
                *addr = new;
            }
        }
        Ok(())
    }
}
