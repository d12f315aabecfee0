//! The worker-to-worker data plane: one TCP connection per pair of shards that exchange tensors
//! (the ranks of a stage for the all-reduce; rank t of stage p and of stage p+1 for the hand-off).
//!
//! Every connection lives on one current_thread tokio runtime that the compute thread drives
//! itself (`block_on`), so an all-reduce costs no cross-thread wake-up: the thread that computed
//! the partial writes it to every peer and reads theirs concurrently (no deadlock however large
//! the tensor), then sums in rank order. Elements are copied once out of candle's storage into a
//! reused send buffer, and read from the socket straight into the received tensor's own buffer.
//!
//! A plane belongs to one assignment (one session): `mesh` admits only peers presenting it, and
//! its [`PlaneAbort`] lets the server end every wait of the plane at once (a re-assignment, a
//! release) from another thread.

pub mod frame;
mod mesh;
mod reduce;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use futures_util::future::join_all;
use gemma_proto::{pb, Session, ShardSpec};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::collective::Collective;
use crate::error::{CollectiveError, FrameError};
use crate::peer_stream::PlaneTls;
use crate::wire::ElementBuffer;
use frame::Expected;
use mesh::Link;

/// Ends every current and future wait of one data plane, its connecting included, from any
/// thread. Cloned into the server before the plane exists, so even a plane still waiting for its
/// peers can be stopped.
#[derive(Clone)]
pub struct PlaneAbort(Arc<watch::Sender<Option<String>>>);

impl Default for PlaneAbort {
    fn default() -> Self {
        Self(Arc::new(watch::channel(None).0))
    }
}

impl PlaneAbort {
    /// Aborts the plane; the first reason given is the one every wait reports.
    pub fn abort(&self, reason: &str) {
        self.0.send_if_modified(|current| {
            let first = current.is_none();
            if first {
                *current = Some(reason.to_string());
            }
            first
        });
    }

    pub fn reason(&self) -> Option<String> {
        self.0.borrow().clone()
    }

    /// Runs `work` until it ends or the plane is aborted, whichever comes first.
    async fn unless_aborted<T>(
        &self,
        work: impl Future<Output = Result<T, CollectiveError>>,
    ) -> Result<T, CollectiveError> {
        let mut aborted = self.0.subscribe();
        tokio::select! {
            done = work => done,
            reason = aborted.wait_for(Option::is_some) => Err(CollectiveError::Aborted(
                reason.ok().and_then(|r| r.clone()).unwrap_or_default(),
            )),
        }
    }
}

struct PlaneState {
    /// Connections by the peer's shard index.
    links: BTreeMap<usize, Link>,
    /// Operations done so far per link kind; both ends count alike, frames carry the count.
    stage_ops: u64,
    next_ops: u64,
    prev_ops: u64,
    /// Reused for every frame this shard sends.
    send_buf: Vec<u8>,
}

/// This shard's connections to the shards it exchanges tensors with.
pub struct DataPlane {
    rt: tokio::runtime::Runtime,
    state: Mutex<PlaneState>,
    abort: PlaneAbort,
    /// Shard indices of this stage's ranks, in rank order (this shard included).
    stage: Vec<usize>,
    rank: usize,
    next: Option<usize>,
    prev: Option<usize>,
    timeout: Duration,
    device: Device,
    /// Time spent in all-reduces and hand-offs since last taken (for the step's metrics).
    wait_micros: AtomicU64,
}

/// Where a plane accepts its lower-indexed peers, and how every link is secured.
pub struct PlaneEndpoint {
    pub listener: std::net::TcpListener,
    /// Mutual TLS on every link; None: plain TCP.
    pub tls: Option<Arc<PlaneTls>>,
}

