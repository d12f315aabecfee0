//! The generation engine: one task that owns the cluster, admits requests while KV blocks last,
//! and steps every running sequence together (prefill chunks and decodes in the same step).

use std::collections::VecDeque;
use std::sync::Arc;

use gemma_proto::{KvAllocation, KvBlockManager, SeqStep, StepBatch};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::cluster::Cluster;
use crate::sampler::{Sampler, SamplingParams};
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

#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish_reason: FinishReason,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("the prompt and max_tokens need {needed} KV blocks but the cluster holds {total}")]
    TooLong { needed: usize, total: usize },
    #[error("cluster step failed: {0}")]
    Cluster(String),
    #[error("detokenizing: {0}")]
    Decode(String),
    #[error("the engine has stopped")]
    Stopped,
}

pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub reply: oneshot::Sender<Result<Generation, EngineError>>,
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<GenerateRequest>,
}

impl EngineHandle {
    pub async fn generate(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
        max_tokens: usize,
        stop: Vec<String>,
    ) -> Result<Generation, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(GenerateRequest {
                prompt,
                params,
                max_tokens,
                stop,
                reply,
            })
            .await
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }
}

pub struct EngineConfig {
    pub max_batch_tokens: usize,
    pub max_running: usize,
    pub max_context: usize,
}

/// Starts the engine task; it ends when every handle is dropped.
pub fn spawn(cluster: Cluster, tokenizer: Arc<TextTokenizer>, cfg: EngineConfig) -> EngineHandle {
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(run(cluster, tokenizer, cfg, rx).instrument(tracing::info_span!("engine")));
    EngineHandle { tx }
}

struct Sequence {
    id: u64,
    request: GenerateRequest,
    kv: KvAllocation,
    /// Tokens already in the KV cache.
    cached: usize,
    generated: Vec<u32>,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    text: String,
}

impl Sequence {
    /// This sequence's tokens for the next step: a prefill chunk of at most `budget`, or the
    /// last sampled token.
    fn next_tokens(&self, budget: usize) -> (Vec<u32>, usize) {
        let prompt = &self.request.prompt;
        if self.cached < prompt.len() {
            let end = (self.cached + budget).min(prompt.len());
            (prompt[self.cached..end].to_vec(), self.cached)
        } else {
            let last = self.generated.last().copied().unwrap_or_default();
            (vec![last], self.cached)
        }
    }
}

async fn run(
    mut cluster: Cluster,
    tokenizer: Arc<TextTokenizer>,
    cfg: EngineConfig,
    mut rx: mpsc::Receiver<GenerateRequest>,
) {
    let kv = KvBlockManager::new(cluster.kv_blocks, cluster.block_size);
    let mut waiting: VecDeque<GenerateRequest> = VecDeque::new();
    let mut running: Vec<Sequence> = Vec::new();
    let mut next_id = 0u64;
    loop {
        if running.is_empty() && waiting.is_empty() {
            match rx.recv().await {
                Some(r) => waiting.push_back(r),
                None => return,
            }
        }
        while let Ok(r) = rx.try_recv() {
            waiting.push_back(r);
        }
        admit(&mut waiting, &mut running, &kv, &cfg, &mut next_id);
        if running.is_empty() {
            continue;
        }
        let batch = build_batch(&mut running, cfg.max_batch_tokens);
        let span =
            tracing::debug_span!("step", seqs = batch.seqs.len(), tokens = batch.num_tokens());
        let logits = match cluster.step(&batch).instrument(span).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "step failed; failing the running requests");
                for seq in running.drain(..) {
                    let _ = seq
                        .request
                        .reply
                        .send(Err(EngineError::Cluster(e.to_string())));
                }
                continue;
            }
        };
        let mut finished = Vec::new();
        for ((i, step), mut row) in batch.seqs.iter().enumerate().zip(logits) {
            let seq = &mut running[i];
            seq.cached = step.end_pos();
            if seq.cached < seq.request.prompt.len() {
                continue; // a prefill chunk that is not the last
            }
            match advance(seq, &mut row, &tokenizer, cfg.max_context) {
                Ok(None) => {}
                Ok(Some(reason)) => finished.push((i, Ok(reason))),
                Err(e) => finished.push((i, Err(e))),
            }
        }
        for (i, outcome) in finished.into_iter().rev() {
            let seq = running.swap_remove(i);
            let prompt_tokens = seq.request.prompt.len();
            let result = outcome.map(|finish_reason| Generation {
                text: seq.text,
                tokens: seq.generated,
                prompt_tokens,
                finish_reason,
            });
            // Dropping `seq.kv` (inside `seq`) returns its blocks.
            let _ = seq.request.reply.send(result);
        }
    }
}

