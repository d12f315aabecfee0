//! One assignment: the request as the worker understood it, and the compute thread that serves
//! it. The thread first joins the previous assignment's thread (so that one's data plane and KV
//! cache are gone before this one connects), keeps that one's weights when they are this very
//! shard's, connects the data plane, loads what it must, reports Ready, then runs the steps its
//! own jobs channel brings until it is told to stop. It ends by handing its weights back, for the
//! next assignment to keep.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use gemma_proto::{pb, ModelConfig, PlanRequest, Session, ShardPlan, ShardSpec, StepBatch};
use tokio::sync::{mpsc as tmpsc, oneshot};
use tonic::Status;

use super::step::{failed, respond, run_step};
use super::Shared;
use crate::data_plane::{DataPlane, PlaneAbort, PlaneCollective, PlaneEndpoint};
use crate::error::{AssignError, HoldError, LoadError};
use crate::folder::ModelFolder;
use crate::kv_cache::KvCache;
use crate::kv_sizing::{available_memory, KvSizing, MemoryShare, ShardFootprint};
use crate::model::{Shard, ShardOptions, ShardWeights};
use crate::peer_stream::PlaneTls;
use crate::weights::QuantizedWeights;
use crate::wire::dtype_from_wire;

/// Where an assignment's load events go (the `Assign` stream).
pub type Events = tmpsc::Sender<Result<pb::LoadEvent, Status>>;

/// The shortest lease a coordinator may ask for: shorter ones would run out between its probes.
const MIN_LEASE: Duration = Duration::from_millis(100);

/// Everything the compute thread needs to load and join its stage.
pub struct Assignment {
    model: PathBuf,
    plan: PlanRequest,
    pub expected: ShardSpec,
    addrs: Vec<String>,
    pub session: Session,
    pub lease: Duration,
    opts: ShardOptions,
    kv: KvSizing,
    timeout: Duration,
}

impl TryFrom<pb::AssignRequest> for Assignment {
    type Error = Status;

    fn try_from(req: pb::AssignRequest) -> Result<Self, Status> {
        let kv = kv_sizing(&req)?;
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
            plan.layers_per_stage =
                Some(req.layers_per_stage.iter().map(|&l| l as usize).collect());
        }
        if req.block_size == 0 {
            return Err(Status::invalid_argument("block_size must be at least 1"));
        }
        let lease = Duration::from_millis(req.lease_ms);
        if lease < MIN_LEASE {
            return Err(Status::invalid_argument(format!(
                "lease_ms {} is too short: at least {} ms (the coordinator's default is 30000)",
                req.lease_ms,
                MIN_LEASE.as_millis()
            )));
        }
        Ok(Self {
            model: PathBuf::from(req.model_path),
            plan,
            expected,
            addrs: req.data_addrs,
            session,
            lease,
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
            kv,
            timeout: Duration::from_millis(req.collective_timeout_ms.max(1)),
        })
    }
}

/// What the request asks of the KV pool; the first field set wins.
fn kv_sizing(req: &pb::AssignRequest) -> Result<KvSizing, Status> {
    if req.kv_blocks > 0 {
        return Ok(KvSizing::Blocks(req.kv_blocks as usize));
    }
    if req.kv_budget_bytes > 0 {
        return Ok(KvSizing::Budget(req.kv_budget_bytes));
    }
    let fraction = req.kv_memory_fraction;
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(Status::invalid_argument(format!(
            "kv_memory_fraction {fraction} is outside (0, 1], and neither kv_blocks nor \
             kv_budget_bytes is given"
        )));
    }
    Ok(KvSizing::FromMemory(MemoryShare {
        fraction,
        host_share: req.host_share.max(1),
        max_tokens: req.kv_max_tokens,
    }))
}

/// What makes two assignments' weights the same: the model file (by canonical path), the shard,
/// the compute dtype and whether quantized blocks are kept.
#[derive(Debug, Clone, PartialEq)]
struct WeightsKey {
    model: PathBuf,
    spec: ShardSpec,
    dtype: DType,
    quantized: QuantizedWeights,
}

impl WeightsKey {
    fn of(a: &Assignment) -> Result<Self, LoadError> {
        let model = std::fs::canonicalize(&a.model).map_err(|source| LoadError::Io {
            path: a.model.display().to_string(),
            source,
        })?;
        Ok(Self {
            model,
            spec: a.expected.clone(),
            dtype: a.opts.dtype,
            quantized: a.opts.quantized,
        })
    }
}

