//! One step of the cluster: the same small message goes to every worker.

use serde::{Deserialize, Serialize};

/// One sequence's part of a step: its new tokens and where they go in its KV cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeqStep {
    pub seq_id: u64,
    /// Token ids to process: the prompt (or a chunk of it) at prefill, one token at decode.
    pub tokens: Vec<u32>,
    /// Position of `tokens[0]`; positions before it are already in the cache.
    pub start_pos: usize,
    /// KV blocks of the sequence in position order; must cover `start_pos + tokens.len()`.
    pub block_table: Vec<u32>,
    /// What the last stage returns for this sequence: 0 for every logit, n for each rank's n
    /// largest logits plus its log-sum-exp (see `candidates`).
    #[serde(default)]
    pub top_candidates: u32,
    /// Whether the sampler needs log-probabilities (then the last stage sends log-sum-exps).
    #[serde(default)]
    pub log_probs: bool,
    /// Set when the sampler needs more than candidates (penalties, plain temperature sampling,
    /// top-p / min-p without top-k); then `top_candidates` counts candidates by sampling logit
    /// (0: none) and no rank sends its whole slice.
    #[serde(default)]
    pub sampling: Option<crate::sampling::SampleSpec>,
}

impl SeqStep {
    /// Positions covered once this step is done.
    /// Saturating: a `start_pos` from the wire may be anything, and a position past every
    /// model's is refused by the shard's check rather than wrapping around it.
    pub fn end_pos(&self) -> usize {
        self.start_pos.saturating_add(self.tokens.len())
    }
}

/// A batch step: any mix of prefill chunks and decodes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepBatch {
    pub seqs: Vec<SeqStep>,
}

impl StepBatch {
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }
}
