//! The cluster as the coordinator sees it: the plan, one gRPC connection and step stream per
//! worker, and the local worker processes when it started them itself.

pub mod spawn;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use gemma_proto::pb::worker_client::WorkerClient;
use gemma_proto::{
    candidates, pb, ModelConfig, ModelFiles, PlanRequest, SeqLogits, ShardPlan, ShardSpec,
    StepBatch, WireError,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::settings::Settings;
use gemma_proto::Session;
pub use spawn::LocalWorkers;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "model {0} does not exist; --model takes a HuggingFace folder, a .gguf file or a folder \
         holding one"
    )]
    NoModel(String),
    #[error(transparent)]
    Config(#[from] gemma_proto::ConfigError),
    #[error("the plan does not fit the model: {0}")]
    Plan(#[from] gemma_proto::PlanError),
    #[error("{given} workers given, but tp={tp} x pp={pp} needs {needed}; list one per shard, stage-major")]
    WorkerCount {
        given: usize,
        tp: usize,
        pp: usize,
        needed: usize,
    },
    #[error("--dtype {0} is not supported; use f32, bf16 or f16")]
    Dtype(String),
    #[error("cannot start worker {bin}: {reason}")]
    Spawn { bin: String, reason: String },
    #[error("local worker {index}: {reason}")]
    Announce { index: usize, reason: String },
    #[error("cannot reach worker {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("worker {addr} (stage {stage}, rank {rank}) failed to load its shard: {reason}")]
    Load {
        addr: String,
        stage: usize,
        rank: usize,
        reason: String,
    },
    #[error("worker {addr} (stage {stage}, rank {rank}): {reason}")]
    Step {
        addr: String,
        stage: usize,
        rank: usize,
        reason: String,
    },
    #[error("worker {addr} (stage {stage}, rank {rank}) answered the step wrongly: {source}")]
    Answer {
        addr: String,
        stage: usize,
        rank: usize,
        source: WireError,
    },
    #[error("the last stage's answers do not fit together: {0}")]
    Join(WireError),
    #[error("cannot draw this coordinator's session id: {0}")]
    Session(String),
}

/// What is known before any worker is contacted; computing it refuses bad settings early.
pub struct Prepared {
    /// The model (folder or .gguf file), canonical: what every worker is told to load.
    pub model_path: PathBuf,
    /// Where tokenizer.json and tokenizer_config.json are.
    pub tokenizer_dir: PathBuf,
    pub config: ModelConfig,
    pub plan: ShardPlan,
    pub request: PlanRequest,
}

impl Prepared {
    pub fn new(settings: &Settings) -> Result<Self, ClusterError> {
        let model_path = std::fs::canonicalize(&settings.model)
            .map_err(|_| ClusterError::NoModel(settings.model.display().to_string()))?;
        let files = ModelFiles::locate(&model_path)?;
        let config = files.config()?;
        let mut request = PlanRequest::new(settings.tp, settings.pp);
        request.layers_per_stage = settings.layers_per_stage.clone();
        let plan = ShardPlan::new(&config, &request)?;
        if !settings.workers.is_empty() && settings.workers.len() != plan.world_size() {
            return Err(ClusterError::WorkerCount {
                given: settings.workers.len(),
                tp: plan.tp,
                pp: plan.pp,
                needed: plan.world_size(),
            });
        }
        dtype_of(&settings.dtype)?;
        Ok(Self {
            model_path,
            tokenizer_dir: files.tokenizer_dir,
            config,
            plan,
            request,
        })
    }

    /// Starts the local workers when no external ones are configured. Each gets an equal share
    /// of the cores: candle's pool collapses when two processes fight for one core.
    pub fn spawn_local_workers(
        &self,
        settings: &Settings,
    ) -> Result<Option<LocalWorkers>, ClusterError> {
        if !settings.workers.is_empty() {
            return Ok(None);
        }
        let bin = spawn::worker_binary(settings.worker_bin.as_deref())?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = (cores / self.plan.world_size()).max(1);
        LocalWorkers::spawn(&bin, self.plan.world_size(), threads).map(Some)
    }
}

fn dtype_of(name: &str) -> Result<pb::DType, ClusterError> {
    match name {
        "f32" => Ok(pb::DType::DtypeF32),
        "bf16" => Ok(pb::DType::DtypeBf16),
        "f16" => Ok(pb::DType::DtypeF16),
        other => Err(ClusterError::Dtype(other.to_string())),
    }
}

/// HTTP/2 flow-control windows of the coordinator-worker connections.
pub const STREAM_WINDOW: u32 = 64 << 20;
pub const CONNECTION_WINDOW: u32 = 128 << 20;

struct WorkerLink {
    addr: String,
    /// A second handle on the connection for health probes.
    probe: WorkerClient<Channel>,
    spec: ShardSpec,
    steps: mpsc::Sender<pb::StepRequest>,
    responses: tonic::Streaming<pb::StepResponse>,
}

impl WorkerLink {
    /// This worker's vocabulary slice of the step's logits, checked against the step: a last
    /// stage must answer with one, any other stage without.
    fn last_stage_logits(
        &self,
        output: Option<pb::LastStageOutput>,
        batch: &StepBatch,
    ) -> Result<Option<Vec<SeqLogits>>, ClusterError> {
        let spec = &self.spec;
        let wrong = |reason: &str| ClusterError::Step {
            addr: self.addr.clone(),
            stage: spec.stage,
            rank: spec.rank,
            reason: reason.to_string(),
        };
        match (output, spec.is_last_stage()) {
            (Some(o), true) => o
                .into_logits(batch, &spec.vocab_rows)
                .map(Some)
                .map_err(|source| ClusterError::Answer {
                    addr: self.addr.clone(),
                    stage: spec.stage,
                    rank: spec.rank,
                    source,
                }),
            (None, false) => Ok(None),
            (Some(_), false) => Err(wrong(
                "answered with logits, but only the last stage computes them",
            )),
            (None, true) => Err(wrong(
                "answered without logits, but the last stage must send its vocabulary slice",
            )),
        }
    }
}

/// A loaded, connected cluster, ready to step.
pub struct Cluster {
    pub config: ModelConfig,
    pub plan: ShardPlan,
    /// KV blocks every shard holds (the smallest pool of any shard).
    pub kv_blocks: usize,
    pub block_size: usize,
    workers: Vec<WorkerLink>,
    step_timeout: Duration,
    /// This coordinator's hold on the workers; every step carries it.
    session: Session,
    next_step: u64,
    /// Dropped after the links: stops the local workers.
    _local: Option<LocalWorkers>,
}

impl Cluster {
    /// Connects to every worker, assigns the shards, waits until all are loaded and meshed.
    pub async fn connect(
        prepared: Prepared,
        settings: &Settings,
        local: Option<LocalWorkers>,
    ) -> Result<Self, ClusterError> {
        let addrs = match &local {
            Some(l) => l.addrs.clone(),
            None => settings.workers.clone(),
        };
        let connect_timeout = Duration::from_millis(settings.connect_timeout_ms);
        let clients = join_all(addrs.iter().map(|a| connect_worker(a, connect_timeout)))
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let data_addrs: Vec<String> = clients
            .iter()
            .zip(&addrs)
            .map(|((_, info), grpc)| reachable_data_addr(&info.data_addr, grpc))
            .collect();
        let session = Session::start().map_err(|e| ClusterError::Session(e.to_string()))?;
        let dtype = dtype_of(&settings.dtype)?;
        tracing::info!(
            tp = prepared.plan.tp,
            pp = prepared.plan.pp,
            shards = ?prepared.plan.shards.iter().map(|s| format!("stage {} rank {}: layers {:?} heads {:?} kv {:?} mlp {:?} vocab {:?}", s.stage, s.rank, s.layers, s.q_heads, s.kv_heads, s.mlp_cols, s.vocab_rows)).collect::<Vec<_>>(),
            "shard plan"
        );
        let deadline = Instant::now() + Duration::from_secs(settings.load_timeout_s);
        let assigns = clients
            .into_iter()
            .zip(&prepared.plan.shards)
            .zip(&addrs)
            .map(|(((client, _), spec), addr)| {
                let req = pb::AssignRequest {
                    model_path: prepared.model_path.display().to_string(),
                    tp: prepared.plan.tp as u32,
                    pp: prepared.plan.pp as u32,
                    layers_per_stage: prepared
                        .request
                        .layers_per_stage
                        .iter()
                        .flatten()
                        .map(|&l| l as u32)
                        .collect(),
                    shard: Some(spec.into()),
                    data_addrs: data_addrs.clone(),
                    dtype: dtype as i32,
                    kv_budget_bytes: settings.kv_budget_mib << 20,
                    block_size: settings.block_size as u32,
                    collective_timeout_ms: settings.collective_timeout_ms,
                    session: Some(session.into()),
                    lease_ms: settings.lease_ms,
                    dequantize: settings.dequantize,
                };
                assign(client, req, spec.clone(), addr.clone(), deadline)
            });
        let assigned = join_all(assigns)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let kv_blocks = assigned
            .iter()
            .map(|(_, blocks)| *blocks)
            .min()
            .unwrap_or(0);
        let workers = assigned.into_iter().map(|(link, _)| link).collect();
        tracing::info!(
            kv_blocks,
            block_size = settings.block_size,
            "every worker is ready"
        );
        Ok(Self {
            config: prepared.config,
            plan: prepared.plan,
            kv_blocks,
            block_size: settings.block_size,
            workers,
            step_timeout: Duration::from_millis(settings.step_timeout_ms),
            session,
            next_step: 0,
            _local: local,
        })
    }

    /// A probe that can check the workers while the engine owns the cluster.
    pub fn health_probe(&self) -> HealthProbe {
        HealthProbe {
            workers: self
                .workers
                .iter()
                .map(|w| (w.addr.clone(), w.spec.clone(), w.probe.clone()))
                .collect(),
            session: self.session,
        }
    }

    /// Runs one step on every worker; returns, per sequence, what its sampler asked for (every
    /// logit, or the global top candidates) joined from the last stage's ranks.
    pub async fn step(&mut self, batch: &StepBatch) -> Result<StepOutput, ClusterError> {
        let step_id = self.next_step;
        self.next_step += 1;
        let request = batch.to_wire(step_id, self.session);
        let timeout = self.step_timeout;
        let results = join_all(self.workers.iter_mut().map(|w| {
            let request = request.clone();
            async move {
                let err = |reason: String| ClusterError::Step {
                    addr: w.addr.clone(),
                    stage: w.spec.stage,
                    rank: w.spec.rank,
                    reason,
                };
                w.steps
                    .send(request)
                    .await
                    .map_err(|_| err("the step stream is closed".into()))?;
                let response = tokio::time::timeout(timeout, w.responses.next())
                    .await
                    .map_err(|_| err(format!("no answer within {timeout:?}")))?
                    .ok_or_else(|| err("the worker closed its step stream".into()))?
                    .map_err(|s| err(s.message().to_string()))?;
                if response.step_id != step_id {
                    return Err(err(format!(
                        "answered step {} for step {step_id}",
                        response.step_id
                    )));
                }
                let waited = response.collective_us;
                match response.result {
                    Some(pb::step_response::Result::Output(o)) => Ok((Some(o), waited)),
                    Some(pb::step_response::Result::Done(_)) => Ok((None, waited)),
                    Some(pb::step_response::Result::Error(e)) => Err(err(e)),
                    None => Err(err("empty answer".into())),
                }
            }
        }))
        .await;
        let mut ranks = Vec::new();
        let mut collective_us = 0;
        for (w, r) in self.workers.iter().zip(results) {
            let (output, waited) = r?;
            collective_us = collective_us.max(waited);
            ranks.extend(w.last_stage_logits(output, batch)?);
        }
        let logits = candidates::join_ranks(ranks, batch).map_err(ClusterError::Join)?;
        Ok(StepOutput {
            logits,
            collective: Duration::from_micros(collective_us),
        })
    }
}

/// Checks every worker of a running cluster: loaded and reachable, or why not.
#[derive(Clone)]
pub struct HealthProbe {
    workers: Vec<(String, ShardSpec, WorkerClient<Channel>)>,
    /// Sent with every probe: it renews this coordinator's lease on the workers.
    session: Session,
}

impl HealthProbe {
    /// Ok when every worker answers Info within `timeout` and reports Ready.
    pub async fn check(&self, timeout: Duration) -> Result<(), String> {
        let answers = join_all(self.workers.iter().map(|(addr, spec, client)| {
            let mut client = client.clone();
            let request = pb::InfoRequest {
                session: Some(self.session.into()),
            };
            async move {
                let why = |reason: String| {
                    format!(
                        "worker {addr} (stage {}, rank {}): {reason}",
                        spec.stage, spec.rank
                    )
                };
                let info = tokio::time::timeout(timeout, client.info(request))
                    .await
                    .map_err(|_| why(format!("no answer within {timeout:?}")))?
                    .map_err(|s| why(format!("unreachable: {}", s.message())))?
                    .into_inner();
                match pb::WorkerState::try_from(info.state) {
                    Ok(pb::WorkerState::Ready) => Ok(()),
                    _ if !info.error.is_empty() => Err(why(info.error)),
                    Ok(state) => Err(why(format!("not ready ({state})"))),
                    Err(_) => Err(why(format!("not ready (unknown state {})", info.state))),
                }
            }
        }))
        .await;
        answers.into_iter().collect()
    }
}

/// One step's result.
#[derive(Debug)]
pub struct StepOutput {
    /// Per sequence of the batch, in order.
    pub logits: Vec<SeqLogits>,
    /// The longest time any worker spent in all-reduces and hand-offs.
    pub collective: Duration,
}

async fn connect_worker(
    addr: &str,
    timeout: Duration,
) -> Result<(WorkerClient<Channel>, pb::InfoResponse), ClusterError> {
    let unreachable = |reason: String| ClusterError::Unreachable {
        addr: addr.to_string(),
        reason,
    };
    let endpoint = Channel::from_shared(format!("http://{addr}"))
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        // Logits of a batch are megabytes: HTTP/2's default 64 KiB window would stall every
        // step on window updates.
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    let channel = tokio::time::timeout(timeout, endpoint.connect())
        .await
        .map_err(|_| unreachable(format!("no connection within {timeout:?}")))?
        .map_err(|e| unreachable(source_chain(&e)))?;
    let mut client = WorkerClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let info = tokio::time::timeout(timeout, client.info(pb::InfoRequest::default()))
        .await
        .map_err(|_| unreachable(format!("no answer within {timeout:?}")))?
        .map_err(|s| unreachable(s.message().to_string()))?
        .into_inner();
    match pb::WorkerState::try_from(info.state) {
        Ok(pb::WorkerState::Idle) => {}
        Ok(state) => {
            return Err(unreachable(format!(
                "it is {state}, not idle; give the cluster fresh workers"
            )))
        }
        Err(_) => {
            return Err(unreachable(format!(
                "it reports an unknown state {}, not idle; give the cluster fresh workers",
                info.state
            )))
        }
    }
    Ok((client, info))
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Assigns one shard, logs its loading progress, and opens its step stream once it is ready.
async fn assign(
    mut client: WorkerClient<Channel>,
    req: pb::AssignRequest,
    spec: ShardSpec,
    addr: String,
    deadline: Instant,
) -> Result<(WorkerLink, usize), ClusterError> {
    let load_err = |reason: String| ClusterError::Load {
        addr: addr.clone(),
        stage: spec.stage,
        rank: spec.rank,
        reason,
    };
    // The assignment stream lives as long as loading; no per-call deadline on it.
    let mut events = client
        .assign(req)
        .await
        .map_err(|s| load_err(s.message().to_string()))?
        .into_inner();
    let mut last_log = Instant::now();
    let kv_blocks = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, events.next())
            .await
            .map_err(|_| load_err("loading did not finish before the load timeout".into()))?
            .ok_or_else(|| load_err("the worker ended the assignment without Ready".into()))?
            .map_err(|s| load_err(s.message().to_string()))?;
        match event.event {
            Some(pb::load_event::Event::Progress(p))
                if last_log.elapsed() >= Duration::from_secs(1) =>
            {
                last_log = Instant::now();
                tracing::info!(
                    worker = %addr,
                    stage = spec.stage,
                    rank = spec.rank,
                    loaded_mib = p.bytes_loaded >> 20,
                    total_mib = p.bytes_total >> 20,
                    "loading shard"
                );
            }
            Some(pb::load_event::Event::Ready(r)) => {
                tracing::info!(
                    worker = %addr,
                    stage = spec.stage,
                    rank = spec.rank,
                    weight_mib = r.weight_bytes >> 20,
                    kv_blocks = r.kv_blocks,
                    "shard ready"
                );
                break r.kv_blocks as usize;
            }
            _ => {}
        }
    };
    let (steps, rx) = mpsc::channel(4);
    let responses = client
        .clone()
        .steps(ReceiverStream::new(rx))
        .await
        .map_err(|s| load_err(format!("opening the step stream: {}", s.message())))?
        .into_inner();
    Ok((
        WorkerLink {
            probe: client,
            addr,
            spec,
            steps,
            responses,
        },
        kv_blocks,
    ))
}

/// The data-plane address peers should dial: a worker listening on every interface (0.0.0.0 or
/// [::]) reports that, so its host is taken from the address the coordinator reached it at.
fn reachable_data_addr(data_addr: &str, grpc_addr: &str) -> String {
    match data_addr.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => {
            let host = grpc_addr.rsplit_once(':').map_or(grpc_addr, |(h, _)| h);
            format!("{host}:{}", a.port())
        }
        _ => data_addr.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn unspecified_data_hosts_take_the_workers_host() {
        use super::reachable_data_addr as r;
        assert_eq!(r("0.0.0.0:4100", "10.0.0.7:50051"), "10.0.0.7:4100");
        assert_eq!(
            r("[::]:4100", "worker-3.gemma:50051"),
            "worker-3.gemma:4100"
        );
        assert_eq!(r("127.0.0.1:4100", "localhost:50051"), "127.0.0.1:4100");
    }
}
