//! Prefix caching through real processes: the same requests give the same greedy and seeded
//! text with the cache on and off (tp=1, tp=2, pp=2, on a tiny Gemma 3 whose sliding layers
//! read reused blocks too), a repeated prompt reports `cached_tokens` and `/metrics` counts the
//! hits, `n > 1` choices compute their prompt once, and no block stays referenced afterwards.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use gemma_cluster_tests::http::{self, post_json, request, sse_data};
use gemma_cluster_tests::process::CoordinatorProcess;
use gemma_testkit::{add_tokenizer, TinyGemma};
use serde_json::{json, Value};

/// Tokens per KV block (the coordinator's default).
const BS: u64 = 16;

fn model_dir() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir_in(gemma_testkit::process_scratch()).expect("tmp");
        TinyGemma::gemma3_like().write(dir.path()).expect("model");
        add_tokenizer(dir.path()).expect("tokenizer");
        dir
    })
    .path()
}

/// A shared prefix of about 100 tokens: several blocks, longer than the sliding window.
const PREFIX: &str = "You are a careful assistant for a small library in a quiet town. The \
    library opens at nine in the morning and closes at six in the evening, except on Sundays, \
    when it stays closed. Members may borrow up to five books at a time for three weeks, and \
    renew each book twice unless another member has reserved it. Late returns cost ten cents a \
    day. The reading room upstairs has twelve desks and a shelf of local newspapers.";

fn prompt(question: &str) -> String {
    format!("{PREFIX}\nQuestion: {question}\nAnswer:")
}

fn start(plan: &[&str], caching: bool) -> CoordinatorProcess {
    let dir = model_dir().display().to_string();
    let caching = format!("--prefix-caching={caching}");
    let mut args = vec![
        "--model",
        &dir,
        "--kv-budget-mib",
        "32",
        // Prompts prefill in several chunks, as long prompts do.
        "--max-batch-tokens",
        "48",
        &caching,
    ];
    args.extend_from_slice(plan);
    CoordinatorProcess::start(&args).expect("coordinator")
}

fn complete(addr: &str, body: &Value) -> Value {
    let r = post_json(addr, "/v1/completions", body).expect("request");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json().expect("json")
}

fn cached_tokens(answer: &Value) -> u64 {
    answer["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("usage without prompt_tokens_details: {answer}"))
}

fn metrics(addr: &str) -> HashMap<String, f64> {
    http::metrics(addr).expect("metrics")
}

/// What one coordinator answered to the test's requests, in order.
#[derive(Debug)]
struct Run {
    texts: Vec<String>,
    cached: Vec<u64>,
    prompt_tokens: Vec<u64>,
    /// `n = 2` on a prompt nothing cached yet: both choices' texts, the usage's cached tokens,
    /// the prompt's length, and how many prompt tokens the cache served meanwhile.
    n2_texts: Vec<String>,
    n2_cached: u64,
    n2_prompt_tokens: u64,
    n2_hits: f64,
    /// The usage chunk of a streamed request.
    streamed_cached: u64,
    end: HashMap<String, f64>,
}

/// Greedy and seeded requests: two prompts sharing the prefix, then the first again.
fn exercise(plan: &[&str], caching: bool) -> Run {
    let c = start(plan, caching);
    let sampling = [
        json!({"temperature": 0}),
        json!({"temperature": 1.0, "seed": 7}),
    ];
    let (mut texts, mut cached, mut prompt_tokens) = (Vec::new(), Vec::new(), Vec::new());
    for params in &sampling {
        for q in [
            "What are the opening hours?",
            "How many books?",
            "What are the opening hours?",
        ] {
            let mut body = json!({"prompt": prompt(q), "max_tokens": 12});
            body.as_object_mut()
                .expect("object")
                .extend(params.as_object().expect("object").clone());
            let a = complete(&c.addr, &body);
            texts.push(a["choices"][0]["text"].as_str().expect("text").to_string());
            cached.push(cached_tokens(&a));
            prompt_tokens.push(a["usage"]["prompt_tokens"].as_u64().expect("prompt tokens"));
        }
    }

    let before = metrics(&c.addr)["gemma_cluster_prompt_tokens_cached_total"];
    let fresh = format!("A different preamble about a bakery and its bread. {PREFIX}");
    let a = complete(
        &c.addr,
        &json!({"prompt": fresh, "max_tokens": 6, "temperature": 0, "n": 2}),
    );
    let n2_texts = (0..2)
        .map(|i| a["choices"][i]["text"].as_str().expect("text").to_string())
        .collect();
    let n2_hits = metrics(&c.addr)["gemma_cluster_prompt_tokens_cached_total"] - before;

    let r = request(
        &c.addr,
        "POST",
        "/v1/completions",
        Some(
            &json!({"prompt": prompt("How many books?"), "max_tokens": 4, "temperature": 0,
                     "stream": true, "stream_options": {"include_usage": true}}),
        ),
        Duration::from_secs(60),
    )
    .expect("stream");
    let events = sse_data(&r.body);
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).expect("usage chunk");

    let end = http::wait_for_metrics(&c.addr, Duration::from_secs(20), |m| {
        m["gemma_cluster_kv_blocks_used"] == 0.0
    })
    .expect("every block released");
    Run {
        texts,
        cached,
        prompt_tokens,
        n2_texts,
        n2_cached: cached_tokens(&a),
        n2_prompt_tokens: a["usage"]["prompt_tokens"].as_u64().expect("prompt tokens"),
        n2_hits,
        streamed_cached: cached_tokens(&usage),
        end,
    }
}

