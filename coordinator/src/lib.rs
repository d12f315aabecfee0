//! The gemma-cluster coordinator: HTTP API and OpenAI types, tokenizer and chat template,
//! engine (scheduler), sampler, cluster membership and the step client. It depends on
//! `gemma-proto` only, never on the worker crate (and so never on candle).

pub mod api;
pub mod chat;
pub mod cluster;
pub mod engine;
pub mod metrics;
pub mod names;
pub mod sampler;
pub mod settings;
pub mod structured;
pub mod tokenizer;
