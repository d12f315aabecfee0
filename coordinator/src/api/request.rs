//! The request bodies of /v1/completions and /v1/chat/completions as clients send them, before
//! any check: numbers stay signed and every field optional, so that a bad value reaches the
//! validator (which says what is allowed) instead of failing deserialization.

use serde::Deserialize;

use crate::chat::ChatMessage;

/// A string or a list of strings (`prompt`, `stop`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// The fields both endpoints share.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct SamplingFields {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    /// The chat API's newer name for `max_tokens`; wins when both are given.
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<OneOrMany>,
    /// vLLM's extension: generate through <eos> and <end_of_turn> until `max_tokens` or a stop
    /// string.
    pub ignore_eos: Option<bool>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct CompletionRequest {
    pub prompt: Option<OneOrMany>,
    /// Completions: how many alternatives per token (0 to 20).
    pub logprobs: Option<i64>,
    #[serde(flatten)]
    pub fields: SamplingFields,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct ChatRequest {
    pub messages: Option<Vec<ChatMessage>>,
    /// Chat: whether to return log-probabilities; `top_logprobs` alternatives (0 to 20).
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    #[serde(flatten)]
    pub fields: SamplingFields,
}
