//! The prober: every second, Info on every worker with a 1 s deadline, carrying the session so
//! that the probe renews the holder's lease, also while nothing steps. A worker that misses two
//! probes in a row, or no longer holds this session's shard, takes the cluster down, so an idle
//! cluster notices a lost worker before a request does. And `Release` at shutdown.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use gemma_proto::{pb, Session};

use super::link::WorkerLink;
use super::status::ClusterStatus;

/// Time between probes, and each probe's deadline.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Misses in a row that make a worker lost: one slow answer on a busy host is not a loss.
const MISSES_TO_LOSE: u32 = 2;

/// The session and the workers it holds, as the cluster last assigned them; shared by the
/// cluster (which replaces them when it heals) and whoever probes or releases the workers.
#[derive(Clone)]
pub struct Roster(Arc<Mutex<(Session, Vec<WorkerLink>)>>);

impl Roster {
    pub fn new(session: Session, links: Vec<WorkerLink>) -> Self {
        Self(Arc::new(Mutex::new((session, links))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Session, Vec<WorkerLink>)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn replace(&self, session: Session, links: Vec<WorkerLink>) {
        *self.lock() = (session, links);
    }

    pub fn snapshot(&self) -> (Session, Vec<WorkerLink>) {
        self.lock().clone()
    }

    pub fn links(&self) -> Vec<WorkerLink> {
        self.lock().1.clone()
    }

    /// Gives every worker up (a coordinator that shuts down), so that a successor need not wait
    /// for the lease. Best effort: each call is bounded by `timeout`, all run at once.
    pub async fn release_all(&self, timeout: Duration) {
        let (session, links) = self.snapshot();
        let releases = links.iter().map(|link| async move {
            let mut client = link.client.clone();
            let request = pb::ReleaseRequest {
                session: Some(session.into()),
            };
            match tokio::time::timeout(timeout, client.release(request)).await {
                Ok(Ok(_)) => tracing::info!(worker = %link.addr, "released"),
                Ok(Err(s)) => {
                    tracing::warn!(worker = %link.addr, reason = s.message(), "release refused")
                }
                Err(_) => tracing::warn!(worker = %link.addr, ?timeout, "no answer to release"),
            }
        });
        join_all(releases).await;
    }
}

/// Probes the roster's workers every second for as long as it runs (spawn it).
pub struct Prober {
    roster: Roster,
    status: ClusterStatus,
}

impl Prober {
    pub fn new(roster: Roster, status: ClusterStatus) -> Self {
        Self { roster, status }
    }

    pub async fn run(self) {
        let mut tick = tokio::time::interval(PROBE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut misses: Vec<u32> = Vec::new();
        let mut epoch = None;
        loop {
            tick.tick().await;
            let (session, links) = self.roster.snapshot();
            if epoch != Some(session.epoch) || misses.len() != links.len() {
                epoch = Some(session.epoch);
                misses = vec![0; links.len()];
            }
            let answers = join_all(
                links
                    .iter()
                    .map(|link| link.info(Some(session), PROBE_INTERVAL)),
            )
            .await;
            for ((link, answer), missed) in links.iter().zip(answers).zip(&mut misses) {
                match answer.and_then(|info| holds(&info, &session)) {
                    Ok(()) => *missed = 0,
                    Err(reason) => {
                        *missed += 1;
                        tracing::debug!(worker = %link.addr, %reason, missed = *missed, "probe missed");
                        if *missed >= MISSES_TO_LOSE {
                            let reason = format!("lost {}: {reason}", link.name());
                            if self.status.lose(session.epoch, &reason) {
                                tracing::error!(%reason, "the prober lost a worker");
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Whether a worker's Info shows it serving `session`'s shard (or still loading it).
fn holds(info: &pb::InfoResponse, session: &Session) -> Result<(), String> {
    if let Some(holder) = info.holder.clone() {
        match Session::try_from(holder) {
            Ok(h) if h == *session => {}
            Ok(h) => {
                return Err(format!(
                    "it is held by {h}, not by this coordinator's {session}"
                ))
            }
            Err(e) => return Err(format!("it reports a malformed holder: {e}")),
        }
    }
    match pb::WorkerState::try_from(info.state) {
        Ok(pb::WorkerState::Ready | pb::WorkerState::Loading) => Ok(()),
        _ if !info.error.is_empty() => Err(info.error.clone()),
        Ok(state) => Err(format!(
            "it is {}, no longer serving its shard",
            state.as_str_name()
        )),
        Err(_) => Err(format!("it reports an unknown state {}", info.state)),
    }
}
