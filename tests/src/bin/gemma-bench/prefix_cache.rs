//! The prefix cache's rows: time to first token of a request whose 1024-token prefix is cached
//! against the same request with the prefix not cached (one coordinator, same run), and a
//! multi-turn chat workload (8 conversations x 6 turns behind one 512-token system prompt,
//! every turn resending the conversation so far) with the cache on against off (two
//! coordinators, one after the other, on the same model and cores).

use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, Result};
use gemma_proto::SplitMix64;
use gemma_testkit::TinyGemma;

use super::stream_timing::{self, StreamTimes};
use super::{serde_json_string, split, start_coordinator, Row};

const CONVERSATIONS: usize = 8;
const TURNS: usize = 6;
const SYSTEM_WORDS: usize = 512;
const PREFIX_WORDS: usize = 1024;
const ANSWER_TOKENS: usize = 32;

/// Common words the Gemma tokenizer keeps whole (with their leading space): one token each,
/// so N words make an N-token text.
const WORDS: &[&str] = &[
    "the", "time", "people", "year", "way", "day", "man", "thing", "woman", "life", "child",
    "world", "school", "state", "family", "student", "group", "country", "problem", "hand", "part",
    "place", "case", "week", "company", "system", "program", "question", "work", "number", "night",
    "point", "home", "water", "room", "mother", "area", "money", "story", "fact", "month", "lot",
    "right", "study", "book", "eye", "job", "word", "business", "issue", "side", "kind", "head",
    "house", "service", "friend", "father", "power", "hour", "game", "line", "end", "member",
    "law",
];

/// `n` words drawn from `WORDS` by a seeded stream.
fn words(seed: u64, n: usize) -> String {
    let mut rng = SplitMix64::new(seed);
    let picked: Vec<&str> = (0..n)
        .map(|_| WORDS[(rng.next_u64() % WORDS.len() as u64) as usize])
        .collect();
    picked.join(" ")
}

pub fn rows(threads: usize) -> Result<Vec<Row>> {
    let dir = tempfile::tempdir()?;
    // Layers heavy enough that prefill dominates a request, vocabulary of the real tokenizer.
    let model = TinyGemma {
        vocab_size: 256_000,
        hidden_size: 256,
        intermediate_size: 1024,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: 4,
        head_dim: 64,
        ..TinyGemma::mha_like_7b()
    };
    model.write(dir.path())?;
    gemma_testkit::add_tokenizer(dir.path())?;
    eprintln!(
        "prefix-cache model: {} MiB of f32 weights",
        model.f32_bytes() >> 20
    );
    let mut rows = ttft_rows(dir.path(), threads)?;
    rows.extend(chat_rows(dir.path(), threads)?);
    Ok(rows)
}

/// A streamed completion of `max_tokens` greedy tokens, usage included.
fn complete(addr: &str, prompt: &str, max_tokens: usize) -> Result<StreamTimes> {
    let body = format!(
        r#"{{"prompt":{},"max_tokens":{max_tokens},"temperature":0,"ignore_eos":true,"stream":true,"stream_options":{{"include_usage":true}}}}"#,
        serde_json_string(prompt)
    );
    stream_timing::stream(addr, "/v1/completions", &body)
}

/// Median TTFT over 3 prefixes: first with the prefix new, then with it cached (another
/// question after it, so only the prefix can be reused).
fn ttft_rows(model: &Path, threads: usize) -> Result<Vec<Row>> {
    let (_coordinator, addr) = start_coordinator(model, &["--tp", "1"])?;
    complete(&addr, "warm up the workers", 4)?;
    let (mut cold, mut warm, mut reused) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..3 {
        let prefix = words(1000 + i, PREFIX_WORDS);
        let first = complete(&addr, &format!("{prefix} first question {i}?"), 1)?;
        let second = complete(&addr, &format!("{prefix} second question {i}?"), 1)?;
        cold.push(first.ttft().ok_or_else(|| anyhow!("no token"))?);
        warm.push(second.ttft().ok_or_else(|| anyhow!("no token"))?);
        reused.push(second.cached_tokens as f64);
    }
    let reused = super::median(&mut reused);
    Ok(vec![Row {
        figure: format!("TTFT, {PREFIX_WORDS}-token prefix cached ({reused:.0} reused)"),
        value: super::median(&mut warm),
        unit: "ms",
        reference: "the same, prefix not cached".into(),
        ref_value: super::median(&mut cold),
        threads: format!("{t} | {t}", t = split(threads, 1)),
    }])
}

