//! Joining a group: this shard dials every peer with a higher shard index and accepts the lower
//! ones, each connecting side presenting a `PeerHello` (its shard index and the session of the
//! assignment). Only a hello with exactly this shard's session and an expected index makes a link,
//! and the accepting side answers it with its own hello; any other connection (an older
//! incarnation of the group, another cluster, a port scanner) is dropped. Hellos are read
//! concurrently, each within [`HELLO_DEADLINE`], so one silent connection cannot hold up the peers
//! that come after it.
//!
//! The answer matters while a group is re-assigned: the peer may still be in its previous
//! assignment, whose accept loop drops the new session's hello. The dialling side takes a link only
//! once answered, and dials again until the deadline otherwise.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use futures_util::stream::{FuturesUnordered, StreamExt};
use gemma_proto::{pb, Session};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::frame;
use crate::error::CollectiveError;
use crate::peer_stream::{self, PeerStream, PlaneTls};
use crate::wire::ElementBuffer;

/// How long an accepted connection has to say hello.
const HELLO_DEADLINE: Duration = Duration::from_secs(2);
/// Connections whose hello is awaited at once; past it, accepting waits for one to finish.
const MAX_PENDING_HELLOS: usize = 64;
/// Socket buffers large enough that a whole prefill chunk's frame is in flight at once instead
/// of trickling through the default 16 KiB send buffer (the kernel caps it at wmem_max).
const SOCKET_BUFFER: usize = 8 << 20;

/// One connection to a peer shard.
pub(super) struct Link {
    /// Plain TCP, or TLS when the cluster runs with mutual TLS.
    pub stream: PeerStream,
    /// Reused for every frame header read on this link.
    pub rbuf: Vec<u8>,
    /// Reused for every all-reduce partial received on this link.
    pub partial: ElementBuffer,
}

/// Connects to `peers` (shard indices) before `deadline`: links by peer index.
pub(super) async fn connect(
    me: usize,
    session: Session,
    addrs: &[String],
    peers: &[usize],
    listener: std::net::TcpListener,
    tls: Option<&std::sync::Arc<PlaneTls>>,
    deadline: Instant,
) -> Result<BTreeMap<usize, Link>, CollectiveError> {
    let hello = frame::encode_hello(&pb::PeerHello {
        shard_index: me as u32,
        session: Some(session.into()),
    });
    let dials = peers
        .iter()
        .filter(|&&p| p > me)
        .map(|&p| dial_until_answered(p, &addrs[p], session, &hello, tls, deadline));
    let lower: Vec<usize> = peers.iter().copied().filter(|&p| p < me).collect();
    let (dialed, accepted) = tokio::join!(
        join_all(dials),
        accept_peers(listener, session, &hello, lower, tls, deadline)
    );
    let mut links = accepted?;
    for d in dialed {
        let (p, link) = d?;
        links.insert(p, link);
    }
    Ok(links)
}

