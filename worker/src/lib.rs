//! A gemma-cluster worker: one shard (pipeline stage x tensor rank) of a Gemma model, its paged
//! KV cache, the collective that joins it to the other ranks of its stage, and the gRPC server
//! that runs the coordinator's steps on it.
//!
//! The library is the model plus its server and schedules nothing: the coordinator's engine
//! decides what each step carries. The single-process harnesses (`LocalCluster`,
//! `generate_greedy`, the `gemma-local` binary) live in the test kit, `gemma-testkit`.

pub mod collective;
pub mod data_plane;
pub mod error;
pub mod folder;
pub mod kv_cache;
pub mod kv_sizing;
pub mod model;
pub mod peer_stream;
pub mod q8_matmul;
pub mod server;
pub mod weights;
pub mod wire;

pub use collective::{Collective, InProcessCollective, SoloCollective};
pub use error::{CollectiveError, LoadError, StepError};
pub use folder::ModelFolder;
pub use model::{Shard, ShardOptions, ShardWeights, StageOutput};
