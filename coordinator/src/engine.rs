//! The generation engine: one task that owns the cluster and runs iteration-level (continuous)
//! batching, as vLLM's scheduler does:
//! - requests join the running batch between steps, while their KV blocks are free;
//! - every step carries each running sequence's next token, then prefill chunks of the others
//!   under a per-step token budget, so long prompts never stall running requests;
//! - a sequence that cannot grow when the pool is full preempts the newest running sequence,
//!   whose blocks are freed and whose tokens are recomputed when it is readmitted;
//! - a request whose client went away is dropped between steps, and its blocks freed;
//! - with prefix caching, a sequence starts past the longest run of its leading blocks the
//!   cache holds, and registers each of its blocks once full and computed; a request that
//!   would share blocks another sequence is still prefilling waits for them (so `n > 1`
//!   choices and concurrent conversations prefill a common prompt once);
//! - with a pipeline (pp stages) up to pp steps are in flight at once, each carrying its own
//!   sequences (a micro-batch), so every stage computes while the others do; a sequence joins
//!   its next step only once its token is sampled (`pipeline_overlap`);
//! - the waiting queue is bounded: past it, submissions are refused at once;
//! - a cluster that loses a worker fails every request it holds and is healed by this loop,
//!   which meanwhile refuses new requests at once (503) and keeps its heartbeat going, so that
//!   `/health` tells a wedged engine from a cluster that is merely down.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gemma_proto::{KvAllocation, KvBlockManager, SeqStep, StepBatch};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::cluster::{Cluster, ClusterError, ClusterStatus, SentStep, StepOutput};
use crate::metrics::{Metrics, Outcome};
use crate::sampler::{Draw, SampleError, Sampled, Sampler, SamplingParams};
use crate::structured::{Constraint, GrammarError, Progress};
use crate::tokenizer::{IncrementalDecoder, TextTokenizer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// max_tokens or the context length.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("the prompt and max_tokens need {needed} KV blocks but the cluster holds {total}")]
    TooLong { needed: usize, total: usize },
    #[error("the server is at capacity ({waiting} requests waiting); retry shortly")]
    QueueFull { waiting: usize },
    /// Shared by every request the failed step took down.
    #[error("cluster step failed: {0}")]
    Cluster(Arc<ClusterError>),
    /// The cluster is down and healing: refused at once rather than queued.
    #[error("the cluster cannot serve now; retry shortly: {0}")]
    Unavailable(String),
    #[error("sampling: {0}")]
    Sample(#[from] SampleError),
    #[error("detokenizing: {0}")]
    Decode(String),
    #[error("structured output: {0}")]
    Grammar(#[from] GrammarError),
    #[error("the engine has stopped")]
    Stopped,
}

/// What a request asks the engine for.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Some(k): report log-probabilities with k alternatives per token.
    pub logprobs: Option<usize>,
    pub max_tokens: usize,
    /// No stop token is drawn and no stop string ends the output before this many tokens
    /// (vLLM's `min_tokens`); at most `max_tokens`.
    pub min_tokens: usize,
    pub stop: Vec<String>,
    /// Generate through the stop tokens (<eos>, <end_of_turn>) until `max_tokens` or a stop
    /// string: a run whose length is known in advance (vLLM's `ignore_eos`).
    pub ignore_eos: bool,
    /// Structured output: the grammar the output must follow (each choice its own copy). The
    /// sequence ends when it is complete, `ignore_eos` or not.
    pub constraint: Option<Constraint>,
}

/// One generated token as the client sees it.
#[derive(Debug, Clone)]
pub struct TokenEvent {
    /// Text this token completes; empty while a character or a possible stop string is pending.
    pub text: String,
    pub sampled: Sampled,
    /// Prompt tokens whose KV came from the prefix cache (known since admission).
    pub cached_tokens: usize,
}

#[derive(Debug, Clone)]
pub enum Event {
    Token(TokenEvent),
    Done {
        finish_reason: FinishReason,
        prompt_tokens: usize,
        /// Prompt tokens whose KV came from the prefix cache at admission.
        cached_tokens: usize,
        completion_tokens: usize,
        /// Text held back until the end (a partial stop-string match that was not one).
        tail: String,
    },
    Error(EngineError),
}

/// A whole generation, for non-streaming answers.
#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<Sampled>,
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
    pub finish_reason: FinishReason,
}

struct Request {
    spec: RequestSpec,
    events: Events,
    arrived: Instant,
}

/// Where a request's events go. Tokens are sent by reference; the last event (`Done` or
/// `Error`) consumes the sender, so nothing can follow it.
struct Events(mpsc::UnboundedSender<Event>);

impl Events {
    fn token(&self, token: TokenEvent) {
        // A client that went away is noticed between steps (`cancelled`).
        let _ = self.0.send(Event::Token(token));
    }

    fn finish(self, last: Event) {
        let _ = self.0.send(last);
    }

    /// The client dropped its receiver.
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// How often the engine loop stamps its heartbeat while it waits (idle, or healing).
const BEAT: Duration = Duration::from_secs(1);

/// When the engine loop last made progress, and until when it may be busy in a step: what
/// `/health` reads to tell a wedged engine (restart the coordinator) from a busy or idle one.
#[derive(Clone)]
pub struct Heartbeat(Arc<Mutex<Beat>>);

#[derive(Clone, Copy)]
struct Beat {
    last: tokio::time::Instant,
    /// The deadline of the step in progress: the loop may be silent until then.
    busy_until: Option<tokio::time::Instant>,
}

impl Heartbeat {
    fn new() -> Self {
        Self(Arc::new(Mutex::new(Beat {
            last: tokio::time::Instant::now(),
            busy_until: None,
        })))
    }

    fn update(&self, f: impl FnOnce(&mut Beat)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// The loop made progress.
    fn beat(&self) {
        self.update(|b| {
            b.last = tokio::time::Instant::now();
            b.busy_until = None;
        });
    }

    /// The loop waits, for a step or the next beat, at most `deadline`.
    fn busy_for(&self, deadline: Duration) {
        self.update(|b| {
            let now = tokio::time::Instant::now();
            b.last = now;
            b.busy_until = Some(now + deadline);
        });
    }

    /// How long the loop has been silent, when that is more than `grace` past what it may take.
    pub fn stalled(&self, grace: Duration) -> Option<Duration> {
        let beat = *self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        let due = beat.busy_until.unwrap_or(beat.last).max(beat.last);
        (now.saturating_duration_since(due) > grace).then(|| now - beat.last)
    }
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<Request>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    pub metrics: Arc<Metrics>,
    kv: KvBlockManager,
    status: ClusterStatus,
    heartbeat: Heartbeat,
    wedged_after: Duration,
}

impl EngineHandle {
    /// Queues a request; its events arrive on the returned receiver. Dropping the receiver
    /// cancels the request and frees its KV blocks. While the cluster is down the request is
    /// refused at once: it would only wait for a healing of unknown length.
    pub fn submit(&self, spec: RequestSpec) -> Result<mpsc::UnboundedReceiver<Event>, EngineError> {
        if let Some(reason) = self.status.outage() {
            self.metrics.outcome(Outcome::Unavailable);
            return Err(EngineError::Unavailable(reason));
        }
        let waiting = self.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            self.metrics.outcome(Outcome::Rejected);
            return Err(EngineError::QueueFull { waiting });
        }
        let (events, rx) = mpsc::unbounded_channel();
        let request = Request {
            spec,
            events: Events(events),
            arrived: Instant::now(),
        };
        if self.tx.send(request).is_err() {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Stopped);
        }
        Ok(rx)
    }

