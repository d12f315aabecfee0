//! One data-plane connection as the plane reads and writes it: plain TCP, or TLS over TCP when
//! the cluster runs with mutual TLS (`PlaneTls`). Both sides of a TLS link present a
//! certificate from the cluster's CA; a peer without one never gets past the handshake, so it
//! never reaches the hello, let alone a frame.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use gemma_proto::tls::{server_name, TlsError, TlsIdentity};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A data-plane connection.
pub enum PeerStream {
    Plain(TcpStream),
    /// This side dialled.
    Dialled(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// This side accepted.
    Accepted(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl PeerStream {
    /// The TCP socket under it (for socket options).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(s) => s,
            Self::Dialled(s) => s.get_ref().0,
            Self::Accepted(s) => s.get_ref().0,
        }
    }
}

/// The data plane's TLS: how it dials and how it accepts.
#[derive(Clone)]
pub struct PlaneTls {
    connector: TlsConnector,
    acceptor: TlsAcceptor,
}

/// A handshake that does not finish in this time is a stranger's (or a dead peer's).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

impl PlaneTls {
    pub fn new(identity: &TlsIdentity) -> Result<Self, TlsError> {
        Ok(Self {
            connector: TlsConnector::from(identity.data_plane_client()?),
            acceptor: TlsAcceptor::from(identity.data_plane_server()?),
        })
    }

    /// TLS over a dialled connection to `addr`, whose certificate must name its host.
    pub async fn dial(&self, addr: &str, tcp: TcpStream) -> std::io::Result<PeerStream> {
        let name = server_name(addr).map_err(std::io::Error::other)?;
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.connector.connect(name, tcp))
            .await
            .map_err(|_| timed_out(addr))??;
        Ok(PeerStream::Dialled(Box::new(tls)))
    }

    /// TLS over an accepted connection; the peer must present the CA's certificate.
    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<PeerStream> {
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp))
            .await
            .map_err(|_| timed_out("an accepted peer"))??;
        Ok(PeerStream::Accepted(Box::new(tls)))
    }
}

fn timed_out(whom: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("TLS handshake with {whom} took longer than {HANDSHAKE_TIMEOUT:?}"),
    )
}

/// How a plane makes its connections: plain, or TLS when configured.
pub async fn dial(
    tls: Option<&Arc<PlaneTls>>,
    addr: &str,
    tcp: TcpStream,
) -> std::io::Result<PeerStream> {
    match tls {
        Some(t) => t.dial(addr, tcp).await,
        None => Ok(PeerStream::Plain(tcp)),
    }
}

pub async fn accept(tls: Option<&Arc<PlaneTls>>, tcp: TcpStream) -> std::io::Result<PeerStream> {
    match tls {
        Some(t) => t.accept(tcp).await,
        None => Ok(PeerStream::Plain(tcp)),
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Dialled(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Self::Accepted(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Dialled(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Self::Accepted(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Dialled(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Self::Accepted(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Dialled(s) => s.is_write_vectored(),
            Self::Accepted(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Dialled(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Self::Accepted(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Dialled(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Self::Accepted(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl PeerStream {
    /// Read and write halves that work at the same time (an all-reduce writes its partial
    /// while reading the peer's). Plain TCP splits without a lock; TLS, whose reads and writes
    /// share one session, through tokio's split.
    pub fn split(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        match self {
            Self::Plain(s) => {
                let (r, w) = s.split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            tls => {
                let (r, w) = tokio::io::split(tls);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }
}

pub enum ReadHalf<'a> {
    Plain(tokio::net::tcp::ReadHalf<'a>),
    Tls(tokio::io::ReadHalf<&'a mut PeerStream>),
}

pub enum WriteHalf<'a> {
    Plain(tokio::net::tcp::WriteHalf<'a>),
    Tls(tokio::io::WriteHalf<&'a mut PeerStream>),
}

impl AsyncRead for ReadHalf<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(r) => Pin::new(r).poll_read(cx, buf),
            Self::Tls(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(w) => Pin::new(w).poll_write(cx, buf),
            Self::Tls(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(w) => Pin::new(w).poll_flush(cx),
            Self::Tls(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(w) => Pin::new(w).poll_shutdown(cx),
            Self::Tls(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}