/// Moves waiting requests into the running set while their prompt's KV blocks are free.
fn admit(
    waiting: &mut VecDeque<GenerateRequest>,
    running: &mut Vec<Sequence>,
    kv: &KvBlockManager,
    cfg: &EngineConfig,
    next_id: &mut u64,
) {
    while running.len() < cfg.max_running {
        let Some(request) = waiting.pop_front() else {
            return;
        };
        let needed = kv.blocks_for(request.prompt.len() + request.max_tokens);
        if needed > kv.total_blocks() {
            let _ = request.reply.send(Err(EngineError::TooLong {
                needed,
                total: kv.total_blocks(),
            }));
            continue;
        }
        // Reserve the whole request up front: admitted requests then never run out of blocks.
        let alloc = match kv.allocate(request.prompt.len() + request.max_tokens) {
            Ok(a) => a,
            Err(_) => {
                waiting.push_front(request);
                return;
            }
        };
        *next_id += 1;
        running.push(Sequence {
            id: *next_id,
            sampler: Sampler::new(request.params.clone(), &request.prompt),
            request,
            kv: alloc,
            cached: 0,
            generated: Vec::new(),
            decoder: IncrementalDecoder::default(),
            text: String::new(),
        });
    }
}

fn build_batch(running: &mut [Sequence], max_tokens: usize) -> StepBatch {
    let mut budget = max_tokens.max(1);
    let mut batch = StepBatch::default();
    for seq in running.iter() {
        let (tokens, start_pos) = seq.next_tokens(budget.max(1));
        budget = budget.saturating_sub(tokens.len());
        batch.seqs.push(SeqStep {
            seq_id: seq.id,
            tokens,
            start_pos,
            block_table: seq.kv.block_table().to_vec(),
        });
    }
    batch
}

/// Samples the next token of a sequence whose prompt is fully cached; returns why it finished,
/// if it did.
fn advance(
    seq: &mut Sequence,
    logits: &mut [f32],
    tok: &TextTokenizer,
    max_context: usize,
) -> Result<Option<FinishReason>, EngineError> {
    let token = seq.sampler.sample(logits);
    seq.generated.push(token);
    if tok.stop_ids().contains(&token) {
        seq.generated.pop();
        return Ok(Some(FinishReason::Stop));
    }
    let piece = seq
        .decoder
        .push(tok, token)
        .map_err(|e| EngineError::Decode(e.to_string()))?;
    seq.text.push_str(&piece);
    if let Some(at) = first_stop(&seq.text, &seq.request.stop) {
        seq.text.truncate(at);
        return Ok(Some(FinishReason::Stop));
    }
    let total = seq.request.prompt.len() + seq.generated.len();
    if seq.generated.len() >= seq.request.max_tokens || total >= max_context {
        let rest = seq
            .decoder
            .flush(tok)
            .map_err(|e| EngineError::Decode(e.to_string()))?;
        seq.text.push_str(&rest);
        if let Some(at) = first_stop(&seq.text, &seq.request.stop) {
            seq.text.truncate(at);
            return Ok(Some(FinishReason::Stop));
        }
        return Ok(Some(FinishReason::Length));
    }
    Ok(None)
}

/// Byte offset of the earliest stop string in `text`.
fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}
