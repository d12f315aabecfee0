//! Request validation: nothing a client sends reaches the engine unchecked. Checking is split in
//! two because one rule needs the prompt's tokens: [`Validator::completion`] and
//! [`Validator::chat`] check every other field and report every rule that fails (not only the
//! first), so a request that is refused anyway is never tokenized; [`Validator::with_prompt`]
//! then checks the prompt and `max_tokens` against every bound on their tokens (the context, the
//! cluster's KV pool, the server's `max_tokens_per_request`). Whatever the engine would refuse
//! for the request's shape is refused here, so a streamed request never gets a 200 that ends in
//! an error event for something its client sent.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroUsize;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;

use super::request::{ChatRequest, CompletionRequest, OneOrMany, ResponseFormat, SamplingFields};
use crate::chat::{ChatError, ChatMessage};
use crate::engine::RequestSpec;
use crate::sampler::SamplingParams;
use crate::structured::{Constraint, OutputFormat};
use crate::tokenizer::TokenizerError;

/// Most stop strings per request (OpenAI allows 4).
pub const MAX_STOP: usize = 4;
/// Most choices per request.
pub const MAX_N: i64 = 16;
/// Most alternatives per token in log-probabilities (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: i64 = 20;
/// `max_tokens` when the request gives none (OpenAI's default), if the context has room.
pub const DEFAULT_MAX_TOKENS: usize = 16;
/// Most `logit_bias` entries per request (OpenAI's limit). Every entry travels to every worker
/// with each step of the sequence (about 7 bytes each).
pub const MAX_LOGIT_BIAS_ENTRIES: usize = 300;
/// The largest bias magnitude (OpenAI's); -100 bans the token.
const MAX_BIAS: f64 = gemma_proto::sampling::MAX_LOGIT_BIAS as f64;

/// One broken rule: what was wrong and what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error("model {requested:?} is not served here; this endpoint serves {served:?}")]
    UnknownModel { requested: String, served: String },
    #[error("prompt is required")]
    MissingPrompt,
    #[error("send one prompt per request ({count} were sent)")]
    SeveralPrompts { count: usize },
    #[error("messages is required and must not be empty")]
    MissingMessages,
    #[error("this model has no chat template; use /v1/completions")]
    NoChatTemplate,
    #[error("n is {0}; allowed: 1 to {MAX_N}")]
    N(i64),
    #[error("{value} alternatives per token requested; allowed: 0 to {MAX_TOP_LOGPROBS}")]
    Alternatives { param: &'static str, value: i64 },
    #[error("top_logprobs needs logprobs: true")]
    TopLogprobsWithoutLogprobs,
    #[error("temperature is {0}; allowed: 0 to 2")]
    Temperature(f32),
    #[error("top_p is {0}; allowed: greater than 0, at most 1")]
    TopP(f32),
    #[error("top_k is {0}; allowed: -1 or 0 (off) or a positive integer")]
    TopK(i64),
    #[error("min_p is {0}; allowed: 0 to 1")]
    MinP(f32),
    #[error("frequency_penalty is {0}; allowed: -2 to 2")]
    FrequencyPenalty(f32),
    #[error("presence_penalty is {0}; allowed: -2 to 2")]
    PresencePenalty(f32),
    #[error("repetition_penalty is {0}; allowed: greater than 0, at most 10 (1 = off)")]
    RepetitionPenalty(f32),
    #[error("stop has {0} strings; allowed: at most {MAX_STOP} non-empty strings")]
    TooManyStops(usize),
    #[error("stop has an empty string; allowed: at most {MAX_STOP} non-empty strings")]
    EmptyStop,
    #[error("stream_options needs stream: true")]
    StreamOptionsWithoutStream,
    #[error("stream_options.continuous_usage_stats needs stream_options.include_usage: true")]
    ContinuousUsageWithoutUsage,
    #[error("min_tokens is {value}; allowed: 0 to max_tokens ({max_tokens})")]
    MinTokens { value: i64, max_tokens: usize },
    #[error("min_tokens is {0}; allowed: 0 to max_tokens")]
    NegativeMinTokens(i64),
    #[error(
        "best_of is {best_of}; allowed: n ({n}): every choice is one generation, none are made \
         to choose the best from"
    )]
    BestOf { best_of: i64, n: i64 },
    #[error("logit_bias has {0} entries; allowed: at most {MAX_LOGIT_BIAS_ENTRIES}")]
    LogitBiasSize(usize),
    #[error(
        "logit_bias key {key:?} is not a token id; allowed: token ids 0 to {} as strings of \
         digits",
        vocab_size.saturating_sub(1)
    )]
    LogitBiasKey { key: String, vocab_size: usize },
    #[error("logit_bias names token {0} twice")]
    LogitBiasTwice(u32),
    #[error("logit_bias of token {key} is {value}; allowed: -100 to 100 (-100 bans the token)")]
    LogitBiasValue { key: String, value: f64 },
    #[error(
        "logit_bias bans every token of the vocabulary ({0}); allowed: at least one token left \
         to draw"
    )]
    LogitBiasBansAll(usize),
    /// The conversation does not fit the model's chat template (roles, order).
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error("{source}")]
    Tokenize {
        param: &'static str,
        source: TokenizerError,
    },
    #[error(
        "the prompt has {prompt_tokens} tokens, leaving no room for output in {limit}; allowed: \
         a prompt of at most {} tokens",
        limit.tokens().saturating_sub(1)
    )]
    NoRoom {
        prompt_tokens: usize,
        limit: TokenLimit,
    },
    #[error(
        "max_tokens is {value}; with a prompt of {prompt_tokens} tokens it must be 1 to {allowed} \
         ({limit})"
    )]
    MaxTokens {
        value: i64,
        prompt_tokens: usize,
        allowed: usize,
        limit: TokenLimit,
    },
    #[error(
        "response_format and structured_outputs both ask for a format; allowed: one of them \
         (response_format {{\"type\": \"text\"}} with structured_outputs)"
    )]
    TwoOutputFormats,
    #[error(
        "the prompt tokenizes to id {id}, outside the model's vocabulary of {vocab_size}; \
         allowed: text whose tokens the model has (the tokenizer knows more tokens than the \
         model)"
    )]
    OutsideVocabulary { id: u32, vocab_size: usize },
    #[error("{param}: {reason}")]
    OutputFormat { param: &'static str, reason: String },
}

