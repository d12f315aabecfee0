//! At most `max_connections` HTTP connections at once. [`ConnectionLimit`] wraps the listener:
//! every accepted connection holds a semaphore permit for as long as it is open (the permit
//! lives in its [`Counted`] stream, so it returns when the server drops the connection). A
//! connection accepted past the limit never reaches the server: it is answered 503 in OpenAI's
//! error shape and closed, within a bounded time, so a flood costs no more than the limit.

use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::api::response::ErrorBody;

/// `max_connections` when the settings give none.
pub const DEFAULT_MAX_CONNECTIONS: NonZeroUsize = NonZeroUsize::new(1024).unwrap();

/// Refusals being written at once; past it an over-limit connection is closed unanswered.
const MAX_REFUSING: usize = 64;
/// How long a refusal may take: reading the request head, writing the 503, draining.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(2);
/// Most request bytes read before the 503 is written (the head; a body is drained after).
const REFUSAL_READ: usize = 16 << 10;

/// A TCP listener that lets at most `max` connections be open at once.
pub struct ConnectionLimit {
    listener: TcpListener,
    open: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    max: usize,
}

impl ConnectionLimit {
    pub fn new(listener: TcpListener, max: NonZeroUsize) -> Self {
        Self {
            listener,
            open: Arc::new(Semaphore::new(max.get())),
            refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
            max: max.get(),
        }
    }

    /// Answers an over-limit connection off the accept loop, or drops it when too many
    /// refusals are under way already.
    fn refuse(&self, stream: TcpStream, peer: SocketAddr) {
        let Ok(slot) = self.refusing.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = self.max, "connection past the limit closed unanswered");
            return;
        };
        tracing::warn!(%peer, max = self.max, "connection past the limit refused");
        let response = refusal(self.max);
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(REFUSAL_DEADLINE, answer_and_close(stream, response)).await;
            drop(slot);
        });
    }
}

impl Listener for ConnectionLimit {
    type Io = Counted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Counted, SocketAddr) {
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors or a connection reset before accept: accepting
                    // again at once would spin, so back off briefly.
                    tracing::warn!(%e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match self.open.clone().try_acquire_owned() {
                Ok(permit) => {
                    return (
                        Counted {
                            stream,
                            _permit: permit,
                        },
                        peer,
                    )
                }
                Err(_) => self.refuse(stream, peer),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// An accepted connection and its place under the limit, given back when it is dropped.
pub struct Counted {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The client's address, for handlers and middleware (`ConnectInfo<ClientAddr>`): the rate
/// limit keys on it when no API keys are configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

impl Connected<IncomingStream<'_, ConnectionLimit>> for ClientAddr {
    fn connect_info(stream: IncomingStream<'_, ConnectionLimit>) -> Self {
        Self(*stream.remote_addr())
    }
}

/// The whole HTTP/1.1 503 answer to a connection past the limit.
fn refusal(max: usize) -> Vec<u8> {
    let message = format!(
        "the server has {max} connections open, its max_connections; retry shortly, or reuse a \
         connection"
    );
    let body = serde_json::to_string(&ErrorBody::new(message, "server_error", None))
        .unwrap_or_else(|_| "{}".to_string());
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads the request head (what has arrived of it), writes the answer, then drains until the
/// client closes: closing a socket with unread input makes the kernel send a reset, which could
/// destroy the answer before the client reads it.
async fn answer_and_close(mut stream: TcpStream, response: Vec<u8>) -> io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < REFUSAL_READ {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    stream.write_all(&response).await?;
    stream.shutdown().await?;
    while stream.read(&mut buf).await? > 0 {}
    Ok(())
}
