//! Text <-> token ids: the model folder's tokenizer.json, Gemma's <bos> rule, and incremental
//! detokenization that never splits a UTF-8 character.

use std::path::Path;

use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "{path}: {reason}; the model's HuggingFace tokenizer.json must be in the model folder \
         (beside the .gguf for a GGUF model: its built-in vocabulary is not used)"
    )]
    Load { path: String, reason: String },
    #[error("tokenizing: {0}")]
    Encode(String),
    #[error("detokenizing: {0}")]
    Decode(String),
}

pub struct TextTokenizer {
    inner: Tokenizer,
    bos: u32,
    /// Tokens that end a model turn: <eos> and <end_of_turn>.
    stop_ids: Vec<u32>,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from the model folder.
    pub fn from_dir(dir: &Path, bos: u32, eos: u32) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        let inner = Tokenizer::from_file(&path).map_err(|e| TokenizerError::Load {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut stop_ids = vec![eos];
        stop_ids.extend(inner.token_to_id("<end_of_turn>"));
        Ok(Self {
            inner,
            bos,
            stop_ids,
        })
    }

    pub fn bos(&self) -> u32 {
        self.bos
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Prompt text -> ids, starting with <bos> exactly once: special tokens written in the text
    /// (`<bos>`, `<start_of_turn>`) are recognised, and a text that already starts with <bos>
    /// gets no second one.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let ids = enc.get_ids();
        let mut out = Vec::with_capacity(ids.len() + 1);
        if ids.first() != Some(&self.bos) {
            out.push(self.bos);
        }
        out.extend_from_slice(ids);
        Ok(out)
    }

    /// One token's text as a client sees it in log-probabilities.
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// One token's bytes, as OpenAI's `bytes` reports them: a byte-fallback token (`<0xAB>`,
    /// a piece of a character that takes several tokens) is its one byte, whose text alone is
    /// only U+FFFD; any other token is the UTF-8 of its text.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        match self
            .inner
            .id_to_token(id)
            .as_deref()
            .and_then(fallback_byte)
        {
            Some(byte) => vec![byte],
            None => self.token_text(id).into_bytes(),
        }
    }

    /// Ids -> text, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }
}

/// The byte of a byte-fallback piece such as `<0xE2>`.
fn fallback_byte(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Turns generated ids into text as they arrive. Decodes a small window of recent ids and emits
/// only what is new once it no longer ends in an incomplete character (byte-fallback tokens
/// carry single UTF-8 bytes; an emoji may take four of them).
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window whose text was already emitted up to `read`.
    prefix: usize,
    read: usize,
}

impl IncrementalDecoder {
    /// Adds one id; returns the text it completes (often empty for a partial character).
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            let delta = match now.get(before.len()..) {
                Some(d) if now.starts_with(&before) => d.to_string(),
                // The window re-segmented; emit what differs after the common prefix.
                _ => now.chars().skip(before.chars().count()).collect(),
            };
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back (an incomplete character at the very end).
    pub fn flush(&mut self, tok: &TextTokenizer) -> Result<String, TokenizerError> {
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or_default().to_string())
    }
}
