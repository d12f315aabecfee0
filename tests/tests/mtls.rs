//! Mutual TLS across real processes (issue 10, item 4): a cluster whose coordinator and workers
//! hold certificates from one throwaway CA serves the same greedy text as the same cluster over
//! plain TCP; a stranger without such a certificate is refused at `Assign`, at `Steps` and at
//! the data plane, and the cluster serves on.

use std::io::Write;
use std::time::Duration;

use gemma_cluster_tests::http::post_json;
use gemma_cluster_tests::process::{CoordinatorProcess, WorkerProcess};
use gemma_cluster_tests::tiny_servable_model;
use gemma_proto::pb;
use gemma_proto::pb::worker_client::WorkerClient;
use gemma_proto::tls::TlsIdentity;
use gemma_testkit::pki::{IssuedFiles, TestCa};
use serde_json::json;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

const WAIT: Duration = Duration::from_secs(30);

fn greedy(addr: &str) -> String {
    let body = json!({"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0});
    let r = post_json(addr, "/v1/completions", &body).expect("request");
    let v = r.json().expect("json");
    assert_eq!(r.status, 200, "{v}");
    v["choices"][0]["text"].as_str().expect("text").to_string()
}

/// Two workers; with `pki`, each gets its certificate.
fn workers(pki: Option<[&IssuedFiles; 2]>) -> Vec<WorkerProcess> {
    (0..2)
        .map(|i| {
            let extra = pki.map(|w| w[i].flags()).unwrap_or_default();
            WorkerProcess::start_with("127.0.0.1:0", 1, &extra).expect("worker")
        })
        .collect()
}

/// A tp=2 coordinator of `workers`; with `pki`, with its certificate.
fn coordinator(
    model: &str,
    workers: &[WorkerProcess],
    pki: Option<&IssuedFiles>,
) -> CoordinatorProcess {
    let list = workers
        .iter()
        .map(|w| w.addr.clone())
        .collect::<Vec<_>>()
        .join(",");
    let mut args: Vec<String> = ["--model", model, "--tp", "2", "--workers", &list]
        .iter()
        .map(|s| s.to_string())
        .chain(["--kv-budget-mib".into(), "32".into()])
        .collect();
    args.extend(pki.map(IssuedFiles::flags).unwrap_or_default());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    CoordinatorProcess::start(&args).expect("coordinator")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// What a stranger's call to a worker comes to: Ok if the worker answered it.
async fn stranger_call(addr: &str, tls: Option<ClientTlsConfig>) -> Result<(), String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Channel::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut client = WorkerClient::new(channel);
    // A worker that hears an empty Assign refuses it for its content (no session); one that
    // hears a Steps call opens the stream. A TLS refusal gets neither far.
    let assign = client.assign(pb::AssignRequest::default()).await;
    let assign_heard = match &assign {
        Ok(_) => true,
        Err(s) => s.code() == tonic::Code::InvalidArgument,
    };
    let steps = client
        .steps(tokio_stream::iter(vec![pb::StepRequest::default()]))
        .await;
    match (assign_heard, steps.is_ok()) {
        (false, false) => Err(format!("assign: {assign:?}; steps: {:?}", steps.err())),
        _ => Ok(()),
    }
}

#[test]
fn a_mutual_tls_cluster_serves_the_same_text_and_refuses_strangers() {
    let (_tmp, dir) = tiny_servable_model();
    let model = dir.display().to_string();
    let plain_text = {
        let workers = workers(None);
        greedy(&coordinator(&model, &workers, None).addr)
    };

    let pki_dir = tempfile::tempdir().expect("tmp");
    let ca = TestCa::new(pki_dir.path(), "cluster").expect("ca");
    let other_ca = TestCa::new(pki_dir.path(), "stranger").expect("ca");
    let names = ["127.0.0.1", "localhost"];
    let coordinator_files = ca.issue("coordinator", &names).expect("cert");
    let w0 = ca.issue("worker-0", &names).expect("cert");
    let w1 = ca.issue("worker-1", &names).expect("cert");
    let intruder = other_ca.issue("intruder", &names).expect("cert");

    let workers = workers(Some([&w0, &w1]));
    // Strangers on the data plane before the group meshes: a plain hello, and garbage, at the
    // worker that accepts (shard 1; shard 0 only dials). Its accept loop takes them first;
    // neither gets past the TLS handshake.
    let strangers: Vec<std::net::TcpStream> = workers[1..]
        .iter()
        .flat_map(|w| {
            let hello: &[u8] = &[12, 0, 0, 0, 16, 1, 26, 8, 10, 0, 16, 1];
            [hello, b"GET / HTTP/1.1\r\n\r\n"].map(|bytes| {
                let mut tcp = std::net::TcpStream::connect(&w.data_addr).expect("data port");
                tcp.write_all(bytes).expect("write");
                tcp.set_read_timeout(Some(WAIT)).expect("timeout");
                tcp
            })
        })
        .collect();
    let coord = coordinator(&model, &workers, Some(&coordinator_files));
    assert_eq!(greedy(&coord.addr), plain_text, "mTLS changed the text");
    for mut tcp in strangers {
        // Dropped by the worker: at most a TLS alert record (content type 21), then the end of
        // the stream (or a reset); never a hello or a frame.
        let mut got = Vec::new();
        match std::io::Read::read_to_end(&mut tcp, &mut got) {
            Ok(_) => {}
            Err(e) => assert_ne!(
                e.kind(),
                std::io::ErrorKind::WouldBlock,
                "still open after {WAIT:?}"
            ),
        }
        assert!(
            got.is_empty() || got[0] == 21,
            "the data plane answered a stranger: {got:?}"
        );
    }

    let rt = runtime();
    let ca_pem = std::fs::read(&coordinator_files.ca).expect("ca pem");
    let ours = TlsIdentity::from_options(
        Some(&coordinator_files.cert),
        Some(&coordinator_files.key),
        Some(&coordinator_files.ca),
    )
    .expect("identity")
    .expect("configured");
    for w in &workers {
        // The check itself: a client with the cluster's certificate is heard.
        let heard = rt.block_on(stranger_call(&w.addr, Some(ours.grpc_client("127.0.0.1"))));
        assert_eq!(
            heard,
            Ok(()),
            "the cluster's own certificate was refused by {}",
            w.addr
        );
        // Plain HTTP/2 to a TLS port.
        let plain = rt.block_on(stranger_call(&w.addr, None));
        assert!(
            plain.is_err(),
            "a plain-text stranger was heard by {}",
            w.addr
        );
        // TLS trusting the cluster's CA, but without a client certificate.
        let anonymous = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca_pem))
            .domain_name("127.0.0.1");
        let anonymous = rt.block_on(stranger_call(&w.addr, Some(anonymous)));
        assert!(
            anonymous.is_err(),
            "a stranger without a certificate was heard by {}",
            w.addr
        );
        // A certificate from another CA.
        let theirs = TlsIdentity::from_options(
            Some(&intruder.cert),
            Some(&intruder.key),
            Some(&coordinator_files.ca),
        )
        .expect("identity")
        .expect("configured");
        let other = rt.block_on(stranger_call(
            &w.addr,
            Some(theirs.grpc_client("127.0.0.1")),
        ));
        assert!(
            other.is_err(),
            "another CA's certificate was heard by {}",
            w.addr
        );
    }
    // The cluster never noticed.
    assert_eq!(greedy(&coord.addr), plain_text);
}

#[test]
fn a_worker_with_another_cas_certificate_is_refused_at_connect() {
    let (_tmp, dir) = tiny_servable_model();
    let model = dir.display().to_string();
    let pki_dir = tempfile::tempdir().expect("tmp");
    let ca = TestCa::new(pki_dir.path(), "cluster").expect("ca");
    let other_ca = TestCa::new(pki_dir.path(), "stranger").expect("ca");
    let names = ["127.0.0.1"];
    let coordinator = ca.issue("coordinator", &names).expect("cert");
    let impostor = other_ca.issue("worker", &names).expect("cert");
    let worker = WorkerProcess::start_with("127.0.0.1:0", 1, &impostor.flags()).expect("worker");
    let mut args: Vec<String> = [
        "--model",
        &model,
        "--workers",
        &worker.addr,
        "--connect-timeout-ms",
        "3000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(coordinator.flags());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let Err(e) = CoordinatorProcess::start(&args) else {
        panic!("a coordinator accepted a worker whose certificate its CA never signed");
    };
    let log = format!("{e:#}");
    assert!(
        log.contains(&worker.addr) && log.contains("cannot reach"),
        "{log}"
    );
}