    /// Runs a request to the end.
    pub async fn generate(&self, spec: RequestSpec) -> Result<Generation, EngineError> {
        let mut rx = self.submit(spec)?;
        let mut text = String::new();
        let mut tokens = Vec::new();
        while let Some(event) = rx.recv().await {
            match event {
                Event::Token(t) => {
                    text.push_str(&t.text);
                    tokens.push(t.sampled);
                }
                Event::Done {
                    finish_reason,
                    prompt_tokens,
                    cached_tokens,
                    tail,
                    ..
                } => {
                    text.push_str(&tail);
                    return Ok(Generation {
                        text,
                        tokens,
                        prompt_tokens,
                        cached_tokens,
                        finish_reason,
                    });
                }
                Event::Error(e) => return Err(e),
            }
        }
        Err(EngineError::Stopped)
    }

    /// KV blocks held by sequences now (a block shared by several counts once).
    pub fn kv_blocks_used(&self) -> usize {
        self.kv.used_blocks()
    }

    /// Cached prefix blocks no sequence holds: kept for reuse, evicted when space is needed.
    pub fn kv_blocks_cached(&self) -> usize {
        self.kv.cached_blocks()
    }

    /// Tokens the cluster's KV pool holds (blocks x block size): no sequence's prompt and output
    /// together can grow past it, so the API refuses such a request before it is queued.
    pub fn kv_capacity_tokens(&self) -> usize {
        self.kv.total_blocks() * self.kv.block_size()
    }

    /// Whether the cluster serves, and why not.
    pub fn cluster_status(&self) -> &ClusterStatus {
        &self.status
    }

    /// Some(silence) when the engine loop is wedged: no progress for longer than a step's
    /// deadline plus `wedged_after`. Idle, busy or healing engines are not.
    pub fn wedged(&self) -> Option<Duration> {
        self.heartbeat.stalled(self.wedged_after)
    }
}

/// What the engine needs of a cluster: the shape of its KV pool, steps sent and answered in
/// order (several may be in flight: a pipeline's stages work on different steps at once),
/// whether it serves, and healing when it does not. [`Cluster`] is the real one; the engine's
/// tests step a stand-in.
pub trait StepCluster: Send + 'static {
    /// A step sent and not yet answered.
    type Sent: Send;
    /// KV blocks every shard holds.
    fn kv_blocks(&self) -> usize;
    fn block_size(&self) -> usize;
    /// How long a step of `tokens` tokens may take before the cluster gives up on it.
    fn deadline(&self, tokens: usize) -> Duration;
    /// Whether the cluster serves; a failed step marks it down.
    fn status(&self) -> &ClusterStatus;
    /// Sends a step without waiting for its answer.
    fn send(
        &mut self,
        batch: &StepBatch,
    ) -> impl Future<Output = Result<Self::Sent, ClusterError>> + Send;
    /// The answer to `sent`, the oldest step sent and not yet received; `batch` is what it
    /// carried.
    fn receive(
        &mut self,
        sent: Self::Sent,
        batch: &StepBatch,
    ) -> impl Future<Output = Result<StepOutput, ClusterError>> + Send;
    /// Brings a down cluster back; returns once it serves.
    fn heal(&mut self) -> impl Future<Output = ()> + Send;
}

impl StepCluster for Cluster {
    type Sent = SentStep;

    fn kv_blocks(&self) -> usize {
        self.kv_blocks
    }

    fn block_size(&self) -> usize {
        self.block_size
    }

    fn deadline(&self, tokens: usize) -> Duration {
        Cluster::deadline(self, tokens)
    }

    fn status(&self) -> &ClusterStatus {
        Cluster::status(self)
    }

    fn send(
        &mut self,
        batch: &StepBatch,
    ) -> impl Future<Output = Result<SentStep, ClusterError>> + Send {
        Cluster::send(self, batch)
    }

    fn receive(
        &mut self,
        sent: SentStep,
        batch: &StepBatch,
    ) -> impl Future<Output = Result<StepOutput, ClusterError>> + Send {
        Cluster::receive(self, sent, batch)
    }

    fn heal(&mut self) -> impl Future<Output = ()> + Send {
        Cluster::heal(self)
    }
}

pub struct EngineConfig {
    pub max_batch_tokens: usize,
    pub max_running: usize,
    pub max_waiting: usize,
    pub max_context: usize,
    /// Reuse the KV of cached prompt prefixes (`prefix_caching`).
    pub prefix_caching: bool,
    /// Most steps in flight at once: the pipeline's stages with `pipeline_overlap`, else 1.
    /// Each carries its own sequences (a micro-batch), about 1/depth of those running.
    pub pipeline_depth: usize,
    /// `/health` fails once the engine loop is this late past what it may take.
    pub wedged_after: Duration,
}

/// Starts the engine task; it ends when every handle is dropped.
pub fn spawn<C: StepCluster>(
    cluster: C,
    tokenizer: Arc<TextTokenizer>,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
) -> EngineHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let kv = KvBlockManager::new(cluster.kv_blocks(), cluster.block_size())
        .with_prefix_caching(cfg.prefix_caching);
    metrics.kv_blocks_total.set(cluster.kv_blocks() as i64);
    let waiting = Arc::new(AtomicUsize::new(0));
    let heartbeat = Heartbeat::new();
    let handle = EngineHandle {
        tx,
        waiting: waiting.clone(),
        max_waiting: cfg.max_waiting,
        metrics: metrics.clone(),
        kv: kv.clone(),
        status: cluster.status().clone(),
        heartbeat: heartbeat.clone(),
        wedged_after: cfg.wedged_after,
    };
    let engine = Engine {
        cluster,
        requests: rx,
        tokenizer,
        cfg,
        kv,
        metrics,
        waiting_count: waiting,
        waiting: VecDeque::new(),
        running: Vec::new(),
        in_flight: VecDeque::new(),
        next_step: 0,
        next_id: 0,
        stepped_since_trim: false,
        heartbeat,
    };
    tokio::spawn(engine.run().instrument(tracing::info_span!("engine")));
    handle
}

struct Sequence {
    id: u64,
    request: Request,
    kv: KvAllocation,
    /// Tokens of prompt + output already in the KV cache (reused from the prefix cache, or
    /// computed).
    cached: usize,
    /// Prompt tokens reused from the prefix cache at its first admission (the usage's
    /// `cached_tokens`).
    prompt_cached: usize,
    /// prompt ++ generated: what a preempted sequence recomputes.
    context: Vec<u32>,
    generated: usize,
    sampler: Sampler,
    /// Structured output's grammar state; the sampler holds its mask for the next draw.
    constraint: Option<Constraint>,
    decoder: IncrementalDecoder,
    /// All text so far and how much of it the client has.
    text: String,
    sent: usize,
    /// Where stop strings may start in `text`: past the text of the tokens before min_tokens.
    stops_from: usize,
    last_token_at: Option<Instant>,
    /// The engine's number of the step carrying it, until that step's answer is taken: no
    /// other step may carry it meanwhile (its next token is not known yet). Only that step's
    /// answer applies to it (a sequence preempted and readmitted meanwhile ignores it).
    in_flight: Option<u64>,
}