/// The weights a finished compute thread hands to the next assignment.
pub struct KeptWeights {
    key: WeightsKey,
    weights: ShardWeights,
}

/// A compute thread, running or winding down; joining it yields the weights it kept.
pub type ComputeThread = JoinHandle<Option<KeptWeights>>;

/// One step for the compute thread, with where its answer goes.
pub struct Job {
    pub request: pb::StepRequest,
    /// The request's session, already decoded.
    pub session: Session,
    pub reply: oneshot::Sender<pb::StepResponse>,
}

/// What a compute thread's jobs channel carries.
pub enum Order {
    Step(Job),
    /// End the assignment: the thread drops its plane and KV cache and exits, and with its
    /// receiver gone every Steps stream opened under this assignment fails its next send.
    Stop,
}

/// The server's handle on the current assignment's compute thread.
pub struct Running {
    pub session: Session,
    pub jobs: mpsc::Sender<Order>,
    abort: PlaneAbort,
    thread: ComputeThread,
}

impl Running {
    /// Ends the assignment: a wait in the data plane returns at once, the thread leaves its step
    /// loop. Returns the thread, for the next assignment to join.
    pub fn stop(self, reason: &str) -> ComputeThread {
        self.abort.abort(reason);
        let _ = self.jobs.send(Order::Stop);
        self.thread
    }
}

/// Starts assignment number `serial`'s compute thread.
pub fn start(
    a: Assignment,
    serial: u64,
    listener: TcpListener,
    tls: Option<Arc<PlaneTls>>,
    previous: Option<ComputeThread>,
    shared: Arc<Shared>,
    events: Events,
) -> std::io::Result<Running> {
    let (jobs, orders) = mpsc::channel();
    let abort = PlaneAbort::default();
    let session = a.session;
    let thread_abort = abort.clone();
    let thread = std::thread::Builder::new()
        .name(format!("compute-{}", session.epoch))
        .spawn(move || {
            let ctx = Context {
                serial,
                tls,
                shared,
                abort: thread_abort,
                events,
            };
            compute(a, listener, previous, orders, ctx)
        })?;
    Ok(Running {
        session,
        jobs,
        abort,
        thread,
    })
}

/// What the compute thread reports to.
struct Context {
    serial: u64,
    /// The data plane's mutual TLS, when the worker has certificates.
    tls: Option<Arc<PlaneTls>>,
    shared: Arc<Shared>,
    abort: PlaneAbort,
    events: Events,
}

fn compute(
    a: Assignment,
    listener: TcpListener,
    previous: Option<ComputeThread>,
    orders: mpsc::Receiver<Order>,
    ctx: Context,
) -> Option<KeptWeights> {
    let started = Instant::now();
    let _span = tracing::info_span!("assignment", session = %a.session).entered();
    // Joined before connecting: the previous plane's links and its KV cache are gone by now.
    let mut kept = previous.and_then(|t| t.join().ok().flatten());
    gemma_proto::process::release_freed_memory();
    let (shard, plane, key, weights_kept) = match assemble(&a, &mut kept, listener, &ctx) {
        Ok(assembled) => assembled,
        Err(e) => {
            fail(&ctx, e.to_string());
            return kept;
        }
    };
    if let Some(reason) = ctx.abort.reason() {
        fail(&ctx, format!("assignment ended while loading: {reason}"));
        return Some(KeptWeights {
            key,
            weights: shard.into_weights(),
        });
    }
    let kv_blocks = shard.kv_blocks() as u32;
    ctx.shared.if_current(ctx.serial, |slot| {
        slot.status.state = pb::WorkerState::Ready;
        slot.status.kv_blocks = kv_blocks;
        // The lease starts running now; the holder has been waiting on the Assign stream.
        if let Some(h) = slot.holder.as_mut() {
            h.renew(Instant::now());
        }
    });
    tracing::info!(
        stage = a.expected.stage,
        rank = a.expected.rank,
        kv_blocks,
        weights_kept,
        ready_ms = started.elapsed().as_secs_f64() * 1e3,
        "ready"
    );
    let _ = ctx.events.blocking_send(Ok(pb::LoadEvent {
        event: Some(pb::load_event::Event::Ready(pb::Ready {
            kv_blocks,
            weight_bytes: shard.weight_bytes(),
            weights_kept,
        })),
    }));
    drop(ctx.events);
    serve(&shard, &plane, &orders, a.session);
    // The plane closes here (the shard holds the other handle on it), and the KV cache with it.
    drop(plane);
    Some(KeptWeights {
        key,
        weights: shard.into_weights(),
    })
}