/// A bound on a request's tokens, as a refusal names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenLimit {
    /// The model's context length: prompt and output together.
    Context(usize),
    /// The cluster's KV pool in tokens: one sequence's prompt and output together can never
    /// outgrow it (smaller than the context when `kv_budget_mib` is).
    KvPool(usize),
    /// The server's `max_tokens_per_request`: output only.
    PerRequest(usize),
}

impl TokenLimit {
    pub fn tokens(self) -> usize {
        match self {
            TokenLimit::Context(n) | TokenLimit::KvPool(n) | TokenLimit::PerRequest(n) => n,
        }
    }
}

impl fmt::Display for TokenLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenLimit::Context(n) => write!(f, "the context length, {n} tokens"),
            TokenLimit::KvPool(n) => write!(f, "the cluster's KV cache, {n} tokens"),
            TokenLimit::PerRequest(n) => write!(f, "this server's max_tokens_per_request, {n}"),
        }
    }
}

impl ValidationError {
    /// The request field at fault, as OpenAI's error `param` names it.
    pub fn param(&self) -> &'static str {
        use ValidationError::*;
        match self {
            UnknownModel { .. } => "model",
            MissingPrompt | SeveralPrompts { .. } | NoRoom { .. } | OutsideVocabulary { .. } => {
                "prompt"
            }
            MissingMessages | NoChatTemplate | Chat(_) => "messages",
            N(_) => "n",
            Alternatives { param, .. } | Tokenize { param, .. } => param,
            TopLogprobsWithoutLogprobs => "top_logprobs",
            Temperature(_) => "temperature",
            TopP(_) => "top_p",
            TopK(_) => "top_k",
            MinP(_) => "min_p",
            FrequencyPenalty(_) => "frequency_penalty",
            PresencePenalty(_) => "presence_penalty",
            RepetitionPenalty(_) => "repetition_penalty",
            TooManyStops(_) | EmptyStop => "stop",
            StreamOptionsWithoutStream | ContinuousUsageWithoutUsage => "stream_options",
            MinTokens { .. } | NegativeMinTokens(_) => "min_tokens",
            BestOf { .. } => "best_of",
            LogitBiasSize(_)
            | LogitBiasKey { .. }
            | LogitBiasTwice(_)
            | LogitBiasValue { .. }
            | LogitBiasBansAll(_) => "logit_bias",
            MaxTokens { .. } => "max_tokens",
            TwoOutputFormats => "structured_outputs",
            OutputFormat { param, .. } => param,
        }
    }

    /// 404 for a model this server does not serve, as OpenAI answers; 400 for the rest.
    pub fn status(&self) -> StatusCode {
        match self {
            ValidationError::UnknownModel { .. } => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// Every rule a request broke, in the order the fields are checked; never empty.
#[derive(Debug)]
pub struct ValidationErrors {
    first: ValidationError,
    rest: Vec<ValidationError>,
}

impl ValidationErrors {
    /// None when there is nothing to report.
    fn collect(errors: Vec<ValidationError>) -> Option<Self> {
        let mut errors = errors.into_iter();
        let first = errors.next()?;
        Some(Self {
            first,
            rest: errors.collect(),
        })
    }

    /// The first broken rule: its field is the error's `param`, its status the answer's.
    pub fn first(&self) -> &ValidationError {
        &self.first
    }

    pub fn iter(&self) -> impl Iterator<Item = &ValidationError> {
        std::iter::once(&self.first).chain(&self.rest)
    }
}

impl From<ValidationError> for ValidationErrors {
    fn from(first: ValidationError) -> Self {
        Self {
            first,
            rest: Vec::new(),
        }
    }
}

/// One error's message alone; several joined by "; and ".
impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.first)?;
        for e in &self.rest {
            write!(f, "; and {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

/// Every field of a request checked, except what depends on the prompt's length.
#[derive(Debug, Clone)]
pub struct ValidFields {
    params: SamplingParams,
    logprobs: Option<usize>,
    stop: Vec<String>,
    ignore_eos: bool,
    /// As the client sent it: its upper bound depends on max_tokens.
    min_tokens: i64,
    /// As the client sent it: its upper bound depends on the prompt.
    max_tokens: Option<i64>,
    n: usize,
    stream: bool,
    include_usage: bool,
    continuous_usage: bool,
    /// The structured output asked for, with the field that asked.
    output: Option<(&'static str, OutputFormat)>,
}

impl ValidFields {
    /// The structured output asked for and the field that asked (compiled before the prompt
    /// is tokenized).
    pub fn output(&self) -> Option<(&'static str, OutputFormat)> {
        self.output.clone()
    }
}

/// A request that may run: what each choice asks of the engine.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    /// Choice 0's spec.
    pub spec: RequestSpec,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// Usage so far on every chunk (vLLM's `continuous_usage_stats`, with `include_usage`).
    pub continuous_usage: bool,
}

impl ValidRequest {
    /// The spec of choice `i`: choice i samples with seed + i, so choices differ and each is
    /// reproducible.
    pub fn choice(&self, i: usize) -> RequestSpec {
        let mut spec = self.spec.clone();
        spec.params.seed = spec.params.seed.wrapping_add(i as u64);
        spec
    }

    /// Some(k): report log-probabilities with k alternatives per token.
    pub fn logprobs(&self) -> Option<usize> {
        self.spec.logprobs
    }
}

/// What a request is checked against: the served model, its context and the server's limits.
#[derive(Debug, Clone, Copy)]
pub struct Validator<'a> {
    pub model_name: &'a str,
    pub max_context: usize,
    /// Tokens the cluster's KV pool holds (blocks x block size).
    pub kv_capacity: usize,
    /// Most tokens one request may generate (`max_tokens_per_request`).
    pub max_tokens_limit: NonZeroUsize,
    pub has_chat_template: bool,
    /// The model's vocabulary (its logits): `logit_bias` ids must be below it.
    pub vocab_size: usize,
}

impl Validator<'_> {
    /// A completion request: its one prompt's text and its checked fields.
    pub fn completion(
        &self,
        req: CompletionRequest,
    ) -> Result<(String, ValidFields), ValidationErrors> {
        let mut errors = Vec::new();
        let prompt = match req.prompt.map(OneOrMany::into_vec) {
            None => {
                errors.push(ValidationError::MissingPrompt);
                None
            }
            Some(mut v) if v.len() == 1 => v.pop(),
            Some(v) => {
                errors.push(ValidationError::SeveralPrompts { count: v.len() });
                None
            }
        };
        let fields = self.fields(&req.fields, req.logprobs, "logprobs", &mut errors);
        if let Some(best_of) = req.best_of {
            let n = req.fields.n.unwrap_or(1);
            if best_of != n {
                errors.push(ValidationError::BestOf { best_of, n });
            }
        }
        match (prompt, ValidationErrors::collect(errors)) {
            (Some(prompt), None) => Ok((prompt, fields)),
            (_, Some(errors)) => Err(errors),
            (None, None) => Err(ValidationError::MissingPrompt.into()),
        }
    }

    /// A chat request: its conversation and its checked fields.
    pub fn chat(
        &self,
        req: ChatRequest,
    ) -> Result<(Vec<ChatMessage>, ValidFields), ValidationErrors> {
        let mut errors = Vec::new();
        let messages = req.messages.filter(|m| !m.is_empty());
        if messages.is_none() {
            errors.push(ValidationError::MissingMessages);
        }
        if !self.has_chat_template {
            errors.push(ValidationError::NoChatTemplate);
        }
        let alternatives = match (req.logprobs, req.top_logprobs) {
            (Some(true), k) => Some(k.unwrap_or(0)),
            (_, Some(_)) => {
                errors.push(ValidationError::TopLogprobsWithoutLogprobs);
                None
            }
            _ => None,
        };
        let fields = self.fields(&req.fields, alternatives, "top_logprobs", &mut errors);
        match (messages, ValidationErrors::collect(errors)) {
            (Some(messages), None) => Ok((messages, fields)),
            (_, Some(errors)) => Err(errors),
            (None, None) => Err(ValidationError::MissingMessages.into()),
        }
    }

    /// With the prompt tokenized: the prompt must leave room for output in the context and in
    /// the KV pool, and `max_tokens` (default 16, or less where the limits say so) must fit that
    /// room and `max_tokens_per_request`.
    pub fn with_prompt(
        &self,
        fields: ValidFields,
        prompt: Vec<u32>,
        constraint: Option<Constraint>,
    ) -> Result<ValidRequest, ValidationErrors> {
        let prompt_tokens = prompt.len();
        // A tokenizer with more ids than the model's vocabulary (added tokens past it) must not
        // reach the workers, which would refuse the whole step and every request in it.
        if let Some(&id) = prompt.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(ValidationError::OutsideVocabulary {
                id,
                vocab_size: self.vocab_size,
            }
            .into());
        }
        // The engine refuses a sequence whose prompt + max_tokens outgrows the pool; the
        // context bounds every sequence.
        let sequence = match self.kv_capacity < self.max_context {
            true => TokenLimit::KvPool(self.kv_capacity),
            false => TokenLimit::Context(self.max_context),
        };
        let room = sequence.tokens().saturating_sub(prompt_tokens);
        if room == 0 {
            return Err(ValidationError::NoRoom {
                prompt_tokens,
                limit: sequence,
            }
            .into());
        }
        let per_request = self.max_tokens_limit.get();
        let limit = match per_request < room {
            true => TokenLimit::PerRequest(per_request),
            false => sequence,
        };
        let allowed = room.min(per_request);
        let max_tokens = match fields.max_tokens {
            None => DEFAULT_MAX_TOKENS.min(allowed),
            Some(m) if m >= 1 && (m as u64) <= allowed as u64 => m as usize,
            Some(value) => {
                return Err(ValidationError::MaxTokens {
                    value,
                    prompt_tokens,
                    allowed,
                    limit,
                }
                .into())
            }
        };
        if fields.min_tokens as u64 > max_tokens as u64 {
            return Err(ValidationError::MinTokens {
                value: fields.min_tokens,
                max_tokens,
            }
            .into());
        }
        Ok(ValidRequest {
            spec: RequestSpec {
                prompt,
                params: fields.params,
                logprobs: fields.logprobs,
                max_tokens,
                min_tokens: fields.min_tokens.max(0) as usize,
                stop: fields.stop,
                ignore_eos: fields.ignore_eos,
                constraint,
            },
            n: fields.n,
            stream: fields.stream,
            include_usage: fields.include_usage,
            continuous_usage: fields.continuous_usage,
        })
    }

    /// The fields both endpoints share; `alternatives` is the number of log-probability
    /// alternatives asked for (in the field `alternatives_param`). Every broken rule is pushed.
    fn fields(
        &self,
        f: &SamplingFields,
        alternatives: Option<i64>,
        alternatives_param: &'static str,
        errors: &mut Vec<ValidationError>,
    ) -> ValidFields {
        use ValidationError as E;
        let mut rule = |ok: bool, error: E| {
            if !ok {
                errors.push(error);
            }
        };
        if let Some(m) = &f.model {
            rule(
                m == self.model_name,
                E::UnknownModel {
                    requested: m.clone(),
                    served: self.model_name.to_string(),
                },
            );
        }
        let n = f.n.unwrap_or(1);
        rule((1..=MAX_N).contains(&n), E::N(n));
        if let Some(k) = alternatives {
            rule(
                (0..=MAX_TOP_LOGPROBS).contains(&k),
                E::Alternatives {
                    param: alternatives_param,
                    value: k,
                },
            );
        }
        let temperature = f.temperature.unwrap_or(1.0);
        rule(
            (0.0..=2.0).contains(&temperature),
            E::Temperature(temperature),
        );
        let top_p = f.top_p.unwrap_or(1.0);
        rule(top_p > 0.0 && top_p <= 1.0, E::TopP(top_p));
        // -1 (vLLM's "off") and 0 both mean no limit.
        let top_k = f.top_k.unwrap_or(0);
        rule(top_k >= -1, E::TopK(top_k));
        let min_p = f.min_p.unwrap_or(0.0);
        rule((0.0..=1.0).contains(&min_p), E::MinP(min_p));
        let frequency_penalty = f.frequency_penalty.unwrap_or(0.0);
        rule(
            (-2.0..=2.0).contains(&frequency_penalty),
            E::FrequencyPenalty(frequency_penalty),
        );
        let presence_penalty = f.presence_penalty.unwrap_or(0.0);
        rule(
            (-2.0..=2.0).contains(&presence_penalty),
            E::PresencePenalty(presence_penalty),
        );
        let repetition_penalty = f.repetition_penalty.unwrap_or(1.0);
        rule(
            repetition_penalty > 0.0 && repetition_penalty <= 10.0,
            E::RepetitionPenalty(repetition_penalty),
        );
        let stop = f.stop.clone().map_or_else(Vec::new, OneOrMany::into_vec);
        rule(stop.len() <= MAX_STOP, E::TooManyStops(stop.len()));
        rule(!stop.iter().any(String::is_empty), E::EmptyStop);
        let stream = f.stream.unwrap_or(false);
        rule(
            f.stream_options.is_none() || stream,
            E::StreamOptionsWithoutStream,
        );
        let option = |get: fn(&super::request::StreamOptions) -> Option<bool>| {
            f.stream_options.as_ref().and_then(get).unwrap_or(false)
        };
        let include_usage = option(|o| o.include_usage);
        let continuous_usage = option(|o| o.continuous_usage_stats);
        rule(
            include_usage || !continuous_usage,
            E::ContinuousUsageWithoutUsage,
        );
        let min_tokens = f.min_tokens.unwrap_or(0);
        rule(min_tokens >= 0, E::NegativeMinTokens(min_tokens));
        let output = output_format(f).unwrap_or_else(|e| {
            errors.push(e);
            None
        });
        let logit_bias = match &f.logit_bias {
            None => Vec::new(),
            Some(map) => logit_bias(map, self.vocab_size).unwrap_or_else(|e| {
                errors.push(e);
                Vec::new()
            }),
        };
        ValidFields {
            params: SamplingParams {
                temperature,
                top_k: top_k.max(0) as usize,
                top_p,
                min_p,
                repetition_penalty,
                frequency_penalty,
                presence_penalty,
                seed: f.seed.unwrap_or_else(fresh_u64),
                logit_bias,
            },
            logprobs: alternatives.map(|k| k.max(0) as usize),
            stop,
            ignore_eos: f.ignore_eos.unwrap_or(false),
            min_tokens,
            max_tokens: f.max_completion_tokens.or(f.max_tokens),
            n: n.max(1) as usize,
            stream,
            include_usage,
            continuous_usage,
            output,
        }
    }
}

