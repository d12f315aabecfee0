//! Errors of the contract: each says what was wrong and what is allowed.

use std::ops::Range;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a valid config.json: {message}")]
    Json { path: String, message: String },
    #[error("config.json has no `{0}`, which is required")]
    Missing(&'static str),
    #[error("config.json: `{field}` is {value}; allowed: {allowed}")]
    Invalid {
        field: &'static str,
        value: String,
        allowed: String,
    },
    #[error("{path} is not a model: {reason}; --model takes a HuggingFace folder (config.json + safetensors), a .gguf file, or a folder holding one .gguf")]
    NotAModel { path: String, reason: String },
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    #[error("{path}: {inner}")]
    InFile {
        path: String,
        inner: Box<ConfigError>,
    },
}

impl ConfigError {
    pub(crate) fn invalid(field: &'static str, value: &str, allowed: &str) -> Self {
        ConfigError::Invalid {
            field,
            value: value.to_string(),
            allowed: allowed.to_string(),
        }
    }

    /// Names the file an error came from.
    pub(crate) fn in_file(self, path: &Path) -> Self {
        let path = path.display().to_string();
        match self {
            ConfigError::Json { message, .. } => ConfigError::Json { path, message },
            e @ (ConfigError::Read { .. }
            | ConfigError::InFile { .. }
            | ConfigError::NotAModel { .. }
            | ConfigError::Gguf(_)) => e,
            inner => ConfigError::InFile {
                path,
                inner: Box::new(inner),
            },
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("{what}={value} is not allowed; it must be at least 1")]
    Zero { what: &'static str, value: usize },
    #[error("tp={tp} does not divide {heads} attention heads; use {allowed}")]
    HeadsNotDivisible {
        tp: usize,
        heads: usize,
        allowed: String,
    },
    #[error(
        "tp={tp} cannot share {kv_heads} key-value heads: tp must divide them or be a multiple of \
         them; use {allowed}"
    )]
    KvHeadsIncompatible {
        tp: usize,
        kv_heads: usize,
        allowed: String,
    },
    #[error("pp={pp} exceeds the model's {layers} layers; use 1 to {layers}")]
    TooManyStages { pp: usize, layers: usize },
    #[error("layers per stage {given:?} has {len} entries but pp={pp}; give one count per stage")]
    StageCountMismatch {
        given: Vec<usize>,
        len: usize,
        pp: usize,
    },
    #[error(
        "layers per stage {given:?} sum to {sum} but the model has {layers} layers; the counts \
         must add up to {layers}, each at least 1"
    )]
    LayerSumMismatch {
        given: Vec<usize>,
        sum: usize,
        layers: usize,
    },
    #[error(
        "layers per stage {given:?} gives stage {stage} no layers; every stage needs at least 1"
    )]
    EmptyStage { given: Vec<usize>, stage: usize },
    #[error("tp={tp} exceeds intermediate_size {intermediate}")]
    TooManyRanks { tp: usize, intermediate: usize },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvError {
    #[error(
        "out of KV blocks: {needed} more needed, {free} free of {total} (block size {block_size})"
    )]
    OutOfBlocks {
        needed: usize,
        free: usize,
        total: usize,
        block_size: usize,
    },
}

/// A message that does not fit its contract. The last stage's answer is checked against the step
/// that asked for it (see `wire.rs`), so a short, oversized or mismatched answer is refused here
/// instead of being sampled from.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("message lacks {0}")]
    Missing(&'static str),
    #[error("a session's cluster id is 16 bytes; this one has {len}")]
    SessionId { len: usize },
    #[error("{0}")]
    Invalid(String),
    #[error("the answer covers {sent} sequences; the step had {expected}, one answer each")]
    SequenceCount { sent: usize, expected: usize },
    #[error(
        "sequence {seq_id}: `full` holds {bytes} bytes; vocabulary rows {rows:?} take {expected} \
         (4 per row, f32 little-endian)"
    )]
    FullLength {
        seq_id: u64,
        bytes: usize,
        rows: Range<usize>,
        expected: usize,
    },
    #[error(
        "sequence {seq_id}: {candidates} candidates sent, but the step asked for every logit of \
         the slice (top_candidates 0)"
    )]
    CandidatesForFull { seq_id: u64, candidates: usize },
    #[error(
        "sequence {seq_id}: every logit of the slice sent, but the step asked for the {asked} best \
         candidates"
    )]
    FullForTop { seq_id: u64, asked: u32 },
    #[error(
        "sequence {seq_id}: {ids} candidate ids but {logits} logits; each candidate needs one of \
         each"
    )]
    CandidateLengths {
        seq_id: u64,
        ids: usize,
        logits: usize,
    },
    #[error(
        "sequence {seq_id}: {sent} candidates; the step asked for the {asked} best of vocabulary \
         rows {rows:?}, which are {expected}"
    )]
    CandidateCount {
        seq_id: u64,
        sent: usize,
        asked: u32,
        rows: Range<usize>,
        expected: usize,
    },
    #[error(
        "sequence {seq_id}: candidate id {id} is outside this rank's vocabulary rows {rows:?}"
    )]
    CandidateOutsideSlice {
        seq_id: u64,
        id: u32,
        rows: Range<usize>,
    },
    #[error(
        "sequence {seq_id}: candidates {at} and {next} are out of order; they must run by logit \
         descending, then id ascending, each id once",
        next = .at + 1
    )]
    CandidatesOutOfOrder { seq_id: u64, at: usize },
    #[error("no rank of the last stage answered; every rank must send its vocabulary slice")]
    NoRanks,
    #[error(
        "sequence {seq_id}: the last stage's ranks answered in different forms (every logit from \
         some, candidates from others); all must send what the step asked for"
    )]
    MixedForms { seq_id: u64 },
    #[error("sequence {seq_id}: the compact answer is malformed: {what}")]
    Compact { seq_id: u64, what: String },
}
