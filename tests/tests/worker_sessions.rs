//! The worker side of sessions, re-assignment and leases, against real `gemma-worker` processes
//! driven by a raw gRPC client: who may assign, step and release a worker; a re-assignment to the
//! same shard keeping the weights (same logits, bit for bit); the lease watchdog; strangers on the
//! data plane; no thread or descriptor leak across re-assignments.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use gemma_cluster_tests::process::{binary, Spawned};
use gemma_proto::pb::worker_client::WorkerClient;
use gemma_proto::{pb, ClusterId, PlanRequest, SeqStep, Session, ShardPlan, StepBatch};
use gemma_testkit::{LocalCluster, TinyGemma};
use gemma_worker::{ModelFolder, ShardOptions};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;

/// Every wait in these tests ends by this deadline.
const WAIT: Duration = Duration::from_secs(60);
const BLOCK_SIZE: u32 = 16;
const PROMPT: [u32; 5] = [2, 651, 6037, 576, 6081];

struct Model {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    folder: ModelFolder,
}

fn tiny_model() -> Model {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    TinyGemma::mqa_like_2b().write(&dir).unwrap();
    let folder = ModelFolder::open(&dir).unwrap();
    Model {
        _tmp: tmp,
        dir,
        folder,
    }
}

/// A started `gemma-worker` and its announced addresses.
struct Worker {
    process: Spawned,
    grpc: String,
    data: String,
}

impl Worker {
    fn start() -> Self {
        let args = ["--threads".to_string(), "1".to_string()];
        let process = Spawned::start(&binary("gemma-worker"), &args).unwrap();
        let line = process
            .next_line(WAIT)
            .expect("the worker announces itself");
        let rest = line
            .strip_prefix("gemma-worker listening on ")
            .unwrap_or_else(|| panic!("unexpected announcement {line:?}"));
        let (grpc, data) = rest.split_once(" data ").expect("both addresses");
        Self {
            grpc: grpc.to_string(),
            data: data.to_string(),
            process,
        }
    }

    fn pid(&self) -> u32 {
        self.process.id().unwrap()
    }

    async fn client(&self) -> WorkerClient<Channel> {
        WorkerClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
            .max_decoding_message_size(usize::MAX)
    }

    fn log_has(&self, text: &str) -> bool {
        self.process
            .wait_for_stderr_line(|l| l.contains(text), Duration::from_secs(10))
    }
}

fn session(id: u8, epoch: u64) -> Session {
    Session {
        cluster_id: ClusterId::from_bytes([id; 16]),
        epoch,
    }
}

/// The assignment of shard `index` of a tp x 1 plan to the workers at `data_addrs`.
fn assign_request(
    model: &Model,
    tp: usize,
    index: usize,
    data_addrs: &[String],
    session: Session,
    lease_ms: u64,
) -> pb::AssignRequest {
    let plan = ShardPlan::new(&model.folder.config, &PlanRequest::new(tp, 1)).unwrap();
    pb::AssignRequest {
        model_path: model.dir.display().to_string(),
        tp: tp as u32,
        pp: 1,
        layers_per_stage: vec![],
        shard: Some((&plan.shards[index]).into()),
        data_addrs: data_addrs.to_vec(),
        dtype: pb::DType::DtypeF32 as i32,
        kv_budget_bytes: 4 << 20,
        block_size: BLOCK_SIZE,
        collective_timeout_ms: 10_000,
        dequantize: false,
        session: Some(session.into()),
        lease_ms,
        ..Default::default()
    }
}

/// Assigns and waits for Ready: the Ready event and how long it took, or the refusal.
async fn assign(
    client: &mut WorkerClient<Channel>,
    req: pb::AssignRequest,
) -> Result<(pb::Ready, Duration), tonic::Status> {
    let t = Instant::now();
    let mut events = client.assign(req).await?.into_inner();
    loop {
        let event = tokio::time::timeout(WAIT, events.message())
            .await
            .expect("a load event in time")?
            .expect("the stream ends with Ready");
        if let Some(pb::load_event::Event::Ready(r)) = event.event {
            return Ok((r, t.elapsed()));
        }
    }
}

