//! Streaming answers as server-sent events in OpenAI's chunk format: (chat) one opening chunk
//! per choice with the role, one chunk per token and choice, a final chunk per choice with the
//! finish reason, optionally a usage chunk, then `data: [DONE]`; a request that fails ends with
//! an error chunk in OpenAI's error shape, then `data: [DONE]`. A client that disconnects drops
//! the response body, which ends the producer task and so drops the engine receivers: the engine
//! cancels the requests and frees their KV blocks.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::response::sse::{Event as SseEvent, Sse};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt, StreamMap};
use tracing::Instrument;

use super::response::{Answer, Endpoint, ErrorBody, Usage};
use super::validation::ValidRequest;
use crate::engine::Event;
use crate::tokenizer::TextTokenizer;

/// The engine's event receivers of one request, keyed by choice index.
pub type ChoiceEvents = StreamMap<usize, UnboundedReceiverStream<Event>>;

/// The SSE response of a streamed request whose choices are already submitted.
pub fn stream<E: Endpoint>(
    tokenizer: Arc<TextTokenizer>,
    answer: Answer<E>,
    request: ValidRequest,
    choices: ChoiceEvents,
    span: tracing::Span,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let producer = Producer {
        tokenizer,
        answer,
        request,
        tx,
    };
    let task = tokio::spawn(producer.run(choices).instrument(span));
    Sse::new(AbortOnDrop {
        events: UnboundedReceiverStream::new(rx),
        task,
    })
}

/// Turns engine events into SSE events; stops as soon as the response is gone (a send fails).
struct Producer<E> {
    tokenizer: Arc<TextTokenizer>,
    answer: Answer<E>,
    request: ValidRequest,
    tx: mpsc::UnboundedSender<Result<SseEvent, Infallible>>,
}

/// The error event sent if a chunk cannot be serialized.
const SERIALIZE_FAILED: &str = r#"{"error":{"message":"the server could not serialize a chunk","type":"server_error","param":null,"code":null}}"#;

/// The client went away.
struct Gone;

impl<E: Endpoint> Producer<E> {
    async fn run(self, mut choices: ChoiceEvents) {
        let _ = self.produce(&mut choices).await;
    }

    async fn produce(&self, choices: &mut ChoiceEvents) -> Result<(), Gone> {
        let n = self.request.n;
        for i in 0..n {
            if let Some(opening) = E::opening(i) {
                self.send_chunk(opening, 0, 0)?;
            }
        }
        let (mut prompt_tokens, mut completion_tokens) = (0, 0);
        // Choice 0's, as in a whole answer (the prompt counts once); known from its first event.
        let mut cached_tokens = 0;
        // Tokens streamed so far, every choice together (continuous usage).
        let mut streamed = 0;
        // Where each choice's next token starts in its text (completions' text_offset).
        let mut offsets = vec![0usize; n];
        while let Some((i, event)) = choices.next().await {
            let choice = match event {
                Event::Token(t) => {
                    streamed += 1;
                    if i == 0 {
                        cached_tokens = t.cached_tokens;
                    }
                    let logprobs = self.request.logprobs().map(|_| {
                        E::logprobs(
                            &self.tokenizer,
                            std::slice::from_ref(&t.sampled),
                            offsets[i],
                        )
                    });
                    offsets[i] += t.text.len();
                    E::delta(i, t.text, logprobs, None)
                }
                Event::Done {
                    finish_reason,
                    prompt_tokens: p,
                    cached_tokens: cached,
                    completion_tokens: c,
                    tail,
                } => {
                    prompt_tokens = p;
                    if i == 0 {
                        cached_tokens = cached;
                    }
                    completion_tokens += c;
                    E::delta(i, tail, None, Some(finish_reason))
                }
                Event::Error(e) => {
                    // OpenAI's clients read to `[DONE]`: the error chunk is followed by it, so
                    // a failed stream ends as clearly as a finished one.
                    let body = ErrorBody::new(e.to_string(), "server_error", None);
                    self.send(&body)?;
                    return self.done();
                }
            };
            self.send_chunk(choice, streamed, cached_tokens)?;
        }
        if self.request.include_usage {
            let last = self.answer.chunk(
                Vec::new(),
                Some(Some(Usage::new(
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens,
                ))),
            );
            self.send(&last)?;
        }
        tracing::info!(completion_tokens, "streamed");
        self.done()
    }

    fn done(&self) -> Result<(), Gone> {
        self.tx
            .send(Ok(SseEvent::default().data("[DONE]")))
            .map_err(|_| Gone)
    }

    /// One choice's chunk: with continuous usage, the usage so far (`completion_tokens`
    /// streamed); else `usage: null` on it when the last chunk will carry usage.
    fn send_chunk(
        &self,
        choice: E::ChunkChoice,
        completion_tokens: usize,
        cached_tokens: usize,
    ) -> Result<(), Gone> {
        let prompt_tokens = self.request.spec.prompt.len();
        let usage = match (self.request.continuous_usage, self.request.include_usage) {
            (true, _) => Some(Some(Usage::new(
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            ))),
            (false, true) => Some(None),
            (false, false) => None,
        };
        self.send(&self.answer.chunk(vec![choice], usage))
    }

    fn send(&self, data: &impl Serialize) -> Result<(), Gone> {
        let event = match SseEvent::default().json_data(data) {
            Ok(event) => event,
            // Our shapes always serialize (string keys, no fallible fields); should one not,
            // the client still gets an error instead of a silent gap.
            Err(e) => {
                tracing::error!(%e, "an SSE chunk did not serialize");
                SseEvent::default().data(SERIALIZE_FAILED)
            }
        };
        self.tx.send(Ok(event)).map_err(|_| Gone)
    }
}

/// The response body: SSE events from the producer, whose task ends when the body is dropped.
struct AbortOnDrop<S> {
    events: S,
    task: JoinHandle<()>,
}

impl<S: Stream + Unpin> Stream for AbortOnDrop<S> {
    type Item = S::Item;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.events).poll_next(cx)
    }
}

impl<S> Drop for AbortOnDrop<S> {
    fn drop(&mut self) {
        self.task.abort();
    }
}