/// The output format a request asks for: OpenAI's `response_format` or vLLM's
/// `structured_outputs` (one of them; in the latter, exactly one key).
fn output_format(
    f: &SamplingFields,
) -> Result<Option<(&'static str, OutputFormat)>, ValidationError> {
    use ValidationError as E;
    let from_openai = match &f.response_format {
        None | Some(ResponseFormat::Text) => None,
        Some(ResponseFormat::JsonObject) => Some(OutputFormat::JsonObject),
        Some(ResponseFormat::JsonSchema { json_schema }) => Some(OutputFormat::JsonSchema {
            schema: json_schema.schema.clone().unwrap_or(serde_json::json!({})),
            strict: json_schema.strict.unwrap_or(false),
        }),
    };
    let Some(so) = &f.structured_outputs else {
        return Ok(from_openai.map(|o| ("response_format", o)));
    };
    if from_openai.is_some() {
        return Err(E::TwoOutputFormats);
    }
    let mut chosen = Vec::new();
    if let Some(json) = &so.json {
        chosen.push(OutputFormat::JsonSchema {
            strict: false,
            schema: match json {
                serde_json::Value::String(text) => {
                    serde_json::from_str(text).map_err(|e| E::OutputFormat {
                        param: "structured_outputs",
                        reason: format!("`json` is a string that does not hold JSON: {e}"),
                    })?
                }
                schema => schema.clone(),
            },
        });
    }
    if let Some(rx) = &so.regex {
        chosen.push(OutputFormat::Regex(rx.clone()));
    }
    if let Some(choice) = &so.choice {
        if choice.is_empty() {
            return Err(E::OutputFormat {
                param: "structured_outputs",
                reason: "`choice` is empty; allowed: at least one string".into(),
            });
        }
        chosen.push(OutputFormat::Choice(choice.clone()));
    }
    if let Some(grammar) = &so.grammar {
        chosen.push(OutputFormat::Lark(grammar.clone()));
    }
    if so.json_object == Some(true) {
        chosen.push(OutputFormat::JsonObject);
    }
    match chosen.len() {
        0 | 1 => Ok(chosen.pop().map(|o| ("structured_outputs", o))),
        n => Err(E::OutputFormat {
            param: "structured_outputs",
            reason: format!(
                "{n} formats were given; allowed: exactly one of `json`, `regex`, `choice`, \
                 `grammar`, `json_object`"
            ),
        }),
    }
}

