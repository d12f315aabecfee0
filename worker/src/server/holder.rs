//! Who holds the worker: one coordinator session and its lease.
//!
//! The rules, in one place ([`admit`]): a worker held by nobody takes any session; the holder's
//! own cluster id re-assigns it with a newer epoch (never an older or the same one); a failed
//! worker takes anyone; another cluster id only once the holder's lease has run out. The lease
//! runs while the worker is Ready or Failed: it is renewed by every sign of life from the holder
//! (an `Info` from its cluster id, a valid step, an `Assign`), and not while a shard loads, when
//! the holder is waiting on the `Assign` stream.

use std::time::{Duration, Instant};

use gemma_proto::{pb, Session};

use crate::error::HoldError;

/// The session holding the worker and when it was last heard from.
#[derive(Debug, Clone)]
pub struct Holder {
    session: Session,
    lease: Duration,
    heard: Instant,
}

impl Holder {
    pub fn new(session: Session, lease: Duration, now: Instant) -> Self {
        Self {
            session,
            lease,
            heard: now,
        }
    }

    pub fn session(&self) -> Session {
        self.session
    }

    /// The holder was heard from.
    pub fn renew(&mut self, now: Instant) {
        self.heard = now;
    }

    /// Time left on the lease; the whole lease while a shard loads (it does not run then).
    pub fn lease_left(&self, state: pb::WorkerState, now: Instant) -> Duration {
        match state {
            pb::WorkerState::Loading => self.lease,
            _ => (self.heard + self.lease).saturating_duration_since(now),
        }
    }

    pub fn expired(&self, state: pb::WorkerState, now: Instant) -> bool {
        self.lease_left(state, now).is_zero()
    }

    /// Whether `session` is the holder itself (its exact epoch).
    pub fn check_step(&self, offered: Session) -> Result<(), HoldError> {
        match offered == self.session {
            true => Ok(()),
            false => Err(HoldError::WrongStepSession {
                held: self.session,
                offered,
            }),
        }
    }

    /// Whether `offered` may release the worker: the holder's cluster id, at any epoch (the id
    /// names the coordinator process).
    pub fn check_release(&self, offered: Session) -> Result<(), HoldError> {
        match offered.same_cluster(&self.session) {
            true => Ok(()),
            false => Err(HoldError::NotHolder {
                holder: self.session,
                offered,
            }),
        }
    }
}

/// Why an `Assign` is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Nobody held the worker.
    Free,
    /// The worker had failed; whoever assigns it now holds it.
    AfterFailure,
    /// The holder's newer epoch (the coordinator heals its group).
    NewerEpoch,
    /// Another coordinator, after the holder's lease ran out.
    LeaseExpired,
}

/// Whether `offered` may assign a worker in `state` held by `holder`, and why.
pub fn admit(
    holder: Option<&Holder>,
    state: pb::WorkerState,
    offered: Session,
    now: Instant,
) -> Result<Admission, HoldError> {
    let Some(h) = holder else {
        return Ok(Admission::Free);
    };
    let held = h.session;
    let same_cluster = held.same_cluster(&offered);
    if same_cluster && offered.epoch < held.epoch {
        return Err(HoldError::StaleEpoch { held, offered });
    }
    if state == pb::WorkerState::Failed {
        return Ok(Admission::AfterFailure);
    }
    if same_cluster {
        return match offered.epoch > held.epoch {
            true => Ok(Admission::NewerEpoch),
            false => Err(HoldError::SameEpoch { held }),
        };
    }
    if h.expired(state, now) {
        return Ok(Admission::LeaseExpired);
    }
    Err(HoldError::Leased {
        holder: held,
        left_ms: h.lease_left(state, now).as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemma_proto::ClusterId;

    fn session(id: u8, epoch: u64) -> Session {
        Session {
            cluster_id: ClusterId::from_bytes([id; 16]),
            epoch,
        }
    }

    const LEASE: Duration = Duration::from_millis(700);

    #[test]
    fn the_holders_newer_epoch_reassigns_and_older_ones_are_refused() {
        let t0 = Instant::now();
        let h = Holder::new(session(1, 3), LEASE, t0);
        let ready = pb::WorkerState::Ready;
        assert_eq!(
            admit(Some(&h), ready, session(1, 4), t0),
            Ok(Admission::NewerEpoch)
        );
        let stale = admit(Some(&h), ready, session(1, 2), t0).unwrap_err();
        assert_eq!(
            stale.to_string(),
            format!(
                "this worker holds epoch 3 of cluster {}; epoch 2 is older",
                ClusterId::from_bytes([1; 16])
            )
        );
        assert!(matches!(
            admit(Some(&h), ready, session(1, 3), t0),
            Err(HoldError::SameEpoch { .. })
        ));
        // Even a failed worker refuses its holder's older epoch: that message is a late one.
        assert!(admit(Some(&h), pb::WorkerState::Failed, session(1, 2), t0).is_err());
    }

    #[test]
    fn a_stranger_waits_for_the_lease_unless_the_worker_failed() {
        let t0 = Instant::now();
        let h = Holder::new(session(1, 1), LEASE, t0);
        let ready = pb::WorkerState::Ready;
        let err = admit(
            Some(&h),
            ready,
            session(2, 1),
            t0 + Duration::from_millis(200),
        );
        assert_eq!(
            err,
            Err(HoldError::Leased {
                holder: session(1, 1),
                left_ms: 500
            })
        );
        assert_eq!(
            admit(Some(&h), ready, session(2, 1), t0 + LEASE),
            Ok(Admission::LeaseExpired)
        );
        assert_eq!(
            admit(Some(&h), pb::WorkerState::Failed, session(2, 1), t0),
            Ok(Admission::AfterFailure)
        );
        assert_eq!(
            admit(None, pb::WorkerState::Idle, session(2, 9), t0),
            Ok(Admission::Free)
        );
    }

    #[test]
    fn the_lease_does_not_run_while_loading_and_renews() {
        let t0 = Instant::now();
        let mut h = Holder::new(session(1, 1), LEASE, t0);
        let later = t0 + Duration::from_secs(5);
        assert!(!h.expired(pb::WorkerState::Loading, later));
        assert!(h.expired(pb::WorkerState::Ready, later));
        h.renew(later);
        assert_eq!(h.lease_left(pb::WorkerState::Ready, later), LEASE);
    }

    #[test]
    fn steps_need_the_exact_session_and_release_the_cluster_id() {
        let h = Holder::new(session(1, 2), LEASE, Instant::now());
        assert!(h.check_step(session(1, 2)).is_ok());
        assert!(h.check_step(session(1, 1)).is_err());
        assert!(h.check_step(session(2, 2)).is_err());
        assert!(h.check_release(session(1, 7)).is_ok());
        assert!(h.check_release(session(2, 2)).is_err());
    }
}
