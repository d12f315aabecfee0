//! OpenAI's response shapes: whole answers, streamed chunks, choices, log-probabilities, usage,
//! the model list and the error body. Each field name is written once, here; `Option` fields
//! serialize as `null` (OpenAI sends them), and the few fields OpenAI leaves out are skipped.
//!
//! [`Endpoint`] is what differs between /v1/completions and /v1/chat/completions; the code that
//! answers and streams is generic over it, so an answer can never mix the two APIs' shapes.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::validation::fresh_u64;
use crate::engine::{FinishReason, Generation};
use crate::sampler::Sampled;
use crate::tokenizer::TextTokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    /// Always present, `cached_tokens: 0` included, as OpenAI sends it.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI's breakdown of the prompt tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}

/// A whole answer: `text_completion` or `chat.completion`.
#[derive(Debug, Serialize)]
pub struct Completion<'a, C> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<C>,
    pub usage: Usage,
}

/// One server-sent event of a streamed answer.
#[derive(Debug, Serialize)]
pub struct Chunk<'a, C> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<C>,
    /// Absent unless the client asked for usage (`stream_options.include_usage`); then `null` on
    /// every chunk but the last, which carries it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// A choice of /v1/completions, whole or streamed (OpenAI uses one shape for both).
#[derive(Debug, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    /// `null` until a streamed choice's last chunk.
    pub finish_reason: Option<&'static str>,
}

/// Log-probabilities of /v1/completions: parallel lists, one entry per token.
#[derive(Debug, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    /// Per token, its alternatives' text -> logprob (alternatives with the same text: the most
    /// likely one's).
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    /// Byte offset of each token's text in the choice's text.
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// What a chat chunk adds: the role once at the start, then content; the last chunk of a choice
/// may be empty (`{}`).
#[derive(Debug, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// Log-probabilities of /v1/chat/completions: one entry per token.
#[derive(Debug, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Debug, Serialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    /// The token's bytes, as a list of numbers: its text's UTF-8, or the one byte of a
    /// byte-fallback token (a piece of a character, whose text alone is U+FFFD).
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

impl TopLogprob {
    fn new(tok: &TextTokenizer, id: u32, logprob: f32) -> Self {
        Self {
            token: tok.token_text(id),
            logprob,
            bytes: tok.token_bytes(id),
        }
    }
}

/// GET /v1/models.
#[derive(Debug, Serialize)]
pub struct ModelList<'a> {
    pub object: &'static str,
    pub data: Vec<ModelCard<'a>>,
}

#[derive(Debug, Serialize)]
pub struct ModelCard<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

impl<'a> ModelList<'a> {
    /// The one model this cluster serves.
    pub fn single(id: &'a str) -> Self {
        Self {
            object: "list",
            data: vec![ModelCard {
                id,
                object: "model",
                created: 0,
                owned_by: "gemma-cluster",
            }],
        }
    }
}

/// `{"error": {...}}`: every refusal, and a stream's failure.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    /// Always `null`: OpenAI's codes name its own conditions.
    pub code: Option<&'static str>,
}

impl ErrorBody {
    pub fn new(message: String, kind: &'static str, param: Option<String>) -> Self {
        Self {
            error: ErrorDetail {
                message,
                kind,
                param,
                code: None,
            },
        }
    }
}

/// GET /ready.
#[derive(Debug, Serialize)]
pub struct Readiness {
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What differs between the two generating endpoints: `object` names, id prefix, and the shapes
/// of choices and log-probabilities.
pub trait Endpoint: Send + Sync + 'static {
    /// `object` of a whole answer and of a streamed chunk.
    const OBJECT: &'static str;
    const CHUNK_OBJECT: &'static str;
    const ID_PREFIX: &'static str;
    type Choice: Serialize;
    type ChunkChoice: Serialize + Send;
    type Logprobs: Serialize + Send;

    /// Log-probabilities of some tokens whose text starts at byte `text_start` of the choice.
    fn logprobs(tok: &TextTokenizer, tokens: &[Sampled], text_start: usize) -> Self::Logprobs;

    fn choice(index: usize, g: &Generation, logprobs: Option<Self::Logprobs>) -> Self::Choice;

    /// A streamed piece of choice `index`: new text, or the end with its reason.
    fn delta(
        index: usize,
        text: String,
        logprobs: Option<Self::Logprobs>,
        finish: Option<FinishReason>,
    ) -> Self::ChunkChoice;

    /// What choice `index` streams before its first token, if anything.
    fn opening(_index: usize) -> Option<Self::ChunkChoice> {
        None
    }
}

/// POST /v1/completions.
pub struct Completions;

/// POST /v1/chat/completions.
pub struct ChatCompletions;

