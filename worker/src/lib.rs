//! A gemma-cluster worker: one shard (pipeline stage x tensor rank) of a Gemma model, its paged
//! KV cache, and the collective that joins it to the other ranks of its stage.

pub mod collective;
pub mod data_plane;
pub mod error;
pub mod folder;
pub mod generate;
pub mod kv_cache;
pub mod local;
pub mod model;
pub mod server;
pub mod weights;
pub mod wire;

pub use collective::{Collective, InProcessCollective, SoloCollective};
pub use error::{CollectiveError, LoadError, RunError, StepError};
pub use folder::ModelFolder;
pub use generate::{generate_greedy, GreedyOptions, GreedyOutput};
pub use local::LocalCluster;
pub use model::{Shard, ShardOptions, StageOutput};
