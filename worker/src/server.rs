//! The worker's gRPC service. Steps run on one compute thread that owns the shard and its data
//! plane; the service only forwards requests to it and streams answers back.

use std::net::TcpListener;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use candle_core::{DType, Device};
use gemma_proto::{
    candidates, pb, PlanRequest, SeqLogits, Session, ShardPlan, ShardSpec, StepBatch,
};
use tokio::sync::{mpsc as tmpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::data_plane::{DataPlane, PlaneCollective};
use crate::error::{AssignError, StepError, WireTensorError};
use crate::folder::ModelFolder;
use crate::kv_cache::KvCache;
use crate::model::{Shard, ShardOptions, StageOutput};
use crate::weights::QuantizedWeights;
use crate::wire::{dtype_from_wire, with_elements};

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// One step for the compute thread, with where its answer goes.
struct Job {
    request: pb::StepRequest,
    reply: oneshot::Sender<pb::StepResponse>,
}

/// What `Info` reports: the worker's state, its shard and how loading went.
#[derive(Default)]
struct WorkerStatus {
    state: pb::WorkerState,
    shard: Option<ShardSpec>,
    bytes_total: u64,
    kv_blocks: u32,
    error: String,
}

pub struct WorkerService {
    data_addr: String,
    /// The data-plane listener, bound at start so peers can dial before this worker is assigned.
    data_listener: Mutex<Option<TcpListener>>,
    status: Arc<Mutex<WorkerStatus>>,
    progress: Arc<Mutex<Arc<AtomicU64>>>,
    jobs: Arc<Mutex<Option<mpsc::Sender<Job>>>>,
}

impl WorkerService {
    pub fn new(data_listener: TcpListener) -> std::io::Result<Self> {
        let data_addr = data_listener.local_addr()?.to_string();
        Ok(Self {
            data_addr,
            data_listener: Mutex::new(Some(data_listener)),
            status: Arc::new(Mutex::new(WorkerStatus {
                state: pb::WorkerState::Idle,
                ..WorkerStatus::default()
            })),
            progress: Arc::default(),
            jobs: Arc::default(),
        })
    }

    pub fn data_addr(&self) -> &str {
        &self.data_addr
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Everything the compute thread needs to load and join its stage.
struct Assignment {
    model: PathBuf,
    plan: PlanRequest,
    expected: ShardSpec,
    addrs: Vec<String>,
    session: Session,
    opts: ShardOptions,
    kv_budget: u64,
    timeout: Duration,
}

fn parse_assignment(req: pb::AssignRequest) -> Result<Assignment, Status> {
    let session = gemma_proto::session::required(req.session)
        .map_err(|e| Status::invalid_argument(format!("assignment: {e}")))?;
    let expected: ShardSpec = req
        .shard
        .ok_or_else(|| Status::invalid_argument("assignment lacks the shard"))?
        .try_into()
        .map_err(|e: gemma_proto::WireError| Status::invalid_argument(e.to_string()))?;
    let dtype = match req.dtype {
        0 => DType::F32,
        d => dtype_from_wire(d).map_err(|e| Status::invalid_argument(e.to_string()))?,
    };
    let mut plan = PlanRequest::new(req.tp as usize, req.pp as usize);
    if !req.layers_per_stage.is_empty() {
        plan.layers_per_stage = Some(req.layers_per_stage.iter().map(|&l| l as usize).collect());
    }
    if req.block_size == 0 {
        return Err(Status::invalid_argument("block_size must be at least 1"));
    }
    Ok(Assignment {
        model: PathBuf::from(req.model_path),
        plan,
        expected,
        addrs: req.data_addrs,
        session,
        opts: ShardOptions {
            dtype,
            device: Device::Cpu,
            kv_blocks: 0,
            block_size: req.block_size as usize,
            quantized: if req.dequantize {
                QuantizedWeights::Dequantize
            } else {
                QuantizedWeights::Keep
            },
        },
        kv_budget: req.kv_budget_bytes,
        timeout: Duration::from_millis(req.collective_timeout_ms.max(1)),
    })
}

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let st = lock(&self.status);
        Ok(Response::new(pb::InfoResponse {
            data_addr: self.data_addr.clone(),
            state: st.state.into(),
            shard: st.shard.as_ref().map(pb::ShardSpec::from),
            bytes_loaded: lock(&self.progress).load(Ordering::Relaxed),
            bytes_total: st.bytes_total,
            kv_blocks: st.kv_blocks,
            error: st.error.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            holder: None,
            lease_left_ms: 0,
        }))
    }

    type AssignStream = EventStream<pb::LoadEvent>;

    async fn assign(
        &self,
        request: Request<pb::AssignRequest>,
    ) -> Result<Response<Self::AssignStream>, Status> {
        let assignment = parse_assignment(request.into_inner())?;
        {
            let mut st = lock(&self.status);
            if matches!(st.state, pb::WorkerState::Loading | pb::WorkerState::Ready) {
                return Err(Status::failed_precondition(
                    "this worker already holds a shard; start a fresh worker to assign another",
                ));
            }
            st.state = pb::WorkerState::Loading;
            st.shard = Some(assignment.expected.clone());
            st.error.clear();
        }
        let listener = lock(&self.data_listener)
            .take()
            .ok_or_else(|| Status::failed_precondition("the data-plane listener is gone"))?;
        let (events, rx) = tmpsc::channel(16);
        let (jobs_tx, jobs_rx) = mpsc::channel();
        *lock(&self.jobs) = Some(jobs_tx);
        let status = self.status.clone();
        let progress = self.progress.clone();
        std::thread::Builder::new()
            .name("compute".into())
            .spawn(move || compute_thread(assignment, listener, events, jobs_rx, status, progress))
            .map_err(|e| Status::internal(format!("cannot start the compute thread: {e}")))?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn release(
        &self,
        _: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        Err(Status::unimplemented(
            "this worker cannot release a shard yet; stop it to free it",
        ))
    }

    type StepsStream = EventStream<pb::StepResponse>;

    async fn steps(
        &self,
        request: Request<Streaming<pb::StepRequest>>,
    ) -> Result<Response<Self::StepsStream>, Status> {
        let jobs = lock(&self.jobs)
            .clone()
            .ok_or_else(|| Status::failed_precondition("no shard assigned yet"))?;
        let mut inbound = request.into_inner();
        let (tx, rx) = tmpsc::channel(4);
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                let Ok(request) = msg else { break };
                let step_id = request.step_id;
                let (reply, answer) = oneshot::channel();
                let response = if jobs.send(Job { request, reply }).is_err() {
                    failed(step_id, "the compute thread has stopped".into())
                } else {
                    answer.await.unwrap_or_else(|_| {
                        failed(step_id, "the compute thread dropped the step".into())
                    })
                };
                if tx.send(Ok(response)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn failed(step_id: u64, error: String) -> pb::StepResponse {
    pb::StepResponse {
        step_id,
        epoch: 0,
        collective_us: 0,
        result: Some(pb::step_response::Result::Error(error)),
    }
}

/// Loads the shard, joins the data plane, reports Ready, then executes steps until the service
/// goes away.
fn compute_thread(
    a: Assignment,
    listener: TcpListener,
    events: tmpsc::Sender<Result<pb::LoadEvent, Status>>,
    jobs: mpsc::Receiver<Job>,
    status: Arc<Mutex<WorkerStatus>>,
    progress: Arc<Mutex<Arc<AtomicU64>>>,
) {
    let loaded = load(&a, listener, &events, &status, &progress);
    let (shard, plane) = match loaded {
        Ok(x) => x,
        Err(e) => {
            // The gRPC edge: from here on the error is the message the coordinator shows.
            let message = e.to_string();
            tracing::error!(%message, "assignment failed");
            let mut st = lock(&status);
            st.state = pb::WorkerState::Failed;
            st.error = message.clone();
            let _ = events.blocking_send(Err(Status::failed_precondition(message)));
            return;
        }
    };
    {
        let mut st = lock(&status);
        st.state = pb::WorkerState::Ready;
        st.kv_blocks = shard.kv_blocks() as u32;
    }
    let _ = events.blocking_send(Ok(pb::LoadEvent {
        event: Some(pb::load_event::Event::Ready(pb::Ready {
            kv_blocks: shard.kv_blocks() as u32,
            weight_bytes: shard.weight_bytes(),
            weights_kept: false,
        })),
    }));
    drop(events);
    while let Ok(job) = jobs.recv() {
        let step_id = job.request.step_id;
        let _span = tracing::debug_span!("step", step_id).entered();
        let batch = StepBatch::from_wire(job.request);
        let result = run_step(&shard, &plane, &batch);
        let _ = job.reply.send(respond(step_id, result, &plane));
    }
}

/// The gRPC edge of a step: its result, or its error as the message the coordinator shows.
fn respond(
    step_id: u64,
    result: Result<pb::step_response::Result, StepError>,
    plane: &DataPlane,
) -> pb::StepResponse {
    match result {
        Ok(result) => pb::StepResponse {
            step_id,
            epoch: 0,
            collective_us: plane.take_wait_micros(),
            result: Some(result),
        },
        Err(e) => {
            tracing::warn!(step_id, error = %e, "step failed");
            failed(step_id, e.to_string())
        }
    }
}

fn load(
    a: &Assignment,
    listener: TcpListener,
    events: &tmpsc::Sender<Result<pb::LoadEvent, Status>>,
    status: &Arc<Mutex<WorkerStatus>>,
    progress: &Arc<Mutex<Arc<AtomicU64>>>,
) -> Result<(Shard, Arc<DataPlane>), AssignError> {
    let folder = ModelFolder::open(&a.model)?;
    let plan = ShardPlan::new(&folder.config, &a.plan)?;
    let spec = plan
        .shard(a.expected.stage, a.expected.rank)
        .filter(|s| **s == a.expected)
        .cloned()
        .ok_or_else(|| AssignError::ShardMismatch {
            expected: Box::new(a.expected.clone()),
            model: a.model.display().to_string(),
        })?;
    let total =
        (spec.num_parameters(&folder.config) as f64 * folder.weights.bytes_per_parameter()) as u64;
    lock(status).bytes_total = total;
    *lock(progress) = folder.weights.progress();
    let mut opts = a.opts.clone();
    let per_block = KvCache::bytes_per_block(
        spec.layers.len(),
        opts.block_size,
        spec.kv_heads.len(),
        folder.config.head_dim,
        opts.dtype,
    ) as u64;
    opts.kv_blocks = (a.kv_budget / per_block.max(1)) as usize;
    if opts.kv_blocks == 0 {
        return Err(AssignError::NoKvBlock {
            budget: a.kv_budget,
            block_size: opts.block_size,
            per_block,
        });
    }
    let reporter = spawn_progress_reporter(folder.weights.progress(), total, events.clone());
    // The data plane first: the shard's collective is its all-reduce.
    let plane = DataPlane::connect(
        &spec,
        a.session,
        &a.addrs,
        listener,
        a.timeout.max(Duration::from_secs(30)),
        opts.device.clone(),
    )
    .map(Arc::new);
    let plane = match plane {
        Ok(p) => p,
        Err(e) => {
            reporter.stop();
            return Err(e.into());
        }
    };
    let shard = Shard::load(
        &folder.weights,
        &folder.config,
        &spec,
        &opts,
        Box::new(PlaneCollective(plane.clone())),
    );
    reporter.stop();
    let shard = shard?;
    tracing::info!(
        stage = spec.stage,
        rank = spec.rank,
        weight_bytes = shard.weight_bytes(),
        kv_blocks = shard.kv_blocks(),
        "shard loaded"
    );
    Ok((shard, plane))
}

struct ProgressReporter {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProgressReporter {
    fn stop(mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends the bytes loaded so far every 200 ms, so a 17 GB model does not look hung.
fn spawn_progress_reporter(
    counter: Arc<AtomicU64>,
    total: u64,
    events: tmpsc::Sender<Result<pb::LoadEvent, Status>>,
) -> ProgressReporter {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || loop {
        let done = !matches!(
            stopped.recv_timeout(Duration::from_millis(200)),
            Err(mpsc::RecvTimeoutError::Timeout)
        );
        let event = pb::LoadEvent {
            event: Some(pb::load_event::Event::Progress(pb::LoadProgress {
                bytes_loaded: counter.load(Ordering::Relaxed),
                bytes_total: total,
            })),
        };
        if events.blocking_send(Ok(event)).is_err() || done {
            return;
        }
    });
    ProgressReporter {
        stop: Some(stop),
        thread: Some(thread),
    }
}

/// One checked step: validated before waiting for the previous stage (a batch refused everywhere
/// never leaves a stage waiting), run, and handed on or answered.
fn run_step(
    shard: &Shard,
    plane: &DataPlane,
    batch: &StepBatch,
) -> Result<pb::step_response::Result, StepError> {
    let batch = shard.validate(batch)?;
    let input = match shard.spec().is_first_stage() {
        true => None,
        false => Some(plane.recv_prev()?),
    };
    match shard.step(&batch, input.as_ref())? {
        StageOutput::Hidden(h) => {
            plane.send_next(&h)?;
            Ok(pb::step_response::Result::Done(pb::StepDone {}))
        }
        StageOutput::Logits(l) => {
            let first_id = shard.spec().vocab_rows.start as u32;
            let output = last_stage_output(batch.batch(), &l, first_id)?;
            Ok(pb::step_response::Result::Output(output))
        }
    }
}

/// Per sequence, what its sampler asked for from this rank's vocabulary slice: the whole slice,
/// or its largest logits and log-sum-exp (a few hundred bytes instead of the vocabulary).
fn last_stage_output(
    batch: &StepBatch,
    logits: &candle_core::Tensor,
    first_id: u32,
) -> Result<pb::LastStageOutput, WireTensorError> {
    with_elements::<f32, _>(logits, |values| {
        select_outputs(batch, values, first_id).into()
    })
}

/// [`last_stage_output`] over the logits' elements, `[vocab slice, seqs]` row-major: one pass
/// selects every sequence's candidates; only a sequence that wants every logit copies its column.
fn select_outputs(batch: &StepBatch, values: &[f32], first_id: u32) -> Vec<SeqLogits> {
    let seqs = batch.seqs.len();
    let wanted: Vec<usize> = batch
        .seqs
        .iter()
        .map(|s| s.top_candidates as usize)
        .collect();
    let mut top = candidates::top_candidates_by_column(values, seqs, &wanted, first_id);
    let lse_wanted: Vec<bool> = batch.seqs.iter().map(|s| s.log_probs).collect();
    let lse = candidates::log_sum_exp_by_column(values, seqs, &lse_wanted);
    batch
        .seqs
        .iter()
        .enumerate()
        .map(|(i, seq)| match seq.top_candidates {
            0 => SeqLogits::Full(values.iter().skip(i).step_by(seqs).copied().collect()),
            _ => SeqLogits::Top {
                candidates: std::mem::take(&mut top[i]),
                log_sum_exp: lse[i],
            },
        })
        .collect()
}
