//! gemma-worker: serves one shard of a Gemma model to a coordinator.
//!
//! On start it binds its gRPC address and its data-plane address (port 0 allowed) and prints
//! one line, `gemma-worker listening on GRPC_ADDR data DATA_ADDR`, on stdout: the handshake a
//! spawning coordinator reads. Then it waits for an assignment.
//!
//! Beside the `Worker` service it serves the standard gRPC health service
//! (`grpc.health.v1.Health`): the process answers, so Kubernetes' native `grpc:` probes can ask
//! it without a client of our own. SERVING means "up and accepting an assignment", not
//! "assigned": a worker waits unassigned until its coordinator arrives.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};

use anyhow::{Context, Result};
use clap::Parser;
use gemma_proto::pb::worker_server::WorkerServer;
use gemma_proto::tls::TlsIdentity;
use gemma_worker::peer_stream::PlaneTls;
use gemma_worker::server::WorkerService;

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// gRPC address for the coordinator (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Data-plane address for the other workers; default: the --listen host, any free port.
    #[arg(long)]
    data_listen: Option<SocketAddr>,
    /// Compute threads (candle's pool); default: all cores. Give each local worker its share.
    #[arg(long)]
    threads: Option<usize>,
    /// This worker's certificate (PEM, leaf first). With --tls-key and --tls-ca: mutual TLS on
    /// gRPC and on the data plane, and only peers with a certificate from the CA get through.
    #[arg(long, value_name = "PEM")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM")]
    tls_key: Option<std::path::PathBuf>,
    /// The CA that signs every certificate of the cluster (PEM).
    #[arg(long, value_name = "PEM")]
    tls_ca: Option<std::path::PathBuf>,
}

/// How long open connections may drain after SIGTERM.
const DRAIN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(1);

fn main() -> Result<()> {
    gemma_proto::process::bound_allocator_retention();
    let args = Args::parse();
    if let Some(n) = args.threads {
        // candle reads this when it first sizes its thread pool, before any compute.
        std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
    }
    gemma_proto::process::init_tracing();
    let data_addr = args
        .data_listen
        .unwrap_or_else(|| SocketAddr::new(args.listen.ip(), 0));
    let data = TcpListener::bind(data_addr).with_context(|| format!("binding {data_addr}"))?;
    let tls = TlsIdentity::from_options(
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
        args.tls_ca.as_deref(),
    )?;
    let mut service = WorkerService::new(data)?;
    if let Some(identity) = &tls {
        service = service.with_tls(std::sync::Arc::new(PlaneTls::new(identity)?));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        let announce = format!(
            "gemma-worker listening on {addr} data {}\n",
            service.data_addr()
        );
        {
            let mut out = std::io::stdout().lock();
            out.write_all(announce.as_bytes())?;
            out.flush()?;
        }
        tracing::info!(%addr, data = service.data_addr(), "worker up");
        let health = health_service().await;
        let mut builder = tonic::transport::Server::builder();
        if let Some(identity) = &tls {
            builder = builder
                .tls_config(identity.grpc_server())
                .context("the gRPC server's TLS")?;
        }
        let server = builder
            .tcp_nodelay(true)
            // Logits answers are megabytes: a 64 KiB HTTP/2 window would stall them.
            .initial_stream_window_size(64 << 20)
            .initial_connection_window_size(128 << 20)
            .add_service(
                WorkerServer::new(service)
                    .max_decoding_message_size(usize::MAX)
                    .max_encoding_message_size(usize::MAX),
            )
            .add_service(health);
        // A step in flight finishes within a second on any shard we serve; the coordinator's
        // HTTP/2 channel may stay open longer, and must not hold the exit.
        gemma_proto::process::serve_with_drain_deadline(
            |stop| server.serve_with_incoming_shutdown(incoming_nodelay(listener), stop),
            DRAIN_DEADLINE,
        )
        .await
        .context("serving")
    })
}

/// The standard health service, SERVING for the whole server ("") and for `gemma.v1.Worker`.
async fn health_service(
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter.set_serving::<WorkerServer<WorkerService>>().await;
    service
}

/// Accepted connections with Nagle off: tonic's own `tcp_nodelay` applies only to listeners it
/// binds itself, and a step answer held back for a delayed ACK costs 40 ms.
fn incoming_nodelay(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        conn.and_then(|s| {
            s.set_nodelay(true)?;
            Ok(s)
        })
    })
}
