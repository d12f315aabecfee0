//! The worker-to-worker data plane: one TCP connection per pair of shards that exchange tensors
//! (the ranks of a stage for the all-reduce; rank t of stage p and of stage p+1 for the hand-off).
//!
//! Every connection lives on one current_thread tokio runtime that the compute thread drives
//! itself (`block_on`), so an all-reduce costs no cross-thread wake-up: the thread that computed
//! the partial writes it to every peer and reads theirs concurrently (no deadlock however large
//! the tensor), then sums in rank order.
//!
//! A tensor frame is a u32 little-endian header length, a prost `PeerFrame` header (kind,
//! operation number, dtype, shape; its data field empty), then the raw little-endian elements.
//! Elements are copied once out of candle's storage into a reused send buffer, and read from the
//! socket straight into the received tensor's own buffer.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use candle_core::{Device, Tensor};
use futures_util::future::join_all;
use gemma_proto::{pb, Session, ShardSpec};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::collective::{sum_in_rank_order, Collective};
use crate::error::CollectiveError;
use crate::wire::{append_elements, tensor_header, ElementBuffer};

/// Largest frame accepted: a prefill chunk's hidden states stay far below it.
const MAX_FRAME: usize = 1 << 30;

struct Link {
    stream: TcpStream,
    /// Reused for every frame header read on this link.
    rbuf: Vec<u8>,
}

/// A tensor received from a peer: the frame header and the tensor built from its elements.
struct Received {
    frame: pb::PeerFrame,
    tensor: Tensor,
}

struct PlaneState {
    /// Connections by the peer's shard index.
    links: BTreeMap<usize, Link>,
    /// Operations done so far per link kind; both ends count alike, frames carry the count.
    stage_ops: u64,
    next_ops: u64,
    prev_ops: u64,
    aborted: Option<String>,
    /// Reused for every frame this shard sends.
    send_buf: Vec<u8>,
}

/// This shard's connections to the shards it exchanges tensors with.
pub struct DataPlane {
    rt: tokio::runtime::Runtime,
    state: Mutex<PlaneState>,
    /// Shard indices of this stage's ranks, in rank order (this shard included).
    stage: Vec<usize>,
    rank: usize,
    next: Option<usize>,
    prev: Option<usize>,
    timeout: Duration,
    device: Device,
    /// Time spent in all-reduces and hand-offs since last taken (for the step's metrics).
    wait_micros: std::sync::atomic::AtomicU64,
}

impl DataPlane {
    /// Microseconds spent exchanging tensors since the last call.
    pub fn take_wait_micros(&self) -> u64 {
        self.wait_micros
            .swap(0, std::sync::atomic::Ordering::Relaxed)
    }

    fn timed<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.wait_micros.fetch_add(
            t.elapsed().as_micros() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        out
    }