impl DataPlane {
    /// Connects to every peer `spec` needs under `session`: it dials peers with a higher shard
    /// index and accepts the lower ones on the endpoint's listener. `abort` ends the connecting
    /// early.
    pub fn connect(
        spec: &ShardSpec,
        session: Session,
        addrs: &[String],
        endpoint: PlaneEndpoint,
        timeout: Duration,
        device: Device,
        abort: PlaneAbort,
    ) -> Result<Self, CollectiveError> {
        let PlaneEndpoint { listener, tls } = endpoint;
        let me = spec.index();
        if addrs.len() != spec.tp * spec.pp {
            return Err(CollectiveError::Connect(format!(
                "{} data-plane addresses for a plan of {} shards",
                addrs.len(),
                spec.tp * spec.pp
            )));
        }
        let stage: Vec<usize> = (0..spec.tp).map(|r| spec.stage * spec.tp + r).collect();
        let next = (!spec.is_last_stage()).then(|| me + spec.tp);
        let prev = (!spec.is_first_stage()).then(|| me - spec.tp);
        let peers: Vec<usize> = stage
            .iter()
            .copied()
            .filter(|&p| p != me)
            .chain(next)
            .chain(prev)
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CollectiveError::Connect(format!("runtime: {e}")))?;
        let deadline = Instant::now() + timeout;
        let links = rt.block_on(abort.unless_aborted(mesh::connect(
            me,
            session,
            addrs,
            &peers,
            listener,
            tls.as_ref(),
            deadline,
        )))?;
        Ok(Self {
            rt,
            state: Mutex::new(PlaneState {
                links,
                stage_ops: 0,
                next_ops: 0,
                prev_ops: 0,
                send_buf: Vec::new(),
            }),
            abort,
            stage,
            rank: spec.rank,
            next,
            prev,
            timeout,
            device,
            wait_micros: AtomicU64::new(0),
        })
    }

    /// Microseconds spent exchanging tensors since the last call.
    pub fn take_wait_micros(&self) -> u64 {
        self.wait_micros.swap(0, Ordering::Relaxed)
    }

    fn timed<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.wait_micros
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        out
    }

    /// Fails every current and future wait of this plane and closes its links, so every peer
    /// sees the end at once (EOF) instead of at its timeout.
    pub fn abort(&self, reason: &str) {
        self.abort.abort(reason);
        // A wait in progress holds the state; it drops the links itself once it sees the abort.
        if let Ok(mut st) = self.state.try_lock() {
            st.links.clear();
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, PlaneState>, CollectiveError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match self.abort.reason() {
            Some(reason) => {
                st.links.clear();
                Err(CollectiveError::Aborted(reason))
            }
            None => Ok(st),
        }
    }

    /// Runs one exchange on the plane's runtime, ended early by an abort.
    fn block_on<T>(
        &self,
        work: impl Future<Output = Result<T, CollectiveError>>,
    ) -> Result<T, CollectiveError> {
        self.rt.block_on(self.abort.unless_aborted(work))
    }

    /// Sends this stage's output to rank t of the next stage.
    pub fn send_next(&self, hidden: &Tensor) -> Result<(), CollectiveError> {
        self.timed(|| self.send_next_inner(hidden))
    }

    fn send_next_inner(&self, hidden: &Tensor) -> Result<(), CollectiveError> {
        let next = self
            .next
            .ok_or_else(|| CollectiveError::Connect("no next stage".into()))?;
        let mut guard = self.lock()?;
        let st = &mut *guard;
        let op = st.next_ops;
        st.next_ops += 1;
        frame::encode_tensor(&mut st.send_buf, pb::FrameKind::Hidden, op, hidden)
            .map_err(|e| CollectiveError::Mismatch(e.to_string()))?;
        let frame = &st.send_buf;
        let link = link(&mut st.links, next)?;
        let timeout = self.timeout;
        self.block_on(async {
            tokio::time::timeout(timeout, link.stream.write_all(frame))
                .await
                .map_err(|_| link_err(next, "send timed out"))?
                .map_err(|e| link_err(next, &e.to_string()))
        })
    }

    /// Receives the previous stage's output from its rank t: hidden states of `dims` in `dtype`
    /// (anything else is refused before it is read).
    pub fn recv_prev(&self, dims: &[usize], dtype: DType) -> Result<Tensor, CollectiveError> {
        self.timed(|| self.recv_prev_inner(dims, dtype))
    }

    fn recv_prev_inner(&self, dims: &[usize], dtype: DType) -> Result<Tensor, CollectiveError> {
        let prev = self
            .prev
            .ok_or_else(|| CollectiveError::Connect("no previous stage".into()))?;
        let mut st = self.lock()?;
        let expected = Expected {
            kind: pb::FrameKind::Hidden,
            op: st.prev_ops,
            dims,
            dtype,
        };
        st.prev_ops += 1;
        let link = link(&mut st.links, prev)?;
        let (timeout, device) = (self.timeout, &self.device);
        self.block_on(async {
            let Link { stream, rbuf, .. } = link;
            let read = frame::read_tensor(stream, rbuf, &expected, device);
            within(timeout, prev, read).await
        })
    }

    fn all_reduce(&self, partial: &Tensor) -> Result<Tensor, CollectiveError> {
        let mut guard = self.lock()?;
        let st = &mut *guard;
        let op = st.stage_ops;
        st.stage_ops += 1;
        frame::encode_tensor(&mut st.send_buf, pb::FrameKind::Partial, op, partial)
            .map_err(|e| CollectiveError::Mismatch(e.to_string()))?;
        let frame = &st.send_buf;
        // A peer's partial has exactly this rank's shape and dtype.
        let expected = Expected {
            kind: pb::FrameKind::Partial,
            op,
            dims: partial.dims(),
            dtype: partial.dtype(),
        };
        let timeout = self.timeout;
        let me = self.stage[self.rank];
        let mut links: Vec<(usize, &mut Link)> = st
            .links
            .iter_mut()
            .filter(|(p, _)| **p != me && self.stage.contains(p))
            .map(|(&p, l)| (p, l))
            .collect();
        let received = self.block_on(async {
            let exchanges = links
                .iter_mut()
                .map(|(peer, link)| exchange(*peer, link, frame, &expected, timeout));
            Ok(join_all(exchanges).await)
        })?;
        received.into_iter().collect::<Result<Vec<()>, _>>()?;
        let peers: Vec<(usize, &ElementBuffer)> = links
            .iter()
            .map(|(peer, link)| {
                let rank = self
                    .stage
                    .iter()
                    .position(|s| s == peer)
                    .unwrap_or(usize::MAX);
                (rank, &link.partial)
            })
            .collect();
        reduce::rank_ordered_sum(partial, self.rank, &peers, &self.device)
    }
}

