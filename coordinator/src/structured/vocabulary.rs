//! The model's vocabulary as llguidance sees it: every token's bytes in a token trie, and the
//! tokenizer for the strings a grammar forces.

use std::sync::Arc;

use llguidance::toktrie::{TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::tokenizer::{TextTokenizer, TokenPiece};

/// `TokenizerEnv` over the coordinator's own tokenizer (tokenizers 0.23; llguidance's bridge
/// crate would pull a second, older copy of it).
pub struct GrammarVocabulary {
    tokenizer: Arc<TextTokenizer>,
    trie: TokTrie,
}

impl GrammarVocabulary {
    /// The trie of ids `0..vocab_size` (the model's vocabulary: ids the tokenizer lacks get no
    /// bytes, so no grammar ever allows them). Special tokens carry llguidance's marker, so they
    /// never match text; `<eos>` is the grammar's end.
    pub fn new(tokenizer: Arc<TextTokenizer>, vocab_size: usize, eos: u32) -> Self {
        let words: Vec<Vec<u8>> = (0..vocab_size as u32)
            .map(|id| match tokenizer.piece(id) {
                None => Vec::new(),
                Some(TokenPiece::Special(name)) => {
                    let mut bytes = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    bytes.extend_from_slice(name.as_bytes());
                    bytes
                }
                Some(TokenPiece::Byte(b)) => vec![b],
                Some(TokenPiece::Text(text)) => text.into_bytes(),
            })
            .collect();
        let mut info = TokRxInfo::new(vocab_size as u32, eos);
        info.tok_bos = Some(tokenizer.bos());
        let trie = TokTrie::from(&info, &words);
        Self { tokenizer, trie }
    }
}

impl TokenizerEnv for GrammarVocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// The tokenizer's ids for text; bytes that are not UTF-8 (part of a character) are
    /// tokenized greedily over the trie, as byte-fallback pieces would spell them.
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => match self.tokenizer.encode_text(text) {
                Ok(ids) => ids,
                Err(_) => self.trie.greedy_tokenize(s),
            },
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}
