//! vLLM's request extensions that GuideLLM and vLLM's benchmark scripts send, honoured over real
//! HTTP on completions and chat (a tiny model, one worker):
//! - `min_tokens`: no stop string (nor stop token) ends the output before that many tokens;
//! - `stream_options.continuous_usage_stats`: every chunk carries the usage so far, counting
//!   up to the final usage.
//!
//! (`ignore_eos` is held in `serving.rs` and the engine's tests; refusals in `bad_input.rs`.)

use gemma_cluster_tests::http::{post_json, sse_data};
use gemma_cluster_tests::process::CoordinatorProcess;
use serde_json::{json, Value};

fn start() -> (tempfile::TempDir, CoordinatorProcess) {
    let (tmp, dir) = gemma_cluster_tests::tiny_servable_model();
    let dir = dir.display().to_string();
    let coord = CoordinatorProcess::start(&["--model", &dir, "--kv-budget-mib", "16"])
        .expect("coordinator");
    (tmp, coord)
}

fn post(addr: &str, path: &str, body: &Value) -> Value {
    let r = post_json(addr, path, body).expect("request");
    let v = r.json().expect("json");
    assert_eq!(r.status, 200, "{body} -> {v}");
    v
}

/// The greedy tokens' texts of a completion.
fn greedy_tokens(addr: &str, extra: Value) -> (Vec<String>, Value) {
    let mut body = json!({"prompt": "The capital of France is", "max_tokens": 8,
                          "temperature": 0, "logprobs": 0});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let v = post(addr, "/v1/completions", &body);
    let tokens = v["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_str().expect("text").to_string())
        .collect();
    (tokens, v)
}

#[test]
fn min_tokens_holds_off_stop_strings_on_both_apis() {
    let (_tmp, coord) = start();
    let addr = &coord.addr;
    let (free, _) = greedy_tokens(addr, json!({"ignore_eos": true}));
    assert_eq!(free.len(), 8);
    // A stop string that the first token completes ends the output at once...
    let stop = free[0].clone();
    assert!(!stop.is_empty());
    let (_, v) = greedy_tokens(addr, json!({"ignore_eos": true, "stop": [stop]}));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 1, "{v}");
    assert_eq!(v["choices"][0]["text"], "");
    // ...but not before min_tokens: the same greedy tokens come out, at least three of them.
    let (held, v) = greedy_tokens(
        addr,
        json!({"ignore_eos": true, "stop": [stop], "min_tokens": 3}),
    );
    let n = v["usage"]["completion_tokens"].as_u64().expect("count") as usize;
    assert!(n >= 3, "{v}");
    assert_eq!(held[..3], free[..3], "{v}");
    let text = v["choices"][0]["text"].as_str().expect("text");
    assert!(text.starts_with(&free[..3].concat()), "{text:?}");
    // Chat too: min_tokens equal to max_tokens gives exactly max_tokens.
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
                      "min_tokens": 6, "temperature": 0, "stop": [stop]});
    let v = post(addr, "/v1/chat/completions", &chat);
    assert_eq!(v["usage"]["completion_tokens"], 6, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
}

/// A streamed request's parsed chunks (the `[DONE]` checked and left out).
fn streamed_chunks(addr: &str, path: &str, body: &Value) -> Vec<Value> {
    let r = post_json(addr, path, body).expect("request");
    assert_eq!(r.status, 200);
    let mut events = sse_data(&r.body);
    assert_eq!(events.pop().as_deref(), Some("[DONE]"));
    events
        .iter()
        .map(|e| serde_json::from_str(e).expect("a JSON chunk"))
        .collect()
}

#[test]
fn continuous_usage_stats_counts_up_on_every_chunk() {
    let (_tmp, coord) = start();
    let addr = &coord.addr;
    let options = json!({"include_usage": true, "continuous_usage_stats": true});
    for (path, body) in [
        (
            "/v1/completions",
            json!({"prompt": "Hello", "max_tokens": 5, "ignore_eos": true, "stream": true,
                   "stream_options": options}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
                   "ignore_eos": true, "stream": true, "stream_options": options}),
        ),
    ] {
        let chunks = streamed_chunks(addr, path, &body);
        let last = chunks.last().expect("the usage chunk");
        let prompt = last["usage"]["prompt_tokens"]
            .as_u64()
            .expect("prompt tokens");
        assert_eq!(last["usage"]["completion_tokens"], 5, "{path}: {last}");
        let mut seen = 0;
        for c in &chunks {
            let usage = &c["usage"];
            assert_eq!(usage["prompt_tokens"], prompt, "{path}: {c}");
            let done = usage["completion_tokens"]
                .as_u64()
                .expect("completion tokens");
            assert!(done >= seen && done <= 5, "{path}: counts up: {c}");
            assert_eq!(usage["total_tokens"], prompt + done, "{path}: {c}");
            seen = done;
        }
        // One chunk per token: each token's chunk counts it.
        let counted: Vec<u64> = chunks
            .iter()
            .filter(|c| c["choices"].as_array().is_some_and(|a| !a.is_empty()))
            .map(|c| c["usage"]["completion_tokens"].as_u64().expect("count"))
            .collect();
        assert!(
            counted.windows(2).all(|w| w[0] <= w[1]),
            "{path}: {counted:?}"
        );
        assert!(
            counted.contains(&1) && counted.contains(&5),
            "{path}: {counted:?}"
        );
        // Without continuous_usage_stats, chunks carry `usage: null` and only the last counts.
        let mut plain = body.clone();
        plain["stream_options"] = json!({"include_usage": true});
        let chunks = streamed_chunks(addr, path, &plain);
        let (last, rest) = chunks.split_last().expect("chunks");
        assert!(rest.iter().all(|c| c["usage"].is_null()), "{path}");
        assert_eq!(last["usage"]["completion_tokens"], 5);
    }
}