/// Dials `peer` and says hello until it answers with the same session (a peer still in its
/// previous assignment drops the connection; dialled again, its next assignment answers).
async fn dial_until_answered(
    peer: usize,
    addr: &str,
    session: Session,
    hello: &[u8],
    tls: Option<&std::sync::Arc<PlaneTls>>,
    deadline: Instant,
) -> Result<(usize, Link), CollectiveError> {
    loop {
        let tcp = tuned(dial(addr, deadline).await?)?;
        let answer = async {
            let mut link = new_link(peer_stream::dial(tls, addr, tcp).await?);
            link.stream.write_all(hello).await?;
            let answer = frame::read_hello(&mut link.stream)
                .await
                .map_err(std::io::Error::other)?;
            Ok::<_, std::io::Error>((answer, link))
        };
        let why = match tokio::time::timeout_at(deadline.into(), answer).await {
            Ok(Ok((answer, link))) => match admit(&answer, session, &[peer]) {
                Ok(_) => return Ok((peer, link)),
                Err(why) => why,
            },
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer".to_string(),
        };
        if Instant::now() >= deadline {
            return Err(CollectiveError::Connect(format!(
                "peer {addr} never answered this assignment's hello: {why}"
            )));
        }
        tracing::debug!(%addr, %why, "data-plane hello not answered; dialling again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn dial(addr: &str, deadline: Instant) -> Result<TcpStream, CollectiveError> {
    loop {
        // A literal address needs no resolver (tokio resolves names on a blocking thread).
        let attempt = match addr.parse::<SocketAddr>() {
            Ok(a) => TcpStream::connect(a).await,
            Err(_) => TcpStream::connect(addr).await,
        };
        match attempt {
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

/// The socket options of every data-plane connection.
fn tuned(stream: TcpStream) -> Result<TcpStream, CollectiveError> {
    stream
        .set_nodelay(true)
        .map_err(|e| CollectiveError::Connect(format!("TCP_NODELAY: {e}")))?;
    let sock = socket2::SockRef::from(&stream);
    // Best effort: a smaller buffer is slower, not wrong.
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    Ok(stream)
}

fn new_link(stream: PeerStream) -> Link {
    Link {
        stream,
        rbuf: Vec::new(),
        partial: ElementBuffer::F32(Vec::new()),
    }
}

/// A connection that said hello within the deadline, or why it did not.
type Greeted = (SocketAddr, Result<(pb::PeerHello, PeerStream), String>);

/// The TLS handshake (when configured) and the hello, both within [`HELLO_DEADLINE`]: a
/// stranger without the CA's certificate is dropped here.
async fn await_hello(
    tcp: TcpStream,
    from: SocketAddr,
    tls: Option<std::sync::Arc<PlaneTls>>,
) -> Greeted {
    let greet = async {
        let mut stream = peer_stream::accept(tls.as_ref(), tuned(tcp).map_err(|e| e.to_string())?)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let hello = frame::read_hello(&mut stream)
            .await
            .map_err(|e| e.to_string())?;
        Ok((hello, stream))
    };
    let result = match tokio::time::timeout(HELLO_DEADLINE, greet).await {
        Ok(r) => r,
        Err(_) => Err(format!("no hello within {HELLO_DEADLINE:?}")),
    };
    (from, result)
}

/// Accepts until every lower-indexed peer of this assignment has said hello.
async fn accept_peers(
    listener: std::net::TcpListener,
    session: Session,
    hello: &[u8],
    mut expected: Vec<usize>,
    tls: Option<&std::sync::Arc<PlaneTls>>,
    deadline: Instant,
) -> Result<BTreeMap<usize, Link>, CollectiveError> {
    let mut links = BTreeMap::new();
    if expected.is_empty() {
        return Ok(links);
    }
    let listener = listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener))
        .map_err(|e| CollectiveError::Connect(format!("data-plane listener: {e}")))?;
    let mut pending = FuturesUnordered::new();
    let timeout = tokio::time::sleep_until(deadline.into());
    tokio::pin!(timeout);
    while !expected.is_empty() {
        tokio::select! {
            accepted = listener.accept(), if pending.len() < MAX_PENDING_HELLOS => match accepted {
                Ok((stream, from)) => pending.push(await_hello(stream, from, tls.cloned())),
                Err(e) => tracing::debug!(error = %e, "data-plane accept failed"),
            },
            Some((from, greeted)) = pending.next() => {
                let admitted = greeted.and_then(|(theirs, stream)| {
                    admit(&theirs, session, &expected).map(|index| (index, stream))
                });
                match admitted {
                    Ok((index, stream)) => {
                        let mut link = new_link(stream);
                        // The answer fits any socket buffer: this write does not wait.
                        match link.stream.write_all(hello).await {
                            Ok(()) => {
                                expected.retain(|&p| p != index);
                                links.insert(index, link);
                            }
                            Err(e) => tracing::warn!(%from, error = %e, "a peer left before its answer"),
                        }
                    }
                    Err(why) => {
                        tracing::warn!(%from, %why, "dropped a data-plane connection")
                    }
                }
            },
            () = &mut timeout => {
                return Err(CollectiveError::Connect(format!(
                    "peers {expected:?} never connected"
                )))
            }
        }
    }
    Ok(links)
}

/// The shard index of a hello that belongs to this assignment, or why it does not.
fn admit(hello: &pb::PeerHello, session: Session, expected: &[usize]) -> Result<usize, String> {
    let theirs = gemma_proto::session::required(hello.session.clone())
        .map_err(|e| format!("hello without a valid session: {e}"))?;
    if theirs != session {
        return Err(format!(
            "the hello presents {theirs}; this shard's assignment is {session}"
        ));
    }
    let index = hello.shard_index as usize;
    if !expected.contains(&index) {
        return Err(format!(
            "shard {index} is not the peer expected here ({expected:?})"
        ));
    }
    Ok(index)
}
