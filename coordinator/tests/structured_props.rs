//! Structured output's constraint with the real Gemma tokenizer (scripts/fetch-tokenizer.sh;
//! `GEMMA_TOKENIZER_DIR` overrides where it is).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use gemma_coordinator::structured::{Grammars, OutputFormat, Progress};
use gemma_coordinator::tokenizer::TextTokenizer;
use serde_json::json;

const VOCAB: usize = 262_144;

fn tokenizer_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GEMMA_TOKENIZER_DIR") {
        return dir.into();
    }
    let cache = std::env::var_os("GEMMA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/gemma-cluster")
        });
    cache.join("tokenizer-gemma")
}

fn tokenizer() -> Arc<TextTokenizer> {
    static T: OnceLock<Arc<TextTokenizer>> = OnceLock::new();
    T.get_or_init(|| {
        Arc::new(TextTokenizer::from_dir(&tokenizer_dir(), 2, 1).expect("run scripts/fetch-tokenizer.sh"))
    })
    .clone()
}

#[test]
fn timing_probe() {
    let t = Instant::now();
    let g = Grammars::new(tokenizer(), VOCAB).expect("grammars");
    eprintln!("trie+factory {:?}", t.elapsed());
    let schema = json!({"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer"}},"required":["name","age"],"additionalProperties":false});
    let t = Instant::now();
    let mut c = g.compile(&OutputFormat::JsonSchema(schema)).expect("compile");
    eprintln!("compile {:?}", t.elapsed());
    let tok = tokenizer();
    let text = "{\"name\": \"Ada Lovelace\", \"age\": 36}";
    let ids = tok.encode_text(text).expect("ids");
    for &id in &ids {
        let t = Instant::now();
        let m = c.next_mask().expect("mask");
        eprintln!("mask {:?} allowed {} bytes {} allows {}={}", t.elapsed(), m.allowed_count(), m.encoded_bytes(), id, m.allows(id));
        let p = c.accept(id).expect("accept");
        eprintln!("{p:?}");
    }
    let m = c.next_mask().expect("mask");
    eprintln!("final allowed {} {:?}", m.allowed_count(), m.allowed());
    assert_eq!(c.accept(1).expect("eos"), Progress::Complete);
}
