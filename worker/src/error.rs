//! Errors of the worker library. Loading errors name the file, the tensor, and expected vs found.

use gemma_proto::{ConfigError, PlanError, Session, ShardSpec};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "{dir}: no model.safetensors and no model.safetensors.index.json; a HuggingFace model \
         folder needs one of them"
    )]
    NoWeights { dir: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Corrupt { path: String, reason: String },
    #[error("{path}: not a valid safetensors index: {reason}")]
    BadIndex { path: String, reason: String },
    #[error("tensor {tensor} not found in {files}")]
    MissingTensor { tensor: String, files: String },
    #[error("{path}: tensor {tensor} has shape {found:?}, expected {expected:?}")]
    Shape {
        path: String,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor {tensor} of shape {shape:?} cannot be sliced as {slice}")]
    Slice {
        path: String,
        tensor: String,
        shape: Vec<usize>,
        slice: String,
    },
    #[error(
        "{path}: tensor {tensor} is stored as {found}; supported: F32, BF16, F16 (safetensors), \
         and in GGUF also Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q8_K with whole blocks per row"
    )]
    Dtype {
        path: String,
        tensor: String,
        found: String,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("tensor {tensor}: {source}")]
    Candle {
        tensor: String,
        source: candle_core::Error,
    },
    #[error("allocating the KV cache: {0}")]
    KvCache(candle_core::Error),
}

/// Why a step was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("invalid step: {0}")]
    Invalid(String),
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error("compute: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("the last stage's logits: {0}")]
    Output(#[from] WireTensorError),
    #[error("invalid step: {0}")]
    Sampling(#[from] gemma_proto::SampleSpecError),
}

/// Why a worker could not take its assignment (it then reports Failed with this message).
#[derive(Debug, thiserror::Error)]
pub enum AssignError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(
        "the coordinator's shard {expected:?} differs from this worker's plan of {model} (is it \
         the same model?)"
    )]
    ShardMismatch {
        expected: Box<ShardSpec>,
        model: String,
    },
    #[error(
        "a KV budget of {budget} bytes holds no block; one block of {block_size} tokens takes \
         {per_block} bytes on this shard"
    )]
    NoKvBlock {
        budget: u64,
        block_size: usize,
        per_block: u64,
    },
    #[error(
        "cannot size the KV cache from this host's memory ({0}); give the coordinator \
         --kv-budget-mib"
    )]
    HostMemory(String),
    #[error(transparent)]
    DataPlane(#[from] CollectiveError),
}

/// Why a session may not do what it asked: the worker is held by another one. Each names the
/// holder, so the caller knows whom it is waiting for (and, for a live lease, for how long).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum HoldError {
    #[error(
        "this worker holds epoch {} of cluster {}; epoch {} is older",
        held.epoch, held.cluster_id, offered.epoch
    )]
    StaleEpoch { held: Session, offered: Session },
    #[error(
        "this worker already holds epoch {} of cluster {}; a re-assignment needs a newer epoch",
        held.epoch, held.cluster_id
    )]
    SameEpoch { held: Session },
    #[error(
        "this worker is held by {holder}; its lease expires in {left_ms} ms (then any \
         coordinator may assign it)"
    )]
    Leased { holder: Session, left_ms: u64 },
    #[error("this worker is held by {holder}, not by {offered}; only its holder may release it")]
    NotHolder { holder: Session, offered: Session },
    #[error("the step carries {offered}; this worker holds {held} and takes only its steps")]
    WrongStepSession { held: Session, offered: Session },
    #[error("the step carries {offered}; this worker holds no assignment (Assign it first)")]
    NotHeld { offered: Session },
}

#[derive(Debug, thiserror::Error, Clone)]
pub enum CollectiveError {
    #[error("all-reduce on rank {rank}: no partial from {missing:?} within {waited_ms} ms")]
    Timeout {
        rank: usize,
        missing: Vec<usize>,
        waited_ms: u128,
    },
    #[error("all-reduce aborted: {0}")]
    Aborted(String),
    #[error("all-reduce: partials disagree: {0}")]
    Mismatch(String),
    #[error("data plane link to shard {peer}: {reason}")]
    Link { peer: usize, reason: String },
    #[error("data plane: {0}")]
    Connect(String),
}

/// A data-plane frame that could not be read: the connection broke, or what the peer sent is not
/// what this rank expects (it is never allocated for).
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("a {what} of {len} bytes exceeds the limit of {limit}")]
    TooLong {
        what: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("malformed {0}")]
    Malformed(String),
    #[error("expected a frame of {expected}, got {found}")]
    Unexpected { expected: String, found: String },
}

/// A tensor that cannot be put on or taken off the wire.
#[derive(Debug, thiserror::Error, Clone)]
#[error("wire tensor: {0}")]
pub struct WireTensorError(pub String);

impl WireTensorError {
    pub fn candle(e: candle_core::Error) -> Self {
        Self(e.to_string())
    }
}