    /// Connects to every peer `spec` needs: it dials peers with a higher shard index and accepts
    /// the lower ones on `listener`, each side identifying itself with a `PeerHello`.
    pub fn connect(
        spec: &ShardSpec,
        session: Session,
        addrs: &[String],
        listener: std::net::TcpListener,
        timeout: Duration,
        device: Device,
    ) -> Result<Self, CollectiveError> {
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
        let links = rt.block_on(connect_mesh(me, session, addrs, &peers, listener, timeout))?;
        Ok(Self {
            rt,
            state: Mutex::new(PlaneState {
                links,
                stage_ops: 0,
                next_ops: 0,
                prev_ops: 0,
                aborted: None,
                send_buf: Vec::new(),
            }),
            stage,
            rank: spec.rank,
            next,
            prev,
            timeout,
            device,
            wait_micros: Default::default(),
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, PlaneState>, CollectiveError> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match &st.aborted {
            Some(reason) => Err(CollectiveError::Aborted(reason.clone())),
            None => Ok(st),
        }
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
        encode_frame(&mut st.send_buf, pb::FrameKind::Hidden, op, hidden)?;
        let frame = &st.send_buf;
        let link = link(&mut st.links, next)?;
        let timeout = self.timeout;
        self.rt.block_on(async {
            tokio::time::timeout(timeout, link.stream.write_all(frame))
                .await
                .map_err(|_| link_err(next, "send timed out"))?
                .map_err(|e| link_err(next, &e.to_string()))
        })
    }

    /// Receives the previous stage's output from its rank t.
    pub fn recv_prev(&self) -> Result<Tensor, CollectiveError> {
        self.timed(|| self.recv_prev_inner())
    }

    fn recv_prev_inner(&self) -> Result<Tensor, CollectiveError> {
        let prev = self
            .prev
            .ok_or_else(|| CollectiveError::Connect("no previous stage".into()))?;
        let mut st = self.lock()?;
        let op = st.prev_ops;
        st.prev_ops += 1;
        let link = link(&mut st.links, prev)?;
        let timeout = self.timeout;
        let device = &self.device;
        let got = self.rt.block_on(async {
            let Link { stream, rbuf, .. } = link;
            read_tensor_frame(stream, rbuf, prev, timeout, device).await
        })?;
        check_frame(&got.frame, pb::FrameKind::Hidden, op, prev)?;
        Ok(got.tensor)
    }

    fn all_reduce(&self, partial: &Tensor) -> Result<Tensor, CollectiveError> {
        let mut guard = self.lock()?;
        let st = &mut *guard;
        let op = st.stage_ops;
        st.stage_ops += 1;
        encode_frame(&mut st.send_buf, pb::FrameKind::Partial, op, partial)?;
        let frame = &st.send_buf;
        let timeout = self.timeout;
        let device = &self.device;
        let peers: Vec<usize> = self
            .stage
            .iter()
            .copied()
            .filter(|&p| p != self.stage[self.rank])
            .collect();
        let mut links: Vec<(usize, &mut Link)> = st
            .links
            .iter_mut()
            .filter(|(p, _)| peers.contains(p))
            .map(|(&p, l)| (p, l))
            .collect();
        let received = self.rt.block_on(join_all(
            links
                .iter_mut()
                .map(|(peer, link)| exchange(*peer, link, frame, timeout, device)),
        ));
        let mut parts: Vec<Option<Tensor>> = vec![None; self.stage.len()];
        parts[self.rank] = Some(partial.clone());
        for ((peer, _), got) in links.iter().zip(received) {
            let got = got?;
            check_frame(&got.frame, pb::FrameKind::Partial, op, *peer)?;
            let t = got.tensor;
            if t.dims() != partial.dims() || t.dtype() != partial.dtype() {
                return Err(CollectiveError::Mismatch(format!(
                    "shard {peer} sent {:?} {:?}, this rank has {:?} {:?}",
                    t.dims(),
                    t.dtype(),
                    partial.dims(),
                    partial.dtype()
                )));
            }
            let rank = self.stage.iter().position(|&s| s == *peer).unwrap_or(0);
            parts[rank] = Some(t);
        }
        let parts: Vec<Tensor> = parts.into_iter().flatten().collect();
        sum_in_rank_order(&parts)
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
        let mut st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        st.aborted = Some(reason.to_string());
        // Dropping the links tells every peer at once (EOF) instead of at its timeout.
        st.links.clear();
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

fn check_frame(
    frame: &pb::PeerFrame,
    kind: pb::FrameKind,
    op: u64,
    peer: usize,
) -> Result<(), CollectiveError> {
    if frame.kind != kind as i32 || frame.op != op {
        return Err(CollectiveError::Mismatch(format!(
            "shard {peer} sent frame kind {} op {}, expected kind {} op {op}",
            frame.kind, frame.op, kind as i32
        )));
    }
    Ok(())
}

/// Encodes a tensor frame into `buf` (cleared first): header length, header, elements. Encoded
/// once per operation and written to every peer.
fn encode_frame(
    buf: &mut Vec<u8>,
    kind: pb::FrameKind,
    op: u64,
    t: &Tensor,
) -> Result<(), CollectiveError> {
    let bad = |e: crate::error::WireTensorError| CollectiveError::Mismatch(e.to_string());
    let header = pb::PeerFrame {
        kind: kind as i32,
        op,
        tensor: Some(tensor_header(t).map_err(bad)?),
    };
    buf.clear();
    buf.extend_from_slice(&(header.encoded_len() as u32).to_le_bytes());
    header
        .encode(buf)
        .map_err(|e| CollectiveError::Mismatch(e.to_string()))?;
    append_elements(t, buf).map_err(bad)
}

fn length_prefixed(msg: &impl Message) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    // Encoding into a Vec with enough capacity cannot fail.
    let _ = msg.encode(&mut buf);
    Bytes::from(buf)
}

/// Writes our frame and reads the peer's at the same time.
async fn exchange(
    peer: usize,
    link: &mut Link,
    frame: &[u8],
    timeout: Duration,
    device: &Device,
) -> Result<Received, CollectiveError> {
    let Link { stream, rbuf, .. } = link;
    let (mut r, mut w) = stream.split();
    let write = async {
        tokio::time::timeout(timeout, w.write_all(frame))
            .await
            .map_err(|_| link_err(peer, "send timed out"))?
            .map_err(|e| link_err(peer, &e.to_string()))
    };
    let read = read_tensor_frame(&mut r, rbuf, peer, timeout, device);
    let (written, read) = tokio::join!(write, read);
    written?;
    read
}

/// Reads a tensor frame: the header into `buf`, the elements straight into a new tensor's buffer.
async fn read_tensor_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    peer: usize,
    timeout: Duration,
    device: &Device,
) -> Result<Received, CollectiveError> {
    let read = async {
        read_frame(r, buf).await?;
        let frame = pb::PeerFrame::decode(&buf[..]).map_err(std::io::Error::other)?;
        let header = frame
            .tensor
            .as_ref()
            .ok_or_else(|| std::io::Error::other("frame without tensor header"))?;
        let (mut elements, dims) = ElementBuffer::for_header(header, MAX_FRAME)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        r.read_exact(elements.bytes_mut()).await?;
        let tensor = elements
            .into_tensor(dims, device)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok::<_, std::io::Error>(Received { frame, tensor })
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(got)) => Ok(got),
        Ok(Err(e)) => Err(link_err(peer, &e.to_string())),
        Err(_) => Err(CollectiveError::Timeout {
            rank: peer,
            missing: vec![peer],
            waited_ms: timeout.as_millis(),
        }),
    }
}

/// Reads one length-prefixed frame into `buf`.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!(
            "frame of {len} bytes exceeds the limit of {MAX_FRAME}"
        )));
    }
    buf.resize(len, 0);
    r.read_exact(buf).await?;
    Ok(())
}