/// How long the compute thread waits without a step before it gives freed memory back: far
/// longer than the gap between two steps of a serving cluster, short enough that a worker's
/// memory falls soon after its load does.
const IDLE_TRIM_AFTER: Duration = Duration::from_millis(500);

/// The next order; None once every sender is gone. A wait longer than [`IDLE_TRIM_AFTER`] gives
/// freed memory back first, once per idle spell.
fn next_order(orders: &mpsc::Receiver<Order>) -> Option<Order> {
    match orders.recv_timeout(IDLE_TRIM_AFTER) {
        Ok(order) => Some(order),
        Err(mpsc::RecvTimeoutError::Disconnected) => None,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            gemma_proto::process::release_freed_memory();
            orders.recv().ok()
        }
    }
}

/// Runs the steps of this assignment until it is stopped.
fn serve(shard: &Shard, plane: &DataPlane, orders: &mpsc::Receiver<Order>, session: Session) {
    while let Some(Order::Step(job)) = next_order(orders) {
        let step_id = job.request.step_id;
        let _span = tracing::debug_span!("step", step_id).entered();
        // The stream checked the session against the holder; this thread serves only its own.
        let response = match job.session == session {
            true => {
                let batch = StepBatch::from_wire(job.request);
                respond(
                    step_id,
                    session.epoch,
                    run_step(shard, plane, &batch),
                    plane,
                )
            }
            false => {
                let refusal = HoldError::WrongStepSession {
                    held: session,
                    offered: job.session,
                };
                failed(step_id, job.session.epoch, refusal.to_string())
            }
        };
        let _ = job.reply.send(response);
    }
}

/// The gRPC edge of a failed assignment: from here on the error is the message the coordinator
/// shows.
fn fail(ctx: &Context, message: String) {
    tracing::error!(%message, "assignment failed");
    ctx.shared.if_current(ctx.serial, |slot| {
        slot.status.state = pb::WorkerState::Failed;
        slot.status.error = message.clone();
        if let Some(h) = slot.holder.as_mut() {
            h.renew(Instant::now());
        }
    });
    let _ = ctx
        .events
        .blocking_send(Err(Status::failed_precondition(message)));
}

/// A servable shard for the assignment: its plane connected and its weights kept or loaded.
type Assembled = (Shard, Arc<DataPlane>, WeightsKey, bool);

fn assemble(
    a: &Assignment,
    kept: &mut Option<KeptWeights>,
    listener: TcpListener,
    ctx: &Context,
) -> Result<Assembled, AssignError> {
    let key = WeightsKey::of(a)?;
    // Another shard's weights are dropped here, before this one's load.
    match kept.take().filter(|k| k.key == key) {
        None => {
            let (shard, plane) = load(a, listener, ctx)?;
            Ok((shard, plane, key, false))
        }
        Some(k) => match rejoin(a, &k.weights, listener, ctx) {
            Ok((blocks, plane)) => {
                let group = Box::new(PlaneCollective(plane.clone()));
                let shard = k.weights.attach(blocks, a.opts.block_size, group)?;
                Ok((shard, plane, key, true))
            }
            // A failed re-assignment keeps the weights for the next one.
            Err(e) => {
                *kept = Some(k);
                Err(e)
            }
        },
    }
}

/// For weights kept from the previous assignment: the KV blocks of the new budget and a new
/// plane (the KV cache is then built afresh by `attach`).
fn rejoin(
    a: &Assignment,
    weights: &ShardWeights,
    listener: TcpListener,
    ctx: &Context,
) -> Result<(usize, Arc<DataPlane>), AssignError> {
    let spec = planned_spec(a, weights.config())?;
    let bytes = weights.weight_bytes();
    // Resident already: the host's available memory no longer counts them.
    let blocks = kv_blocks(a, weights.config(), &spec, bytes, bytes)?;
    ctx.shared.if_current(ctx.serial, |slot| {
        slot.status.bytes_total = bytes;
        slot.status.progress = Arc::new(AtomicU64::new(bytes));
    });
    Ok((blocks, connect_plane(a, &spec, listener, ctx)?))
}