/// OpenAI's `logit_bias` as (token id, bias), ids ascending: keys are token ids written as
/// strings of digits, below `vocab_size`, each once; values in [-100, 100]. The first broken
/// rule is the refusal (a map of 300 bad entries gets one line, not 300).
pub fn logit_bias(
    map: &BTreeMap<String, f64>,
    vocab_size: usize,
) -> Result<Vec<(u32, f32)>, ValidationError> {
    if map.len() > MAX_LOGIT_BIAS_ENTRIES {
        return Err(ValidationError::LogitBiasSize(map.len()));
    }
    let mut bias = Vec::with_capacity(map.len());
    for (key, &value) in map {
        let id = key
            .parse::<u32>()
            .ok()
            .filter(|&id| (id as usize) < vocab_size)
            .ok_or_else(|| ValidationError::LogitBiasKey {
                key: key.clone(),
                vocab_size,
            })?;
        if !(-MAX_BIAS..=MAX_BIAS).contains(&value) {
            return Err(ValidationError::LogitBiasValue {
                key: key.clone(),
                value,
            });
        }
        bias.push((id, value as f32));
    }
    // Keys are ordered as strings ("10" < "9"), and "07" is token 7 too.
    bias.sort_unstable_by_key(|&(id, _)| id);
    if let Some(w) = bias.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(ValidationError::LogitBiasTwice(w[0].0));
    }
    let banned = bias.iter().filter(|b| f64::from(b.1) <= -MAX_BIAS).count();
    if banned >= vocab_size {
        return Err(ValidationError::LogitBiasBansAll(vocab_size));
    }
    Ok(bias)
}