impl Sequence {
    /// `stop_ids`: the tokens that end a generation, never drawn before `min_tokens`. A grammar
    /// that cannot give its first mask fails the request.
    fn new(
        id: u64,
        mut request: Request,
        kv: KvAllocation,
        stop_ids: &[u32],
    ) -> Result<Self, Box<(Request, GrammarError)>> {
        let mut constraint = request.spec.constraint.take();
        let s = &request.spec;
        let sampler = match s.logprobs {
            Some(k) => Sampler::with_logprobs(s.params.clone(), &s.prompt, k),
            None => Sampler::new(s.params.clone(), &s.prompt),
        };
        let banned = match s.ignore_eos {
            true => &[][..],
            false => stop_ids,
        };
        let mut sampler = sampler.with_min_tokens(s.min_tokens, banned);
        if let Some(c) = &mut constraint {
            match c.next_mask() {
                Ok(mask) => sampler.set_allowed(mask),
                Err(e) => return Err(Box::new((request, e))),
            }
        }
        Ok(Self {
            id,
            constraint,
            context: s.prompt.clone(),
            sampler,
            request,
            cached: kv.reused_tokens(),
            prompt_cached: kv.reused_tokens(),
            kv,
            generated: 0,
            decoder: IncrementalDecoder::default(),
            text: String::new(),
            sent: 0,
            stops_from: 0,
            last_token_at: None,
            in_flight: None,
        })
    }

    fn prompt_len(&self) -> usize {
        self.request.spec.prompt.len()
    }

    fn is_decoding(&self) -> bool {
        self.cached + 1 == self.context.len()
    }

    fn cancelled(&self) -> bool {
        self.request.events.is_closed()
    }

    /// Ends the sequence and tells its client why. Consuming the sequence is the point: its KV
    /// blocks go back to the pool before its last event exists, so a client that has seen its
    /// request end (and the `/metrics` it reads next) finds them free.
    fn finish(self, outcome: Result<FinishReason, EngineError>, metrics: &Metrics) {
        let Sequence {
            request,
            kv,
            mut text,
            sent,
            generated,
            prompt_cached,
            ..
        } = self;
        drop(kv);
        let last = match outcome {
            Ok(finish_reason) => {
                metrics.outcome(Outcome::Finished);
                metrics
                    .e2e_latency
                    .observe(request.arrived.elapsed().as_secs_f64());
                Event::Done {
                    finish_reason,
                    prompt_tokens: request.spec.prompt.len(),
                    cached_tokens: prompt_cached,
                    completion_tokens: generated,
                    tail: text.split_off(sent),
                }
            }
            Err(e) => {
                metrics.outcome(Outcome::Failed);
                Event::Error(e)
            }
        };
        request.events.finish(last);
    }
}

/// A waiting request, fresh or preempted (then it keeps its sampler and output).
enum Waiting {
    Fresh(Request),
    Preempted(Box<Sequence>),
}

impl Waiting {
    /// Refuses the request with `error`; a preempted one holds no blocks, but ends as every
    /// sequence does.
    fn fail(self, error: EngineError, metrics: &Metrics) {
        match self {
            Waiting::Fresh(r) => {
                metrics.outcome(Outcome::Failed);
                r.events.finish(Event::Error(error));
            }
            Waiting::Preempted(s) => s.finish(Err(error), metrics),
        }
    }

    fn cancelled(&self) -> bool {
        match self {
            Waiting::Fresh(r) => r.events.is_closed(),
            Waiting::Preempted(s) => s.cancelled(),
        }
    }

    /// The tokens it will hold KV for: its prompt, and a preempted one's output.
    fn context(&self) -> &[u32] {
        match self {
            Waiting::Fresh(r) => &r.spec.prompt,
            Waiting::Preempted(s) => &s.context,
        }
    }

    /// Tokens whose KV it needs to be admitted (what it will prefill, plus one to grow into).
    fn tokens_needed(&self) -> usize {
        self.context().len() + 1
    }

    /// Blocks the whole request may need: refused at once if the pool can never hold it.
    fn tokens_at_most(&self) -> usize {
        match self {
            Waiting::Fresh(r) => r.spec.prompt.len() + r.spec.max_tokens,
            Waiting::Preempted(s) => s.prompt_len() + s.request.spec.max_tokens,
        }
    }
}

/// A step in the pipeline: what it carries, and the cluster's handle on its answer.
struct InFlight<S> {
    step: u64,
    batch: StepBatch,
    sent: S,
    started: Instant,
}

struct Engine<C: StepCluster> {
    cluster: C,
    /// Submitted requests not yet taken into `waiting`.
    requests: mpsc::UnboundedReceiver<Request>,
    tokenizer: Arc<TextTokenizer>,
    cfg: EngineConfig,
    kv: KvBlockManager,
    metrics: Arc<Metrics>,
    /// Shared with the handles: requests submitted and not yet admitted.
    waiting_count: Arc<AtomicUsize>,
    waiting: VecDeque<Waiting>,
    /// In admission order: the last is the newest (preempted first).
    running: Vec<Sequence>,
    /// Steps sent and not yet answered, oldest first (at most `pipeline_depth`).
    in_flight: VecDeque<InFlight<C::Sent>>,
    /// The engine's number for the next step it sends.
    next_step: u64,
    next_id: u64,
    heartbeat: Heartbeat,
    /// Whether a step ran since freed memory was last given back (done once per idle spell).
    stepped_since_trim: bool,
}

