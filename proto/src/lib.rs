//! The contract between the coordinator and the workers: the model config, the shard plan, the KV
//! block tables and the step. The coordinator depends on this crate only, never on the worker.

pub mod candidates;
pub mod compact;
pub mod config;
pub mod error;
pub mod gguf;
pub mod kv_blocks;
pub mod model_files;
pub mod noise;
pub mod plan;
pub mod process;
pub mod rng;
pub mod sampling;
pub mod session;
pub mod step;
pub mod tls;
pub mod token_mask;
pub mod wire;

pub use candidates::SeqLogits;
pub use compact::Compact;
pub use config::{Activation, Architecture, LayerKind, ModelConfig};
pub use error::{ConfigError, KvError, PlanError, WireError};
pub use gguf::{GgmlType, GgufError, GgufHeader, GgufTensor};
pub use kv_blocks::{KvAllocation, KvBlockManager, DEFAULT_BLOCK_SIZE};
pub use model_files::{ModelFiles, ModelFormat};
pub use plan::{PlanRequest, ShardPlan, ShardSpec};
pub use rng::SplitMix64;
pub use sampling::{Penalties, SampleSpec, SampleSpecError};
pub use session::{ClusterId, Session};
pub use step::{SeqStep, StepBatch};
pub use token_mask::TokenMask;

/// Generated wire types and gRPC services (proto/gemma.proto).
#[allow(clippy::all)]
pub mod pb {
    tonic::include_proto!("gemma.v1");
}