/// What the chat workload measured on one coordinator.
struct ChatLoad {
    tokens_per_s: f64,
    ttft_p50: f64,
    ttft_p99: f64,
    /// Share of prompt tokens served from the cache, %.
    reused_percent: f64,
}

fn chat_rows(model: &Path, threads: usize) -> Result<Vec<Row>> {
    let off = chat_load(model, false)?;
    let on = chat_load(model, true)?;
    let sides = format!("{t} | {t}", t = split(threads, 1));
    let figure = |what: &str| format!("chat {CONVERSATIONS}x{TURNS}, prefix cache: {what}");
    let row = |what: &str, value: f64, ref_value: f64, unit: &'static str| Row {
        figure: figure(what),
        value,
        unit,
        reference: "prefix cache off".into(),
        ref_value,
        threads: sides.clone(),
    };
    Ok(vec![
        row("throughput", on.tokens_per_s, off.tokens_per_s, "tok/s"),
        row("TTFT p50", on.ttft_p50, off.ttft_p50, "ms"),
        row("TTFT p99", on.ttft_p99, off.ttft_p99, "ms"),
        Row {
            figure: figure("prompt tokens reused"),
            value: on.reused_percent,
            unit: "%",
            reference: format!("off: {:.0} %", off.reused_percent),
            ref_value: f64::NAN,
            threads: sides.clone(),
        },
    ])
}

/// 8 conversations at once, each 6 turns back to back; every turn sends the system prompt, the
/// turns so far (the server's own answers included) and a new question.
fn chat_load(model: &Path, caching: bool) -> Result<ChatLoad> {
    let flag = format!("--prefix-caching={caching}");
    let (_coordinator, addr) = start_coordinator(model, &["--tp", "1", &flag])?;
    complete(&addr, "warm up the workers", 4)?;
    let system = words(7, SYSTEM_WORDS);
    let started = Instant::now();
    let results: Vec<Result<Vec<StreamTimes>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CONVERSATIONS)
            .map(|c| {
                let (addr, system) = (&addr, &system);
                s.spawn(move || conversation(addr, system, c))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("client panicked"))))
            .collect()
    });
    let wall = started.elapsed().as_secs_f64();
    let (mut ttft, mut tokens, mut prompt, mut cached) = (Vec::new(), 0, 0, 0);
    for times in results
        .into_iter()
        .collect::<Result<Vec<_>>>()?
        .iter()
        .flatten()
    {
        ttft.push(times.ttft().ok_or_else(|| anyhow!("no token arrived"))?);
        tokens += times.completion_tokens;
        prompt += times.prompt_tokens;
        cached += times.cached_tokens;
    }
    ttft.sort_by(f64::total_cmp);
    let pct = |q: f64| ttft[((ttft.len() - 1) as f64 * q).round() as usize];
    Ok(ChatLoad {
        tokens_per_s: tokens as f64 / wall,
        ttft_p50: pct(0.5),
        ttft_p99: pct(0.99),
        reused_percent: 100.0 * cached as f64 / prompt.max(1) as f64,
    })
}

/// One conversation's turns; the answers are read back from the stream to be resent.
fn conversation(addr: &str, system: &str, c: usize) -> Result<Vec<StreamTimes>> {
    let mut messages = vec![format!(
        r#"{{"role":"system","content":{}}}"#,
        serde_json_string(system)
    )];
    let mut times = Vec::new();
    for t in 0..TURNS {
        let question = format!(
            "Conversation {c}, turn {t}: {}?",
            words(100 * c as u64 + t as u64, 16)
        );
        messages.push(format!(
            r#"{{"role":"user","content":{}}}"#,
            serde_json_string(&question)
        ));
        let body = format!(
            r#"{{"messages":[{}],"max_tokens":{ANSWER_TOKENS},"temperature":0,"ignore_eos":true,"stream":true,"stream_options":{{"include_usage":true}}}}"#,
            messages.join(",")
        );
        let turn = stream_timing::stream(addr, "/v1/chat/completions", &body)?;
        messages.push(format!(
            r#"{{"role":"assistant","content":{}}}"#,
            serde_json_string(&turn.text)
        ));
        times.push(turn);
    }
    Ok(times)
}