/// A value that differs per call: the seed of requests that give none, and response ids.
pub fn fresh_u64() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    const SERVED: Validator<'static> = Validator {
        model_name: "gemma-tiny",
        max_context: 64,
        kv_capacity: 1 << 20,
        max_tokens_limit: NonZeroUsize::MIN.saturating_add(63),
        has_chat_template: true,
        vocab_size: 1000,
    };

    fn completion(body: Value) -> Result<(String, ValidFields), ValidationErrors> {
        SERVED.completion(serde_json::from_value(body).expect("request shape"))
    }

    fn chat(body: Value) -> Result<(Vec<ChatMessage>, ValidFields), ValidationErrors> {
        SERVED.chat(serde_json::from_value(body).expect("request shape"))
    }

    /// A completion with a 4-token prompt, checked end to end.
    fn valid(fields: Value) -> Result<ValidRequest, ValidationErrors> {
        let mut body = json!({"prompt": "x"});
        body.as_object_mut()
            .expect("object")
            .extend(fields.as_object().expect("object").clone());
        let (_, fields) = completion(body)?;
        SERVED.with_prompt(fields, vec![2, 10, 11, 12], None)
    }

    /// The one error a request gets, with its param; its message says what is allowed.
    fn refused(fields: Value) -> ValidationError {
        let errors = valid(fields.clone()).expect_err("must be refused");
        let all: Vec<_> = errors.iter().collect();
        assert_eq!(all.len(), 1, "{fields}: {errors}");
        errors.first
    }

    #[test]
    fn defaults_fill_every_field() {
        let r = valid(json!({"seed": 3})).expect("valid");
        assert_eq!(r.spec.prompt, [2, 10, 11, 12]);
        assert_eq!(r.spec.max_tokens, DEFAULT_MAX_TOKENS);
        let p = &r.spec.params;
        assert_eq!(
            (p.temperature, p.top_k, p.top_p, p.min_p),
            (1.0, 0, 1.0, 0.0)
        );
        assert_eq!(p.repetition_penalty, 1.0);
        assert_eq!((p.frequency_penalty, p.presence_penalty), (0.0, 0.0));
        assert_eq!(p.seed, 3);
        assert!(r.spec.stop.is_empty() && r.spec.logprobs.is_none());
        assert!(!r.spec.ignore_eos);
        assert_eq!((r.n, r.stream, r.include_usage), (1, false, false));
    }

    #[test]
    fn fields_are_carried_over() {
        let r = valid(json!({
            "temperature": 0.5, "top_k": 7, "top_p": 0.9, "min_p": 0.1, "seed": 9,
            "repetition_penalty": 1.2, "frequency_penalty": -1.5, "presence_penalty": 2,
            "stop": ["a", "b"], "n": 3, "stream": true, "stream_options": {"include_usage": true},
            "logprobs": 5, "max_tokens": 60, "ignore_eos": true,
        }))
        .expect("valid");
        assert!(r.spec.ignore_eos);
        let p = &r.spec.params;
        assert_eq!(
            (p.temperature, p.top_k, p.top_p, p.min_p),
            (0.5, 7, 0.9, 0.1)
        );
        assert_eq!(
            (
                p.repetition_penalty,
                p.frequency_penalty,
                p.presence_penalty
            ),
            (1.2, -1.5, 2.0)
        );
        assert_eq!(r.spec.stop, ["a", "b"]);
        assert_eq!(r.spec.max_tokens, 60);
        assert_eq!(r.logprobs(), Some(5));
        assert_eq!((r.n, r.stream, r.include_usage), (3, true, true));
    }

    #[test]
    fn choice_i_samples_with_seed_plus_i() {
        let r = valid(json!({"seed": u64::MAX, "n": 3})).expect("valid");
        let seeds: Vec<u64> = (0..3).map(|i| r.choice(i).params.seed).collect();
        assert_eq!(seeds, [u64::MAX, 0, 1]);
    }

    #[test]
    fn an_unknown_model_is_404_and_names_the_served_one() {
        let e = refused(json!({"model": "gpt-4"}));
        assert_eq!((e.param(), e.status()), ("model", StatusCode::NOT_FOUND));
        assert!(e.to_string().contains("\"gemma-tiny\""), "{e}");
        assert!(valid(json!({"model": "gemma-tiny"})).is_ok());
    }

    #[test]
    fn prompt_must_be_exactly_one() {
        let e = completion(json!({})).expect_err("no prompt");
        assert!(matches!(e.first(), ValidationError::MissingPrompt));
        let e = completion(json!({"prompt": ["a", "b"]})).expect_err("two prompts");
        assert!(matches!(
            e.first(),
            ValidationError::SeveralPrompts { count: 2 }
        ));
        assert_eq!(e.first().param(), "prompt");
        let (text, _) = completion(json!({"prompt": ["only"]})).expect("one in a list");
        assert_eq!(text, "only");
    }

    #[test]
    fn every_sampling_rule_says_what_is_allowed() {
        let cases = [
            (json!({"n": 0}), "n", "1 to 16"),
            (json!({"n": 17}), "n", "1 to 16"),
            (json!({"logprobs": 21}), "logprobs", "0 to 20"),
            (json!({"logprobs": -1}), "logprobs", "0 to 20"),
            (json!({"temperature": 2.5}), "temperature", "0 to 2"),
            (json!({"temperature": -0.1}), "temperature", "0 to 2"),
            (json!({"top_p": 0}), "top_p", "greater than 0"),
            (json!({"top_p": 1.01}), "top_p", "at most 1"),
            (json!({"top_k": -2}), "top_k", "-1 or 0 (off)"),
            (json!({"min_p": 1.5}), "min_p", "0 to 1"),
            (
                json!({"frequency_penalty": 2.1}),
                "frequency_penalty",
                "-2 to 2",
            ),
            (
                json!({"presence_penalty": -3}),
                "presence_penalty",
                "-2 to 2",
            ),
            (
                json!({"repetition_penalty": 0}),
                "repetition_penalty",
                "greater than 0",
            ),
            (
                json!({"repetition_penalty": 11}),
                "repetition_penalty",
                "at most 10",
            ),
            (
                json!({"stop": ["a", "b", "c", "d", "e"]}),
                "stop",
                "at most 4",
            ),
            (json!({"stop": ""}), "stop", "non-empty"),
            (
                json!({"stream_options": {"include_usage": true}}),
                "stream_options",
                "stream: true",
            ),
        ];
        for (fields, param, allowed) in cases {
            let e = refused(fields.clone());
            assert_eq!(e.param(), param, "{fields}");
            assert_eq!(e.status(), StatusCode::BAD_REQUEST);
            assert!(e.to_string().contains(allowed), "{fields}: {e}");
        }
    }

    #[test]
    fn boundaries_are_allowed() {
        for fields in [
            json!({"n": 16, "logprobs": 20, "temperature": 0, "top_p": 1, "min_p": 1}),
            json!({"n": 1, "logprobs": 0, "temperature": 2, "top_k": -1, "min_p": 0}),
            json!({"frequency_penalty": -2, "presence_penalty": 2, "repetition_penalty": 10}),
            json!({"stop": ["a", "b", "c", "d"], "stream": true, "stream_options": {}}),
            json!({"stop": "a", "top_k": 0}),
        ] {
            assert!(valid(fields.clone()).is_ok(), "{fields}");
        }
        assert_eq!(
            valid(json!({"top_k": -1})).expect("off").spec.params.top_k,
            0
        );
        assert_eq!(
            valid(json!({"stop": "end"})).expect("one").spec.stop,
            ["end"]
        );
    }

    #[test]
    fn every_broken_rule_is_reported_in_order() {
        let errors = valid(json!({"model": "other", "temperature": 7, "top_p": 0, "n": 0}))
            .expect_err("refused");
        let params: Vec<_> = errors.iter().map(ValidationError::param).collect();
        assert_eq!(params, ["model", "n", "temperature", "top_p"]);
        // The first decides status and param; the message lists them all.
        assert_eq!(errors.first().status(), StatusCode::NOT_FOUND);
        let message = errors.to_string();
        assert_eq!(message.matches("; and ").count(), 3, "{message}");
        assert!(message.contains("temperature is 7") && message.contains("n is 0"));
    }

    #[test]
    fn the_prompt_must_leave_room_in_the_context() {
        let (_, fields) = completion(json!({"prompt": "x"})).expect("fields");
        let e = SERVED
            .with_prompt(fields.clone(), vec![1; 64], None)
            .expect_err("full context");
        assert!(matches!(
            e.first(),
            ValidationError::NoRoom {
                prompt_tokens: 64,
                limit: TokenLimit::Context(64)
            }
        ));
        assert_eq!(e.first().param(), "prompt");
        // The default shrinks to what room there is.
        let r = SERVED
            .with_prompt(fields, vec![1; 60], None)
            .expect("room for 4");
        assert_eq!(r.spec.max_tokens, 4);
    }

    #[test]
    fn max_tokens_must_fit_the_room() {
        for m in [0, -1, 61] {
            let e = refused(json!({"max_tokens": m}));
            assert_eq!(e.param(), "max_tokens");
            assert!(e.to_string().contains("must be 1 to 60"), "{e}");
        }
        assert_eq!(
            valid(json!({"max_tokens": 60}))
                .expect("fits")
                .spec
                .max_tokens,
            60
        );
        // The chat API's newer name wins.
        let r = valid(json!({"max_tokens": 99, "max_completion_tokens": 5})).expect("valid");
        assert_eq!(r.spec.max_tokens, 5);
    }

    /// SERVED's vocabulary has 1000 ids: a prompt id past it never reaches the engine.
    #[test]
    fn a_prompt_id_outside_the_models_vocabulary_is_refused() {
        let (_, fields) = completion(json!({"prompt": "x"})).expect("fields");
        assert!(SERVED
            .with_prompt(fields.clone(), vec![2, 999], None)
            .is_ok());
        let e = SERVED
            .with_prompt(fields, vec![2, 1000], None)
            .expect_err("outside");
        assert_eq!(e.first().param(), "prompt");
        assert!(e.to_string().contains("id 1000"), "{e}");
    }

    #[test]
    fn a_kv_pool_smaller_than_the_context_bounds_prompt_and_output() {
        let small_pool = Validator {
            kv_capacity: 32,
            ..SERVED
        };
        let (_, fields) = completion(json!({"prompt": "x", "max_tokens": 29})).expect("fields");
        let e = small_pool
            .with_prompt(fields.clone(), vec![1; 4], None)
            .expect_err("past the pool");
        assert_eq!(e.first().param(), "max_tokens");
        let message = e.to_string();
        assert!(
            message.contains("must be 1 to 28") && message.contains("KV cache, 32 tokens"),
            "{message}"
        );
        assert!(small_pool
            .with_prompt(fields.clone(), vec![1; 3], None)
            .is_ok());
        let e = small_pool
            .with_prompt(fields, vec![1; 32], None)
            .expect_err("prompt fills the pool");
        assert_eq!(e.first().param(), "prompt");
        assert!(
            e.to_string().contains("at most 31 tokens") && e.to_string().contains("KV cache"),
            "{e}"
        );
    }

    #[test]
    fn max_tokens_per_request_bounds_the_output_alone() {
        let limited = Validator {
            max_tokens_limit: NonZeroUsize::MIN.saturating_add(7),
            ..SERVED
        };
        let (_, fields) = completion(json!({"prompt": "x", "max_tokens": 9})).expect("fields");
        let e = limited
            .with_prompt(fields, vec![1; 4], None)
            .expect_err("past 8");
        assert_eq!(e.first().param(), "max_tokens");
        let message = e.to_string();
        assert!(
            message.contains("must be 1 to 8") && message.contains("max_tokens_per_request, 8"),
            "{message}"
        );
        // The default shrinks to the limit; the room still wins when it is smaller.
        let (_, fields) = completion(json!({"prompt": "x"})).expect("fields");
        let r = limited
            .with_prompt(fields.clone(), vec![1; 4], None)
            .expect("valid");
        assert_eq!(r.spec.max_tokens, 8);
        let r = limited
            .with_prompt(fields, vec![1; 61], None)
            .expect("valid");
        assert_eq!(r.spec.max_tokens, 3);
    }

    #[test]
    fn chat_needs_messages_and_a_template() {
        let e = chat(json!({"messages": []})).expect_err("empty");
        assert!(matches!(e.first(), ValidationError::MissingMessages));
        assert_eq!(e.first().param(), "messages");
        let no_template = Validator {
            has_chat_template: false,
            ..SERVED
        };
        let req = serde_json::from_value(json!({"messages": [{"role": "user", "content": "Hi"}]}))
            .expect("shape");
        let e = no_template.chat(req).expect_err("no template");
        assert!(matches!(e.first(), ValidationError::NoChatTemplate));
        assert!(e.to_string().contains("/v1/completions"));
    }

    /// Keys are token ids as strings (ordered as ids, not as text), values -100 to 100.
    #[test]
    fn logit_bias_is_carried_by_id() {
        let r = valid(json!({"logit_bias": {"10": 5, "9": -100, "0": 0.5, "999": 100}}))
            .expect("valid");
        assert_eq!(
            r.spec.params.logit_bias,
            [(0, 0.5), (9, -100.0), (10, 5.0), (999, 100.0)]
        );
        assert!(valid(json!({"logit_bias": {}}))
            .expect("valid")
            .spec
            .params
            .logit_bias
            .is_empty());
        let full: serde_json::Map<String, Value> = (0..MAX_LOGIT_BIAS_ENTRIES)
            .map(|i| (i.to_string(), json!(1)))
            .collect();
        assert!(valid(json!({ "logit_bias": full })).is_ok(), "300 entries");
    }

    #[test]
    fn logit_bias_refusals_say_what_is_allowed() {
        let too_many: serde_json::Map<String, Value> = (0..=MAX_LOGIT_BIAS_ENTRIES)
            .map(|i| (i.to_string(), json!(1)))
            .collect();
        let cases = [
            (
                json!({"abc": 1}),
                "\"abc\" is not a token id; allowed: token ids 0 to 999",
            ),
            (json!({"-1": 1}), "allowed: token ids 0 to 999"),
            (json!({"1000": 1}), "\"1000\" is not a token id"),
            (json!({"1.5": 1}), "not a token id"),
            (json!({"": 1}), "not a token id"),
            (json!({"99999999999": 1}), "not a token id"),
            (
                json!({"5": 100.5}),
                "token 5 is 100.5; allowed: -100 to 100",
            ),
            (
                json!({"5": -101}),
                "allowed: -100 to 100 (-100 bans the token)",
            ),
            (json!({"5": 1e300}), "allowed: -100 to 100"),
            (json!({"7": 1, "07": 2}), "names token 7 twice"),
            (
                Value::Object(too_many),
                "has 301 entries; allowed: at most 300",
            ),
        ];
        for (bias, allowed) in cases {
            let e = refused(json!({ "logit_bias": bias }));
            assert_eq!(
                (e.param(), e.status()),
                ("logit_bias", StatusCode::BAD_REQUEST)
            );
            assert!(e.to_string().contains(allowed), "{bias}: {e}");
        }
    }

    #[test]
    fn logit_bias_may_not_ban_the_whole_vocabulary() {
        let tiny = Validator {
            vocab_size: 3,
            ..SERVED
        };
        let fields = |bias: Value| {
            let req =
                serde_json::from_value(json!({"prompt": "x", "logit_bias": bias})).expect("shape");
            tiny.completion(req).map(drop)
        };
        let e = fields(json!({"0": -100, "1": -100, "2": -100})).expect_err("all banned");
        assert!(
            matches!(e.first(), ValidationError::LogitBiasBansAll(3)),
            "{e}"
        );
        assert!(fields(json!({"0": -100, "1": -100, "2": -99.9})).is_ok());
    }

    #[test]
    fn best_of_must_equal_n() {
        assert!(valid(json!({"best_of": 1})).is_ok());
        assert!(valid(json!({"best_of": 3, "n": 3})).is_ok());
        for fields in [json!({"best_of": 2}), json!({"best_of": 2, "n": 3})] {
            let e = refused(fields.clone());
            assert_eq!(e.param(), "best_of");
            assert!(e.to_string().contains("allowed: n ("), "{fields}: {e}");
        }
    }

    #[test]
    fn chat_logprobs_are_a_flag_and_a_count() {
        let hi = json!([{"role": "user", "content": "Hi"}]);
        let (messages, fields) = chat(json!({"messages": hi, "logprobs": true})).expect("valid");
        assert_eq!(messages.len(), 1);
        assert_eq!(fields.logprobs, Some(0));
        let (_, fields) =
            chat(json!({"messages": hi, "logprobs": true, "top_logprobs": 20})).expect("valid");
        assert_eq!(fields.logprobs, Some(20));
        let (_, fields) = chat(json!({"messages": hi, "logprobs": false})).expect("valid");
        assert_eq!(fields.logprobs, None);
        let e = chat(json!({"messages": hi, "top_logprobs": 2})).expect_err("needs the flag");
        assert!(matches!(
            e.first(),
            ValidationError::TopLogprobsWithoutLogprobs
        ));
        let e = chat(json!({"messages": hi, "logprobs": true, "top_logprobs": 21}))
            .expect_err("too many");
        assert_eq!(e.first().param(), "top_logprobs");
        assert!(e.to_string().contains("0 to 20"));
    }
}
