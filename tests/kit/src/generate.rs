//! Greedy generation over a [`LocalCluster`]: prompts admitted one per step while the others
//! decode, prompts prefilled in chunks, so steps mix prefill and decode of sequences of different
//! lengths through the paged cache.

use gemma_proto::candidates::argmax;
use gemma_proto::{KvAllocation, KvBlockManager, SeqStep, StepBatch};
use gemma_worker::StepError;

use crate::local::LocalCluster;

/// Why a generation run stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("prompt {0} is empty; every prompt needs at least one token (<bos>)")]
    EmptyPrompt(usize),
    #[error(transparent)]
    Kv(#[from] gemma_proto::KvError),
    #[error(transparent)]
    Step(#[from] StepError),
}

#[derive(Debug, Clone)]
pub struct GreedyOptions {
    pub max_new_tokens: usize,
    /// Most prompt tokens of one sequence per step.
    pub prefill_chunk: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GreedyOutput {
    /// Per prompt: the full-vocabulary logits at its last prompt token.
    pub prefill_logits: Vec<Vec<f32>>,
    /// Per prompt: the full-vocabulary logits that picked its last generated token (a decode
    /// step far past the prompt).
    pub last_logits: Vec<Vec<f32>>,
    /// Per prompt: the generated tokens.
    pub tokens: Vec<Vec<u32>>,
    /// Largest number of sequences in one step.
    pub max_batch: usize,
}

struct Sequence {
    prompt: Vec<u32>,
    generated: Vec<u32>,
    /// Tokens already in the cache.
    cached: usize,
    kv: KvAllocation,
    prefill_logits: Vec<f32>,
    last_logits: Vec<f32>,
}

impl Sequence {
    fn done(&self, max_new: usize) -> bool {
        self.generated.len() >= max_new
    }

    /// This sequence's part of the next step.
    fn next_step(&self, chunk: usize) -> (Vec<u32>, usize) {
        if self.cached < self.prompt.len() {
            let end = (self.cached + chunk).min(self.prompt.len());
            (self.prompt[self.cached..end].to_vec(), self.cached)
        } else {
            let last = self.generated.last().copied().unwrap_or_default();
            (vec![last], self.prompt.len() + self.generated.len() - 1)
        }
    }
}

pub fn generate_greedy(
    cluster: &LocalCluster,
    kv: &KvBlockManager,
    prompts: &[Vec<u32>],
    opts: &GreedyOptions,
) -> Result<GreedyOutput, RunError> {
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(RunError::EmptyPrompt(i));
    }
    let chunk = opts.prefill_chunk.max(1);
    let mut seqs: Vec<Sequence> = Vec::with_capacity(prompts.len());
    let mut max_batch = 0;
    loop {
        if seqs.len() < prompts.len() {
            seqs.push(Sequence {
                prompt: prompts[seqs.len()].clone(),
                generated: Vec::new(),
                cached: 0,
                kv: kv.allocation(),
                prefill_logits: Vec::new(),
                last_logits: Vec::new(),
            });
        }
        let active: Vec<usize> = (0..seqs.len())
            .filter(|&i| !seqs[i].done(opts.max_new_tokens))
            .collect();
        if active.is_empty() {
            if seqs.len() == prompts.len() {
                break;
            }
            continue;
        }
        let mut batch = StepBatch::default();
        for &i in &active {
            let (tokens, start_pos) = seqs[i].next_step(chunk);
            seqs[i].kv.ensure_capacity(start_pos + tokens.len())?;
            batch.seqs.push(SeqStep {
                seq_id: i as u64,
                tokens,
                start_pos,
                block_table: seqs[i].kv.block_table().to_vec(),
                top_candidates: 0,
                log_probs: false,
                sampling: None,
            });
        }
        max_batch = max_batch.max(batch.seqs.len());
        let logits = cluster
            .step(&batch)?
            .to_vec2::<f32>()
            .map_err(StepError::from)?;
        for ((&i, seq_step), row) in active.iter().zip(&batch.seqs).zip(logits) {
            let seq = &mut seqs[i];
            seq.cached = seq_step.end_pos();
            if seq.cached < seq.prompt.len() {
                continue; // a prefill chunk that is not the last: its logits are not used
            }
            if seq.generated.is_empty() {
                seq.prefill_logits = row.clone();
            }
            seq.generated.push(argmax(&row));
            if seq.done(opts.max_new_tokens) {
                seq.last_logits = row;
            }
        }
    }
    Ok(GreedyOutput {
        prefill_logits: seqs
            .iter_mut()
            .map(|s| std::mem::take(&mut s.prefill_logits))
            .collect(),
        last_logits: seqs
            .iter_mut()
            .map(|s| std::mem::take(&mut s.last_logits))
            .collect(),
        tokens: seqs
            .iter_mut()
            .map(|s| std::mem::take(&mut s.generated))
            .collect(),
        max_batch,
    })
}