/// Assigns every worker its shard of a tp = workers.len() plan, all at once (they mesh), over
/// the given clients (one connection per worker for the whole test).
async fn assign_group(
    workers: &[Worker],
    clients: &[WorkerClient<Channel>],
    model: &Model,
    s: Session,
) -> Vec<(pb::Ready, Duration)> {
    assign_group_with(workers, clients, model, s, 10_000).await
}

async fn assign_group_with(
    workers: &[Worker],
    clients: &[WorkerClient<Channel>],
    model: &Model,
    s: Session,
    collective_timeout_ms: u64,
) -> Vec<(pb::Ready, Duration)> {
    let addrs: Vec<String> = workers.iter().map(|w| w.data.clone()).collect();
    let mut tasks = Vec::new();
    for (i, client) in clients.iter().enumerate() {
        let mut client = client.clone();
        let mut req = assign_request(model, workers.len(), i, &addrs, s, 30_000);
        req.collective_timeout_ms = collective_timeout_ms;
        tasks.push(tokio::spawn(async move { assign(&mut client, req).await }));
    }
    let mut ready = Vec::new();
    for t in tasks {
        ready.push(t.await.unwrap().expect("assigned"));
    }
    ready
}

/// One worker's Steps stream.
struct Steps {
    tx: mpsc::Sender<pb::StepRequest>,
    rx: tonic::Streaming<pb::StepResponse>,
}

impl Steps {
    async fn open(client: &mut WorkerClient<Channel>) -> Self {
        let (tx, requests) = mpsc::channel(4);
        let rx = client
            .steps(ReceiverStream::new(requests))
            .await
            .unwrap()
            .into_inner();
        Self { tx, rx }
    }

    async fn send(&mut self, req: pb::StepRequest) {
        self.tx.send(req).await.unwrap();
    }

    async fn answer(&mut self) -> pb::StepResponse {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("an answer in time")
            .unwrap()
            .expect("an answer")
    }
}

/// A one-sequence step in block 0: `tokens` from `start_pos`, every logit asked for.
fn batch(tokens: &[u32], start_pos: usize) -> StepBatch {
    StepBatch {
        seqs: vec![SeqStep {
            seq_id: 7,
            tokens: tokens.to_vec(),
            start_pos,
            block_table: vec![0],
            top_candidates: 0,
            log_probs: false,
            sampling: None,
        }],
    }
}