/// The Collective face of a data plane (the shard owns one of these; the server keeps the plane
/// for the stage hand-off).
#[derive(Clone)]
pub struct PlaneCollective(pub Arc<DataPlane>);

impl Collective for PlaneCollective {
    fn rank(&self) -> usize {
        self.0.rank
    }
    fn world_size(&self) -> usize {
        self.0.stage.len()
    }
    fn all_reduce_sum(&self, partial: &Tensor) -> Result<Tensor, CollectiveError> {
        if self.0.stage.len() == 1 {
            return Ok(partial.clone());
        }
        self.0.timed(|| self.0.all_reduce(partial))
    }
    fn abort(&self, reason: &str) {
        self.0.abort(reason);
    }
}

fn link(links: &mut BTreeMap<usize, Link>, peer: usize) -> Result<&mut Link, CollectiveError> {
    links
        .get_mut(&peer)
        .ok_or_else(|| link_err(peer, "not connected"))
}

fn link_err(peer: usize, reason: &str) -> CollectiveError {
    CollectiveError::Link {
        peer,
        reason: reason.to_string(),
    }
}

/// A frame (or its elements) read from `peer` within `timeout`.
async fn within<T>(
    timeout: Duration,
    peer: usize,
    read: impl Future<Output = Result<T, FrameError>>,
) -> Result<T, CollectiveError> {
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(got)) => Ok(got),
        Ok(Err(e @ FrameError::Unexpected { .. })) => {
            Err(CollectiveError::Mismatch(format!("shard {peer}: {e}")))
        }
        Ok(Err(e)) => Err(link_err(peer, &e.to_string())),
        Err(_) => Err(CollectiveError::Timeout {
            rank: peer,
            missing: vec![peer],
            waited_ms: timeout.as_millis(),
        }),
    }
}

/// Writes our frame and reads the peer's partial into the link's buffer at the same time.
async fn exchange(
    peer: usize,
    link: &mut Link,
    frame: &[u8],
    expected: &Expected<'_>,
    timeout: Duration,
) -> Result<(), CollectiveError> {
    let Link {
        stream,
        rbuf,
        partial,
    } = link;
    let (mut r, mut w) = stream.split();
    let write = async {
        tokio::time::timeout(timeout, w.write_all(frame))
            .await
            .map_err(|_| link_err(peer, "send timed out"))?
            .map_err(|e| link_err(peer, &e.to_string()))
    };
    let read = within(
        timeout,
        peer,
        frame::read_elements_into(&mut r, rbuf, expected, partial),
    );
    let (written, read) = tokio::join!(write, read);
    written?;
    read
}
