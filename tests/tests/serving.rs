//! Serving at scale against real processes: streaming in OpenAI's format, continuous batching
//! that does not change greedy text, cancellation that frees KV blocks, back-pressure, metrics,
//! readiness, log-probabilities and n.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gemma_cluster_tests::http::{self, open_stream, post_json, request, sse_data};
use gemma_cluster_tests::process::CoordinatorProcess;
use gemma_testkit::{add_tokenizer, TinyGemma};
use serde_json::{json, Value};

fn model_dir() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir_in(gemma_testkit::process_scratch()).expect("tmp");
        TinyGemma::mha_like_7b().write(dir.path()).expect("model");
        add_tokenizer(dir.path()).expect("tokenizer");
        dir
    })
    .path()
}

fn start(extra: &[&str], env: &[(&str, &str)]) -> CoordinatorProcess {
    let dir = model_dir().display().to_string();
    let mut args = vec!["--model", &dir, "--tp", "2"];
    if !extra.contains(&"--kv-budget-mib") {
        args.extend(["--kv-budget-mib", "32"]);
    }
    args.extend_from_slice(extra);
    CoordinatorProcess::start_with_env(&args, env).expect("coordinator")
}

/// Text of a streamed completion, its SSE framing checked on the way.
fn streamed_text(addr: &str, body: Value) -> String {
    http::streamed_completion(addr, body, Duration::from_secs(120))
        .expect("stream")
        .0
}

fn metrics(addr: &str) -> HashMap<String, f64> {
    http::metrics(addr).expect("metrics")
}

/// Waits (bounded) until `f` holds for the metrics.
fn until_metrics(
    addr: &str,
    what: &str,
    f: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    http::wait_for_metrics(addr, Duration::from_secs(20), f)
        .unwrap_or_else(|e| panic!("{what} never held: {e}"))
}

#[test]
fn concurrent_streams_match_solo_and_steps_batch() {
    let c = start(&["--max-batch-tokens", "64"], &[]);
    let prompts: Vec<String> = (0..16)
        .map(|i| format!("Request {i}: tell me about the number {}", i * 7))
        .collect();
    let body = |p: &str| json!({"prompt": p, "max_tokens": 12, "temperature": 0, "stream": true});
    let solo: Vec<String> = prompts
        .iter()
        .map(|p| streamed_text(&c.addr, body(p)))
        .collect();
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| s.spawn(|| streamed_text(&c.addr, body(p))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    assert_eq!(together, solo, "batching must not change greedy text");
    let m = metrics(&c.addr);
    let steps = m["gemma_cluster_step_sequences_count"];
    let single = m["gemma_cluster_step_sequences_bucket{le=\"1.0\"}"];
    assert!(
        steps - single > 0.0,
        "some steps carried more than one sequence: {m:?}"
    );
    assert!(m["gemma_cluster_requests_total{outcome=\"finished\"}"] >= 32.0);
    assert!(m["gemma_cluster_generation_tokens_total"] > 0.0);
    assert_eq!(
        m["gemma_cluster_kv_blocks_used"], 0.0,
        "idle cluster holds no blocks"
    );
}

#[test]
fn cancelled_stream_frees_its_blocks() {
    let c = start(&[], &[]);
    let conn = open_stream(
        &c.addr,
        "/v1/completions",
        &json!({"prompt": "A long story:", "max_tokens": 4000, "temperature": 0, "ignore_eos": true, "stream": true}),
        3,
        Duration::from_secs(60),
    )
    .expect("stream started");
    let m = metrics(&c.addr);
    assert!(
        m["gemma_cluster_kv_blocks_used"] > 0.0,
        "the running request holds blocks"
    );
    drop(conn); // the client goes away mid-stream
    until_metrics(&c.addr, "blocks freed after cancel", |m| {
        m["gemma_cluster_kv_blocks_used"] == 0.0
            && m.get("gemma_cluster_requests_total{outcome=\"cancelled\"}")
                .is_some_and(|&n| n >= 1.0)
    });
}

#[test]
fn full_queue_answers_429_with_retry_after() {
    let c = start(
        &[],
        &[("GEMMA_MAX_RUNNING", "1"), ("GEMMA_MAX_WAITING", "1")],
    );
    // It cannot end before the other two have answered: greedy through <eos> (ignore_eos) for
    // 2000 tokens, cancelled as soon as the refusal is in.
    let long = json!({"prompt": "x", "max_tokens": 2000, "temperature": 0, "ignore_eos": true, "stream": true});
    // One running, one waiting; the third has no room.
    let first = open_stream(
        &c.addr,
        "/v1/completions",
        &long,
        1,
        Duration::from_secs(60),
    )
    .expect("first");
    // The refused request answers at once; the queued one only once the first stream ends, so
    // the first stream is cancelled as soon as one answer is in (not after 2000 tokens).
    let statuses: Vec<(u16, Option<String>)> = std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..2 {
            let tx = tx.clone();
            let addr = &c.addr;
            s.spawn(move || {
                let r = post_json(
                    addr,
                    "/v1/completions",
                    &json!({"prompt": "y", "max_tokens": 1}),
                )
                .expect("req");
                let _ = tx.send((r.status, r.header("retry-after").map(str::to_string)));
            });
        }
        drop(tx);
        let answer = || rx.recv_timeout(Duration::from_secs(60)).expect("an answer");
        let early = answer();
        drop(first);
        vec![early, answer()]
    });
    // The waiting request cannot answer while the first stream runs, so the first answer is
    // the refusal.
    assert_eq!(statuses[0], (429, Some("1".to_string())), "{statuses:?}");
    assert_eq!(statuses[1].0, 200, "the queued request ran: {statuses:?}");
    let m = metrics(&c.addr);
    assert_eq!(m["gemma_cluster_requests_total{outcome=\"rejected\"}"], 1.0);
}