impl<C: StepCluster> Engine<C> {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(BEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.heartbeat.beat();
            if self.cluster.status().outage().is_some() {
                self.heal().await;
                continue;
            }
            if self.running.is_empty() && self.waiting.is_empty() && self.in_flight.is_empty() {
                self.update_gauges();
                let status = self.cluster.status().clone();
                // Back within a beat at the latest.
                self.heartbeat.busy_for(BEAT);
                tokio::select! {
                    r = self.requests.recv() => match r {
                        Some(r) => self.waiting.push_back(Waiting::Fresh(r)),
                        None => return,
                    },
                    // The prober found a worker lost while nothing stepped: heal now.
                    () = status.lost() => continue,
                    _ = tick.tick() => {
                        // Idle for a beat: the load's buffers are free, give them back.
                        if std::mem::take(&mut self.stepped_since_trim) {
                            gemma_proto::process::release_freed_memory();
                        }
                        continue;
                    }
                }
            }
            while let Ok(r) = self.requests.try_recv() {
                self.waiting.push_back(Waiting::Fresh(r));
            }
            self.drop_cancelled();
            self.admit();
            self.fill_pipeline().await;
            self.update_gauges();
            if !self.in_flight.is_empty() {
                self.receive_oldest().await;
            }
        }
    }

    /// Sends steps until `pipeline_depth` are in flight or no sequence is left to carry: each
    /// takes sequences no other step in flight carries.
    async fn fill_pipeline(&mut self) {
        while self.in_flight.len() < self.cfg.pipeline_depth.max(1) {
            let batch = self.schedule();
            if batch.seqs.is_empty() {
                return;
            }
            if let Err(e) = self.send(batch).await {
                return self.fail_all(e);
            }
        }
    }

    fn update_gauges(&self) {
        self.metrics.queue_length.set(self.waiting.len() as i64);
        self.metrics
            .running_sequences
            .set(self.running.len() as i64);
        self.metrics
            .kv_blocks_used
            .set(self.kv.used_blocks() as i64);
        self.metrics
            .kv_blocks_cached
            .set(self.kv.cached_blocks() as i64);
    }

    /// Forgets requests whose client went away; their blocks return to the pool.
    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|w| !w.cancelled());
        let fresh_gone = before - self.waiting.len();
        for _ in 0..fresh_gone {
            self.metrics.outcome(Outcome::Cancelled);
        }
        self.waiting_count.fetch_sub(fresh_gone, Ordering::SeqCst);
        let before = self.running.len();
        self.running.retain(|s| !s.cancelled());
        for _ in 0..before - self.running.len() {
            self.metrics.outcome(Outcome::Cancelled);
        }
    }

    /// Moves waiting requests into the running batch, oldest first, while their blocks fit.
    fn admit(&mut self) {
        while self.running.len() < self.cfg.max_running {
            let Some(w) = self.waiting.front() else {
                return;
            };
            let at_most = self.kv.blocks_for(w.tokens_at_most());
            if at_most > self.kv.total_blocks() {
                let Some(w) = self.waiting.pop_front() else {
                    return;
                };
                self.waiting_count.fetch_sub(1, Ordering::SeqCst);
                let error = EngineError::TooLong {
                    needed: at_most,
                    total: self.kv.total_blocks(),
                };
                w.fail(error, &self.metrics);
                continue;
            }
            if self.prefill_would_share(w.context()) {
                return; // admitted once those blocks are cached, and then reuses them
            }
            let Ok(alloc) = self.kv.allocate_for(w.context(), w.tokens_needed()) else {
                return;
            };
            let seq = match self.waiting.pop_front() {
                Some(Waiting::Fresh(r)) => {
                    self.next_id += 1;
                    self.metrics
                        .prompt(r.spec.prompt.len(), alloc.reused_tokens());
                    match Sequence::new(self.next_id, r, alloc, self.tokenizer.stop_ids()) {
                        Ok(seq) => seq,
                        Err(failed) => {
                            let (r, e) = *failed;
                            self.waiting_count.fetch_sub(1, Ordering::SeqCst);
                            Waiting::Fresh(r).fail(e.into(), &self.metrics);
                            continue;
                        }
                    }
                }
                Some(Waiting::Preempted(mut s)) => {
                    s.cached = alloc.reused_tokens();
                    s.kv = alloc;
                    *s
                }
                None => return,
            };
            self.waiting_count.fetch_sub(1, Ordering::SeqCst);
            self.running.push(seq);
        }
    }

    /// Whether a running sequence is still computing leading blocks that `context` would reuse
    /// beyond what the cache holds now. Admitting it now would compute them a second time;
    /// waiting a few steps lets it reuse them (`n > 1` choices, concurrent requests with one
    /// system prompt). The running sequence makes progress every step, and one that ends or is
    /// preempted stops the wait, so the wait is bounded.
    fn prefill_would_share(&self, context: &[u32]) -> bool {
        if !self.kv.prefix_caching() {
            return false;
        }
        let bs = self.kv.block_size();
        let reusable = self.kv.reusable_blocks(context);
        let cached = self.kv.cached_prefix_blocks(context);
        if reusable <= cached {
            return false;
        }
        self.running.iter().any(|s| {
            let common = context
                .iter()
                .zip(&s.context)
                .take(reusable * bs)
                .take_while(|(a, b)| a == b)
                .count()
                / bs;
            common > cached && s.kv.sealed_blocks() < common
        })
    }

    /// Builds the next step: every decoding sequence's token first, then prefill chunks under
    /// the remaining token budget. Preempts the newest sequences when blocks run out.
    /// With several steps in flight, a step carries only sequences no other one carries, and
    /// at most its share (1/depth) of the running ones, so the micro-batches stay even.
    fn schedule(&mut self) -> StepBatch {
        // Growth for decodes: each needs room for one more token.
        let mut i = 0;
        while i < self.running.len() {
            let s = &mut self.running[i];
            let free = s.in_flight.is_none();
            if free && s.is_decoding() && s.kv.ensure_capacity(s.context.len()).is_err() {
                // Free the newest sequence (possibly this one) and try again.
                self.preempt_newest();
                continue;
            }
            i += 1;
        }
        let mut budget = self.cfg.max_batch_tokens.max(1);
        let share = self.running.len().div_ceil(self.cfg.pipeline_depth.max(1));
        let mut batch = StepBatch::default();
        let free = || self.running.iter().filter(|s| s.in_flight.is_none());
        let decoding = free().filter(|s| s.is_decoding());
        let prefilling = free().filter(|s| !s.is_decoding());
        for s in decoding.chain(prefilling) {
            if budget == 0 || batch.seqs.len() == share {
                break;
            }
            let end = (s.cached + budget).min(s.context.len());
            let tokens = s.context[s.cached..end].to_vec();
            budget -= tokens.len();
            let ask = s.sampler.ask();
            batch.seqs.push(SeqStep {
                seq_id: s.id,
                tokens,
                start_pos: s.cached,
                block_table: s.kv.block_table().to_vec(),
                top_candidates: ask.top_candidates,
                log_probs: ask.log_probs,
                sampling: ask.sampling,
            });
        }
        batch
    }

    fn preempt_newest(&mut self) {
        let Some(mut s) = self.running.pop() else {
            return;
        };
        tracing::debug!(
            seq = s.id,
            tokens = s.context.len(),
            "preempted: KV blocks exhausted"
        );
        self.metrics.preemptions.inc();
        // Its blocks go back now; it recomputes prompt + output when readmitted. A step in
        // flight that carries it still writes them, but every worker runs steps in order, so a
        // later step that reuses them writes after it; its answer is ignored.
        s.kv = self.kv.allocation();
        s.cached = 0;
        s.in_flight = None;
        self.waiting_count.fetch_add(1, Ordering::SeqCst);
        self.waiting.push_front(Waiting::Preempted(Box::new(s)));
    }

    /// Sends `batch` as the next step; its sequences are in flight until its answer is taken.
    async fn send(&mut self, batch: StepBatch) -> Result<(), ClusterError> {
        let step = self.next_step;
        self.next_step += 1;
        self.stepped_since_trim = true;
        self.metrics.step_sequences.observe(batch.seqs.len() as f64);
        self.metrics.step_tokens.observe(batch.num_tokens() as f64);
        self.heartbeat
            .busy_for(self.cluster.deadline(batch.num_tokens()));
        let sent = self.cluster.send(&batch).await?;
        for seq in &mut self.running {
            if batch.seqs.iter().any(|s| s.seq_id == seq.id) {
                seq.in_flight = Some(step);
            }
        }
        self.in_flight.push_back(InFlight {
            step,
            batch,
            sent,
            started: Instant::now(),
        });
        Ok(())
    }

    /// Waits for the oldest step in flight and takes its answer: samples, streams, finishes.
    async fn receive_oldest(&mut self) {
        let Some(InFlight {
            step: number,
            batch,
            sent,
            started,
        }) = self.in_flight.pop_front()
        else {
            return;
        };
        let span =
            tracing::debug_span!("step", seqs = batch.seqs.len(), tokens = batch.num_tokens());
        self.heartbeat
            .busy_for(self.cluster.deadline(batch.num_tokens()));
        let output = match self.cluster.receive(sent, &batch).instrument(span).await {
            Ok(o) => o,
            Err(e) => return self.fail_all(e),
        };
        self.heartbeat.beat();
        self.metrics
            .step_duration
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .all_reduce_duration
            .observe(output.collective.as_secs_f64());
        let mut finished = Vec::new();
        for (step, logits) in batch.seqs.iter().zip(output.logits) {
            // Gone (finished, cancelled) or preempted since: the answer is not its own.
            let carried = |s: &Sequence| s.id == step.seq_id && s.in_flight == Some(number);
            let Some(i) = self.running.iter().position(carried) else {
                continue;
            };
            let seq = &mut self.running[i];
            seq.in_flight = None;
            seq.cached = step.end_pos();
            if seq.cached < seq.context.len() {
                continue; // a prefill chunk that is not the last
            }
            let sampled = match seq.sampler.draw(logits) {
                Ok(Draw::Token(s)) => s,
                Ok(Draw::Retry) => {
                    // The nucleus was wider than the candidates: recompute the last position
                    // (its KV entry is rewritten with the same values) and ask for more.
                    seq.cached -= 1;
                    continue;
                }
                Err(e) => {
                    finished.push((seq.id, Err(e.into())));
                    continue;
                }
            };
            match advance(
                seq,
                sampled,
                &self.tokenizer,
                self.cfg.max_context,
                &self.metrics,
            ) {
                Ok(None) => {}
                Ok(Some(reason)) => finished.push((seq.id, Ok(reason))),
                Err(e) => finished.push((seq.id, Err(e))),
            }
        }
        // Blocks this step filled are now computed on every worker: other sequences may read
        // them from the next step on (a retried position was taken back above, so its block is
        // not among them).
        for seq in &mut self.running {
            seq.kv.commit(&seq.context[..seq.cached]);
        }
        for (id, outcome) in finished {
            let Some(i) = self.running.iter().position(|s| s.id == id) else {
                continue;
            };
            self.running.remove(i).finish(outcome, &self.metrics);
        }
    }

    /// A failed step fails every request the engine holds: the running ones, and the waiting
    /// ones too (submitted ones included), which would otherwise be admitted onto the cluster
    /// that just failed, each costing another failed step.
    fn fail_all(&mut self, error: ClusterError) {
        tracing::error!(%error, "step failed; failing every running and waiting request");
        let error = Arc::new(error);
        self.fail_everything(|| EngineError::Cluster(error.clone()));
    }

    /// Ends every request the engine holds with `error()`; their blocks return first.
    fn fail_everything(&mut self, error: impl Fn() -> EngineError) {
        // Their answers will never come: the cluster's streams are gone with the epoch.
        self.in_flight.clear();
        let mut waiting: Vec<Waiting> = self.waiting.drain(..).collect();
        while let Ok(r) = self.requests.try_recv() {
            waiting.push(Waiting::Fresh(r));
        }
        self.waiting_count
            .fetch_sub(waiting.len(), Ordering::SeqCst);
        for seq in self.running.drain(..) {
            seq.finish(Err(error()), &self.metrics);
        }
        for w in waiting {
            w.fail(error(), &self.metrics);
        }
        self.update_gauges();
    }

    /// Heals the down cluster. Meanwhile every request is refused at once with the reason, and
    /// the heartbeat goes on: a healing engine is not a wedged one.
    async fn heal(&mut self) {
        let status = self.cluster.status().clone();
        let reason = || {
            status
                .outage()
                .unwrap_or_else(|| "the cluster is healing".into())
        };
        self.fail_everything(|| EngineError::Unavailable(reason()));
        // The workers will be re-assigned with empty caches: no cached block holds K/V anymore.
        self.kv.clear_cache();
        self.update_gauges();
        let Engine {
            cluster,
            requests,
            metrics,
            waiting_count,
            heartbeat,
            ..
        } = self;
        let healing = cluster.heal();
        tokio::pin!(healing);
        let mut tick = tokio::time::interval(BEAT);
        loop {
            heartbeat.busy_for(BEAT);
            tokio::select! {
                () = &mut healing => break,
                Some(r) = requests.recv() => {
                    waiting_count.fetch_sub(1, Ordering::SeqCst);
                    metrics.outcome(Outcome::Unavailable);
                    r.events.finish(Event::Error(EngineError::Unavailable(reason())));
                }
                _ = tick.tick() => {}
            }
        }
        heartbeat.beat();
    }
}

