//! Structured output: a request's JSON Schema, regex, Lark grammar or choice list compiled by
//! llguidance into a per-sequence `Constraint`, which gives the engine the tokens allowed next
//! (a `TokenMask` the last stage applies to each rank's vocabulary slice) and follows every
//! token drawn.
//!
//! JSON is generated compact and on one line (`", "` and `": "` between items, no other
//! whitespace): a model may otherwise spend its tokens on whitespace the grammar allows
//! anywhere. A schema's own `x-guidance` options override that.

mod vocabulary;

use std::fmt;
use std::sync::{Arc, OnceLock};

use gemma_proto::TokenMask;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::TokEnv;
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::tokenizer::TextTokenizer;
pub use vocabulary::GrammarVocabulary;

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON value valid under the schema; `strict` as OpenAI's strict mode means it: an
    /// object schema with `properties` allows only those (`additionalProperties: false` where
    /// the schema does not say).
    JsonSchema { schema: Value, strict: bool },
    /// Text matching the regex (whole output).
    Regex(String),
    /// Text of a Lark grammar (llguidance's dialect).
    Lark(String),
    /// Exactly one of the strings.
    Choice(Vec<String>),
}

impl OutputFormat {
    /// The grammar llguidance compiles.
    fn grammar(&self) -> TopLevelGrammar {
        match self {
            OutputFormat::JsonObject => {
                TopLevelGrammar::from_json_schema(compact_json(json!({"type": "object"})))
            }
            OutputFormat::JsonSchema { schema, strict } => {
                let mut schema = schema.clone();
                if *strict {
                    close_objects(&mut schema);
                }
                TopLevelGrammar::from_json_schema(compact_json(schema))
            }
            OutputFormat::Regex(rx) => TopLevelGrammar::from_regex(rx),
            OutputFormat::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
            OutputFormat::Choice(choices) => {
                let alternatives: Vec<String> = choices.iter().map(|c| lark_string(c)).collect();
                TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
            }
        }
    }
}

/// The schema with llguidance's compact, single-line JSON options, unless it sets its own. A
/// schema that is not an object (`true`) is wrapped so that it can carry them.
fn compact_json(schema: Value) -> Value {
    let options = json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
    });
    match schema {
        Value::Object(mut o) => {
            o.entry("x-guidance").or_insert(options);
            Value::Object(o)
        }
        other => json!({"allOf": [other], "x-guidance": options}),
    }
}

/// Strict mode: every object schema that lists `properties` and says nothing of others gets
/// `additionalProperties: false`, in every subschema (values of `properties`, `$defs`,
/// `items`, `anyOf`...; never inside `const`, `enum`, `default` or `examples`, which are data).
fn close_objects(schema: &mut Value) {
    match schema {
        Value::Object(o) => {
            if o.contains_key("properties") && !o.contains_key("additionalProperties") {
                o.insert("additionalProperties".into(), Value::Bool(false));
            }
            for (key, value) in o.iter_mut() {
                match key.as_str() {
                    "const" | "enum" | "default" | "examples" => {}
                    // Maps of name -> schema: each value is a schema, the map is not.
                    "properties" | "$defs" | "definitions" | "patternProperties" => {
                        if let Value::Object(map) = value {
                            map.values_mut().for_each(close_objects);
                        }
                    }
                    _ => close_objects(value),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}

/// A Lark string literal of `s` (JSON's escapes are Lark's).
fn lark_string(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// Why a grammar cannot be served: llguidance's own words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrammarError {
    #[error("{0}")]
    Refused(String),
    #[error("the grammar engine failed: {0}")]
    Engine(String),
    #[error("token {token} does not continue the grammar: {reason}")]
    Token { token: u32, reason: String },
}

/// Compiles output formats for one model's vocabulary (its token trie is built once, at start).
pub struct Grammars {
    factory: ParserFactory,
    /// Tokens that end a turn: each is allowed wherever the grammar allows <eos>.
    stop_ids: Arc<[u32]>,
    vocab_size: usize,
}

impl Grammars {
    pub fn new(tokenizer: Arc<TextTokenizer>, vocab_size: usize) -> Result<Self, GrammarError> {
        let stop_ids: Arc<[u32]> = tokenizer.stop_ids().into();
        let eos = stop_ids.first().copied().unwrap_or(1);
        let env: TokEnv = Arc::new(GrammarVocabulary::new(tokenizer, vocab_size, eos));
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| GrammarError::Engine(e.to_string()))?;
        // Its warnings would go to stderr, not through tracing; refusals still come back.
        factory.quiet();
        Ok(Self {
            factory,
            stop_ids,
            vocab_size,
        })
    }

    /// The constraint of one sequence, or why the format is refused (a 400 to the client).
    pub fn compile(&self, format: &OutputFormat) -> Result<Constraint, GrammarError> {
        let parser = self
            .factory
            .create_parser(format.grammar())
            .map_err(|e| GrammarError::Refused(e.to_string()))?;
        let matcher = Box::new(Matcher::new(Ok(parser)));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError::Refused(e));
        }
        Ok(Constraint {
            matcher,
            stop_ids: self.stop_ids.clone(),
            vocab_size: self.vocab_size,
        })
    }
}

/// One sequence's grammar state: the mask of its next token, advanced by each token drawn.
pub struct Constraint {
    /// Boxed: a matcher is over a kilobyte, and requests move through queues by value.
    matcher: Box<Matcher>,
    stop_ids: Arc<[u32]>,
    vocab_size: usize,
}

/// Where a sequence stands once a token is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The grammar goes on.
    Open,
    /// The output is complete: nothing but a stop token may follow, so the sequence ends here.
    Complete,
}