/// Opens the model, then connects the plane and loads this shard's slices.
fn load(
    a: &Assignment,
    listener: TcpListener,
    ctx: &Context,
) -> Result<(Shard, Arc<DataPlane>), AssignError> {
    let folder = ModelFolder::open(&a.model)?;
    let spec = planned_spec(a, &folder.config)?;
    let total =
        (spec.num_parameters(&folder.config) as f64 * folder.weights.bytes_per_parameter()) as u64;
    // Sized before any shard of the group loads (they load only once the plane is connected),
    // so co-located workers read the same available memory.
    let blocks = kv_blocks(a, &folder.config, &spec, total, 0)?;
    let progress = folder.weights.progress();
    ctx.shared.if_current(ctx.serial, |slot| {
        slot.status.bytes_total = total;
        slot.status.progress = progress.clone();
    });
    let reporter = ProgressReporter::start(progress, total, ctx.events.clone());
    // The data plane first, so every shard of the group connects before any starts loading.
    let loaded = connect_plane(a, &spec, listener, ctx).and_then(|plane| {
        let weights = ShardWeights::load(&folder.weights, &folder.config, &spec, &a.opts)?;
        let group = Box::new(PlaneCollective(plane.clone()));
        Ok((weights.attach(blocks, a.opts.block_size, group)?, plane))
    });
    reporter.stop();
    let (shard, plane) = loaded?;
    tracing::info!(
        stage = spec.stage,
        rank = spec.rank,
        weight_bytes = shard.weight_bytes(),
        kv_blocks = shard.kv_blocks(),
        "shard loaded"
    );
    Ok((shard, plane))
}

/// The shard the worker's own plan of the model gives this place; it must be the coordinator's.
fn planned_spec(a: &Assignment, cfg: &ModelConfig) -> Result<ShardSpec, AssignError> {
    let plan = ShardPlan::new(cfg, &a.plan)?;
    plan.shard(a.expected.stage, a.expected.rank)
        .filter(|s| **s == a.expected)
        .cloned()
        .ok_or_else(|| AssignError::ShardMismatch {
            expected: Box::new(a.expected.clone()),
            model: a.model.display().to_string(),
        })
}

/// How many KV blocks this shard's cache holds, as the assignment asks (`kv_sizing`): its
/// weights take `weight_bytes`, of which `resident` are already in memory.
fn kv_blocks(
    a: &Assignment,
    cfg: &ModelConfig,
    spec: &ShardSpec,
    weight_bytes: u64,
    resident: u64,
) -> Result<usize, AssignError> {
    let per_block = KvCache::bytes_per_block(
        spec.layers.len(),
        a.opts.block_size,
        spec.kv_heads.len(),
        cfg.head_dim,
        a.opts.dtype,
    ) as u64;
    let shard = ShardFootprint {
        per_block,
        block_size: a.opts.block_size,
        weight_bytes,
        resident_weight_bytes: resident,
    };
    a.kv.blocks(shard, available_memory)
}

fn connect_plane(
    a: &Assignment,
    spec: &ShardSpec,
    listener: TcpListener,
    ctx: &Context,
) -> Result<Arc<DataPlane>, AssignError> {
    let plane = DataPlane::connect(
        spec,
        a.session,
        &a.addrs,
        PlaneEndpoint {
            listener,
            tls: ctx.tls.clone(),
        },
        a.timeout.max(Duration::from_secs(30)),
        a.opts.device.clone(),
        ctx.abort.clone(),
    )?;
    Ok(Arc::new(plane))
}

/// Sends the bytes loaded so far every 200 ms, so a 17 GB model does not look hung.
struct ProgressReporter {
    stop: mpsc::Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl ProgressReporter {
    fn start(counter: Arc<AtomicU64>, total: u64, events: Events) -> Self {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("load-progress".into())
            .spawn(move || loop {
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
            })
            // Without a reporter the load only looks slower.
            .ok();
        Self { stop, thread }
    }

    fn stop(self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread {
            let _ = t.join();
        }
    }
}