fn same_text_with_the_cache_on_and_off(plan: &[&str]) {
    let off = exercise(plan, false);
    let on = exercise(plan, true);
    assert_eq!(on.texts, off.texts, "{plan:?}: the cache changed the text");
    assert_eq!(on.n2_texts, off.n2_texts, "{plan:?}: n = 2");
    assert_eq!(on.n2_texts[0], on.n2_texts[1], "greedy choices agree");

    // Off: nothing reused, nothing kept.
    assert!(off.cached.iter().all(|&c| c == 0), "{:?}", off.cached);
    assert_eq!(off.end["gemma_cluster_prompt_tokens_cached_total"], 0.0);
    assert_eq!(off.end["gemma_cluster_kv_blocks_cached"], 0.0);
    assert_eq!((off.n2_hits, off.streamed_cached), (0.0, 0));

    // On: the first request finds nothing; every later one finds at least the shared prefix,
    // and a repeated prompt every full block before its last token.
    assert_eq!(on.cached[0], 0);
    assert!(
        on.cached[1..].iter().all(|&c| c >= 5 * BS),
        "{:?}",
        on.cached
    );
    for i in [2, 3, 5] {
        let all_but_last = (on.prompt_tokens[i] - 1) / BS * BS;
        assert_eq!(on.cached[i], all_but_last, "request {i}: {on:?}");
    }
    assert!(on.streamed_cached >= 5 * BS, "streamed usage: {on:?}");
    // n = 2: choice 0 computed the prompt, choice 1 reused its blocks instead of computing
    // them again (it waited for them).
    assert_eq!(on.n2_cached, 0);
    assert_eq!(on.n2_hits, ((on.n2_prompt_tokens - 1) / BS * BS) as f64);
    let m = &on.end;
    let hits: u64 = on.cached.iter().sum::<u64>() + on.n2_hits as u64 + on.streamed_cached;
    assert_eq!(m["gemma_cluster_prompt_tokens_cached_total"], hits as f64);
    let rate = m["gemma_cluster_prefix_cache_hit_rate"];
    let prompts = m["gemma_cluster_prompt_tokens_total"];
    assert!(
        (rate - hits as f64 / prompts).abs() < 1e-9,
        "{rate} vs {hits}/{prompts}"
    );
    assert!(m["gemma_cluster_kv_blocks_cached"] > 0.0);
    assert_eq!(m["gemma_cluster_kv_blocks_used"], 0.0);
}

#[test]
fn tp1_same_text_with_the_cache_on_and_off() {
    same_text_with_the_cache_on_and_off(&[]);
}

#[test]
fn tp2_same_text_with_the_cache_on_and_off() {
    same_text_with_the_cache_on_and_off(&["--tp", "2"]);
}

#[test]
fn pp2_same_text_with_the_cache_on_and_off() {
    same_text_with_the_cache_on_and_off(&["--pp", "2"]);
}
