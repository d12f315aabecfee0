//! Prompt text -> token ids, off the async runtime. Tokenizing a long prompt, or rendering a long
//! conversation, is milliseconds to seconds of CPU; on a runtime worker thread it would stall
//! every connection and stream scheduled there (and the engine task) for that long. Both run on
//! tokio's blocking pool instead.

use std::sync::Arc;

use super::error::ApiError;
use super::validation::ValidationError;
use super::AppState;
use crate::chat::ChatMessage;
use crate::structured::{Constraint, OutputFormat};

/// A completion prompt's ids (<bos> first).
pub async fn encode_text(state: Arc<AppState>, text: String) -> Result<Vec<u32>, ApiError> {
    off_runtime(move || {
        state
            .tokenizer
            .encode_prompt(&text)
            .map_err(|source| ValidationError::Tokenize {
                param: "prompt",
                source,
            })
    })
    .await
}

/// A conversation rendered with the model's chat template, then tokenized.
pub async fn encode_chat(
    state: Arc<AppState>,
    messages: Vec<ChatMessage>,
) -> Result<Vec<u32>, ApiError> {
    off_runtime(move || {
        let template = state.chat.as_ref().ok_or(ValidationError::NoChatTemplate)?;
        let text = template.render(&messages)?;
        state
            .tokenizer
            .encode_prompt(&text)
            .map_err(|source| ValidationError::Tokenize {
                param: "messages",
                source,
            })
    })
    .await
}

/// A structured output format compiled for this model (the first one also builds the grammar
/// engine's view of the vocabulary); a format llguidance refuses is a 400 with its reason.
pub async fn compile_output(
    state: Arc<AppState>,
    output: Option<(&'static str, OutputFormat)>,
) -> Result<Option<Constraint>, ApiError> {
    let Some((param, format)) = output else {
        return Ok(None);
    };
    off_runtime(move || {
        let grammars = state
            .grammars
            .get()
            .map_err(|e| ValidationError::OutputFormat {
                param,
                reason: e.to_string(),
            })?;
        grammars
            .compile(&format)
            .map(Some)
            .map_err(|e| ValidationError::OutputFormat {
                param,
                reason: e.to_string(),
            })
    })
    .await
}

/// Runs `work` on the blocking pool.
async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ValidationError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => Ok(result?),
        Err(e) => Err(ApiError::internal(format!(
            "preparing the prompt failed: {e}"
        ))),
    }
}