impl Constraint {
    /// The tokens the grammar allows next, over the model's vocabulary; every stop token where
    /// it allows <eos> (the grammar may end).
    pub fn next_mask(&mut self) -> Result<TokenMask, GrammarError> {
        let bits = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| GrammarError::Engine(e.to_string()))?;
        let mask = TokenMask::from_bit_words(bits.as_slice(), self.vocab_size);
        let eos = self.stop_ids.first().copied();
        Ok(match eos.is_some_and(|e| mask.allows(e)) {
            true => mask.with_allowed(&self.stop_ids),
            false => mask,
        })
    }

    /// Takes the token drawn (one the last mask allowed). A stop token is taken only where the
    /// grammar may end, and completes it.
    pub fn accept(&mut self, token: u32) -> Result<Progress, GrammarError> {
        if self.stop_ids.contains(&token) {
            let accepting = self
                .matcher
                .is_accepting()
                .map_err(|e| GrammarError::Engine(e.to_string()))?;
            return match accepting || self.matcher.is_stopped() {
                true => Ok(Progress::Complete),
                false => Err(GrammarError::Token {
                    token,
                    reason: "a stop token before the grammar is complete".into(),
                }),
            };
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| GrammarError::Token {
                token,
                reason: e.to_string(),
            })?;
        Ok(match self.matcher.is_stopped() {
            true => Progress::Complete,
            false => Progress::Open,
        })
    }
}

/// n > 1 choices each follow their own copy of the compiled grammar.
impl Clone for Constraint {
    fn clone(&self) -> Self {
        Self {
            matcher: Box::new(self.matcher.deep_clone()),
            stop_ids: self.stop_ids.clone(),
            vocab_size: self.vocab_size,
        }
    }
}

impl fmt::Debug for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish_non_exhaustive()
    }
}

/// The model's `Grammars`, built on first use: its token trie and token classes take about a
/// second of CPU over a 262k vocabulary, which a server that never sees a structured request
/// (and every test cluster) should not pay at start.
pub struct LazyGrammars {
    cell: OnceLock<Result<Grammars, GrammarError>>,
    tokenizer: Arc<TextTokenizer>,
    vocab_size: usize,
}

impl LazyGrammars {
    pub fn new(tokenizer: Arc<TextTokenizer>, vocab_size: usize) -> Self {
        Self {
            cell: OnceLock::new(),
            tokenizer,
            vocab_size,
        }
    }

    /// Blocks while the first caller builds them (call it off the async runtime).
    pub fn get(&self) -> Result<&Grammars, GrammarError> {
        self.cell
            .get_or_init(|| Grammars::new(self.tokenizer.clone(), self.vocab_size))
            .as_ref()
            .map_err(Clone::clone)
    }
}
