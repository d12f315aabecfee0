//! The OpenAI-compatible HTTP API: POST /v1/completions, POST /v1/chat/completions (not
//! streaming yet), GET /v1/models, GET /health. Every request is validated here; nothing a client
//! sends reaches a worker unchecked.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::Instrument;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::engine::{EngineError, EngineHandle, Generation};
use crate::sampler::SamplingParams;
use crate::tokenizer::TextTokenizer;

/// Most stop strings per request (OpenAI allows 4).
const MAX_STOP: usize = 4;

pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<TextTokenizer>,
    pub chat: Option<ChatTemplate>,
    pub model_name: String,
    pub max_context: usize,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .with_state(state)
}

/// An error in OpenAI's shape.
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
}

impl ApiError {
    fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let status = match e {
            EngineError::TooLong { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self {
            status,
            message: e.to_string(),
            kind: if status == StatusCode::BAD_REQUEST {
                "invalid_request_error"
            } else {
                "server_error"
            },
            param: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": Value::Null,
        }});
        (self.status, Json(body)).into_response()
    }
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(v)| v).map_err(|e| ApiError {
        status: StatusCode::BAD_REQUEST,
        message: format!("invalid JSON body: {}", e.body_text()),
        kind: "invalid_request_error",
        param: None,
    })
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The sampling fields both endpoints share.
#[derive(Debug, Deserialize, Default)]
struct SamplingFields {
    model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    n: Option<i64>,
    stream: Option<bool>,
    logprobs: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Option<OneOrMany>,
    #[serde(flatten)]
    fields: SamplingFields,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Option<Vec<ChatMessage>>,
    #[serde(flatten)]
    fields: SamplingFields,
}

/// A validated generation request.
struct Checked {
    params: SamplingParams,
    max_tokens: usize,
    stop: Vec<String>,
}

fn check(f: &SamplingFields, state: &AppState, prompt_len: usize) -> Result<Checked, ApiError> {
    if let Some(m) = &f.model {
        if m != &state.model_name {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "model {m:?} is not served here; this endpoint serves {:?}",
                    state.model_name
                ),
                kind: "invalid_request_error",
                param: Some("model"),
            });
        }
    }
    if f.stream == Some(true) {
        return Err(ApiError::invalid(
            "stream",
            "streaming is not supported yet; send stream: false",
        ));
    }
    if f.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("n", "only n = 1 is supported"));
    }
    if f.logprobs
        .as_ref()
        .is_some_and(|v| !v.is_null() && v != &json!(false))
    {
        return Err(ApiError::invalid(
            "logprobs",
            "logprobs are not supported yet",
        ));
    }
    let room = state.max_context.saturating_sub(prompt_len);
    let max_tokens = match f.max_completion_tokens.or(f.max_tokens) {
        None => 16.min(room),
        Some(n) if n >= 1 && (n as usize) <= room => n as usize,
        Some(n) => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "max_tokens is {n}; with a prompt of {prompt_len} tokens it must be 1 to {room} (context length {})",
                    state.max_context
                ),
            ))
        }
    };
    if max_tokens == 0 {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "the prompt has {prompt_len} tokens, leaving no room in the context of {}",
                state.max_context
            ),
        ));
    }
    let temperature = f.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("temperature is {temperature}; allowed: 0 to 2"),
        ));
    }
    let top_p = f.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("top_p is {top_p}; allowed: greater than 0, at most 1"),
        ));
    }
    let top_k = match f.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("top_k is {k}; allowed: -1 or 0 (off) or a positive integer"),
            ))
        }
    };
    let min_p = f.min_p.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::invalid(
            "min_p",
            format!("min_p is {min_p}; allowed: 0 to 1"),
        ));
    }
    let penalty = |name: &'static str, v: Option<f32>| -> Result<f32, ApiError> {
        let v = v.unwrap_or(0.0);
        if (-2.0..=2.0).contains(&v) {
            Ok(v)
        } else {
            Err(ApiError::invalid(
                name,
                format!("{name} is {v}; allowed: -2 to 2"),
            ))
        }
    };
    let repetition_penalty = f.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty > 0.0 && repetition_penalty <= 10.0) {
        return Err(ApiError::invalid(
            "repetition_penalty",
            format!("repetition_penalty is {repetition_penalty}; allowed: greater than 0, at most 10 (1 = off)"),
        ));
    }
    let stop = match &f.stop {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s.clone()],
        Some(OneOrMany::Many(v)) => v.clone(),
    };
    if stop.len() > MAX_STOP || stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop",
            format!("stop takes at most {MAX_STOP} non-empty strings"),
        ));
    }
    Ok(Checked {
        params: SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            frequency_penalty: penalty("frequency_penalty", f.frequency_penalty)?,
            presence_penalty: penalty("presence_penalty", f.presence_penalty)?,
            seed: f.seed.unwrap_or_else(random_seed),
        },
        max_tokens,
        stop,
    })
}