#[test]
fn logprobs_n_usage_and_readiness() {
    let c = start(&[], &[]);
    let r = request(&c.addr, "GET", "/ready", None, Duration::from_secs(10)).expect("ready");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // Completions logprobs: the greedy token is the most likely alternative.
    let v = post_json(
        &c.addr,
        "/v1/completions",
        &json!({"prompt": "Hello", "max_tokens": 5, "temperature": 0, "logprobs": 3}),
    )
    .expect("req")
    .json()
    .expect("json");
    let lp = &v["choices"][0]["logprobs"];
    let n = v["usage"]["completion_tokens"].as_u64().expect("usage") as usize;
    assert_eq!(lp["tokens"].as_array().map(Vec::len), Some(n));
    for (i, top) in lp["top_logprobs"]
        .as_array()
        .expect("top")
        .iter()
        .enumerate()
    {
        let top = top.as_object().expect("map");
        assert_eq!(top.len(), 3);
        let best = top
            .values()
            .filter_map(Value::as_f64)
            .fold(f64::NEG_INFINITY, f64::max);
        let chosen = lp["token_logprobs"][i].as_f64().expect("logprob");
        assert!((best - chosen).abs() < 1e-5 && chosen <= 0.0, "{lp}");
    }

    // Chat logprobs and n: choice 0 equals the single request with the same seed.
    let chat =
        |n: u32| {
            post_json(&c.addr, "/v1/chat/completions", &json!({
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "n": n,
            "temperature": 1.0, "top_k": 30, "seed": 11, "logprobs": true, "top_logprobs": 2,
        }))
        .expect("req")
        .json()
        .expect("json")
        };
    let one = chat(1);
    let two = chat(2);
    assert_eq!(two["choices"].as_array().map(Vec::len), Some(2));
    assert_eq!(two["choices"][0]["message"], one["choices"][0]["message"]);
    for t in one["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("content")
    {
        assert_eq!(t["top_logprobs"].as_array().map(Vec::len), Some(2));
    }

    // Chat streaming with usage: role first, usage chunk last, then [DONE].
    let r = request(
        &c.addr,
        "POST",
        "/v1/chat/completions",
        Some(&json!({
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0,
            "stream": true, "stream_options": {"include_usage": true},
        })),
        Duration::from_secs(60),
    )
    .expect("stream");
    let events = sse_data(&r.body);
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("json"))
        .collect();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let last = chunks.last().expect("usage chunk");
    assert_eq!(last["choices"].as_array().map(Vec::len), Some(0));
    assert!(last["usage"]["completion_tokens"]
        .as_u64()
        .is_some_and(|n| n <= 4));

    // A worker that dies makes the cluster unready, with the reason.
    let pid = c.worker_pids()[1];
    // SAFETY: signalling a child process of our coordinator by its logged pid.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = request(&c.addr, "GET", "/ready", None, Duration::from_secs(10)).expect("ready");
        if r.status == 503 {
            let v = r.json().expect("json");
            assert!(
                v["reason"].as_str().is_some_and(|s| s.contains("rank 1")),
                "{v}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/ready stayed 200 after a worker died"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn preemption_under_kv_pressure_keeps_greedy_text() {
    // 1 MiB of KV per worker holds 32 blocks of 16 tokens here; 12 concurrent requests growing to
    // ~70 tokens (5 blocks) each need about 60: the newest get preempted and recomputed.
    let c = start(&["--kv-budget-mib", "1"], &[]);
    let prompts: Vec<String> = (0..12).map(|i| format!("Story {i}:")).collect();
    let body = |p: &str| json!({"prompt": p, "max_tokens": 64, "temperature": 0, "stream": true});
    let solo: Vec<String> = prompts
        .iter()
        .map(|p| streamed_text(&c.addr, body(p)))
        .collect();
    let together: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = prompts
            .iter()
            .map(|p| s.spawn(|| streamed_text(&c.addr, body(p))))
            .collect();
        hs.into_iter().map(|h| h.join().expect("client")).collect()
    });
    assert_eq!(
        together, solo,
        "preemption and recompute must not change greedy text"
    );
    let m = metrics(&c.addr);
    assert!(
        m["gemma_cluster_preemptions_total"] > 0.0,
        "the pool was exhausted: {m:?}"
    );
    assert_eq!(m["gemma_cluster_kv_blocks_total"], 32.0);
    assert_eq!(m["gemma_cluster_kv_blocks_used"], 0.0);
}

/// Tokenizing runs off the async runtime. The coordinator gets two runtime worker threads
/// (TOKIO_WORKER_THREADS), and two clients send a prompt of 1.75 MB each (one BPE word, seconds
/// of tokenizer work each, then refused as too long). Were prompts tokenized on the runtime, both
/// worker threads would be busy until the refusals: the running stream and /health would stall,
/// and the refusals would arrive first. Off the runtime, the stream keeps receiving tokens and
/// /health answers while the big prompts are still being tokenized.
#[test]
fn long_prompts_do_not_stall_other_streams() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;

    const BIG_PROMPTS: usize = 2;
    /// Tokens (one engine step each) the stream must deliver while the big prompts are pending.
    const EVENTS: usize = 8;
    let c = start(&[], &[("TOKIO_WORKER_THREADS", "2")]);
    let mut stream = open_stream(
        &c.addr,
        "/v1/completions",
        &json!({"prompt": "A long story:", "max_tokens": 4000, "temperature": 0.7, "top_k": 40,
                "seed": 5, "ignore_eos": true, "stream": true}),
        1,
        Duration::from_secs(300),
    )
    .expect("stream started");
    let answered = AtomicUsize::new(0);
    // The stream's tokens are counted from when every big prompt has been sent.
    let sent = Barrier::new(BIG_PROMPTS + 1);
    std::thread::scope(|s| {
        for i in 0..BIG_PROMPTS {
            let (addr, answered, sent) = (&c.addr, &answered, &sent);
            s.spawn(move || {
                let prompt = format!("{i}: {}", "lorem ipsum dolor sit amet ".repeat(65_000));
                let body = json!({"prompt": prompt, "max_tokens": 1}).to_string();
                let mut conn = std::net::TcpStream::connect(addr).expect("connect");
                conn.set_read_timeout(Some(Duration::from_secs(300)))
                    .expect("timeout");
                write!(
                    conn,
                    "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
                     Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .expect("big prompt sent");
                sent.wait();
                let mut answer = String::new();
                conn.read_to_string(&mut answer)
                    .expect("big prompt answered");
                answered.fetch_add(1, Ordering::SeqCst);
                assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
                assert!(answer.contains(r#""param":"prompt""#), "{answer}");
            });
        }
        sent.wait();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while String::from_utf8_lossy(&seen).matches("data:").count() < EVENTS {
            let n = stream.read(&mut buf).expect("stream readable");
            assert!(n > 0, "stream ended: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        let health =
            request(&c.addr, "GET", "/health", None, Duration::from_secs(300)).expect("health");
        assert_eq!(health.status, 200);
        assert_eq!(
            answered.load(Ordering::SeqCst),
            0,
            "the big prompts were answered before the stream's {EVENTS} tokens and /health: \
             tokenizing stalled the runtime"
        );
    });
}
