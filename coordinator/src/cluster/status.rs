//! Whether the cluster can serve now, shared by everyone who needs to know: the engine (which
//! heals a down cluster), the prober (which may find a worker lost while nothing steps), the
//! request path (which refuses at once while the cluster is down) and `/ready`.

use std::sync::Arc;

use tokio::sync::watch;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// Every shard of this epoch's assignment is loaded and stepping.
    Serving { epoch: u64 },
    /// The assignment of `epoch` is broken; `reason` names the lost shard(s) and, while healing,
    /// what the last attempt found.
    Down { epoch: u64, reason: String },
}

/// The cluster's availability, cheap to clone and to read.
#[derive(Clone)]
pub struct ClusterStatus(Arc<watch::Sender<Availability>>);

impl ClusterStatus {
    pub fn serving(epoch: u64) -> Self {
        Self(Arc::new(watch::Sender::new(Availability::Serving {
            epoch,
        })))
    }

    /// Not serving yet, or no longer: `reason` is what `/ready` and refused requests show.
    pub fn down(epoch: u64, reason: String) -> Self {
        Self(Arc::new(watch::Sender::new(Availability::Down {
            epoch,
            reason,
        })))
    }

    pub fn now(&self) -> Availability {
        self.0.borrow().clone()
    }

    /// None while serving; else why not, for a 503 or `/ready`.
    pub fn outage(&self) -> Option<String> {
        match &*self.0.borrow() {
            Availability::Serving { .. } => None,
            Availability::Down { reason, .. } => Some(reason.clone()),
        }
    }

    /// The assignment of `epoch` serves.
    pub fn set_serving(&self, epoch: u64) {
        self.0.send_replace(Availability::Serving { epoch });
    }

    /// Marks the assignment of `epoch` lost, unless it is already (the first report names the
    /// shard that failed first) or a newer epoch serves (a late report about an old one).
    /// True when this call took it down.
    pub fn lose(&self, epoch: u64, reason: &str) -> bool {
        self.0.send_if_modified(|now| match now {
            Availability::Serving { epoch: e } if *e == epoch => {
                *now = Availability::Down {
                    epoch,
                    reason: reason.to_string(),
                };
                true
            }
            _ => false,
        })
    }

    /// While down: what healing found on its last attempt, after the original loss.
    pub fn set_healing(&self, reason: String) {
        self.0.send_if_modified(|now| match now {
            Availability::Down { reason: r, .. } => {
                *r = reason;
                true
            }
            Availability::Serving { .. } => false,
        });
    }

    /// Resolves once the cluster is not serving (at once if it is down already).
    pub async fn lost(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives in `self`, so waiting cannot fail.
        let _ = rx
            .wait_for(|a| matches!(a, Availability::Down { .. }))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_loss_of_the_serving_epoch_wins() {
        let s = ClusterStatus::serving(1);
        assert_eq!(s.outage(), None);
        assert!(!s.lose(0, "an older epoch"), "a late report about epoch 0");
        assert!(s.lose(1, "stage 0 rank 1 lost"));
        assert!(!s.lose(1, "the peer's error"));
        assert_eq!(s.outage().as_deref(), Some("stage 0 rank 1 lost"));
        s.set_healing("stage 0 rank 1 unreachable; retrying".into());
        assert_eq!(
            s.outage().as_deref(),
            Some("stage 0 rank 1 unreachable; retrying")
        );
        s.set_serving(2);
        assert_eq!(s.now(), Availability::Serving { epoch: 2 });
        assert!(!s.lose(1, "a stale probe of epoch 1"));
    }
}
