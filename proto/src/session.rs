//! Who holds a worker: a coordinator session (a random 128-bit cluster id drawn once per
//! coordinator process) and the epoch of its current assignment of the group.
//!
//! A worker obeys only the session it holds. The same cluster id with a newer epoch re-assigns
//! it (the coordinator healed the group); another cluster id only once the holder's lease has
//! expired or the holder released it; everything else (a stale step, a stranger's `Assign`, a
//! data-plane hello from an older incarnation) is refused.

use std::fmt;

use crate::error::WireError;
use crate::pb;

/// 16 random bytes naming one coordinator process.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClusterId([u8; 16]);

impl ClusterId {
    /// A fresh id from the kernel's random source: two coordinators, or one restarted, never
    /// share one, so a worker can tell its holder from anyone else.
    pub fn random() -> std::io::Result<Self> {
        use std::io::Read;
        let mut bytes = [0u8; 16];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(Self(bytes))
    }

    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterId({self})")
    }
}

/// One coordinator's assignment of the group: its cluster id and the epoch, which grows by one
/// each time the coordinator re-assigns every worker.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Session {
    pub cluster_id: ClusterId,
    pub epoch: u64,
}

impl Session {
    /// The first assignment of a new coordinator process.
    pub fn start() -> std::io::Result<Self> {
        Ok(Self {
            cluster_id: ClusterId::random()?,
            epoch: 1,
        })
    }

    /// The next assignment of the same coordinator (after it healed the group).
    pub fn next_epoch(self) -> Self {
        Self {
            epoch: self.epoch + 1,
            ..self
        }
    }

    /// Whether `other` is the same coordinator process, at any epoch.
    pub fn same_cluster(&self, other: &Session) -> bool {
        self.cluster_id == other.cluster_id
    }
}

impl fmt::Display for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cluster {} epoch {}", self.cluster_id, self.epoch)
    }
}

impl From<Session> for pb::Session {
    fn from(s: Session) -> Self {
        Self {
            cluster_id: s.cluster_id.0.to_vec(),
            epoch: s.epoch,
        }
    }
}

impl TryFrom<pb::Session> for Session {
    type Error = WireError;
    fn try_from(s: pb::Session) -> Result<Self, WireError> {
        let bytes: [u8; 16] =
            s.cluster_id
                .as_slice()
                .try_into()
                .map_err(|_| WireError::SessionId {
                    len: s.cluster_id.len(),
                })?;
        Ok(Self {
            cluster_id: ClusterId(bytes),
            epoch: s.epoch,
        })
    }
}

/// A message's optional session field, which every message that carries one must set.
pub fn required(session: Option<pb::Session>) -> Result<Session, WireError> {
    session.ok_or(WireError::Missing("its session"))?.try_into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_random_and_round_trip() {
        let a = Session::start().unwrap();
        let b = Session::start().unwrap();
        assert_ne!(a.cluster_id, b.cluster_id);
        assert_eq!(Session::try_from(pb::Session::from(a)).unwrap(), a);
        let next = a.next_epoch();
        assert!(next.same_cluster(&a) && next.epoch == 2 && !next.same_cluster(&b));
        assert_eq!(a.cluster_id.to_string().len(), 32);
    }

    #[test]
    fn a_session_id_of_the_wrong_length_is_refused() {
        let short = pb::Session {
            cluster_id: vec![1; 15],
            epoch: 1,
        };
        assert_eq!(
            Session::try_from(short).unwrap_err().to_string(),
            "a session's cluster id is 16 bytes; this one has 15"
        );
        assert!(required(None).is_err());
    }
}