/// Takes a sampled token into the sequence and tells the client; returns why it finished, if
/// it did.
fn advance(
    seq: &mut Sequence,
    sampled: Sampled,
    tok: &TextTokenizer,
    max_context: usize,
    metrics: &Metrics,
) -> Result<Option<FinishReason>, EngineError> {
    let now = Instant::now();
    match seq.last_token_at {
        None => metrics
            .time_to_first_token
            .observe((now - seq.request.arrived).as_secs_f64()),
        Some(t) => metrics.inter_token_latency.observe((now - t).as_secs_f64()),
    }
    seq.last_token_at = Some(now);
    metrics.generation_tokens.inc();
    let token = sampled.token;
    let progress = match &mut seq.constraint {
        Some(c) => c.accept(token)?,
        None => Progress::Open,
    };
    let is_stop = tok.stop_ids().contains(&token);
    if is_stop && (!seq.request.spec.ignore_eos || progress == Progress::Complete) {
        return Ok(Some(FinishReason::Stop));
    }
    seq.generated += 1;
    seq.context.push(token);
    let decode = |e: crate::tokenizer::TokenizerError| EngineError::Decode(e.to_string());
    seq.text
        .push_str(&seq.decoder.push(tok, token).map_err(decode)?);
    let stops = &seq.request.spec.stop;
    let at_limit = seq.generated >= seq.request.spec.max_tokens || seq.context.len() >= max_context;
    if at_limit {
        seq.text.push_str(&seq.decoder.flush(tok).map_err(decode)?);
    }
    // vLLM's min_tokens: stop strings count only in text from the min_tokens-th token on.
    if seq.generated < seq.request.spec.min_tokens {
        seq.stops_from = seq.text.len();
    }
    let from = seq.stops_from;
    let stopped = first_stop(&seq.text[from..], stops).map(|at| from + at);
    if let Some(at) = stopped {
        seq.text.truncate(at);
    }
    // Send what can no longer become part of a stop string.
    let safe = if stopped.is_some() || at_limit {
        seq.text.len()
    } else {
        seq.text.len() - pending_stop_prefix(&seq.text, stops)
    };
    let text = seq
        .text
        .get(seq.sent..safe.max(seq.sent))
        .unwrap_or_default()
        .to_string();
    seq.sent += text.len();
    seq.request.events.token(TokenEvent {
        text,
        sampled,
        cached_tokens: seq.prompt_cached,
    });
    Ok(match (stopped, at_limit, progress) {
        (Some(_), _, _) | (None, _, Progress::Complete) => Some(FinishReason::Stop),
        (None, true, Progress::Open) => Some(FinishReason::Length),
        (None, false, Progress::Open) => {
            // The grammar's mask for the next draw.
            if let Some(c) = &mut seq.constraint {
                seq.sampler.set_allowed(c.next_mask()?);
            }
            None
        }
    })
}

