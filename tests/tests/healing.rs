//! Detection and healing against real processes (issue 10, items 1 and 2): a worker SIGKILLed or
//! SIGSTOPped mid-generation fails every request in flight within 5 s with an error naming the
//! lost shard, /ready says which, new requests get 503 + Retry-After at once, and the cluster
//! heals when the worker is back (restarted at its address, woken up, or respawned by the
//! coordinator) without restarting the others, giving the same greedy text; a restarted
//! coordinator takes the running workers over once the old lease expires (at once after a
//! SIGTERM, which releases them); a worker of another version is refused naming both versions.

use std::io::Read;
use std::net::TcpStream;
use std::pin::Pin;
use std::time::{Duration, Instant};

use gemma_cluster_tests::http::{self, open_stream, post_json, request, HttpResponse};
use gemma_cluster_tests::process::{alive, binary, CoordinatorProcess, Spawned};
use gemma_cluster_tests::tiny_servable_model;
use gemma_proto::pb;
use serde_json::{json, Value};

/// Every wait in these tests ends by this deadline.
const WAIT: Duration = Duration::from_secs(30);
/// What the issue allows between a worker's loss and the end of every request in flight.
const FAIL_FAST: Duration = Duration::from_secs(5);

/// A started `gemma-worker` and its announced gRPC address.
struct Worker {
    process: Spawned,
    addr: String,
}

impl Worker {
    /// `listen`: "127.0.0.1:0" for any port, or the address of a worker it replaces.
    fn start(listen: &str) -> Self {
        let args = ["--listen", listen, "--threads", "1"].map(String::from);
        let process = Spawned::start(&binary("gemma-worker"), &args).unwrap();
        let line = process
            .next_line(WAIT)
            .expect("the worker announces itself");
        let addr = line
            .strip_prefix("gemma-worker listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected announcement {line:?}"))
            .to_string();
        Self { process, addr }
    }

    fn pid(&self) -> u32 {
        self.process.id().unwrap()
    }

    fn signal(&self, signal: i32) {
        // SAFETY: signalling a child process of this test by its pid.
        unsafe {
            libc::kill(self.pid() as i32, signal);
        }
    }
}

/// A tp=2 coordinator (unless `extra` gives another plan).
fn start_coordinator(model: &str, extra: &[&str]) -> CoordinatorProcess {
    let mut args = vec!["--model", model, "--kv-budget-mib", "32"];
    if !extra.contains(&"--pp") && !extra.contains(&"--tp") {
        args.extend(["--tp", "2"]);
    }
    args.extend_from_slice(extra);
    CoordinatorProcess::start(&args).expect("coordinator")
}

fn greedy(addr: &str) -> String {
    let r = post_json(
        addr,
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}),
    )
    .unwrap();
    let v = r.json().unwrap();
    assert_eq!(r.status, 200, "{v}");
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

/// Greedy text of a prompt of several KV blocks, and how many of its tokens the prefix cache
/// served.
fn long_greedy(addr: &str) -> (String, u64) {
    let prompt = "The capital of France is Paris. ".repeat(8);
    let r = post_json(
        addr,
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 8, "temperature": 0}),
    )
    .unwrap();
    let v = r.json().unwrap();
    assert_eq!(r.status, 200, "{v}");
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    (
        v["choices"][0]["text"].as_str().unwrap().to_string(),
        cached,
    )
}

/// A request that generates until it is stopped (or fails).
fn endless(stream: bool) -> Value {
    json!({"prompt": "Count:", "max_tokens": 3000, "temperature": 0, "ignore_eos": true,
           "stream": stream})
}

fn get(addr: &str, path: &str) -> HttpResponse {
    request(addr, "GET", path, None, Duration::from_secs(10)).unwrap()
}