async fn connect_mesh(
    me: usize,
    session: Session,
    addrs: &[String],
    peers: &[usize],
    listener: std::net::TcpListener,
    timeout: Duration,
) -> Result<BTreeMap<usize, Link>, CollectiveError> {
    let deadline = Instant::now() + timeout;
    let dial = peers.iter().filter(|&&p| p > me).map(|&p| async move {
        let stream = dial(&addrs[p], deadline).await?;
        let mut link = new_link(stream)?;
        let hello = length_prefixed(&pb::PeerHello {
            shard_index: me as u32,
            session: Some(session.into()),
        });
        link.stream
            .write_all(&hello)
            .await
            .map_err(|e| CollectiveError::Connect(format!("hello to {}: {e}", addrs[p])))?;
        Ok::<_, CollectiveError>((p, link))
    });
    let lower: Vec<usize> = peers.iter().copied().filter(|&p| p < me).collect();
    let accept = accept_peers(listener, session, lower, deadline);
    let (dialed, accepted) = tokio::join!(join_all(dial), accept);
    let mut links = accepted?;
    for d in dialed {
        let (p, link) = d?;
        links.insert(p, link);
    }
    Ok(links)
}

async fn dial(addr: &str, deadline: Instant) -> Result<TcpStream, CollectiveError> {
    loop {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(CollectiveError::Connect(format!(
                    "cannot reach peer {addr}: {e}"
                )))
            }
            // The peer may still be starting; try again shortly.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Socket buffers large enough that a whole prefill chunk's frame is in flight at once instead
/// of trickling through the default 16 KiB send buffer (the kernel caps it at wmem_max).
const SOCKET_BUFFER: usize = 8 << 20;

fn new_link(stream: TcpStream) -> Result<Link, CollectiveError> {
    stream
        .set_nodelay(true)
        .map_err(|e| CollectiveError::Connect(format!("TCP_NODELAY: {e}")))?;
    let sock = socket2::SockRef::from(&stream);
    // Best effort: a smaller buffer is slower, not wrong.
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    Ok(Link {
        stream,
        rbuf: Vec::new(),
    })
}

/// Accepts until every lower-indexed peer of this cluster has said hello; connections from
/// elsewhere (an older incarnation, a port scanner) are dropped.
async fn accept_peers(
    listener: std::net::TcpListener,
    session: Session,
    mut expected: Vec<usize>,
    deadline: Instant,
) -> Result<BTreeMap<usize, Link>, CollectiveError> {
    let mut links = BTreeMap::new();
    if expected.is_empty() {
        return Ok(links);
    }
    listener
        .set_nonblocking(true)
        .map_err(|e| CollectiveError::Connect(e.to_string()))?;
    let listener =
        TcpListener::from_std(listener).map_err(|e| CollectiveError::Connect(e.to_string()))?;
    while !expected.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let accepted = tokio::time::timeout(left, listener.accept())
            .await
            .map_err(|_| CollectiveError::Connect(format!("peers {expected:?} never connected")))?;
        let Ok((stream, _)) = accepted else { continue };
        let mut link = new_link(stream)?;
        let Link { stream, rbuf, .. } = &mut link;
        let hello = tokio::time::timeout(Duration::from_secs(5), read_frame(stream, rbuf)).await;
        let Ok(Ok(())) = hello else { continue };
        let Ok(hello) = pb::PeerHello::decode(&rbuf[..]) else {
            continue;
        };
        let from = hello.shard_index as usize;
        let theirs = gemma_proto::session::required(hello.session).ok();
        if theirs == Some(session) && expected.contains(&from) {
            expected.retain(|&p| p != from);
            links.insert(from, link);
        }
    }
    Ok(links)
}
