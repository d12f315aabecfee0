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

/// Turns off the BPE model's word cache.
///
/// tokenizers keeps that cache per thread (up to 10,000 words of under 256 bytes each, per
/// thread, never shrunk). Gemma's tokenizer has no pre-tokenizer, so a whole prompt is one
/// "word", and prompts are encoded on tokio's blocking pool: up to 512 threads, each filling its
/// own cache in its own malloc arena. A server fed distinct prompts grew by tens of MiB per load
/// storm and never gave it back (the soak test's memory check). A cache hit would need the same
/// prompt text twice, which serving rarely sees, so the cache buys nothing here.
fn disable_word_cache(tokenizer: &mut Tokenizer) {
    let mut model = tokenizer.get_model().clone();
    model.resize_cache(0);
    tokenizer.with_model(model);
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from the model folder.
    pub fn from_dir(dir: &Path, bos: u32, eos: u32) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        let mut inner = Tokenizer::from_file(&path).map_err(|e| TokenizerError::Load {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        disable_word_cache(&mut inner);
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
        let mut ids = self.encode_text(text)?;
        if ids.first() != Some(&self.bos) {
            ids.insert(0, self.bos);
        }
        Ok(ids)
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

    /// What token `id` stands for in generated text, for the grammar engine's token trie:
    /// None for an id the tokenizer does not know.
    pub fn piece(&self, id: u32) -> Option<TokenPiece> {
        let piece = self.inner.id_to_token(id)?;
        if self.inner.get_added_vocabulary().is_special_token(&piece) {
            return Some(TokenPiece::Special(piece));
        }
        Some(match fallback_byte(&piece) {
            Some(byte) => TokenPiece::Byte(byte),
            // SentencePiece's space marker is a space in the text (the decoder's rule).
            None => TokenPiece::Text(piece.replace('\u{2581}', " ")),
        })
    }

    /// Text -> ids, no <bos>, special tokens written in the text recognised.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Whether `id` is a byte-fallback piece that [`Self::decode`] shows: its text depends on
    /// the byte pieces next to it, which are decoded together (a run that is not valid UTF-8 as
    /// a whole becomes one U+FFFD per byte, even where a prefix of it was valid).
    fn is_byte_piece(&self, id: u32) -> bool {
        self.inner.id_to_token(id).is_some_and(|piece| {
            fallback_byte(&piece).is_some()
                && !self.inner.get_added_vocabulary().is_special_token(&piece)
        })
    }

    /// Whether `id` shows in [`Self::decode`]'s text at all (unknown ids and special tokens do
    /// not).
    fn is_shown(&self, id: u32) -> bool {
        self.inner
            .id_to_token(id)
            .is_some_and(|piece| !self.inner.get_added_vocabulary().is_special_token(&piece))
    }

    /// Ids -> text, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }
}

/// A token as text generation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenPiece {
    /// A special token (`<eos>`, `<start_of_turn>`): never part of generated text.
    Special(String),
    /// A byte-fallback piece: one byte of a character.
    Byte(u8),
    /// Ordinary text, spaces as spaces.
    Text(String),
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
/// only what is new once it can no longer change: not while the shown ids end in a byte-fallback
/// piece (byte pieces carry single UTF-8 bytes, an emoji may take four, and a run is decoded as
/// a whole), nor while the text ends in an incomplete character. So the pieces emitted, then
/// flushed, are exactly the one-shot decode of every id.
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
        let pending = &self.ids[self.read..];
        let last_shown = pending.iter().rev().find(|&&id| tok.is_shown(id));
        if last_shown.is_none_or(|&id| tok.is_byte_piece(id)) {
            return Ok(String::new());
        }
        let (before, now) = self.window(tok)?;
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        Ok(self.advance(&before, &now))
    }

    /// Whatever is still held back (a byte run or an incomplete character at the very end).
    pub fn flush(&mut self, tok: &TextTokenizer) -> Result<String, TokenizerError> {
        let (before, now) = self.window(tok)?;
        let rest = self.advance(&before, &now);
        self.prefix = self.ids.len();
        Ok(rest)
    }

    /// The window's text up to what was emitted, and with every id.
    fn window(&self, tok: &TextTokenizer) -> Result<(String, String), TokenizerError> {
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        Ok((before, now))
    }

    /// Emits what `now` adds to `before`; the window moves on to the ids after them.
    fn advance(&mut self, before: &str, now: &str) -> String {
        let delta = match now.strip_prefix(before) {
            Some(d) => d.to_string(),
            // The window re-segmented; emit what differs after the common prefix.
            None => now.chars().skip(before.chars().count()).collect(),
        };
        self.prefix = self.read;
        self.read = self.ids.len();
        delta
    }
}