/// Polls `path` until it answers `status`, at most `WAIT`; returns the answer and the time.
fn until_status(addr: &str, path: &str, status: u16) -> (HttpResponse, Duration) {
    let started = Instant::now();
    loop {
        let r = get(addr, path);
        if r.status == status {
            return (r, started.elapsed());
        }
        assert!(
            started.elapsed() < WAIT,
            "{path} answered {} for {WAIT:?}, not {status}: {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The in-flight requests a fault must end: one stream (already sending tokens) and one plain
/// request (already running), both endless.
struct InFlight {
    stream: TcpStream,
    plain: std::thread::JoinHandle<(HttpResponse, Instant)>,
}

fn start_in_flight(addr: &str) -> InFlight {
    let stream = open_stream(addr, "/v1/completions", &endless(true), 3, WAIT).unwrap();
    let a = addr.to_string();
    let plain = std::thread::spawn(move || {
        let r = request(&a, "POST", "/v1/completions", Some(&endless(false)), WAIT).unwrap();
        (r, Instant::now())
    });
    http::wait_for_metrics(addr, WAIT, |m| m["gemma_cluster_running_sequences"] == 2.0)
        .expect("both requests run");
    InFlight { stream, plain }
}

impl InFlight {
    /// Both requests end within `FAIL_FAST` of `fault` with errors naming `shard`; prints the
    /// times.
    fn fail_naming(mut self, fault: Instant, shard: &str) {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("data: [DONE]") {
            let n = self
                .stream
                .read(&mut buf)
                .expect("the stream ends, not hangs");
            assert!(
                n > 0,
                "closed without [DONE]: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
        let streamed = fault.elapsed();
        let text = String::from_utf8_lossy(&seen).to_string();
        let error = http::sse_data(text.as_bytes())
            .into_iter()
            .find(|d| d.contains("\"error\""))
            .unwrap_or_else(|| panic!("no error chunk before [DONE]: {text}"));
        assert!(error.contains(shard), "{error}");
        let (r, ended) = self.plain.join().unwrap();
        let plain = ended - fault;
        let v = r.json().unwrap();
        assert_eq!(r.status, 503, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(shard),
            "{v}"
        );
        println!("after the fault: stream ended in {streamed:?}, plain request in {plain:?}");
        assert!(streamed < FAIL_FAST && plain < FAIL_FAST);
    }
}

/// After a loss: KV blocks back, /ready 503 naming the shard, new requests refused at once
/// with Retry-After, /health still ok.
fn check_down(addr: &str, shard: &str) {
    http::wait_for_metrics(addr, WAIT, |m| m["gemma_cluster_kv_blocks_used"] == 0.0)
        .expect("the failed requests' blocks return");
    let (r, _) = until_status(addr, "/ready", 503);
    let v = r.json().unwrap();
    assert!(v["reason"].as_str().unwrap().contains(shard), "{v}");
    let asked = Instant::now();
    let r = post_json(
        addr,
        "/v1/completions",
        &json!({"prompt": "Hi", "max_tokens": 2}),
    )
    .unwrap();
    let refused = asked.elapsed();
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.header("retry-after").is_some());
    assert!(
        refused < Duration::from_secs(1),
        "refused after {refused:?}"
    );
    assert_eq!(
        get(addr, "/health").status,
        200,
        "down and healing is not wedged"
    );
}

/// Two workers in `plan`; the second is SIGKILLed mid-generation, then restarted at its address.
fn kill_and_restart(plan: &[&str], lost: &str) {
    let (_tmp, dir) = tiny_servable_model();
    let (w0, w1) = (Worker::start("127.0.0.1:0"), Worker::start("127.0.0.1:0"));
    let workers = format!("{},{}", w0.addr, w1.addr);
    let mut args = vec!["--workers", workers.as_str()];
    args.extend_from_slice(plan);
    let c = start_coordinator(dir.to_str().unwrap(), &args);
    let before = greedy(&c.addr);
    let (long_before, _) = long_greedy(&c.addr);
    let (long_again, cached) = long_greedy(&c.addr);
    assert_eq!(long_again, long_before);
    assert!(cached > 0, "the repeated prompt's blocks are cached");

    let in_flight = start_in_flight(&c.addr);
    w1.signal(libc::SIGKILL);
    let killed = Instant::now();
    in_flight.fail_naming(killed, lost);
    check_down(&c.addr, lost);
    let w0_pid = w0.pid();
    let w1_addr = w1.addr.clone();
    drop(w1);

    // A StatefulSet pod comes back: a new process at the same address (a new data port).
    let restarted = Instant::now();
    let w1 = Worker::start(&w1_addr);
    until_status(&c.addr, "/ready", 200);
    println!("restart -> /ready 200 in {:?}", restarted.elapsed());
    assert_eq!(
        greedy(&c.addr),
        before,
        "the same greedy text after healing"
    );
    // The re-assigned workers hold no KV: nothing may be reused from before the loss.
    let (long_after, cached) = long_greedy(&c.addr);
    assert_eq!(cached, 0, "healing dropped the prefix cache");
    assert_eq!(
        long_after, long_before,
        "the same long greedy text after healing"
    );
    assert!(
        alive(w0_pid) && w0.pid() == w0_pid,
        "the surviving worker was not restarted"
    );
    assert!(alive(w1.pid()));
}

#[test]
fn a_killed_worker_fails_requests_fast_and_a_restarted_one_heals_the_cluster() {
    kill_and_restart(&["--tp", "2"], "stage 0, rank 1");
}

#[test]
fn a_killed_pipeline_stage_heals_the_same_way() {
    kill_and_restart(&["--pp", "2"], "stage 1, rank 0");
}

#[test]
fn a_hung_worker_is_found_by_the_deadline_and_its_wakeup_heals_the_cluster() {
    let (_tmp, dir) = tiny_servable_model();
    let (w0, w1) = (Worker::start("127.0.0.1:0"), Worker::start("127.0.0.1:0"));
    let workers = format!("{},{}", w0.addr, w1.addr);
    let c = start_coordinator(
        dir.to_str().unwrap(),
        &["--workers", &workers, "--collective-timeout-ms", "2000"],
    );
    let before = greedy(&c.addr);
    let pids = (w0.pid(), w1.pid());

    let in_flight = start_in_flight(&c.addr);
    w1.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    in_flight.fail_naming(stopped, "stage 0, rank 1");
    check_down(&c.addr, "stage 0, rank 1");

    // Woken up, its answers to the old steps are stale: the coordinator re-assigns the group
    // under a new epoch and drops whatever arrives for the old one.
    w1.signal(libc::SIGCONT);
    let woken = Instant::now();
    until_status(&c.addr, "/ready", 200);
    println!("SIGCONT -> /ready 200 in {:?}", woken.elapsed());
    assert_eq!(
        greedy(&c.addr),
        before,
        "the same greedy text after healing"
    );
    assert_eq!((w0.pid(), w1.pid()), pids);
    assert!(alive(pids.0) && alive(pids.1), "no worker was restarted");
}

#[test]
fn a_local_worker_that_dies_is_respawned() {
    let (_tmp, dir) = tiny_servable_model();
    let c = start_coordinator(dir.to_str().unwrap(), &[]);
    let before = greedy(&c.addr);
    let pids = c.worker_pids();
    assert_eq!(pids.len(), 2);
    // SAFETY: signalling a worker process of our coordinator by its logged pid.
    unsafe {
        libc::kill(pids[1] as i32, libc::SIGKILL);
    }
    let killed = Instant::now();
    assert!(
        c.process
            .wait_for_stderr_line(|l| l.contains("respawned local worker"), WAIT),
        "{}",
        c.process.stderr_text()
    );
    until_status(&c.addr, "/ready", 200);
    println!("kill -> respawned and /ready 200 in {:?}", killed.elapsed());
    assert_eq!(greedy(&c.addr), before);
    assert!(alive(pids[0]), "the other local worker was not restarted");
}

#[test]
fn a_restarted_coordinator_takes_the_workers_over_after_the_lease() {
    let (_tmp, dir) = tiny_servable_model();
    let model = dir.to_str().unwrap();
    let (w0, w1) = (Worker::start("127.0.0.1:0"), Worker::start("127.0.0.1:0"));
    let pids = (w0.pid(), w1.pid());
    let workers = format!("{},{}", w0.addr, w1.addr);
    // A lease longer than a coordinator takes to start (it loads the tokenizer first).
    let first = start_coordinator(model, &["--workers", &workers, "--lease-ms", "10000"]);
    let before = greedy(&first.addr);
    // SAFETY: our own child process.
    unsafe {
        libc::kill(first.process.id().unwrap() as i32, libc::SIGKILL);
    }
    let killed = Instant::now();
    // The successor's Assign is refused while the old lease is alive; it retries until it runs
    // out, then takes over the running workers.
    let second = start_coordinator(model, &["--workers", &workers, "--lease-ms", "60000"]);
    let took_over = killed.elapsed();
    println!("coordinator SIGKILL -> successor serving in {took_over:?} (lease 10 s)");
    assert!(
        second
            .process
            .stderr_text()
            .contains("held by another coordinator"),
        "{}",
        second.process.stderr_text()
    );
    assert_eq!(greedy(&second.addr), before);

    // SIGTERM: the coordinator releases its workers, so the next one need not wait for its
    // 60 s lease.
    drop(second);
    let stopped = Instant::now();
    let third = start_coordinator(model, &["--workers", &workers]);
    let took_over = stopped.elapsed();
    println!("coordinator SIGTERM -> successor serving in {took_over:?} (lease 60 s)");
    assert!(took_over < Duration::from_secs(20));
    assert!(
        !third
            .process
            .stderr_text()
            .contains("held by another coordinator"),
        "released workers are free at once: {}",
        third.process.stderr_text()
    );
    assert_eq!(greedy(&third.addr), before);
    assert_eq!((w0.pid(), w1.pid()), pids);
    assert!(alive(pids.0) && alive(pids.1), "no worker was restarted");
}

/// A worker that answers Info with another version, and nothing else.
struct OtherVersion;

const OTHER_VERSION: &str = "0.0.0-other";

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl pb::worker_server::Worker for OtherVersion {
    async fn info(
        &self,
        _: tonic::Request<pb::InfoRequest>,
    ) -> Result<tonic::Response<pb::InfoResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::InfoResponse {
            data_addr: "127.0.0.1:1".into(),
            state: pb::WorkerState::Idle.into(),
            version: OTHER_VERSION.into(),
            ..Default::default()
        }))
    }

    type AssignStream = Stream<pb::LoadEvent>;

    async fn assign(
        &self,
        _: tonic::Request<pb::AssignRequest>,
    ) -> Result<tonic::Response<Self::AssignStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("a fake"))
    }

    type StepsStream = Stream<pb::StepResponse>;

    async fn steps(
        &self,
        _: tonic::Request<tonic::Streaming<pb::StepRequest>>,
    ) -> Result<tonic::Response<Self::StepsStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("a fake"))
    }

    async fn release(
        &self,
        _: tonic::Request<pb::ReleaseRequest>,
    ) -> Result<tonic::Response<pb::ReleaseResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("a fake"))
    }
}