impl Endpoint for Completions {
    const OBJECT: &'static str = "text_completion";
    const CHUNK_OBJECT: &'static str = "text_completion";
    const ID_PREFIX: &'static str = "cmpl";
    type Choice = CompletionChoice;
    type ChunkChoice = CompletionChoice;
    type Logprobs = CompletionLogprobs;

    fn logprobs(tok: &TextTokenizer, tokens: &[Sampled], text_start: usize) -> CompletionLogprobs {
        let texts: Vec<String> = tokens.iter().map(|s| tok.token_text(s.token)).collect();
        let text_offset = texts
            .iter()
            .scan(text_start, |offset, t| {
                let at = *offset;
                *offset += t.len();
                Some(at)
            })
            .collect();
        CompletionLogprobs {
            tokens: texts,
            token_logprobs: tokens.iter().map(|s| s.logprob).collect(),
            top_logprobs: tokens
                .iter()
                .map(|s| {
                    // Most likely first: a text several alternatives share (byte tokens all read
                    // "\u{FFFD}") keeps the most likely one's value.
                    let mut top = BTreeMap::new();
                    for &(t, lp) in &s.top_logprobs {
                        top.entry(tok.token_text(t)).or_insert(lp);
                    }
                    top
                })
                .collect(),
            text_offset,
        }
    }

    fn choice(index: usize, g: &Generation, logprobs: Option<CompletionLogprobs>) -> Self::Choice {
        CompletionChoice {
            index,
            text: g.text.clone(),
            logprobs,
            finish_reason: Some(g.finish_reason.as_str()),
        }
    }

    fn delta(
        index: usize,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish: Option<FinishReason>,
    ) -> Self::ChunkChoice {
        CompletionChoice {
            index,
            text,
            logprobs,
            finish_reason: finish.map(FinishReason::as_str),
        }
    }
}

impl Endpoint for ChatCompletions {
    const OBJECT: &'static str = "chat.completion";
    const CHUNK_OBJECT: &'static str = "chat.completion.chunk";
    const ID_PREFIX: &'static str = "chatcmpl";
    type Choice = ChatChoice;
    type ChunkChoice = ChatChunkChoice;
    type Logprobs = ChatLogprobs;

    fn logprobs(tok: &TextTokenizer, tokens: &[Sampled], _text_start: usize) -> ChatLogprobs {
        let content = tokens
            .iter()
            .map(|s| {
                let top = TopLogprob::new(tok, s.token, s.logprob);
                TokenLogprob {
                    token: top.token,
                    logprob: top.logprob,
                    bytes: top.bytes,
                    top_logprobs: s
                        .top_logprobs
                        .iter()
                        .map(|&(t, lp)| TopLogprob::new(tok, t, lp))
                        .collect(),
                }
            })
            .collect();
        ChatLogprobs { content }
    }

    fn choice(index: usize, g: &Generation, logprobs: Option<ChatLogprobs>) -> Self::Choice {
        ChatChoice {
            index,
            message: AssistantMessage {
                role: "assistant",
                content: g.text.clone(),
            },
            logprobs,
            finish_reason: g.finish_reason.as_str(),
        }
    }

    fn delta(
        index: usize,
        text: String,
        logprobs: Option<ChatLogprobs>,
        finish: Option<FinishReason>,
    ) -> Self::ChunkChoice {
        // A choice's last chunk has an empty delta unless held-back text ends it.
        let content = (finish.is_none() || !text.is_empty()).then_some(text);
        ChatChunkChoice {
            index,
            delta: Delta {
                role: None,
                content,
            },
            logprobs,
            finish_reason: finish.map(FinishReason::as_str),
        }
    }

    fn opening(index: usize) -> Option<Self::ChunkChoice> {
        Some(ChatChunkChoice {
            index,
            delta: Delta {
                role: Some("assistant"),
                content: Some(String::new()),
            },
            logprobs: None,
            finish_reason: None,
        })
    }
}

/// The identity every object of one answer shares: id, creation time, model.
pub struct Answer<E> {
    pub id: String,
    pub created: u64,
    pub model: String,
    endpoint: std::marker::PhantomData<E>,
}

impl<E: Endpoint> Answer<E> {
    pub fn new(model: &str) -> Self {
        Self {
            id: format!("{}-{:016x}", E::ID_PREFIX, fresh_u64()),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: model.to_string(),
            endpoint: std::marker::PhantomData,
        }
    }

