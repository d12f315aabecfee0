//! The gemma-cluster coordinator: HTTP API and OpenAI types, tokenizer and chat template,
//! scheduler, sampler, cluster membership and the step client. It depends on `gemma-proto` only,
//! never on the worker crate (and so never on candle).
//!
//! Its modules arrive with the cluster issue; the shard plan and the KV block manager it will
//! drive already live in `gemma-proto`.

pub use gemma_proto::{KvBlockManager, ModelConfig, PlanRequest, ShardPlan};
