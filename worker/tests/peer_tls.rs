//! The data plane's mutual TLS over real loopback sockets: two workers with certificates from
//! the cluster's CA connect and exchange bytes; a plain-TCP stranger, a stranger with another
//! CA's certificate, a client without a certificate and a peer whose certificate names another
//! host are all refused at the handshake.

use std::sync::Arc;

use gemma_proto::tls::TlsIdentity;
use gemma_testkit::pki::{IssuedFiles, TestCa};
use gemma_worker::peer_stream::{PeerStream, PlaneTls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn identity(files: &IssuedFiles) -> TlsIdentity {
    TlsIdentity::from_options(Some(&files.cert), Some(&files.key), Some(&files.ca))
        .expect("load")
        .expect("configured")
}

fn plane(files: &IssuedFiles) -> Arc<PlaneTls> {
    Arc::new(PlaneTls::new(&identity(files)).expect("plane tls"))
}

struct Pki {
    _dir: tempfile::TempDir,
    worker0: IssuedFiles,
    worker1: IssuedFiles,
    stranger: IssuedFiles,
    elsewhere: IssuedFiles,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("tmp");
    let ca = TestCa::new(dir.path(), "cluster").expect("ca");
    let other = TestCa::new(dir.path(), "stranger").expect("ca");
    Pki {
        worker0: ca
            .issue("worker-0", &["127.0.0.1", "localhost"])
            .expect("cert"),
        worker1: ca.issue("worker-1", &["127.0.0.1"]).expect("cert"),
        stranger: other.issue("intruder", &["127.0.0.1"]).expect("cert"),
        elsewhere: ca.issue("elsewhere", &["other.example"]).expect("cert"),
        _dir: dir,
    }
}

/// Accepts one connection with `server` while `dial` connects; both results.
async fn handshake(
    server: Arc<PlaneTls>,
    dial: impl AsyncFnOnce(String, TcpStream) -> std::io::Result<PeerStream>,
) -> (std::io::Result<PeerStream>, std::io::Result<PeerStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let accepted = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        server.accept(tcp).await
    });
    let tcp = TcpStream::connect(&addr).await.expect("connect");
    let dialled = dial(addr, tcp).await;
    let accepted = accepted.await.expect("join");
    (accepted, dialled)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn workers_of_one_ca_connect_and_exchange_bytes() {
    let p = pki();
    runtime().block_on(async {
        let client = plane(&p.worker1);
        let (accepted, dialled) = handshake(plane(&p.worker0), async |addr, tcp| {
            client.dial(&addr, tcp).await
        })
        .await;
        let (mut a, mut d) = (accepted.expect("accept"), dialled.expect("dial"));
        d.write_all(b"partial sums").await.expect("write");
        d.flush().await.expect("flush");
        let mut got = [0u8; 12];
        a.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"partial sums");
        a.write_all(b"ok").await.expect("write back");
        a.flush().await.expect("flush");
        let mut back = [0u8; 2];
        d.read_exact(&mut back).await.expect("read back");
        assert_eq!(&back, b"ok");
    });
}

#[test]
fn a_plain_tcp_stranger_is_refused() {
    let p = pki();
    runtime().block_on(async {
        let (accepted, _) = handshake(plane(&p.worker0), async |_, mut tcp| {
            // What a data-plane hello looks like without TLS.
            tcp.write_all(&[12, 0, 0, 0, 16, 1, 26, 8, 10, 0, 16, 1])
                .await?;
            Ok(PeerStream::Plain(tcp))
        })
        .await;
        assert!(accepted.is_err(), "a plain connection got through");
    });
}

#[test]
fn a_certificate_from_another_ca_is_refused_both_ways() {
    let p = pki();
    runtime().block_on(async {
        let intruder = plane(&p.stranger);
        let (accepted, dialled) = handshake(plane(&p.worker0), async |addr, tcp| {
            intruder.dial(&addr, tcp).await
        })
        .await;
        assert!(accepted.is_err(), "the stranger's certificate was accepted");
        assert!(
            dialled.is_err(),
            "the stranger trusted the cluster's certificate"
        );
    });
}

#[test]
fn a_client_without_a_certificate_is_refused() {
    let p = pki();
    runtime().block_on(async {
        // A TLS client that trusts the cluster's CA but presents no certificate of its own.
        let roots = {
            let mut r = tokio_rustls::rustls::RootCertStore::empty();
            let pem = std::fs::read(&p.worker0.ca).expect("ca");
            use tokio_rustls::rustls::pki_types::pem::PemObject;
            for c in tokio_rustls::rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                r.add(c.expect("pem")).expect("root");
            }
            r
        };
        let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let (accepted, _) = handshake(plane(&p.worker0), async |_, tcp| {
            let name = gemma_proto::tls::server_name("127.0.0.1:1").expect("name");
            let mut s = connector.connect(name, tcp).await?;
            // TLS 1.3: the server's refusal of the client comes after the client's finish.
            s.write_all(b"x").await?;
            s.flush().await?;
            Ok(PeerStream::Dialled(Box::new(s)))
        })
        .await;
        assert!(
            accepted.is_err(),
            "a client without a certificate was accepted"
        );
    });
}

#[test]
fn a_peer_whose_certificate_names_another_host_is_refused() {
    let p = pki();
    runtime().block_on(async {
        let client = plane(&p.worker1);
        let (_, dialled) = handshake(plane(&p.elsewhere), async |addr, tcp| {
            client.dial(&addr, tcp).await
        })
        .await;
        let e = dialled
            .err()
            .expect("a certificate for other.example passed as 127.0.0.1");
        assert!(e.to_string().contains("certificate"), "{e}");
    });
}
