//! The request bodies of /v1/completions and /v1/chat/completions as clients send them, before
//! any check: numbers stay signed and every field optional, so that a bad value reaches the
//! validator (which says what is allowed) instead of failing deserialization. Fields these
//! types do not hold are refused before deserialization by the audit in `fields`.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::fields::{self, Api};
use super::ApiError;
use crate::chat::ChatMessage;

/// A request body of one endpoint: which column of the field audit it is checked against.
pub trait RequestBody: DeserializeOwned {
    const API: Api;
}

/// A JSON request body whose errors name the field they are in (`max_tokens: invalid type:
/// string "ten", expected i64`); past the body limit, 413.
pub struct JsonBody<T>(pub T);

impl<T: RequestBody, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await?;
        parse_body(&bytes).map(Self)
    }
}

/// A body's bytes as `T`, or the refusal naming the field at fault: what [`JsonBody`] does once
/// the body is read (the property tests feed it arbitrary bodies). Fields the endpoint refuses
/// or does not know are refused first, all of them named.
pub fn parse_body<T: RequestBody>(bytes: &[u8]) -> Result<T, ApiError> {
    let json: serde_json::Value = serde_json::from_slice(bytes).map_err(ApiError::json)?;
    if let Some(body) = json.as_object() {
        let refused = fields::check(T::API, body);
        if !refused.is_empty() {
            return Err(ApiError::fields(refused));
        }
    }
    match serde_path_to_error::deserialize(&json) {
        Ok(value) => Ok(value),
        Err(e) if e.path().to_string() == "." => Err(culprit::<T>(&json).unwrap_or(e.into())),
        Err(e) => Err(e.into()),
    }
}

/// The error of the one top-level field that breaks `T` on its own. Flattened fields (the shared
/// sampling fields) hide their path from serde; every field being optional, a body holding just
/// the bad field fails where the empty body does not.
fn culprit<T: DeserializeOwned>(json: &serde_json::Value) -> Option<ApiError> {
    let empty = serde_json::Value::Object(serde_json::Map::new());
    let baseline = T::deserialize(&empty).err().map(|e| e.to_string());
    json.as_object()?.iter().find_map(|(key, value)| {
        let alone = serde_json::Value::Object([(key.clone(), value.clone())].into_iter().collect());
        let e = T::deserialize(&alone).err()?;
        (Some(e.to_string()) != baseline).then(|| ApiError::field(key, &e))
    })
}

/// A string or a list of strings (`prompt`, `stop`).
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "a string or a list of strings (prompts as token ids are not supported: send text)"
)]
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

/// Any other key is refused (a typo of `include_usage` must not pass unnoticed).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
    /// vLLM's extension: usage (so far) on every chunk, not only the last; needs include_usage.
    pub continuous_usage_stats: Option<bool>,
    /// OpenAI's random padding of stream events (against length side channels): accepted and
    /// changes nothing; no padding is sent.
    pub include_obfuscation: Option<bool>,
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
    /// vLLM's extension: no stop token or stop string ends the output before this many tokens
    /// (stop tokens are not drawn until then).
    pub min_tokens: Option<i64>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Token id (as a JSON object key: a string) -> bias in [-100, 100]. Values stay f64 so
    /// that one past f32's range is refused by the validator, not rounded to infinity.
    pub logit_bias: Option<BTreeMap<String, f64>>,
    /// OpenAI's structured output (and, as vLLM takes it, on /v1/completions too).
    pub response_format: Option<ResponseFormat>,
    /// vLLM's structured output: exactly one of its keys.
    pub structured_outputs: Option<StructuredOutputs>,
}

/// OpenAI's `response_format`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

/// `response_format.json_schema`: OpenAI's fields, no others.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    pub description: Option<String>,
    /// Absent: any JSON value.
    pub schema: Option<serde_json::Value>,
    /// OpenAI's strict mode: objects allow only the properties they list. The output follows
    /// the schema exactly either way.
    pub strict: Option<bool>,
}

/// vLLM's `structured_outputs` (its `StructuredOutputsParams`), the keys this server serves.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StructuredOutputs {
    /// A JSON Schema, as an object or as a string holding one.
    pub json: Option<serde_json::Value>,
    pub regex: Option<String>,
    pub choice: Option<Vec<String>>,
    /// A Lark grammar (llguidance's dialect).
    pub grammar: Option<String>,
    pub json_object: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct CompletionRequest {
    pub prompt: Option<OneOrMany>,
    /// Completions: how many alternatives per token (0 to 20).
    pub logprobs: Option<i64>,
    /// Accepted when equal to n: no extra generations are made to choose the best from.
    pub best_of: Option<i64>,
    #[serde(flatten)]
    pub fields: SamplingFields,
}

impl RequestBody for CompletionRequest {
    const API: Api = Api::Completions;
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

impl RequestBody for ChatRequest {
    const API: Api = Api::Chat;
}