/// Byte offset of the earliest stop string in `text`.
fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// Length of the longest end of `text` that is the start of a stop string (held back: the
/// next token may complete the stop string, which must then not reach the client).
fn pending_stop_prefix(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|s| {
            (1..s.len())
                .rev()
                .filter(|&n| s.is_char_boundary(n))
                .find(|&n| text.ends_with(&s[..n]))
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use gemma_proto::SeqLogits;

    use super::*;

    /// A cluster that answers each step from a script, and counts the steps it was given.
    struct ScriptedCluster {
        answers: VecDeque<Result<StepOutput, ClusterError>>,
        steps: Arc<AtomicUsize>,
        status: ClusterStatus,
    }

    impl StepCluster for ScriptedCluster {
        type Sent = ();

        fn kv_blocks(&self) -> usize {
            64
        }

        fn block_size(&self) -> usize {
            16
        }

        fn deadline(&self, _: usize) -> Duration {
            Duration::from_millis(100)
        }

        fn status(&self) -> &ClusterStatus {
            &self.status
        }

        fn send(&mut self, _: &StepBatch) -> impl Future<Output = Result<(), ClusterError>> + Send {
            std::future::ready(Ok(()))
        }

        fn receive(
            &mut self,
            _: (),
            _: &StepBatch,
        ) -> impl Future<Output = Result<StepOutput, ClusterError>> + Send {
            self.steps.fetch_add(1, Ordering::SeqCst);
            let answer = self
                .answers
                .pop_front()
                .unwrap_or_else(|| Err(step_error("the script has no answer for this step")));
            std::future::ready(answer)
        }

        fn heal(&mut self) -> impl Future<Output = ()> + Send {
            std::future::ready(())
        }
    }

    /// A cluster that never answers a step (a wedged step future), or one that is down and
    /// never heals: the two cases `/health` must tell apart.
    struct SilentCluster {
        status: ClusterStatus,
    }

    impl StepCluster for SilentCluster {
        type Sent = ();

        fn kv_blocks(&self) -> usize {
            64
        }

        fn block_size(&self) -> usize {
            16
        }

        fn deadline(&self, _: usize) -> Duration {
            Duration::from_millis(100)
        }

        fn status(&self) -> &ClusterStatus {
            &self.status
        }

        fn send(&mut self, _: &StepBatch) -> impl Future<Output = Result<(), ClusterError>> + Send {
            std::future::ready(Ok(()))
        }

        fn receive(
            &mut self,
            _: (),
            _: &StepBatch,
        ) -> impl Future<Output = Result<StepOutput, ClusterError>> + Send {
            std::future::pending()
        }

        fn heal(&mut self) -> impl Future<Output = ()> + Send {
            std::future::pending()
        }
    }

    fn step_error(reason: &str) -> ClusterError {
        ClusterError::Step {
            addr: "127.0.0.1:1".into(),
            stage: 0,
            rank: 1,
            reason: reason.into(),
        }
    }

    /// An engine over `answers` that runs one request at a time; the tokenizer is a three-token
    /// word-level one (the scripted steps never reach detokenizing).
    fn engine(
        answers: Vec<Result<StepOutput, ClusterError>>,
    ) -> (EngineHandle, Arc<AtomicUsize>, tempfile::TempDir) {
        let steps = Arc::new(AtomicUsize::new(0));
        let cluster = ScriptedCluster {
            answers: answers.into(),
            steps: steps.clone(),
            status: ClusterStatus::serving(1),
        };
        let (handle, dir) = engine_over(cluster);
        (handle, steps, dir)
    }

    /// `WEDGED_AFTER`: the grace the engines of these tests get past a step's deadline.
    const WEDGED_AFTER: Duration = Duration::from_millis(500);

    fn engine_over(cluster: impl StepCluster) -> (EngineHandle, tempfile::TempDir) {
        engine_with(cluster, 1, 64)
    }

    fn engine_with(
        cluster: impl StepCluster,
        max_running: usize,
        max_batch_tokens: usize,
    ) -> (EngineHandle, tempfile::TempDir) {
        engine_configured(cluster, max_running, max_batch_tokens, true, 1)
    }

    fn engine_with_caching(
        cluster: impl StepCluster,
        prefix_caching: bool,
    ) -> (EngineHandle, tempfile::TempDir) {
        engine_configured(cluster, 1, 64, prefix_caching, 1)
    }

    fn engine_configured(
        cluster: impl StepCluster,
        max_running: usize,
        max_batch_tokens: usize,
        prefix_caching: bool,
        pipeline_depth: usize,
    ) -> (EngineHandle, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let tokenizer = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":null,"post_processor":null,"decoder":null,
            "model":{"type":"WordLevel","vocab":{"<pad>":0,"<eos>":1,"<bos>":2},
            "unk_token":"<pad>"}}"#;
        std::fs::write(dir.path().join("tokenizer.json"), tokenizer).expect("tokenizer.json");
        let tokenizer = TextTokenizer::from_dir(dir.path(), 2, 1).expect("tokenizer");
        let cfg = EngineConfig {
            max_batch_tokens,
            max_running,
            max_waiting: 16,
            max_context: 1024,
            prefix_caching,
            pipeline_depth,
            wedged_after: WEDGED_AFTER,
        };
        let handle = spawn(cluster, Arc::new(tokenizer), cfg, Arc::new(Metrics::new()));
        (handle, dir)
    }

    fn greedy_request() -> RequestSpec {
        RequestSpec {
            prompt: vec![2, 0, 0],
            params: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            logprobs: None,
            max_tokens: 4,
            stop: Vec::new(),
            min_tokens: 0,
            ignore_eos: false,
            constraint: None,
        }
    }

    /// The first event of a request, which these scripts make its last.
    async fn first_event(rx: &mut mpsc::UnboundedReceiver<Event>) -> Event {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an answer, not a hang")
            .expect("an event")
    }

    #[tokio::test]
    async fn a_failed_step_refuses_the_waiting_requests_too() {
        let (engine, steps, _dir) = engine(vec![Err(step_error("the worker closed its stream"))]);
        // One runs, three wait (the engine runs one at a time).
        let mut requests: Vec<_> = (0..4)
            .map(|_| engine.submit(greedy_request()).expect("queued"))
            .collect();
        for (i, rx) in requests.iter_mut().enumerate() {
            match first_event(rx).await {
                Event::Error(EngineError::Cluster(e)) => {
                    assert!(
                        e.to_string().contains("the worker closed its stream"),
                        "request {i}: {e}"
                    );
                }
                other => panic!("request {i}: {other:?}"),
            }
        }
        assert_eq!(
            steps.load(Ordering::SeqCst),
            1,
            "no waiting request was admitted onto the failed cluster"
        );
        assert_eq!(engine.waiting.load(Ordering::SeqCst), 0);
        assert_eq!(engine.kv_blocks_used(), 0);
    }

    #[tokio::test]
    async fn no_candidates_fail_the_request_with_the_reason() {
        let empty = StepOutput {
            logits: vec![SeqLogits::Top {
                candidates: Vec::new(),
                log_sum_exp: f32::NAN,
            }],
            collective: Duration::ZERO,
        };
        let (engine, steps, _dir) = engine(vec![Ok(empty)]);
        let mut rx = engine.submit(greedy_request()).expect("queued");
        match first_event(&mut rx).await {
            Event::Error(e @ EngineError::Sample(SampleError::NoCandidates)) => {
                assert!(e.to_string().contains("no candidate tokens"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(steps.load(Ordering::SeqCst), 1);
        assert_eq!(engine.kv_blocks_used(), 0, "its blocks went back");
    }

    /// A step answer whose one sequence's greedy choice is `token`.
    fn chooses(token: u32) -> Result<StepOutput, ClusterError> {
        Ok(StepOutput {
            logits: vec![SeqLogits::Top {
                candidates: vec![(0.0, token)],
                log_sum_exp: 0.0,
            }],
            collective: Duration::ZERO,
        })
    }

    /// A client that has its `Done` finds its blocks back in the pool, read from another thread
    /// of a multi-threaded runtime the moment `Done` arrives. The order itself is guaranteed by
    /// construction (`Sequence::finish` consumes the sequence and drops its allocation before
    /// the event exists); the reverse order would fail here only by chance, its window being
    /// the engine's next few instructions.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn done_comes_after_the_blocks_are_back() {
        const REQUESTS: usize = 50;
        // Each request: one prefill step whose sample is <eos>.
        let (engine, steps, _dir) = engine((0..REQUESTS).map(|_| chooses(1)).collect());
        for i in 0..REQUESTS {
            let mut rx = engine.submit(greedy_request()).expect("queued");
            match first_event(&mut rx).await {
                Event::Done { finish_reason, .. } => {
                    assert_eq!(finish_reason, FinishReason::Stop);
                    assert_eq!(engine.kv_blocks_used(), 0, "request {i}: Done before free");
                }
                other => panic!("request {i}: {other:?}"),
            }
        }
        assert_eq!(steps.load(Ordering::SeqCst), REQUESTS);
    }

    /// `ignore_eos` generates through <eos> until max_tokens.
    #[tokio::test]
    async fn ignore_eos_runs_to_max_tokens() {
        let spec = RequestSpec {
            ignore_eos: true,
            ..greedy_request()
        };
        let (engine, steps, _dir) = engine((0..spec.max_tokens).map(|_| chooses(1)).collect());
        let generation = tokio::time::timeout(Duration::from_secs(10), engine.generate(spec))
            .await
            .expect("an answer, not a hang")
            .expect("generated");
        assert_eq!(generation.finish_reason, FinishReason::Length);
        assert_eq!(generation.tokens.len(), 4);
        assert!(generation.tokens.iter().all(|t| t.token == 1));
        assert_eq!(steps.load(Ordering::SeqCst), 4);
        assert_eq!(engine.kv_blocks_used(), 0);
    }

    /// A step that never returns wedges the engine loop: `wedged` says so once the step's
    /// deadline and the grace have passed, and not before. (Paused time: tokio advances the
    /// clock only when every task waits, so the test is exact and instant.)
    #[tokio::test(start_paused = true)]
    async fn a_step_that_never_returns_is_a_wedged_engine() {
        let cluster = SilentCluster {
            status: ClusterStatus::serving(1),
        };
        let (engine, _dir) = engine_over(cluster);
        tokio::time::sleep(3 * WEDGED_AFTER).await;
        assert_eq!(engine.wedged(), None, "an idle engine is not wedged");
        let _rx = engine.submit(greedy_request()).expect("queued");
        // Deadline 100 ms + grace 500 ms: still in time at 550 ms, wedged past 600 ms.
        tokio::time::sleep(Duration::from_millis(550)).await;
        assert_eq!(
            engine.wedged(),
            None,
            "within the step's deadline and grace"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let silent = engine.wedged().expect("wedged past deadline + grace");
        assert!(silent >= Duration::from_millis(600), "{silent:?}");
    }

    /// A cluster that is down and healing for ever: the engine refuses requests at once with the
    /// reason, and its heartbeat goes on, so `/health` stays ok.
    #[tokio::test(start_paused = true)]
    async fn a_healing_engine_is_not_wedged_and_refuses_at_once() {
        let cluster = SilentCluster {
            status: ClusterStatus::down(1, "lost worker 127.0.0.1:1 (stage 0, rank 1)".into()),
        };
        let (engine, _dir) = engine_over(cluster);
        for _ in 0..10 {
            tokio::time::sleep(WEDGED_AFTER).await;
            assert_eq!(engine.wedged(), None, "a healing engine beats");
        }
        match engine.submit(greedy_request()) {
            Err(e @ EngineError::Unavailable(_)) => {
                assert!(e.to_string().contains("stage 0, rank 1"), "{e}")
            }
            other => panic!("{:?}", other.map(|_| "queued")),
        }
        assert_eq!(engine.waiting.load(Ordering::SeqCst), 0);
    }

    /// A cluster that answers every sequence of every step with `token` as its greedy choice,
    /// records the batches, and heals at once (telling the test).
    struct RecordingCluster {
        token: u32,
        batches: Arc<Mutex<Vec<StepBatch>>>,
        status: ClusterStatus,
        healed: Arc<tokio::sync::Notify>,
    }

    impl RecordingCluster {
        fn new(token: u32) -> Self {
            Self {
                token,
                batches: Arc::default(),
                status: ClusterStatus::serving(1),
                healed: Arc::default(),
            }
        }
    }

    impl StepCluster for RecordingCluster {
        type Sent = ();

        fn kv_blocks(&self) -> usize {
            64
        }

        fn block_size(&self) -> usize {
            16
        }

        fn deadline(&self, _: usize) -> Duration {
            Duration::from_secs(1)
        }

        fn status(&self) -> &ClusterStatus {
            &self.status
        }

        fn send(&mut self, _: &StepBatch) -> impl Future<Output = Result<(), ClusterError>> + Send {
            std::future::ready(Ok(()))
        }

        fn receive(
            &mut self,
            _: (),
            batch: &StepBatch,
        ) -> impl Future<Output = Result<StepOutput, ClusterError>> + Send {
            self.batches.lock().expect("batches").push(batch.clone());
            let logits = batch
                .seqs
                .iter()
                .map(|_| SeqLogits::Top {
                    candidates: vec![(0.0, self.token)],
                    log_sum_exp: 0.0,
                })
                .collect();
            std::future::ready(Ok(StepOutput {
                logits,
                collective: Duration::ZERO,
            }))
        }

        fn heal(&mut self) -> impl Future<Output = ()> + Send {
            self.status.set_serving(2);
            self.healed.notify_one();
            std::future::ready(())
        }
    }

    /// A greedy request for `prompt` that ends at its first token (<eos>, in these scripts).
    fn prompt_request(prompt: Vec<u32>) -> RequestSpec {
        RequestSpec {
            prompt,
            ..greedy_request()
        }
    }

    /// 40 tokens: two full blocks of 16 that a later request may reuse, and 8 more.
    fn long_prompt() -> Vec<u32> {
        (0..40).map(|i| if i == 0 { 2 } else { i % 3 }).collect()
    }

    async fn done(engine: &EngineHandle, spec: RequestSpec) -> Generation {
        tokio::time::timeout(Duration::from_secs(10), engine.generate(spec))
            .await
            .expect("an answer, not a hang")
            .expect("generated")
    }

    /// The steps that carried sequence `id`, as (start_pos, block table).
    fn steps_of(batches: &Mutex<Vec<StepBatch>>, id: u64) -> Vec<(usize, Vec<u32>)> {
        let batches = batches.lock().expect("batches");
        let seqs = batches.iter().flat_map(|b| &b.seqs);
        seqs.filter(|s| s.seq_id == id)
            .map(|s| (s.start_pos, s.block_table.clone()))
            .collect()
    }

    #[tokio::test]
    async fn a_repeated_prompt_prefills_only_past_its_cached_blocks() {
        let cluster = RecordingCluster::new(1);
        let batches = cluster.batches.clone();
        let (engine, _dir) = engine_over(cluster);
        let first = done(&engine, prompt_request(long_prompt())).await;
        assert_eq!(first.cached_tokens, 0);
        assert_eq!(engine.kv_blocks_used(), 0);
        assert_eq!(engine.kv_blocks_cached(), 2, "two full blocks kept");
        let second = done(&engine, prompt_request(long_prompt())).await;
        assert_eq!(second.cached_tokens, 32);
        let (one, two) = (steps_of(&batches, 1), steps_of(&batches, 2));
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].0, 0);
        assert_eq!(
            two,
            vec![(32, two[0].1.clone())],
            "one step from position 32"
        );
        assert_eq!(two[0].1[..2], one[0].1[..2], "the cached blocks themselves");
        let m = engine.metrics.render();
        assert!(
            m.contains("gemma_cluster_prompt_tokens_cached_total 32"),
            "{m}"
        );
        assert!(m.contains("gemma_cluster_prefix_cache_hit_rate 0.4"), "{m}");
    }

    /// Two requests with one prompt, submitted together (as `n = 2`): the second waits while the
    /// first prefills the blocks it would share, then reuses them: the prompt's full blocks are
    /// computed once.
    #[tokio::test]
    async fn requests_with_one_prompt_prefill_it_once() {
        let cluster = RecordingCluster::new(1);
        let batches = cluster.batches.clone();
        // Chunks of 16: the first prompt takes three steps.
        let (engine, _dir) = engine_with(cluster, 4, 16);
        let (a, b) = tokio::join!(
            done(&engine, prompt_request(long_prompt())),
            done(&engine, prompt_request(long_prompt()))
        );
        assert_eq!((a.cached_tokens, b.cached_tokens), (0, 32));
        let (one, two) = (steps_of(&batches, 1), steps_of(&batches, 2));
        let starts: Vec<usize> = one.iter().map(|s| s.0).collect();
        assert_eq!(starts, [0, 16, 32]);
        assert_eq!(two.len(), 1, "{two:?}");
        assert_eq!(
            two[0].0, 32,
            "admitted once the shared blocks were computed"
        );
        assert_eq!(two[0].1[..2], one[2].1[..2]);
        assert_ne!(two[0].1[2], one[2].1[2], "each writes its own last block");
        assert_eq!(engine.kv_blocks_used(), 0);
    }

    /// Without prefix caching nothing is reused or held.
    #[tokio::test]
    async fn without_prefix_caching_every_prompt_is_computed() {
        let cluster = RecordingCluster::new(1);
        let batches = cluster.batches.clone();
        let (engine, _dir) = engine_with_caching(cluster, false);
        done(&engine, prompt_request(long_prompt())).await;
        let second = done(&engine, prompt_request(long_prompt())).await;
        assert_eq!(second.cached_tokens, 0);
        assert_eq!(steps_of(&batches, 2)[0].0, 0);
        assert_eq!(engine.kv_blocks_cached(), 0);
    }

    /// A healed cluster's workers start with empty caches: the engine forgets every cached
    /// block, and the same prompt is computed again.
    #[tokio::test]
    async fn healing_drops_the_prefix_cache() {
        let cluster = RecordingCluster::new(1);
        let (status, healed) = (cluster.status.clone(), cluster.healed.clone());
        let (engine, _dir) = engine_over(cluster);
        done(&engine, prompt_request(long_prompt())).await;
        assert_eq!(engine.kv_blocks_cached(), 2);
        assert!(status.lose(1, "a worker restarted"));
        tokio::time::timeout(Duration::from_secs(10), healed.notified())
            .await
            .expect("healed");
        assert_eq!(engine.kv_blocks_cached(), 0);
        let again = done(&engine, prompt_request(long_prompt())).await;
        assert_eq!(again.cached_tokens, 0, "nothing survives a re-assignment");
        assert_eq!(engine.kv_blocks_cached(), 2, "and it caches anew");
    }

    /// A pipeline stand-in: steps are answered only when received, in the order sent, so up
    /// to the engine's depth are in flight at once. Each sequence's next token depends only on
    /// its own step (its last token and end position), never on its micro-batch. It notes any
    /// sequence sent while a step in flight already carries it.
    struct PipelineCluster {
        kv_blocks: usize,
        status: ClusterStatus,
        /// Sequence ids of each step in flight, oldest first.
        in_flight: VecDeque<Vec<u64>>,
        most_in_flight: Arc<AtomicUsize>,
        violations: Arc<Mutex<Vec<String>>>,
    }

    impl PipelineCluster {
        fn new(kv_blocks: usize) -> Self {
            Self {
                kv_blocks,
                status: ClusterStatus::serving(1),
                in_flight: VecDeque::new(),
                most_in_flight: Arc::default(),
                violations: Arc::default(),
            }
        }

        /// A token that is a function of the sequence's own step: 0 or 2, never <eos>.
        fn next_token(seq: &SeqStep) -> u32 {
            let last = seq.tokens.last().copied().unwrap_or(0) as usize;
            if (seq.end_pos() * 7 + last).is_multiple_of(3) {
                0
            } else {
                2
            }
        }
    }

    impl StepCluster for PipelineCluster {
        type Sent = ();

        fn kv_blocks(&self) -> usize {
            self.kv_blocks
        }

        fn block_size(&self) -> usize {
            16
        }

        fn deadline(&self, _: usize) -> Duration {
            Duration::from_secs(1)
        }

        fn status(&self) -> &ClusterStatus {
            &self.status
        }

        fn send(
            &mut self,
            batch: &StepBatch,
        ) -> impl Future<Output = Result<(), ClusterError>> + Send {
            let ids: Vec<u64> = batch.seqs.iter().map(|s| s.seq_id).collect();
            for id in &ids {
                if self.in_flight.iter().any(|step| step.contains(id)) {
                    let mut v = self.violations.lock().expect("violations");
                    v.push(format!("sequence {id} sent while in flight"));
                }
            }
            self.in_flight.push_back(ids);
            self.most_in_flight
                .fetch_max(self.in_flight.len(), Ordering::SeqCst);
            std::future::ready(Ok(()))
        }

        fn receive(
            &mut self,
            _: (),
            batch: &StepBatch,
        ) -> impl Future<Output = Result<StepOutput, ClusterError>> + Send {
            self.in_flight.pop_front();
            let logits = batch
                .seqs
                .iter()
                .map(|s| SeqLogits::Top {
                    candidates: vec![(0.0, Self::next_token(s))],
                    log_sum_exp: 0.0,
                })
                .collect();
            std::future::ready(Ok(StepOutput {
                logits,
                collective: Duration::ZERO,
            }))
        }

        fn heal(&mut self) -> impl Future<Output = ()> + Send {
            std::future::ready(())
        }
    }

    /// Eight concurrent requests (prompts of 20-30 tokens, 40 tokens each, chunks of 16) on a
    /// pool too small for all at once, so some are preempted: the tokens of every request.
    async fn pipelined_outputs(depth: usize) -> (Vec<Vec<u32>>, usize, Vec<String>, String) {
        let cluster = PipelineCluster::new(16);
        let most = cluster.most_in_flight.clone();
        let violations = cluster.violations.clone();
        let (engine, _dir) = engine_configured(cluster, 8, 16, true, depth);
        let requests = (0..8).map(|i| {
            let prompt = (0..20 + i)
                .map(|j| if j == 0 { 2 } else { (j % 2) * 2 })
                .collect();
            let spec = RequestSpec {
                max_tokens: 40,
                ignore_eos: true,
                ..prompt_request(prompt)
            };
            done(&engine, spec)
        });
        let outputs = futures_util::future::join_all(requests)
            .await
            .into_iter()
            .map(|g| g.tokens.iter().map(|t| t.token).collect())
            .collect();
        assert_eq!(engine.kv_blocks_used(), 0);
        let violations = violations.lock().expect("violations").clone();
        (
            outputs,
            most.load(Ordering::SeqCst),
            violations,
            engine.metrics.render(),
        )
    }

    /// Two micro-batches in flight give every request the tokens one step at a time gives, no
    /// sequence is in two steps at once, and preemption of sequences in flight keeps holding.
    #[tokio::test]
    async fn steps_in_flight_together_give_the_same_tokens() {
        let (one, most_one, v_one, _) = pipelined_outputs(1).await;
        let (two, most_two, v_two, metrics) = pipelined_outputs(2).await;
        assert_eq!(most_one, 1);
        assert_eq!(most_two, 2, "two steps were in flight at once");
        assert!(v_one.is_empty() && v_two.is_empty(), "{v_one:?} {v_two:?}");
        assert!(one.iter().all(|t| t.len() == 40));
        assert_eq!(one, two);
        let preempted = metrics
            .lines()
            .find(|l| l.starts_with("gemma_cluster_preemptions_total "))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(preempted > 0.0, "the pool was too small for all: {metrics}");
    }

    #[test]
    fn stop_string_prefixes_are_held_back() {
        let stops = vec!["\nUser:".to_string(), "END".to_string()];
        assert_eq!(pending_stop_prefix("hello\nUs", &stops), 3);
        assert_eq!(pending_stop_prefix("hello E", &stops), 1);
        assert_eq!(pending_stop_prefix("hello", &stops), 0);
        assert_eq!(first_stop("a END b\nUser:", &stops), Some(2));
    }
}