    pub fn completion(&self, choices: Vec<E::Choice>, usage: Usage) -> Completion<'_, E::Choice> {
        Completion {
            id: &self.id,
            object: E::OBJECT,
            created: self.created,
            model: &self.model,
            choices,
            usage,
        }
    }

    pub fn chunk(
        &self,
        choices: Vec<E::ChunkChoice>,
        usage: Option<Option<Usage>>,
    ) -> Chunk<'_, E::ChunkChoice> {
        Chunk {
            id: &self.id,
            object: E::CHUNK_OBJECT,
            created: self.created,
            model: &self.model,
            choices,
            usage,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, to_value};

    use super::*;
    use crate::engine::FinishReason;

    fn generation(text: &str) -> Generation {
        Generation {
            text: text.to_string(),
            tokens: Vec::new(),
            prompt_tokens: 3,
            cached_tokens: 0,
            finish_reason: FinishReason::Length,
        }
    }

    #[test]
    fn whole_answers_have_openais_fields() {
        let answer = Answer::<Completions>::new("m");
        assert!(answer.id.starts_with("cmpl-"));
        let choice = Completions::choice(0, &generation("hi"), None);
        let v = to_value(answer.completion(vec![choice], Usage::new(3, 1, 0))).expect("json");
        assert_eq!(v["object"], "text_completion");
        assert_eq!(
            v["choices"][0],
            json!({"index": 0, "text": "hi", "logprobs": null, "finish_reason": "length"})
        );
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4,
                   "prompt_tokens_details": {"cached_tokens": 0}})
        );

        let answer = Answer::<ChatCompletions>::new("m");
        assert!(answer.id.starts_with("chatcmpl-"));
        let choice = ChatCompletions::choice(1, &generation("yo"), None);
        let v = to_value(answer.completion(vec![choice], Usage::new(3, 1, 2))).expect("json");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(
            v["usage"]["prompt_tokens_details"],
            json!({"cached_tokens": 2})
        );
        assert_eq!(
            v["choices"][0],
            json!({"index": 1, "message": {"role": "assistant", "content": "yo"},
                   "logprobs": null, "finish_reason": "length"})
        );
        let mut keys: Vec<_> = v.as_object().expect("object").keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            ["choices", "created", "id", "model", "object", "usage"]
        );
    }

    #[test]
    fn chat_chunks_open_with_the_role_and_may_end_empty() {
        let answer = Answer::<ChatCompletions>::new("m");
        let opening = ChatCompletions::opening(0).expect("chat opens");
        let v = to_value(answer.chunk(vec![opening], None)).expect("json");
        assert_eq!(v["object"], "chat.completion.chunk");
        assert_eq!(
            v["choices"][0],
            json!({"index": 0, "delta": {"role": "assistant", "content": ""},
                   "logprobs": null, "finish_reason": null})
        );
        assert!(v.get("usage").is_none(), "no usage key unless asked: {v}");

        let token = ChatCompletions::delta(0, "a".into(), None, None);
        assert_eq!(
            to_value(&token).expect("json")["delta"],
            json!({"content": "a"})
        );
        let end = ChatCompletions::delta(0, String::new(), None, Some(FinishReason::Stop));
        assert_eq!(
            to_value(&end).expect("json"),
            json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"})
        );
        let end_with_tail = ChatCompletions::delta(0, "z".into(), None, Some(FinishReason::Stop));
        assert_eq!(
            to_value(&end_with_tail).expect("json")["delta"],
            json!({"content": "z"})
        );
        assert!(Completions::opening(0).is_none());
    }

    #[test]
    fn usage_is_null_on_chunks_then_carried_by_the_last() {
        let answer = Answer::<Completions>::new("m");
        let delta = Completions::delta(2, "b".into(), None, None);
        let v = to_value(answer.chunk(vec![delta], Some(None))).expect("json");
        assert_eq!(v["usage"], json!(null));
        assert!(v.as_object().expect("object").contains_key("usage"));
        assert_eq!(
            v["choices"][0],
            json!({"index": 2, "text": "b", "logprobs": null, "finish_reason": null})
        );
        let last =
            to_value(answer.chunk(Vec::new(), Some(Some(Usage::new(1, 2, 0))))).expect("json");
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["usage"]["total_tokens"], 3);
    }

    #[test]
    fn error_model_list_and_readiness_bodies() {
        let e = ErrorBody::new("bad".into(), "invalid_request_error", Some("top_p".into()));
        assert_eq!(
            to_value(e).expect("json"),
            json!({"error": {"message": "bad", "type": "invalid_request_error",
                             "param": "top_p", "code": null}})
        );
        assert_eq!(
            to_value(ModelList::single("g")).expect("json"),
            json!({"object": "list", "data": [{"id": "g", "object": "model", "created": 0,
                                               "owned_by": "gemma-cluster"}]})
        );
        let ready = Readiness {
            status: "ready",
            reason: None,
        };
        assert_eq!(to_value(ready).expect("json"), json!({"status": "ready"}));
    }
}
