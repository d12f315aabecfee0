//! The cluster as the coordinator sees it: the plan, one connection and one step stream per
//! worker, the session that holds them, and the local worker processes when it started them
//! itself. It notices a lost worker (a step's deadline, a closed stream, the prober) and heals:
//! it re-dials every worker and re-assigns the whole group under the next epoch.
//!
//! - `link`: one worker's connection (dialled, version-checked) and one epoch's step stream;
//! - `assign`: assigning the whole group under one session;
//! - `deadline`: how long a step may take;
//! - `heal`: re-dialling with backoff and re-assigning;
//! - `probe`: the every-second Info on every worker (lease renewal, idle detection), `Release`;
//! - `status`: whether the cluster serves, shared with the engine and the API;
//! - `spawn`: local workers, respawned when they die.

mod assign;
pub mod deadline;
mod heal;
pub mod link;
pub mod probe;
pub mod spawn;
pub mod status;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use gemma_proto::{
    candidates, pb, ModelConfig, ModelFiles, PlanRequest, SeqLogits, Session, ShardPlan, StepBatch,
    WireError,
};

use crate::settings::Settings;
use assign::AssignTemplate;
use deadline::StepDeadline;
use gemma_proto::tls::TlsIdentity;
pub use link::Dialer;
use link::{shard_name, Miss, StepStream, WorkerLink};
pub use probe::{Prober, Roster};
pub use spawn::LocalWorkers;
pub use status::{Availability, ClusterStatus};

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
    #[error(
        "worker {addr} runs gemma-worker {theirs}, but this coordinator is {ours}; run the same \
         release on both sides"
    )]
    Version {
        addr: String,
        theirs: String,
        ours: &'static str,
    },
    #[error("worker {addr} (stage {stage}, rank {rank}) is held by another coordinator: {reason}")]
    Held {
        addr: String,
        stage: usize,
        rank: usize,
        reason: String,
    },
    #[error(
        "the re-assigned workers hold {now} KV blocks, fewer than the {before} the engine \
         schedules; give them the same kv_budget_mib as before"
    )]
    KvShrunk { before: usize, now: usize },
    #[error(
        "kv_memory_fraction {0} is outside (0, 1]; give a fraction of the host's memory, or \
         kv_budget_mib"
    )]
    KvFraction(f64),
    /// The cluster was already down (or went down during the step): why.
    #[error("{0}")]
    Lost(String),
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
    #[error(transparent)]
    Tls(#[from] gemma_proto::tls::TlsError),
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
    /// How the workers are reached: the connection deadline, and mutual TLS when configured
    /// (its files are read and checked here, before any process starts).
    pub dialer: Dialer,
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
        let fraction = settings.kv_memory_fraction;
        if settings.kv_budget_mib.is_none() && !(fraction > 0.0 && fraction <= 1.0) {
            return Err(ClusterError::KvFraction(fraction));
        }
        Ok(Self {
            model_path,
            tokenizer_dir: files.tokenizer_dir,
            config,
            plan,
            request,
            dialer: Dialer {
                timeout: Duration::from_millis(settings.connect_timeout_ms),
                tls: TlsIdentity::from_options(
                    settings.tls_cert.as_deref(),
                    settings.tls_key.as_deref(),
                    settings.tls_ca.as_deref(),
                )?,
            },
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
        // Local workers present the coordinator's own certificate: one identity on one host.
        let tls_flags = match (&settings.tls_cert, &settings.tls_key, &settings.tls_ca) {
            (Some(c), Some(k), Some(ca)) => [("--tls-cert", c), ("--tls-key", k), ("--tls-ca", ca)]
                .iter()
                .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
                .collect(),
            _ => Vec::new(),
        };
        LocalWorkers::spawn(&bin, self.plan.world_size(), threads, tls_flags).map(Some)
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

/// A loaded, connected cluster, ready to step; when a worker is lost it stays down until
/// `heal` has re-assigned the group.
pub struct Cluster {
    pub config: ModelConfig,
    pub plan: ShardPlan,
    /// KV blocks every shard holds (the smallest pool of any shard), as first assigned: the
    /// engine's pool; a re-assignment must hold at least as many.
    pub kv_blocks: usize,
    /// Whether `kv_blocks` is known (the group was assigned once).
    assigned_once: bool,
    pub block_size: usize,
    template: AssignTemplate,
    /// gRPC address of each shard's worker, plan order (a respawned local worker's is new).
    addrs: Vec<String>,
    /// The session and links, shared with the prober.
    roster: Roster,
    /// One per worker while serving; empty while down.
    streams: Vec<StepStream>,
    /// This coordinator's hold on the workers; every step carries it.
    session: Session,
    deadline: StepDeadline,
    next_step: u64,
    status: ClusterStatus,
    /// The loss that took the cluster down, kept while healing reports its progress.
    lost: Option<String>,
    dialer: Dialer,
    /// Dropped after the streams: stops the local workers.
    local: Option<LocalWorkers>,
}

impl Cluster {
    /// Connects to every worker, assigns the shards, waits until all are loaded and meshed.
    /// A worker that cannot be reached, or runs another version, ends it here; one held by
    /// another coordinator (a predecessor that died) is waited for until its lease runs out.
    pub async fn connect(
        prepared: Prepared,
        settings: &Settings,
        local: Option<LocalWorkers>,
    ) -> Result<Self, ClusterError> {
        let addrs = match &local {
            Some(l) => l.addrs.clone(),
            None => settings.workers.clone(),
        };
        let dialer = prepared.dialer.clone();
        let template = AssignTemplate::new(&prepared, settings)?;
        // Epoch 0 is never assigned: the first assignment is epoch 1.
        let session = Session {
            epoch: 0,
            ..Session::start().map_err(|e| ClusterError::Session(e.to_string()))?
        };
        let links = dial_all(&addrs, &prepared.plan, &dialer)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .map(|(link, _)| link)
            .collect();
        let mut cluster = Self {
            config: prepared.config,
            plan: prepared.plan,
            kv_blocks: 0,
            assigned_once: false,
            block_size: settings.block_size,
            template,
            addrs,
            roster: Roster::new(session, links),
            streams: Vec::new(),
            session,
            deadline: StepDeadline::new(settings.step_timeout_ms.map(Duration::from_millis)),
            next_step: 0,
            status: ClusterStatus::down(0, "starting: assigning the shards".into()),
            lost: None,
            dialer,
            local,
        };
        cluster.assign_at_start(settings.load_timeout_s).await?;
        Ok(cluster)
    }

    /// Whether the cluster serves, for the engine, the prober and the API.
    pub fn status(&self) -> &ClusterStatus {
        &self.status
    }

    /// The session and links the prober checks (and `Release` gives up at shutdown).
    pub fn roster(&self) -> Roster {
        self.roster.clone()
    }

    /// How long the engine may wait for a step of `tokens` tokens.
    pub fn deadline(&self, tokens: usize) -> Duration {
        self.deadline.for_tokens(tokens)
    }

    /// Runs one step on every worker and waits for its answer: [`Cluster::send`], then
    /// [`Cluster::receive`].
    pub async fn step(&mut self, batch: &StepBatch) -> Result<StepOutput, ClusterError> {
        let sent = self.send(batch).await?;
        self.receive(sent, batch).await
    }

    /// Sends a step to every worker without waiting for its answer, so that several steps can
    /// be in the pipeline at once (stage 0 on the newest while later stages finish older ones).
    /// Every worker runs its steps in the order sent, and answers them in that order.
    pub async fn send(&mut self, batch: &StepBatch) -> Result<SentStep, ClusterError> {
        if self.streams.is_empty() {
            return Err(self.already_down());
        }
        let step_id = self.next_step;
        self.next_step += 1;
        let links = self.roster.links();
        let requests = self.requests(batch, step_id, &links);
        let sends = join_all(
            self.streams
                .iter_mut()
                .zip(requests)
                .map(|(s, request)| s.send(request)),
        );
        let misses: Vec<(usize, Miss)> = sends
            .await
            .into_iter()
            .enumerate()
            .filter_map(|(i, sent)| sent.err().map(|miss| (i, miss)))
            .collect();
        if !misses.is_empty() {
            let error = self.diagnose(&links, misses).await;
            return Err(self.go_down(error));
        }
        Ok(SentStep {
            step_id,
            epoch: self.session.epoch,
            sent: Instant::now(),
        })
    }

    /// Waits for the answers to `sent`, the oldest step not yet received, from every worker;
    /// returns, per sequence, what its sampler asked for (every logit, or the global top
    /// candidates) joined from the last stage's ranks. A worker that fails, closes its stream or
    /// misses the deadline takes the cluster down (see `heal`). The deadline counts from now:
    /// the steps sent before this one have been answered, so only this one's own work is left.
    pub async fn receive(
        &mut self,
        sent: SentStep,
        batch: &StepBatch,
    ) -> Result<StepOutput, ClusterError> {
        if self.streams.is_empty() || sent.epoch != self.session.epoch {
            return Err(self.already_down());
        }
        let deadline = self.deadline.for_tokens(batch.num_tokens());
        let started = Instant::now().max(sent.sent);
        let status = self.status.clone();
        let exchanges = join_all(
            self.streams
                .iter_mut()
                .map(|s| s.answer(sent.epoch, sent.step_id, deadline)),
        );
        // The prober may find a worker lost before the deadline does (a hung process).
        let answers = tokio::select! {
            answers = exchanges => Some(answers),
            () = status.lost() => None,
        };
        let Some(answers) = answers else {
            let why = self.status.outage().unwrap_or_default();
            self.streams.clear();
            self.lost = Some(why.clone());
            return Err(ClusterError::Lost(why));
        };
        let links = self.roster.links();
        let mut misses = Vec::new();
        let mut outputs = Vec::with_capacity(answers.len());
        for (i, answer) in answers.into_iter().enumerate() {
            match answer.and_then(into_result) {
                Ok(output) => outputs.push(output),
                Err(miss) => misses.push((i, miss)),
            }
        }
        if !misses.is_empty() {
            let error = self.diagnose(&links, misses).await;
            return Err(self.go_down(error));
        }
        self.deadline.record(batch.num_tokens(), started.elapsed());
        let mut ranks = Vec::new();
        let mut collective_us = 0;
        for (link, (output, waited)) in links.iter().zip(outputs) {
            collective_us = collective_us.max(waited);
            match last_stage_logits(link, output, batch) {
                Ok(logits) => ranks.extend(logits),
                Err(e) => return Err(self.go_down(e)),
            }
        }
        let logits = candidates::join_ranks(ranks, batch).map_err(ClusterError::Join)?;
        Ok(StepOutput {
            logits,
            collective: Duration::from_micros(collective_us),
        })
    }

    /// The step's request for each worker, in link order: one for all unless structured output
    /// masks are cut to each last-stage rank's vocabulary slice.
    fn requests(
        &self,
        batch: &StepBatch,
        step_id: u64,
        links: &[WorkerLink],
    ) -> Vec<pb::StepRequest> {
        if batch.has_token_masks() {
            return links
                .iter()
                .map(|l| batch.to_wire_for(step_id, self.session, &l.spec))
                .collect();
        }
        let request = batch.to_wire(step_id, self.session);
        vec![request; self.streams.len()]
    }

    /// Why no step can run: the cluster is down (or a step belongs to an epoch already lost).
    fn already_down(&self) -> ClusterError {
        let why = self
            .status
            .outage()
            .unwrap_or_else(|| "the cluster is down".into());
        ClusterError::Lost(why)
    }

    /// Names the worker that broke a step. A vanished worker outranks a late one, and a late
    /// one a worker whose own step failed (usually because its peer vanished). Among late
    /// workers, those that do not answer Info either are the hung ones: a worker merely
    /// waiting on a hung peer still answers.
    async fn diagnose(&self, links: &[WorkerLink], mut misses: Vec<(usize, Miss)>) -> ClusterError {
        let late: Vec<usize> = misses
            .iter()
            .filter(|(_, m)| matches!(m, Miss::Late(_)))
            .map(|(i, _)| *i)
            .collect();
        if late.len() > 1 {
            let probes = join_all(
                late.iter()
                    .map(|&i| links[i].info(Some(self.session), Duration::from_millis(500))),
            )
            .await;
            let silent: Vec<usize> = late
                .iter()
                .zip(probes)
                .filter(|(_, p)| p.is_err())
                .map(|(&i, _)| i)
                .collect();
            if !silent.is_empty() {
                misses.retain(|(i, m)| !matches!(m, Miss::Late(_)) || silent.contains(i));
            }
        }
        let worst = misses.iter().map(|(_, m)| m).max().cloned();
        let named: Vec<String> = misses
            .iter()
            .filter(|(_, m)| Some(m) == worst.as_ref())
            .map(|(i, m)| format!("{}: {}", links[*i].name(), m.reason()))
            .collect();
        if let [(i, m)] = misses.as_slice() {
            let link = &links[*i];
            return ClusterError::Step {
                addr: link.addr.clone(),
                stage: link.spec.stage,
                rank: link.spec.rank,
                reason: m.reason(),
            };
        }
        ClusterError::Lost(named.join("; "))
    }

    /// Drops every step stream and marks this epoch lost, naming why; returns the error.
    fn go_down(&mut self, error: ClusterError) -> ClusterError {
        let reason = format!("lost {error}");
        tracing::error!(%reason, session = %self.session, "the cluster is down; healing");
        self.streams.clear();
        self.status.lose(self.session.epoch, &reason);
        self.lost = self.status.outage();
        error
    }
}

/// Dials every worker at once.
async fn dial_all(
    addrs: &[String],
    plan: &ShardPlan,
    dialer: &Dialer,
) -> Vec<Result<(WorkerLink, pb::InfoResponse), ClusterError>> {
    join_all(
        addrs
            .iter()
            .zip(&plan.shards)
            .map(|(addr, spec)| link::dial(addr, spec, dialer)),
    )
    .await
}

/// A worker's answer to a step: the last stage's output, if any, and its collective wait.
fn into_result(response: pb::StepResponse) -> Result<(Option<pb::LastStageOutput>, u64), Miss> {
    let waited = response.collective_us;
    match response.result {
        Some(pb::step_response::Result::Output(o)) => Ok((Some(o), waited)),
        Some(pb::step_response::Result::Done(_)) => Ok((None, waited)),
        Some(pb::step_response::Result::Error(e)) => Err(Miss::Failed(e)),
        None => Err(Miss::Failed("an empty answer".into())),
    }
}

/// This worker's vocabulary slice of the step's logits, checked against the step: a last stage
/// must answer with one, any other stage without.
fn last_stage_logits(
    link: &WorkerLink,
    output: Option<pb::LastStageOutput>,
    batch: &StepBatch,
) -> Result<Option<Vec<SeqLogits>>, ClusterError> {
    let spec = &link.spec;
    let wrong = |reason: &str| ClusterError::Step {
        addr: link.addr.clone(),
        stage: spec.stage,
        rank: spec.rank,
        reason: reason.to_string(),
    };
    match (output, spec.is_last_stage()) {
        (Some(o), true) => o
            .into_logits(batch, &spec.vocab_rows)
            .map(Some)
            .map_err(|source| ClusterError::Answer {
                addr: link.addr.clone(),
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

/// A step sent to every worker whose answers are still to come ([`Cluster::receive`]).
#[derive(Debug)]
pub struct SentStep {
    step_id: u64,
    /// The session's epoch it was sent under: a step of a lost epoch has no answer to wait for.
    epoch: u64,
    sent: Instant,
}

/// One step's result.
#[derive(Debug)]
pub struct StepOutput {
    /// Per sequence of the batch, in order.
    pub logits: Vec<SeqLogits>,
    /// The longest time any worker spent in all-reduces and hand-offs.
    pub collective: Duration,
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