/// Sends the same step to every rank and joins their vocabulary slices in rank order.
async fn step(streams: &mut [Steps], b: &StepBatch, step_id: u64, s: Session) -> Vec<f32> {
    for st in streams.iter_mut() {
        st.send(b.to_wire(step_id, s)).await;
    }
    let mut logits = Vec::new();
    for st in streams.iter_mut() {
        let answer = st.answer().await;
        assert_eq!((answer.step_id, answer.epoch), (step_id, s.epoch));
        match answer.result {
            Some(pb::step_response::Result::Output(out)) => logits.extend(
                out.seqs[0]
                    .full
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            other => panic!("step {step_id} failed: {other:?}"),
        }
    }
    logits
}

/// The error text of a refused step.
fn step_error(answer: &pb::StepResponse) -> &str {
    match &answer.result {
        Some(pb::step_response::Result::Error(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The in-process tp=2 plan's logits for the given steps, run in order on one sequence.
fn reference(model: &Model, steps: &[StepBatch]) -> Vec<f32> {
    let local = LocalCluster::load(
        &model.folder,
        &PlanRequest::new(2, 1),
        &ShardOptions::default(),
    )
    .unwrap();
    let mut last = Vec::new();
    for b in steps {
        last = local.step(b).unwrap().to_vec2::<f32>().unwrap().remove(0);
    }
    last
}

async fn info(w: &Worker, asking: Option<Session>) -> pb::InfoResponse {
    let req = pb::InfoRequest {
        session: asking.map(Into::into),
    };
    w.client().await.info(req).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_epoch_reassigns_keeping_the_weights_and_old_sessions_are_refused() {
    let model = tiny_model();
    let workers = [Worker::start(), Worker::start()];
    let mut clients = [workers[0].client().await, workers[1].client().await];
    let a1 = session(1, 1);
    let ready = assign_group(&workers, &clients, &model, a1).await;
    assert!(ready.iter().all(|(r, _)| !r.weights_kept));
    let mut old_streams = [
        Steps::open(&mut clients[0]).await,
        Steps::open(&mut clients[1]).await,
    ];
    let prefill = batch(&PROMPT, 0);
    let want = reference(&model, std::slice::from_ref(&prefill));
    let first = step(&mut old_streams, &prefill, 0, a1).await;
    assert!(first == want, "epoch 1 differs from the in-process plan");

    // Epoch 2 of the same cluster: the very same shards, so the weights stay.
    let a2 = a1.next_epoch();
    let ready = assign_group(&workers, &clients, &model, a2).await;
    for (i, (r, took)) in ready.iter().enumerate() {
        assert!(r.weights_kept, "worker {i} reloaded its weights");
        eprintln!("re-assignment keeping the weights: worker {i} Ready in {took:?}");
    }
    for w in &workers {
        let i = info(w, None).await;
        assert_eq!(i.state, pb::WorkerState::Ready as i32);
        assert_eq!(i.holder, Some(a2.into()));
        assert!(w.log_has("weights_kept=true"));
    }
    let mut streams = [
        Steps::open(&mut clients[0]).await,
        Steps::open(&mut clients[1]).await,
    ];
    let again = step(&mut streams, &prefill, 0, a2).await;
    assert!(again == first, "the kept weights give other logits");

    // A stream opened under epoch 1 cannot feed epoch 2's compute thread, whatever it carries.
    old_streams[0].send(prefill.to_wire(1, a2)).await;
    let e = old_streams[0].answer().await;
    assert!(step_error(&e).contains("has ended"), "{e:?}");
    // A step of the old epoch, or of another cluster, never reaches the shard: block 0 holds
    // the prompt's keys, and a decode step after the refused ones reads them.
    let intruder = batch(&[9, 9, 9, 9, 9], 0);
    for (s, what) in [
        (a1, "epoch 1 is refused"),
        (session(2, 2), "another cluster"),
    ] {
        for st in streams.iter_mut() {
            st.send(intruder.to_wire(1, s)).await;
        }
        for st in streams.iter_mut() {
            let e = st.answer().await;
            assert_eq!(e.epoch, s.epoch);
            let text = step_error(&e);
            assert!(
                text.contains(&format!("this worker holds {a2}")),
                "{what}: {text}"
            );
        }
    }
    let decode = batch(&[1234], PROMPT.len());
    let got = step(&mut streams, &decode, 2, a2).await;
    assert!(
        got == reference(&model, &[prefill.clone(), decode.clone()]),
        "the decode step after the refused ones differs"
    );

    // A stale epoch's Assign is refused, naming the holder and why.
    let addrs = [workers[0].data.clone(), workers[1].data.clone()];
    let stale = assign(
        &mut clients[0],
        assign_request(&model, 2, 0, &addrs, a1, 30_000),
    )
    .await
    .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    assert_eq!(
        stale.message(),
        format!(
            "this worker holds epoch 2 of cluster {}; epoch 1 is older",
            a1.cluster_id
        )
    );

    // A different shard (the whole model at tp=1) loads afresh.
    let a3 = a2.next_epoch();
    let solo = assign_request(&model, 1, 0, &addrs[..1], a3, 30_000);
    let (r, took) = assign(&mut clients[0], solo).await.unwrap();
    assert!(!r.weights_kept);
    eprintln!("re-assignment to another shard (fresh load): Ready in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_waits_for_the_lease_and_only_the_holder_releases() {
    let model = tiny_model();
    let w = Worker::start();
    let mut client = w.client().await;
    let addrs = [w.data.clone()];
    let (holder, stranger) = (session(1, 1), session(2, 1));
    const LEASE_MS: u64 = 700;
    assign(
        &mut client,
        assign_request(&model, 1, 0, &addrs, holder, LEASE_MS),
    )
    .await
    .unwrap();

    let refused = assign(
        &mut client,
        assign_request(&model, 1, 0, &addrs, stranger, 30_000),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let prefix = format!("this worker is held by {holder}; its lease expires in ");
    assert!(
        refused.message().starts_with(&prefix),
        "{}",
        refused.message()
    );
    let release = client
        .release(pb::ReleaseRequest {
            session: Some(stranger.into()),
        })
        .await
        .unwrap_err();
    assert_eq!(release.code(), Code::FailedPrecondition);
    assert_eq!(
        release.message(),
        format!(
            "this worker is held by {holder}, not by {stranger}; only its holder may release it"
        )
    );

    // The holder's Info renews the lease: held through three leases' time.
    let held_until = Instant::now() + Duration::from_millis(3 * LEASE_MS);
    let mut pace = tokio::time::interval(Duration::from_millis(LEASE_MS / 4));
    while Instant::now() < held_until {
        pace.tick().await;
        let i = info(&w, Some(holder.next_epoch())).await;
        assert_eq!(
            i.state,
            pb::WorkerState::Ready as i32,
            "released while renewed"
        );
        assert_eq!(i.holder, Some(holder.into()));
        assert!(i.lease_left_ms <= LEASE_MS);
    }

    // Silent holder (a stranger's Info renews nothing): the watchdog releases the shard.
    let deadline = Instant::now() + WAIT;
    loop {
        let i = info(&w, Some(stranger)).await;
        if i.state == pb::WorkerState::Idle as i32 {
            assert_eq!((i.holder, i.lease_left_ms, i.shard), (None, 0, None));
            break;
        }
        assert!(Instant::now() < deadline, "never released: {i:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(w.log_has("lease expired"));

    // Now the stranger may assign it; the released worker kept its weights warm.
    let (r, _) = assign(
        &mut client,
        assign_request(&model, 1, 0, &addrs, stranger, 30_000),
    )
    .await
    .unwrap();
    assert!(r.weights_kept);
    let old = client
        .release(pb::ReleaseRequest {
            session: Some(holder.into()),
        })
        .await
        .unwrap_err();
    assert!(old.message().contains(&format!("held by {stranger}")));
    client
        .release(pb::ReleaseRequest {
            session: Some(stranger.next_epoch().into()),
        })
        .await
        .unwrap();
    let i = info(&w, None).await;
    assert_eq!(i.state, pb::WorkerState::Idle as i32);
    assert_eq!(i.holder, None);
    // Released: no step reaches it.
    let status = client
        .steps(tokio_stream::empty::<pb::StepRequest>())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reassignment_frees_a_step_blocked_in_a_collective() {
    let model = tiny_model();
    let workers = [Worker::start(), Worker::start()];
    let clients = [workers[0].client().await, workers[1].client().await];
    // Collectives wait longer than this test waits for anything: only the abort can end one.
    const PATIENT_MS: u64 = 120_000;
    let a1 = session(4, 1);
    assign_group_with(&workers, &clients, &model, a1, PATIENT_MS).await;
    // Rank 0 alone gets the step: it waits in its first all-reduce for rank 1.
    let prefill = batch(&PROMPT, 0);
    let mut rank0 = Steps::open(&mut clients[0].clone()).await;
    rank0.send(prefill.to_wire(0, a1)).await;
    let deadline = Instant::now() + WAIT;
    while !waiting_on_sockets(workers[0].pid(), "compute-1") {
        assert!(
            Instant::now() < deadline,
            "rank 0 never waited for its peer"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Rank 0 alone is re-assigned (the whole model at tp=1): rank 1 keeps its links open, so
    // only the abort of rank 0's plane can end the wait.
    let a2 = a1.next_epoch();
    let solo = assign_request(&model, 1, 0, &[workers[0].data.clone()], a2, 30_000);
    assign(&mut clients[0].clone(), solo).await.unwrap();
    let blocked = rank0.answer().await;
    let text = step_error(&blocked);
    assert!(text.contains(&format!("re-assigned to {a2}")), "{text}");
    let a3 = a2.next_epoch();
    assign_group_with(&workers, &clients, &model, a3, PATIENT_MS).await;
    let mut streams = [
        Steps::open(&mut clients[0].clone()).await,
        Steps::open(&mut clients[1].clone()).await,
    ];
    let got = step(&mut streams, &prefill, 0, a3).await;
    assert!(got == reference(&model, &[prefill]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_still_in_its_previous_assignment_is_dialled_again() {
    let model = tiny_model();
    let workers = [Worker::start(), Worker::start()];
    let clients = [workers[0].client().await, workers[1].client().await];
    let addrs = [workers[0].data.clone(), workers[1].data.clone()];
    let (e1, e2) = (session(5, 1), session(5, 2));
    // Rank 1 (which accepts rank 0) waits for its peer under epoch 1, which never comes.
    let mut c = clients[1].clone();
    let req = assign_request(&model, 2, 1, &addrs, e1, 30_000);
    let stale = tokio::spawn(async move { assign(&mut c, req).await });
    wait_for_state(&workers[1], pb::WorkerState::Loading).await;
    // Rank 0 takes epoch 2 and dials rank 1, whose epoch-1 accept loop drops the hello.
    let mut c = clients[0].clone();
    let req = assign_request(&model, 2, 0, &addrs, e2, 30_000);
    let rank0 = tokio::spawn(async move { assign(&mut c, req).await });
    assert!(workers[1].log_has(&format!("the hello presents {e2}")));
    // Rank 1 takes epoch 2 too: rank 0 dials again and the group meshes.
    let req = assign_request(&model, 2, 1, &addrs, e2, 30_000);
    assign(&mut clients[1].clone(), req).await.unwrap();
    rank0.await.unwrap().unwrap();
    let ended = stale.await.unwrap().unwrap_err();
    assert!(
        ended.message().contains(&format!("re-assigned to {e2}")),
        "{ended:?}"
    );
    let mut streams = [
        Steps::open(&mut clients[0].clone()).await,
        Steps::open(&mut clients[1].clone()).await,
    ];
    let prefill = batch(&PROMPT, 0);
    let got = step(&mut streams, &prefill, 0, e2).await;
    assert!(got == reference(&model, &[prefill]));
}

/// Whether the thread `name` of process `pid` is blocked in epoll (its data plane's runtime
/// waiting for a peer), rather than on a channel (futex) or computing.
fn waiting_on_sockets(pid: u32, name: &str) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let epoll = [
        libc::SYS_epoll_pwait,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_epoll_wait,
    ];
    tasks.flatten().any(|task| {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let syscall = std::fs::read_to_string(task.path().join("syscall")).unwrap_or_default();
        let number = syscall
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok());
        comm.trim() == name && number.is_some_and(|n: libc::c_long| epoll.contains(&n))
    })
}

async fn wait_for_state(w: &Worker, state: pb::WorkerState) {
    let deadline = Instant::now() + WAIT;
    while info(w, None).await.state != state as i32 {
        assert!(Instant::now() < deadline, "never {state:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connections a stranger opens to a data-plane address: silent ones, garbage, a huge length
/// prefix, hellos with a wrong session.
async fn strangers(addr: &str, wrong: &[Session]) -> Vec<tokio::net::TcpStream> {
    let mut conns = Vec::new();
    for _ in 0..20 {
        conns.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let hello = |s: Session| {
        use prost::Message;
        let msg = pb::PeerHello {
            shard_index: 0,
            session: Some(s.into()),
        };
        let mut buf = (msg.encoded_len() as u32).to_le_bytes().to_vec();
        msg.encode(&mut buf).unwrap();
        buf
    };
    let mut payloads = vec![
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        u32::MAX.to_le_bytes().to_vec(),
        ((1u32 << 30) - 1).to_le_bytes().to_vec(),
    ];
    payloads.extend(wrong.iter().map(|&s| hello(s)));
    for p in payloads {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(&p).await.unwrap();
        conns.push(c);
    }
    conns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_on_the_data_plane_do_not_stop_the_group_from_meshing() {
    let model = tiny_model();
    let workers = [Worker::start(), Worker::start()];
    let s = session(1, 2);
    // Rank 1 accepts rank 0's connection; the strangers are ahead of it in the queue. Twenty
    // silent connections: read one after the other, their hellos would outlast the connect
    // deadline.
    let _held = strangers(&workers[1].data, &[session(9, 2), session(1, 1)]).await;
    let mut clients = [workers[0].client().await, workers[1].client().await];
    assign_group(&workers, &clients, &model, s).await;
    assert!(workers[1].log_has("dropped a data-plane connection"));
    let mut streams = [
        Steps::open(&mut clients[0]).await,
        Steps::open(&mut clients[1]).await,
    ];
    let prefill = batch(&PROMPT, 0);
    let got = step(&mut streams, &prefill, 0, s).await;
    assert!(got == reference(&model, &[prefill]));
    let log = workers[1].process.stderr_text();
    for why in [
        "exceeds the limit of 128",
        &format!("the hello presents {}", session(9, 2)),
        &format!("the hello presents {}", session(1, 1)),
    ] {
        assert!(log.contains(why), "no drop for {why:?}:\n{log}");
    }
}

/// Threads and open descriptors of a process.
fn threads_and_fds(pid: u32) -> (usize, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (threads, fds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_reassignments_leak_no_thread_and_no_descriptor() {
    let model = tiny_model();
    let workers = [Worker::start(), Worker::start()];
    let prefill = batch(&PROMPT, 0);
    let mut clients = [workers[0].client().await, workers[1].client().await];
    let mut s = session(3, 1);
    let mut baseline = None;
    let mut first_logits = None;
    let mut times = Vec::new();
    for round in 0..21 {
        let ready = assign_group(&workers, &clients, &model, s).await;
        assert!(ready.iter().all(|(r, _)| r.weights_kept == (round > 0)));
        times.extend(ready.iter().skip_while(|_| round == 0).map(|(_, t)| *t));
        let mut streams = [
            Steps::open(&mut clients[0]).await,
            Steps::open(&mut clients[1]).await,
        ];
        let logits = step(&mut streams, &prefill, 0, s).await;
        assert!(*first_logits.get_or_insert_with(|| logits.clone()) == logits);
        drop(streams);
        let counts: Vec<(usize, usize)> =
            workers.iter().map(|w| threads_and_fds(w.pid())).collect();
        // Round 1 is the first with a previous assignment to clean up after.
        if round == 1 {
            baseline = Some(counts.clone());
        }
        if let Some(base) = &baseline {
            assert_eq!(&counts, base, "round {round}: (threads, fds) per worker");
        }
        s = s.next_epoch();
    }
    times.sort();
    eprintln!(
        "weights-kept re-assignment, Ready after (client side): median {:?}, max {:?} over {} assigns",
        times[times.len() / 2],
        times[times.len() - 1],
        times.len()
    );
}

/// What a `grpc:` probe asks: the status of `service` ("" is the whole server).
async fn health(w: &Worker, service: &str) -> Result<i32, tonic::Status> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let channel = Channel::from_shared(format!("http://{}", w.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let request = HealthCheckRequest {
        service: service.to_string(),
    };
    tokio::time::timeout(WAIT, client.check(request))
        .await
        .expect("a health answer in time")
        .map(|answer| answer.into_inner().status)
}

/// Kubernetes' native gRPC probes ask the standard health service: the worker answers SERVING
/// for the server and for its Worker service, unassigned (a pod waits for its coordinator) and
/// assigned alike, and NOT_FOUND for a service it does not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_health_service_answers_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let model = tiny_model();
    let w = Worker::start();
    let serving = ServingStatus::Serving as i32;
    assert_eq!(health(&w, "").await.unwrap(), serving);
    assert_eq!(health(&w, "gemma.v1.Worker").await.unwrap(), serving);
    let unknown = health(&w, "gemma.v1.Coordinator").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");

    let mut client = w.client().await;
    let req = assign_request(
        &model,
        1,
        0,
        std::slice::from_ref(&w.data),
        session(1, 1),
        30_000,
    );
    assign(&mut client, req).await.unwrap();
    assert_eq!(health(&w, "gemma.v1.Worker").await.unwrap(), serving);
}
