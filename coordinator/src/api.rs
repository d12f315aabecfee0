//! The OpenAI-compatible HTTP API: POST /v1/completions and /v1/chat/completions (streaming as
//! server-sent events, or not), GET /v1/models, /health, /ready, /metrics. Every request is
//! validated here; nothing a client sends reaches a worker unchecked.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::future::join_all;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt, StreamMap};
use tracing::Instrument;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::engine::{EngineError, EngineHandle, Event, Generation, RequestSpec};
use crate::sampler::{Sampled, SamplingParams};
use crate::tokenizer::TextTokenizer;

/// Most stop strings per request (OpenAI allows 4).
const MAX_STOP: usize = 4;
/// Most choices per request.
const MAX_N: i64 = 16;
/// Most alternatives per token in log-probabilities (OpenAI's limit).
const MAX_TOP_LOGPROBS: i64 = 20;

pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<TextTokenizer>,
    pub chat: Option<ChatTemplate>,
    pub model_name: String,
    pub max_context: usize,
    /// None when every worker is loaded and reachable; else why not.
    pub unready: Arc<Mutex<Option<String>>>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
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
        let (status, kind) = match e {
            EngineError::TooLong { .. } => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            EngineError::QueueFull { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
            _ => (StatusCode::SERVICE_UNAVAILABLE, "server_error"),
        };
        Self {
            status,
            message: e.to_string(),
            kind,
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
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
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

#[derive(Debug, Deserialize, Default)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// The fields both endpoints share.
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
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Option<OneOrMany>,
    /// Completions: how many alternatives per token (0 to 20).
    logprobs: Option<i64>,
    #[serde(flatten)]
    fields: SamplingFields,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Option<Vec<ChatMessage>>,
    /// Chat: whether to return log-probabilities; `top_logprobs` alternatives (0 to 20).
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
    #[serde(flatten)]
    fields: SamplingFields,
}

/// A validated request: what each choice asks of the engine.
struct Checked {
    spec: RequestSpec,
    n: usize,
    stream: bool,
    include_usage: bool,
    /// Some(k): report log-probabilities with k alternatives.
    logprobs: Option<usize>,
}

impl Checked {
    /// The spec of choice `i`: choice i samples with seed + i, so choices differ and each is
    /// reproducible.
    fn choice(&self, i: usize) -> RequestSpec {
        let mut spec = self.spec.clone();
        spec.params.seed = spec.params.seed.wrapping_add(i as u64);
        spec
    }
}

fn check(
    f: &SamplingFields,
    state: &AppState,
    prompt: Vec<u32>,
    logprobs: Option<i64>,
) -> Result<Checked, ApiError> {
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
    let n = f.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::invalid(
            "n",
            format!("n is {n}; allowed: 1 to {MAX_N}"),
        ));
    }
    let logprobs = match logprobs {
        None => None,
        Some(k) if (0..=MAX_TOP_LOGPROBS).contains(&k) => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("{k} alternatives per token requested; allowed: 0 to {MAX_TOP_LOGPROBS}"),
            ))
        }
    };
    let prompt_len = prompt.len();
    let room = state.max_context.saturating_sub(prompt_len);
    if room == 0 {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "the prompt has {prompt_len} tokens, leaving no room in the context of {}",
                state.max_context
            ),
        ));
    }
    let max_tokens = match f.max_completion_tokens.or(f.max_tokens) {
        None => 16.min(room),
        Some(m) if m >= 1 && (m as usize) <= room => m as usize,
        Some(m) => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "max_tokens is {m}; with a prompt of {prompt_len} tokens it must be 1 to {room} (context length {})",
                    state.max_context
                ),
            ))
        }
    };
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
    let stream = f.stream.unwrap_or(false);
    if f.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "stream_options needs stream: true",
        ));
    }
    Ok(Checked {
        spec: RequestSpec {
            prompt,
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
            logprobs,
            max_tokens,
            stop,
        },
        n: n as usize,
        stream,
        include_usage: f
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        logprobs,
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

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// Which endpoint's shapes to answer in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    Completions,
    Chat,
}

struct Answer {
    api: Api,
    id: String,
    created: u64,
    model: String,
}

impl Answer {
    fn new(api: Api, model: &str) -> Self {
        let prefix = match api {
            Api::Completions => "cmpl",
            Api::Chat => "chatcmpl",
        };
        Self {
            api,
            id: request_id(prefix),
            created: now(),
            model: model.to_string(),
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.api, chunk) {
            (Api::Completions, _) => "text_completion",
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
        }
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// Log-probabilities of some tokens in this endpoint's shape.
    fn logprobs(&self, tok: &TextTokenizer, tokens: &[Sampled], text_start: usize) -> Value {
        match self.api {
            Api::Chat => json!({"content": tokens.iter().map(|s| {
                let text = tok.token_text(s.token);
                json!({
                    "token": text,
                    "logprob": s.logprob,
                    "bytes": text.as_bytes(),
                    "top_logprobs": s.top_logprobs.iter().map(|&(t, lp)| {
                        let alt = tok.token_text(t);
                        json!({"token": alt, "logprob": lp, "bytes": alt.as_bytes()})
                    }).collect::<Vec<_>>(),
                })
            }).collect::<Vec<_>>()}),
            Api::Completions => {
                let texts: Vec<String> = tokens.iter().map(|s| tok.token_text(s.token)).collect();
                let mut offset = text_start;
                let offsets: Vec<usize> = texts
                    .iter()
                    .map(|t| {
                        let at = offset;
                        offset += t.len();
                        at
                    })
                    .collect();
                json!({
                    "tokens": texts,
                    "token_logprobs": tokens.iter().map(|s| s.logprob).collect::<Vec<_>>(),
                    "top_logprobs": tokens.iter().map(|s| {
                        s.top_logprobs.iter().map(|&(t, lp)| (tok.token_text(t), json!(lp))).collect::<serde_json::Map<_, _>>()
                    }).collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
        }
    }

    fn choice(&self, index: usize, g: &Generation, logprobs: Option<Value>) -> Value {
        match self.api {
            Api::Completions => json!({
                "index": index,
                "text": g.text,
                "logprobs": logprobs,
                "finish_reason": g.finish_reason.as_str(),
            }),
            Api::Chat => json!({
                "index": index,
                "message": {"role": "assistant", "content": g.text},
                "logprobs": logprobs,
                "finish_reason": g.finish_reason.as_str(),
            }),
        }
    }

    fn delta(
        &self,
        index: usize,
        text: &str,
        logprobs: Option<Value>,
        finish: Option<&str>,
    ) -> Value {
        match self.api {
            Api::Completions => json!({
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
            Api::Chat => {
                let delta = if finish.is_some() && text.is_empty() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
        }
    }
}

async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
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
    let checked = check(&req.fields, &state, ids, req.logprobs)?;
    let answer = Answer::new(Api::Completions, &state.model_name);
    respond(state, answer, checked).await
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
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
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (Some(true), k) => Some(k.unwrap_or(0)),
        (_, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            ))
        }
        _ => None,
    };
    let checked = check(&req.fields, &state, ids, logprobs)?;
    let answer = Answer::new(Api::Chat, &state.model_name);
    respond(state, answer, checked).await
}

async fn respond(state: Arc<AppState>, answer: Answer, c: Checked) -> Result<Response, ApiError> {
    let span = tracing::info_span!(
        "request",
        id = %answer.id,
        prompt_tokens = c.spec.prompt.len(),
        max_tokens = c.spec.max_tokens,
        n = c.n,
        stream = c.stream
    );
    if c.stream {
        // Submit every choice now, so a full queue is a 429 before any byte is sent.
        let mut streams = StreamMap::new();
        for i in 0..c.n {
            let rx = state.engine.submit(c.choice(i))?;
            streams.insert(i, UnboundedReceiverStream::new(rx));
        }
        let events = sse_stream(state, answer, c, streams, span);
        return Ok(Sse::new(events).into_response());
    }
    async {
        let runs = join_all((0..c.n).map(|i| state.engine.generate(c.choice(i)))).await;
        let gens = runs.into_iter().collect::<Result<Vec<_>, _>>()?;
        let completion_tokens: usize = gens.iter().map(|g| g.tokens.len()).sum();
        let prompt_tokens = gens.first().map_or(0, |g| g.prompt_tokens);
        let choices = gens
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let lp = c
                    .logprobs
                    .map(|_| answer.logprobs(&state.tokenizer, &g.tokens, 0));
                answer.choice(i, g, lp)
            })
            .collect();
        let mut body = answer.envelope(false, choices);
        body["usage"] = usage(prompt_tokens, completion_tokens);
        tracing::info!(completion_tokens, "done");
        Ok(Json(body).into_response())
    }
    .instrument(span)
    .await
}

/// Server-sent events in OpenAI's chunk format: one chunk per token and choice, a final chunk
/// with the finish reason, optionally a usage chunk, then `data: [DONE]`. Dropping the stream
/// (the client went away) drops the engine receivers, which cancels the requests.
fn sse_stream(
    state: Arc<AppState>,
    answer: Answer,
    c: Checked,
    mut streams: StreamMap<usize, UnboundedReceiverStream<Event>>,
    span: tracing::Span,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    async_stream_lite(span.clone(), move |tx| async move {
        let send = |v: Value| tx.send(Ok(SseEvent::default().data(v.to_string())));
        if answer.api == Api::Chat {
            for i in 0..c.n {
                let first = json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": Value::Null, "finish_reason": Value::Null});
                let mut chunk = answer.envelope(true, vec![first]);
                if c.include_usage {
                    chunk["usage"] = Value::Null;
                }
                if send(chunk).is_err() {
                    return;
                }
            }
        }
        let (mut prompt_tokens, mut completion_tokens) = (0, 0);
        let mut offsets = vec![0usize; c.n];
        while let Some((i, event)) = streams.next().await {
            let choice = match event {
                Event::Token(t) => {
                    let lp = c.logprobs.map(|_| {
                        answer.logprobs(
                            &state.tokenizer,
                            std::slice::from_ref(&t.sampled),
                            offsets[i],
                        )
                    });
                    offsets[i] += t.text.len();
                    answer.delta(i, &t.text, lp, None)
                }
                Event::Done {
                    finish_reason,
                    prompt_tokens: p,
                    completion_tokens: n,
                    tail,
                } => {
                    prompt_tokens = p;
                    completion_tokens += n;
                    answer.delta(i, &tail, None, Some(finish_reason.as_str()))
                }
                Event::Error(e) => {
                    let error = json!({"error": {"message": e.to_string(), "type": "server_error", "param": Value::Null, "code": Value::Null}});
                    let _ = send(error);
                    return;
                }
            };
            let mut chunk = answer.envelope(true, vec![choice]);
            if c.include_usage {
                chunk["usage"] = Value::Null;
            }
            if send(chunk).is_err() {
                return;
            }
        }
        if c.include_usage {
            let mut chunk = answer.envelope(true, Vec::new());
            chunk["usage"] = usage(prompt_tokens, completion_tokens);
            let _ = send(chunk);
        }
        tracing::info!(completion_tokens, "streamed");
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]")));
    })
}

/// A stream fed by an async producer through a channel; the producer stops when the stream is
/// dropped (its sends fail).
fn async_stream_lite<T, F, Fut>(span: tracing::Span, producer: F) -> impl Stream<Item = T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::UnboundedSender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(producer(tx).instrument(span));
    AbortOnDrop {
        inner: UnboundedReceiverStream::new(rx),
        task,
    }
}

/// Ends the producer task as soon as the consumer (the HTTP response) goes away, which drops
/// the engine receivers it holds and so cancels their requests.
struct AbortOnDrop<S> {
    inner: S,
    task: tokio::task::JoinHandle<()>,
}

impl<S: Stream + Unpin> Stream for AbortOnDrop<S> {
    type Item = S::Item;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl<S> Drop for AbortOnDrop<S> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": state.model_name, "object": "model", "created": 0, "owned_by": "gemma-cluster"}],
    }))
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let reason = state
        .unready
        .lock()
        .map(|r| r.clone())
        .unwrap_or_else(|e| e.into_inner().clone());
    match reason {
        None => (StatusCode::OK, Json(json!({"status": "ready"}))).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "reason": reason})),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    state
        .engine
        .metrics
        .kv_blocks_used
        .set(state.engine.kv_blocks_used() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.engine.metrics.render(),
    )
        .into_response()
}