/// Serves `OtherVersion` at `addr` on `rt` until the returned sender is dropped or used.
fn serve_other_version(
    rt: &tokio::runtime::Runtime,
    addr: &str,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(addr))
        .expect("bind");
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(pb::worker_server::WorkerServer::new(OtherVersion))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );
    (addr, stop)
}

#[test]
fn a_worker_of_another_version_is_refused_at_connect_and_at_redial() {
    let (_tmp, dir) = tiny_servable_model();
    let model = dir.to_str().unwrap();
    let ours = env!("CARGO_PKG_VERSION");
    let rt = tokio::runtime::Runtime::new().unwrap();

    // At connect: the coordinator refuses to start, naming both versions.
    let (fake, stop) = serve_other_version(&rt, "127.0.0.1:0");
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--model",
        model,
        "--workers",
        &fake,
    ]
    .map(String::from);
    let mut p = Spawned::start(&binary("gemma-coordinator"), &args).unwrap();
    let status = p.wait(WAIT).expect("the coordinator exits");
    assert!(!status.success());
    let log = p.stderr_text();
    assert!(
        log.contains(&format!(
            "runs gemma-worker {OTHER_VERSION}, but this coordinator is {ours}"
        )),
        "{log}"
    );
    let _ = stop.send(());

    // At re-dial: a lost worker's address now answers with another version; the cluster stays
    // down saying so, and heals once the right worker is back there.
    let (w0, w1) = (Worker::start("127.0.0.1:0"), Worker::start("127.0.0.1:0"));
    let workers = format!("{},{}", w0.addr, w1.addr);
    let c = start_coordinator(model, &["--workers", &workers]);
    let before = greedy(&c.addr);
    let w1_addr = w1.addr.clone();
    w1.signal(libc::SIGKILL);
    drop(w1);
    let (_, stop) = serve_other_version(&rt, &w1_addr);
    let deadline = Instant::now() + WAIT;
    loop {
        let r = get(&c.addr, "/ready");
        let reason = r.json().unwrap()["reason"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if r.status == 503 && reason.contains(OTHER_VERSION) {
            assert!(reason.contains(ours), "{reason}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/ready never named the versions: {reason}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = stop.send(());
    rt.shutdown_timeout(Duration::from_secs(5));
    let _w1 = Worker::start(&w1_addr);
    until_status(&c.addr, "/ready", 200);
    assert_eq!(greedy(&c.addr), before);
}