/// A seed for requests that give none: different per request.
fn random_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", random_seed())
}

fn usage(g: &Generation) -> Value {
    json!({
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": g.tokens.len(),
        "total_tokens": g.prompt_tokens + g.tokens.len(),
    })
}

async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let req = json_body(body)?;
    let prompt = match req.prompt {
        Some(OneOrMany::One(p)) => p,
        Some(OneOrMany::Many(mut v)) if v.len() == 1 => v.remove(0),
        Some(OneOrMany::Many(_)) => {
            return Err(ApiError::invalid("prompt", "send one prompt per request"))
        }
        None => return Err(ApiError::invalid("prompt", "prompt is required")),
    };
    let ids = state
        .tokenizer
        .encode_prompt(&prompt)
        .map_err(|e| ApiError::invalid("prompt", e.to_string()))?;
    let checked = check(&req.fields, &state, ids.len())?;
    let id = request_id("cmpl");
    let g = generate(&state, &id, ids, checked).await?;
    Ok(Json(json!({
        "id": id,
        "object": "text_completion",
        "created": now(),
        "model": state.model_name,
        "choices": [{
            "index": 0,
            "text": g.text,
            "logprobs": Value::Null,
            "finish_reason": g.finish_reason.as_str(),
        }],
        "usage": usage(&g),
    })))
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let req = json_body(body)?;
    let messages = req.messages.filter(|m| !m.is_empty()).ok_or_else(|| {
        ApiError::invalid("messages", "messages is required and must not be empty")
    })?;
    let template = state.chat.as_ref().ok_or_else(|| {
        ApiError::invalid(
            "messages",
            "this model has no chat template; use /v1/completions",
        )
    })?;
    let text = template
        .render(&messages)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let ids = state
        .tokenizer
        .encode_prompt(&text)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let checked = check(&req.fields, &state, ids.len())?;
    let id = request_id("chatcmpl");
    let g = generate(&state, &id, ids, checked).await?;
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": now(),
        "model": state.model_name,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": g.text},
            "logprobs": Value::Null,
            "finish_reason": g.finish_reason.as_str(),
        }],
        "usage": usage(&g),
    })))
}

async fn generate(
    state: &AppState,
    id: &str,
    ids: Vec<u32>,
    c: Checked,
) -> Result<Generation, ApiError> {
    let span =
        tracing::info_span!("request", %id, prompt_tokens = ids.len(), max_tokens = c.max_tokens);
    async {
        let g = state
            .engine
            .generate(ids, c.params, c.max_tokens, c.stop)
            .await?;
        tracing::info!(
            completion_tokens = g.tokens.len(),
            finish = g.finish_reason.as_str(),
            "done"
        );
        Ok(g)
    }
    .instrument(span)
    .await
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": state.model_name, "object": "model", "created": 0, "owned_by": "gemma-cluster"}],
    }))
}
