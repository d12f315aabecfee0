//! The worker's gRPC service.
//!
//! The worker holds at most one session (`holder`): the coordinator that assigned it, with a
//! lease that the holder's signs of life renew and a watchdog thread ends. Each assignment runs
//! on its own compute thread (`assignment`), which owns the shard and its data plane and takes
//! steps from a jobs channel of its own; the service only checks who is asking, forwards, and
//! streams answers back. A re-assignment, a release or an expired lease stops the current thread
//! (its data plane aborted first, so a step blocked in a collective returns at once); the next
//! assignment's thread joins it before connecting and keeps its weights when they are the same
//! shard's.

mod assignment;
mod holder;
mod step;

pub use step::last_stage_output;

use std::net::TcpListener;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gemma_proto::{pb, Session, ShardSpec};
use tokio::sync::{mpsc as tmpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::error::HoldError;
use crate::peer_stream::PlaneTls;
use assignment::{Assignment, ComputeThread, Job, Order, Running};
use holder::Holder;
use step::failed;

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// What `Info` reports: the worker's state, its shard and how loading went.
#[derive(Default)]
struct WorkerStatus {
    state: pb::WorkerState,
    shard: Option<ShardSpec>,
    bytes_total: u64,
    /// Bytes read so far by the current load.
    progress: Arc<AtomicU64>,
    kv_blocks: u32,
    error: String,
}

impl WorkerStatus {
    fn idle() -> Self {
        Self {
            state: pb::WorkerState::Idle,
            ..Self::default()
        }
    }
}

/// The assignment's compute thread, as far as the service knows it.
#[derive(Default)]
enum Compute {
    #[default]
    None,
    Running(Running),
    /// Released: the thread is winding down (or done); the next assignment joins it and may
    /// keep its weights.
    Stopped(ComputeThread),
}

impl Compute {
    /// Stops the running thread, if any, and takes whichever thread the next assignment joins.
    fn stop(&mut self, reason: &str) -> Option<ComputeThread> {
        match std::mem::take(self) {
            Compute::None => None,
            Compute::Running(r) => Some(r.stop(reason)),
            Compute::Stopped(t) => Some(t),
        }
    }
}

/// Everything the worker holds, under one lock so that admitting a session and replacing the
/// assignment are one decision.
struct Slot {
    status: WorkerStatus,
    holder: Option<Holder>,
    compute: Compute,
    /// The current assignment's number: a replaced thread's late reports are ignored.
    serial: u64,
}

impl Slot {
    /// Drops the holder and the assignment; the worker is Idle (the weights stay, warm, with the
    /// stopped thread until the next assignment).
    fn release(&mut self, reason: &str) {
        self.holder = None;
        self.compute = match self.compute.stop(reason) {
            Some(t) => Compute::Stopped(t),
            None => Compute::None,
        };
        self.serial += 1;
        self.status = WorkerStatus::idle();
    }
}

/// What the service shares with its compute threads and the lease watchdog.
pub struct Shared {
    slot: Mutex<Slot>,
    /// Signalled when a lease starts, ends or starts running.
    lease_changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        // Every mutation completes before unlock; a panic elsewhere leaves the state usable.
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `update` if assignment `serial` is still the current one.
    fn if_current(&self, serial: u64, update: impl FnOnce(&mut Slot)) {
        let mut slot = self.lock();
        if slot.serial == serial {
            update(&mut slot);
            self.lease_changed.notify_all();
        }
    }

    /// Whether a step of `offered` may reach the shard; renews the lease when it may.
    fn admit_step(&self, offered: Session) -> Result<(), HoldError> {
        let mut slot = self.lock();
        let holder = slot.holder.as_mut().ok_or(HoldError::NotHeld { offered })?;
        holder.check_step(offered)?;
        holder.renew(Instant::now());
        Ok(())
    }

    /// Releases the worker when its holder has been silent longer than its lease.
    fn watch_leases(&self) {
        let mut slot = self.lock();
        loop {
            let now = Instant::now();
            let state = slot.status.state;
            let wait = match &slot.holder {
                Some(h) if h.expired(state, now) => {
                    tracing::warn!(holder = %h.session(), "lease expired: releasing the shard");
                    slot.release("lease expired");
                    continue;
                }
                Some(h) if state != pb::WorkerState::Loading => h.lease_left(state, now),
                // Woken when a lease starts or starts running.
                _ => Duration::from_secs(3600),
            };
            slot = self
                .lease_changed
                .wait_timeout(slot, wait)
                .map(|(s, _)| s)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

pub struct WorkerService {
    data_addr: String,
    /// The data-plane listener, bound for the worker's life so peers can dial before it is
    /// assigned and every assignment announces the same address; each assignment accepts on a
    /// clone of it.
    data_listener: TcpListener,
    shared: Arc<Shared>,
    /// The data plane's mutual TLS; None: plain TCP.
    tls: Option<Arc<PlaneTls>>,
}

impl WorkerService {
    /// The data plane of every assignment over mutual TLS with these certificates.
    pub fn with_tls(self, tls: Arc<PlaneTls>) -> Self {
        Self {
            tls: Some(tls),
            ..self
        }
    }

    /// The service, and its lease watchdog thread.
    pub fn new(data_listener: TcpListener) -> std::io::Result<Self> {
        let data_addr = data_listener.local_addr()?.to_string();
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot {
                status: WorkerStatus::idle(),
                holder: None,
                compute: Compute::None,
                serial: 0,
            }),
            lease_changed: Condvar::new(),
        });
        let watched = shared.clone();
        std::thread::Builder::new()
            .name("lease-watchdog".into())
            .spawn(move || watched.watch_leases())?;
        Ok(Self {
            data_addr,
            data_listener,
            tls: None,
            shared,
        })
    }

    pub fn data_addr(&self) -> &str {
        &self.data_addr
    }
}

fn refused(e: HoldError) -> Status {
    Status::failed_precondition(e.to_string())
}

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    async fn info(
        &self,
        request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        // Anyone may ask (it is the probe); only the holder's cluster id renews the lease.
        let asking = request.into_inner().session;
        let asking = asking.and_then(|s| Session::try_from(s).ok());
        let now = Instant::now();
        let mut slot = self.shared.lock();
        let state = slot.status.state;
        if let (Some(h), Some(asking)) = (slot.holder.as_mut(), asking) {
            if h.session().same_cluster(&asking) {
                h.renew(now);
            }
        }
        let st = &slot.status;
        Ok(Response::new(pb::InfoResponse {
            data_addr: self.data_addr.clone(),
            state: st.state.into(),
            shard: st.shard.as_ref().map(pb::ShardSpec::from),
            bytes_loaded: st.progress.load(Ordering::Relaxed),
            bytes_total: st.bytes_total,
            kv_blocks: st.kv_blocks,
            error: st.error.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            holder: slot.holder.as_ref().map(|h| h.session().into()),
            lease_left_ms: slot
                .holder
                .as_ref()
                .map_or(0, |h| h.lease_left(state, now).as_millis() as u64),
        }))
    }

    type AssignStream = EventStream<pb::LoadEvent>;

    async fn assign(
        &self,
        request: Request<pb::AssignRequest>,
    ) -> Result<Response<Self::AssignStream>, Status> {
        let a = Assignment::try_from(request.into_inner())?;
        let listener = self
            .data_listener
            .try_clone()
            .map_err(|e| Status::internal(format!("the data-plane listener: {e}")))?;
        let (events, rx) = tmpsc::channel(16);
        let now = Instant::now();
        let mut slot = self.shared.lock();
        let admission = holder::admit(slot.holder.as_ref(), slot.status.state, a.session, now)
            .map_err(refused)?;
        tracing::info!(session = %a.session, ?admission, "assigned");
        let previous = slot.compute.stop(&format!("re-assigned to {}", a.session));
        slot.serial += 1;
        slot.holder = Some(Holder::new(a.session, a.lease, now));
        slot.status = WorkerStatus {
            state: pb::WorkerState::Loading,
            shard: Some(a.expected.clone()),
            ..WorkerStatus::default()
        };
        let serial = slot.serial;
        let tls = self.tls.clone();
        match assignment::start(
            a,
            serial,
            listener,
            tls,
            previous,
            self.shared.clone(),
            events,
        ) {
            Ok(running) => slot.compute = Compute::Running(running),
            Err(e) => {
                let message = format!("cannot start the compute thread: {e}");
                slot.status.state = pb::WorkerState::Failed;
                slot.status.error = message.clone();
                return Err(Status::internal(message));
            }
        }
        self.shared.lease_changed.notify_all();
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let offered = gemma_proto::session::required(request.into_inner().session)
            .map_err(|e| Status::invalid_argument(format!("release: {e}")))?;
        let mut slot = self.shared.lock();
        // Nobody holds it: already released, nothing to do.
        if let Some(h) = &slot.holder {
            h.check_release(offered).map_err(refused)?;
            tracing::info!(by = %offered, "released");
            slot.release(&format!("released by {offered}"));
            self.shared.lease_changed.notify_all();
        }
        Ok(Response::new(pb::ReleaseResponse {}))
    }

    type StepsStream = EventStream<pb::StepResponse>;

    async fn steps(
        &self,
        request: Request<Streaming<pb::StepRequest>>,
    ) -> Result<Response<Self::StepsStream>, Status> {
        // The stream feeds the assignment current now and no other: once that one is replaced
        // its jobs channel is closed and every later request here is answered with an error.
        let (jobs, opened_under) = match &self.shared.lock().compute {
            Compute::Running(r) => (r.jobs.clone(), r.session),
            _ => {
                return Err(Status::failed_precondition(
                    "this worker holds no assignment; Assign it first",
                ))
            }
        };
        let shared = self.shared.clone();
        let mut inbound = request.into_inner();
        let (tx, rx) = tmpsc::channel(4);
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                let Ok(request) = msg else { break };
                let response = forward(&shared, &jobs, opened_under, request).await;
                if tx.send(Ok(response)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One step request of a stream opened under `opened_under`: refused unless it carries exactly
/// the held session, else run by that assignment's compute thread.
async fn forward(
    shared: &Shared,
    jobs: &std::sync::mpsc::Sender<Order>,
    opened_under: Session,
    request: pb::StepRequest,
) -> pb::StepResponse {
    let step_id = request.step_id;
    let session = match gemma_proto::session::required(request.session.clone()) {
        Ok(s) => s,
        Err(e) => return failed(step_id, 0, format!("step {step_id} refused: {e}")),
    };
    if let Err(e) = shared.admit_step(session) {
        return failed(
            step_id,
            session.epoch,
            format!("step {step_id} refused: {e}"),
        );
    }
    let (reply, answer) = oneshot::channel();
    let job = Job {
        request,
        session,
        reply,
    };
    if jobs.send(Order::Step(job)).is_err() {
        return failed(
            step_id,
            session.epoch,
            format!(
                "step {step_id} refused: this Steps stream was opened under {opened_under}, \
                 whose assignment has ended; open a new stream"
            ),
        );
    }
    answer.await.unwrap_or_else(|_| {
        failed(
            step_id,
            session.epoch,
            "the compute thread dropped the step (its assignment ended)".into(),
        )
    })
}
