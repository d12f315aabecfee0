//! The OpenAI-compatible HTTP API: POST /v1/completions and /v1/chat/completions (streaming as
//! server-sent events, or not), GET /v1/models, /health, /ready, /metrics. With API keys
//! configured the /v1 routes want `Authorization: Bearer KEY` (`auth`), and with a rate limit
//! each key (or client address) gets so many requests per second (`limits`); the probes and
//! metrics stay open and unlimited.
//!
//! As in TGI's router, one module per concern: `request` (what clients send), `fields` (the
//! audit of OpenAI's request fields: what is served, accepted or refused), `validation`
//! (nothing reaches the engine unchecked), `limits` (connections, request rate), `prompt`
//! (tokenizing off the async runtime), `response` (OpenAI's shapes), `sse` (streaming), `error`
//! (refusals). This module holds the routes and the glue between them.

pub mod auth;
mod error;
pub mod fields;
pub mod limits;
mod prompt;
pub mod request;
pub mod response;
mod sse;
pub mod validation;

use std::num::NonZeroUsize;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::future::join_all;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamMap;
use tracing::Instrument;

pub use error::ApiError;
use request::{ChatRequest, CompletionRequest, JsonBody};
use response::{Answer, ChatCompletions, Completions, Endpoint, ModelList, Readiness, Usage};
use validation::{ValidRequest, Validator};

use crate::chat::ChatTemplate;
use crate::engine::EngineHandle;
use crate::structured::LazyGrammars;
use crate::tokenizer::TextTokenizer;

pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<TextTokenizer>,
    pub chat: Option<ChatTemplate>,
    pub model_name: String,
    pub max_context: usize,
    /// None: the API is open.
    pub api_keys: Option<auth::ApiKeys>,
    /// Most tokens one request may generate (`max_tokens_per_request`, default the context).
    pub max_tokens_per_request: NonZeroUsize,
    /// None: no rate limit.
    pub rate_limiter: Option<limits::RateLimiter>,
    /// The model's vocabulary size (config.json's): the ids `logit_bias` may name.
    pub vocab_size: usize,
    /// Structured output's compiler for this model's vocabulary.
    pub grammars: LazyGrammars,
}

impl AppState {
    fn validator(&self) -> Validator<'_> {
        Validator {
            model_name: &self.model_name,
            max_context: self.max_context,
            kv_capacity: self.engine.kv_capacity_tokens(),
            max_tokens_limit: self.max_tokens_per_request,
            has_chat_template: self.chat.is_some(),
            vocab_size: self.vocab_size,
        }
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        // Layers run outside in: the key is checked before the rate limit keys on it.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::rate::limit_rate,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn completions(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    let (text, fields) = state.validator().completion(req)?;
    let constraint = prompt::compile_output(state.clone(), fields.output()).await?;
    let prompt = prompt::encode_text(state.clone(), text).await?;
    let request = state.validator().with_prompt(fields, prompt, constraint)?;
    respond::<Completions>(state, request).await
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<ChatRequest>,
) -> Result<Response, ApiError> {
    let (messages, fields) = state.validator().chat(req)?;
    let constraint = prompt::compile_output(state.clone(), fields.output()).await?;
    let prompt = prompt::encode_chat(state.clone(), messages).await?;
    let request = state.validator().with_prompt(fields, prompt, constraint)?;
    respond::<ChatCompletions>(state, request).await
}

/// Runs every choice of a valid request on the engine: one JSON answer, or an SSE stream.
async fn respond<E: Endpoint>(
    state: Arc<AppState>,
    request: ValidRequest,
) -> Result<Response, ApiError> {
    let answer = Answer::<E>::new(&state.model_name);
    let span = tracing::info_span!(
        "request",
        id = %answer.id,
        prompt_tokens = request.spec.prompt.len(),
        max_tokens = request.spec.max_tokens,
        n = request.n,
        stream = request.stream
    );
    if request.stream {
        // Submit every choice now, so a full queue is a 429 before any byte is sent.
        let mut choices = StreamMap::new();
        for i in 0..request.n {
            let rx = state.engine.submit(request.choice(i))?;
            choices.insert(i, UnboundedReceiverStream::new(rx));
        }
        let tokenizer = state.tokenizer.clone();
        return Ok(sse::stream(tokenizer, answer, request, choices, span).into_response());
    }
    async {
        let runs = join_all((0..request.n).map(|i| state.engine.generate(request.choice(i)))).await;
        let generations = runs.into_iter().collect::<Result<Vec<_>, _>>()?;
        let completion_tokens: usize = generations.iter().map(|g| g.tokens.len()).sum();
        // The prompt counts once for every choice, as OpenAI counts it; so do its cached tokens,
        // the first choice's (later choices reuse the blocks it computed).
        let prompt_tokens = generations.first().map_or(0, |g| g.prompt_tokens);
        let cached_tokens = generations.first().map_or(0, |g| g.cached_tokens);
        let choices = generations
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let logprobs = request
                    .logprobs()
                    .map(|_| E::logprobs(&state.tokenizer, &g.tokens, 0));
                E::choice(i, g, logprobs)
            })
            .collect();
        let usage = Usage::new(prompt_tokens, completion_tokens, cached_tokens);
        tracing::info!(completion_tokens, "done");
        Ok(Json(answer.completion(choices, usage)).into_response())
    }
    .instrument(span)
    .await
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    Json(ModelList::single(&state.model_name)).into_response()
}

/// Liveness: fails only when the coordinator itself is wedged (its engine loop stopped making
/// progress), so an orchestrator restarts it only when a restart helps. A cluster that is down
/// and healing is alive: `/ready` says it cannot serve.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.engine.wedged() {
        None => "ok".into_response(),
        Some(silent) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("wedged: the engine loop has made no progress for {silent:?}"),
        )
            .into_response(),
    }
}

/// Readiness: 200 while every shard serves; else 503 with the reason (the lost shard's stage,
/// rank and address, and what healing found last).
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let reason = state.engine.cluster_status().outage();
    let (status, body) = match reason {
        None => (
            StatusCode::OK,
            Readiness {
                status: "ready",
                reason: None,
            },
        ),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Readiness {
                status: "unavailable",
                reason: Some(reason),
            },
        ),
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let metrics = &state.engine.metrics;
    metrics
        .kv_blocks_used
        .set(state.engine.kv_blocks_used() as i64);
    metrics
        .kv_blocks_cached
        .set(state.engine.kv_blocks_cached() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.engine.metrics.render(),
    )
        .into_response()
}
