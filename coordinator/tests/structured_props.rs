//! Structured output's constraint with the real Gemma tokenizer (scripts/fetch-tokenizer.sh;
//! `GEMMA_TOKENIZER_DIR` overrides where it is): masks allow exactly the grammar's tokens, stop
//! tokens where it may end, strict mode closes objects, clones follow their own path, refusals
//! carry llguidance's reason, and masks stay small on the wire.

mod common;

use common::tokenizer_dir;
use std::sync::{Arc, OnceLock};

use gemma_coordinator::structured::{Grammars, OutputFormat, Progress};
use gemma_coordinator::tokenizer::TextTokenizer;
use serde_json::json;

const VOCAB: usize = 262_144;

fn tokenizer() -> Arc<TextTokenizer> {
    static T: OnceLock<Arc<TextTokenizer>> = OnceLock::new();
    T.get_or_init(|| {
        Arc::new(
            TextTokenizer::from_dir(&tokenizer_dir(), 2, 1)
                .expect("run scripts/fetch-tokenizer.sh"),
        )
    })
    .clone()
}

fn grammars() -> &'static Grammars {
    static G: OnceLock<Grammars> = OnceLock::new();
    G.get_or_init(|| Grammars::new(tokenizer(), VOCAB).expect("grammars"))
}

/// Feeds `text`'s tokens through a constraint, each checked against the mask before it; the
/// progress after the last one, or the first token the mask refused.
fn follow(format: &OutputFormat, text: &str) -> Result<Progress, u32> {
    let mut c = grammars().compile(format).expect("compiles");
    let mut progress = Progress::Open;
    for id in tokenizer().encode_text(text).expect("ids") {
        let mask = c.next_mask().expect("mask");
        if !mask.allows(id) {
            return Err(id);
        }
        progress = c.accept(id).map_err(|_| id)?;
    }
    Ok(progress)
}

fn schema(v: serde_json::Value, strict: bool) -> OutputFormat {
    OutputFormat::JsonSchema { schema: v, strict }
}

#[test]
fn a_schema_allows_its_json_and_completes_on_the_closing_brace() {
    let person = json!({"type": "object", "properties": {"name": {"type": "string"},
                        "age": {"type": "integer"}}, "required": ["name", "age"]});
    let f = schema(person.clone(), false);
    assert_eq!(
        follow(&f, r#"{"name": "Ada", "age": 36}"#),
        Ok(Progress::Complete)
    );
    // Compact single-line JSON: no other whitespace; required fields first as listed.
    assert!(follow(&f, "{ \"name\"").is_err());
    assert!(follow(&f, r#"{"age": 36"#).is_err());
    // Not strict: other properties are JSON Schema's default, allowed; strict closes them.
    assert_eq!(
        follow(&f, r#"{"name": "Ada", "age": 36, "x": 1}"#),
        Ok(Progress::Complete)
    );
    let strict = schema(person, true);
    assert!(follow(&strict, r#"{"name": "Ada", "age": 36, "x""#).is_err());
}

#[test]
fn strict_mode_closes_nested_objects_but_not_data() {
    let s = json!({"$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer"}}}},
                   "type": "object", "properties": {"p": {"$ref": "#/$defs/p"},
                   "tag": {"const": {"properties": 1}}}});
    let strict = schema(s, true);
    assert!(follow(&strict, r#"{"p": {"x": 1, "y""#).is_err());
    assert_eq!(
        follow(&strict, r#"{"p": {"x": 1}, "tag": {"properties": 1}}"#),
        Ok(Progress::Complete)
    );
}

#[test]
fn stop_tokens_are_allowed_exactly_where_the_grammar_may_end() {
    let tok = tokenizer();
    let f = OutputFormat::Regex("[0-9]{1,3}".into());
    let mut c = grammars().compile(&f).expect("compiles");
    let first = c.next_mask().expect("mask");
    assert!(
        tok.stop_ids().iter().all(|&s| !first.allows(s)),
        "nothing yet"
    );
    let seven = tok.encode_text("7").expect("ids");
    assert_eq!(c.accept(seven[0]).expect("a digit"), Progress::Open);
    let after = c.next_mask().expect("mask");
    assert!(
        tok.stop_ids().iter().all(|&s| after.allows(s)),
        "may end after one digit"
    );
    // n > 1 choices: a clone follows its own path.
    let mut other = c.clone();
    for &stop in tok.stop_ids() {
        assert_eq!(other.clone().accept(stop), Ok(Progress::Complete));
    }
    let letter = tok.encode_text("a").expect("ids")[0];
    assert!(other.accept(letter).is_err(), "a letter is not a digit");
    assert_eq!(c.accept(seven[0]).expect("a second digit"), Progress::Open);
}

#[test]
fn choices_and_lark_compile_and_refusals_say_why() {
    let choice = OutputFormat::Choice(vec!["yes".into(), "no \"way\"".into()]);
    assert_eq!(follow(&choice, "yes"), Ok(Progress::Complete));
    assert_eq!(follow(&choice, "no \"way\""), Ok(Progress::Complete));
    assert!(follow(&choice, "maybe").is_err());
    let lark = OutputFormat::Lark("start: \"a\"+ \"b\"".into());
    assert_eq!(follow(&lark, "aaab"), Ok(Progress::Complete));
    for bad in [
        OutputFormat::Regex("[a-".into()),
        OutputFormat::Lark("start: missing".into()),
        schema(json!({"$ref": "https://example.com/s.json"}), false),
        schema(
            json!({"type": "integer", "minimum": 5, "maximum": 1}),
            false,
        ),
    ] {
        let e = grammars().compile(&bad).expect_err("refused");
        assert!(!e.to_string().is_empty(), "{bad:?}");
    }
}

/// The mask of JSON string content (every token without a quote, backslash or control byte)
/// travels as runs: a few KiB for the whole vocabulary, a rank's slice less.
#[test]
fn a_string_content_mask_is_a_few_kibibytes_on_the_wire() {
    let f = schema(json!({"type": "string"}), false);
    let mut c = grammars().compile(&f).expect("compiles");
    let quote = tokenizer().encode_text("\"").expect("ids")[0];
    c.accept(quote).expect("opening quote");
    let mask = c.next_mask().expect("mask");
    assert!(mask.allowed_count() > 200_000, "{}", mask.allowed_count());
    let whole = mask.encoded_bytes();
    let half = mask.slice(0..(VOCAB / 2) as u32).encoded_bytes();
    assert!(whole <= 8 * 1024 && half < whole, "{whole} {half}");
}
