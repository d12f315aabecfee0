//! What the API does over HTTP against real coordinator and worker processes, beyond the
//! serving tests: stop strings, `/health`, a non-streamed request whose client goes away,
//! Gemma 2 and Gemma 3 through the gRPC cluster at tp=2, at pp=2 and with an uneven
//! `--layers-per-stage`, workers started separately (`--workers`), and `--dtype bf16`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use candle_core::DType;
use gemma_cluster_tests::http::{
    metrics, post_json, request, streamed_completion, wait_for_metrics,
};
use gemma_cluster_tests::process::{binary, CoordinatorProcess, Spawned};
use gemma_coordinator::tokenizer::TextTokenizer;
use gemma_proto::{KvBlockManager, PlanRequest};
use gemma_testkit::{add_tokenizer, generate_greedy, GreedyOptions, LocalCluster, TinyGemma};
use gemma_worker::{ModelFolder, ShardOptions};
use serde_json::{json, Value};

/// Tokens each greedy comparison generates.
const NEW_TOKENS: usize = 8;
/// The smallest lead of the best logit over the second that a compared prompt must have in the
/// reference: f32 plans differ from it by about 1e-5, so such a lead cannot flip.
const CLEAR_MARGIN: f32 = 1e-3;

/// The tiny models of this file, each with the real tokenizer, written once.
struct Models {
    _root: tempfile::TempDir,
    root: PathBuf,
}

fn models() -> &'static Models {
    static M: OnceLock<Models> = OnceLock::new();
    M.get_or_init(|| {
        let root = tempfile::tempdir_in(gemma_testkit::process_scratch()).expect("tmp");
        Models {
            root: root.path().to_path_buf(),
            _root: root,
        }
    })
}

/// The folder of `model` (named `name`), written on first use.
fn folder(name: &str, model: &TinyGemma) -> PathBuf {
    static WRITE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_writer = WRITE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = models().root.join(name);
    if !dir.exists() {
        model.write(&dir).expect("write model");
        add_tokenizer(&dir).expect("tokenizer");
    }
    dir
}

fn tokenizer(dir: &Path) -> TextTokenizer {
    TextTokenizer::from_dir(dir, 2, 1).expect("tokenizer")
}

fn start(dir: &Path, args: &[&str]) -> CoordinatorProcess {
    let dir = dir.display().to_string();
    let mut all = vec!["--model", &dir, "--kv-budget-mib", "16"];
    all.extend_from_slice(args);
    CoordinatorProcess::start(&all).expect("coordinator")
}

fn completion(addr: &str, body: Value) -> Value {
    let r = post_json(addr, "/v1/completions", &body).expect("request");
    let v = r.json().expect("json");
    assert_eq!(r.status, 200, "{v}");
    v
}

/// A streamed completion's text and finish reason, the SSE framing checked.
fn streamed(addr: &str, body: Value) -> (String, String) {
    streamed_completion(addr, body, Duration::from_secs(60)).expect("stream")
}

/// A stop string cuts the text before its first occurrence and finishes with "stop", streamed
/// or not; the stream never sends any part of it, though it spans two tokens.
#[test]
fn stop_strings_cut_the_text_and_finish_with_stop() {
    const PROMPT: &str = "Once upon a time";
    const TOKENS: usize = 24;
    let dir = folder("gemma-mqa", &TinyGemma::mqa_like_2b());
    let tok = tokenizer(&dir);
    // The greedy tokens, from the in-process plan the cluster reproduces bit for bit.
    let model = ModelFolder::open(&dir).expect("open");
    let plan = LocalCluster::load(&model, &PlanRequest::new(2, 1), &ShardOptions::default())
        .expect("plan");
    let kv = KvBlockManager::new(256, gemma_proto::DEFAULT_BLOCK_SIZE);
    let opts = GreedyOptions {
        max_new_tokens: TOKENS,
        prefill_chunk: 512,
    };
    let prompt = tok.encode_prompt(PROMPT).expect("encode");
    let tokens = generate_greedy(&plan, &kv, &[prompt], &opts)
        .expect("generate")
        .tokens
        .remove(0);
    let full_text = tok.decode(&tokens).expect("decode");

    let c = start(&dir, &["--tp", "2"]);
    let base = json!({"prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0,
                      "ignore_eos": true});
    let full = completion(&c.addr, base.clone());
    assert_eq!(full["choices"][0]["text"], full_text);
    assert_eq!(full["choices"][0]["finish_reason"], "length");
    // The stop string: the last character of one token's text and the first of the next, at a
    // token boundary in the middle of the text.
    let boundary = (TOKENS / 2..TOKENS)
        .filter_map(|j| tok.decode(&tokens[..j]).ok())
        .map(|before| before.len())
        .find(|&b| b > 0 && b < full_text.len() && full_text.is_char_boundary(b))
        .expect("a token boundary inside the text");
    let (before, after) = full_text.split_at(boundary);
    let stop: String = before
        .chars()
        .last()
        .into_iter()
        .chain(after.chars().next())
        .collect();
    let want = &full_text[..full_text
        .find(&stop)
        .expect("the stop string is in the text")];
    let with_stop = |stop: Value| {
        let mut body = base.clone();
        body["stop"] = stop;
        body
    };

    let v = completion(
        &c.addr,
        with_stop(json!([stop, "never in this text \u{1F600}"])),
    );
    assert_eq!(v["choices"][0]["text"], want, "stop {stop:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let (text, finish) = streamed(&c.addr, with_stop(json!(stop)));
    assert_eq!(text, want, "streamed, stop {stop:?}");
    assert_eq!(finish, "stop");

    let (text, finish) = streamed(&c.addr, with_stop(json!("never in this text \u{1F600}")));
    assert_eq!(
        (text.as_str(), finish.as_str()),
        (full_text.as_str(), "length")
    );
}

/// `/health` is liveness: "ok" while the process serves, whatever the workers do; readiness
/// (`/ready`, 503 with the reason) is what reports a lost worker.
fn health(addr: &str) -> (u16, String) {
    let r = request(addr, "GET", "/health", None, Duration::from_secs(10)).expect("health");
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

/// A client that drops its connection while its non-streamed request generates: the engine
/// notices between steps, cancels the request and frees its blocks; the server keeps serving.
#[test]
fn a_dropped_non_streamed_request_is_cancelled_and_health_stays_ok() {
    let dir = folder("gemma-mqa", &TinyGemma::mqa_like_2b());
    let c = start(&dir, &["--tp", "2"]);
    assert_eq!(health(&c.addr), (200, "ok".to_string()));

    let body = json!({"prompt": "A long story:", "max_tokens": 4000, "temperature": 0,
                      "ignore_eos": true})
    .to_string();
    let mut conn = std::net::TcpStream::connect(&c.addr).expect("connect");
    write!(
        conn,
        "POST /v1/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        c.addr,
        body.len()
    )
    .expect("request sent");
    // It runs (its blocks are taken) and has generated tokens, with no answer yet.
    wait_for_metrics(&c.addr, Duration::from_secs(30), |m| {
        m["gemma_cluster_running_sequences"] == 1.0
            && m["gemma_cluster_kv_blocks_used"] > 0.0
            && m["gemma_cluster_generation_tokens_total"] >= 8.0
    })
    .expect("the request runs");
    conn.set_nonblocking(true).expect("nonblocking");
    let mut byte = [0u8; 1];
    assert!(
        conn.read(&mut byte).is_err(),
        "a 4000-token request answered already"
    );
    drop(conn);
    let m = wait_for_metrics(&c.addr, Duration::from_secs(30), |m| {
        m["gemma_cluster_running_sequences"] == 0.0
            && m["gemma_cluster_kv_blocks_used"] == 0.0
            && m.get("gemma_cluster_requests_total{outcome=\"cancelled\"}") == Some(&1.0)
    })
    .expect("the dropped request is cancelled and its blocks freed");
    assert!(
        m["gemma_cluster_generation_tokens_total"] < 4000.0,
        "cancelled mid-generation: {m:?}"
    );
    assert_eq!(
        m.get("gemma_cluster_requests_total{outcome=\"finished\"}"),
        None
    );

    // The server still serves, and /health stays "ok" when a worker is lost.
    let v = completion(&c.addr, json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(v["object"], "text_completion");
    let pid = c.worker_pids()[1];
    // SAFETY: signalling a worker process of our coordinator by its logged pid.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    // The next request's step fails on the lost worker, which readiness then reports.
    let r = post_json(
        &c.addr,
        "/v1/completions",
        &json!({"prompt": "Hi", "max_tokens": 2}),
    )
    .expect("request");
    let v = r.json().expect("json");
    assert_eq!(r.status, 503, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("cluster step failed")),
        "{v}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while request(&c.addr, "GET", "/ready", None, Duration::from_secs(10))
        .expect("ready")
        .status
        != 503
    {
        assert!(std::time::Instant::now() < deadline, "/ready stayed 200");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(health(&c.addr), (200, "ok".to_string()));
}

/// Greedy text of `prompt` over HTTP (generating through stop tokens), with each token's
/// log-probability.
fn greedy_http(addr: &str, prompt: &str, max_tokens: usize) -> (String, Vec<f64>) {
    let v = completion(
        addr,
        json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
               "ignore_eos": true, "logprobs": 1}),
    );
    assert_eq!(v["usage"]["completion_tokens"], max_tokens);
    let text = v["choices"][0]["text"].as_str().expect("text").to_string();
    let logprobs = v["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .expect("token_logprobs")
        .iter()
        .map(|l| l.as_f64().expect("a number"))
        .collect();
    (text, logprobs)
}

const PROMPTS: [&str; 2] = ["The quick brown fox", "Grüße, 世界! 🎉"];

/// The plain reference's greedy text of each prompt, checked to have clear choices.
fn reference_texts(dir: &Path, model: &TinyGemma) -> Vec<String> {
    let tok = tokenizer(dir);
    let reference = model.reference();
    PROMPTS
        .iter()
        .map(|p| {
            let ids = tok.encode_prompt(p).expect("encode");
            let g = reference.greedy(&ids, NEW_TOKENS);
            assert!(
                g.min_margin > CLEAR_MARGIN,
                "{p:?} has a near-tie ({}) in the reference: pick another prompt",
                g.min_margin
            );
            tok.decode(&g.tokens).expect("decode")
        })
        .collect()
}

/// Each plan serves the reference's greedy text; plans that differ only in their pipeline
/// stages give the same log-probabilities bit for bit (a stage boundary moves exact f32 hidden
/// states; only tensor parallelism changes summation order).
fn check_plans(name: &str, model: TinyGemma, plans: &[&[&str]]) {
    let dir = folder(name, &model);
    let want = reference_texts(&dir, &model);
    let mut by_tp: Vec<(String, Vec<Vec<f64>>)> = Vec::new();
    for plan in plans {
        let c = start(&dir, plan);
        let mut logprobs = Vec::new();
        for (prompt, want) in PROMPTS.iter().zip(&want) {
            let (text, lp) = greedy_http(&c.addr, prompt, NEW_TOKENS);
            assert_eq!(&text, want, "{name} {plan:?}: {prompt:?}");
            logprobs.push(lp);
        }
        let tp = plan
            .iter()
            .position(|&a| a == "--tp")
            .map_or("1".to_string(), |i| plan[i + 1].to_string());
        match by_tp.iter().find(|(t, _)| *t == tp) {
            Some((_, first)) => assert_eq!(
                &logprobs, first,
                "{name} {plan:?}: pipeline stages changed the log-probabilities at tp={tp}"
            ),
            None => by_tp.push((tp, logprobs)),
        }
    }
}

#[test]
fn gemma2_through_the_cluster_at_tp2_and_pp2() {
    check_plans(
        "gemma2",
        TinyGemma::gemma2_like(),
        &[&["--tp", "2"], &["--pp", "2"]],
    );
}

/// Gemma 3 at tp=2, at pp=2, and at tp=2 with an uneven split of its 6 layers (1 and 5).
#[test]
fn gemma3_through_the_cluster_at_tp2_pp2_and_uneven_stages() {
    check_plans(
        "gemma3",
        TinyGemma::gemma3_like(),
        &[
            &["--tp", "2"],
            &["--pp", "2"],
            &["--tp", "2", "--pp", "2", "--layers-per-stage", "1,5"],
        ],
    );
}

/// Workers started on their own (as on other hosts) and given with `--workers`, stage-major:
/// the coordinator assigns them their shards and serves the reference's text.
#[test]
fn separately_started_workers_serve() {
    let model = TinyGemma::mqa_like_2b();
    let dir = folder("gemma-mqa", &model);
    let want = reference_texts(&dir, &model);
    let workers: Vec<(Spawned, String)> = (0..4)
        .map(|_| {
            let args = ["--listen", "127.0.0.1:0", "--threads", "1"].map(String::from);
            let w = Spawned::start(&binary("gemma-worker"), &args).expect("worker");
            let line = w.next_line(Duration::from_secs(30)).expect("announced");
            let addr = line
                .strip_prefix("gemma-worker listening on ")
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or_else(|| panic!("unexpected announcement {line:?}"))
                .to_string();
            (w, addr)
        })
        .collect();
    let addrs: Vec<&str> = workers.iter().map(|(_, a)| a.as_str()).collect();
    let list = addrs.join(",");
    let c = start(&dir, &["--tp", "2", "--pp", "2", "--workers", &list]);
    assert!(
        c.worker_pids().is_empty(),
        "it started no local worker: {}",
        c.process.stderr_text()
    );
    for (prompt, want) in PROMPTS.iter().zip(&want) {
        let (text, _) = greedy_http(&c.addr, prompt, NEW_TOKENS);
        assert_eq!(&text, want, "{prompt:?}");
    }
    // Each worker loaded the shard of its place in the list (logged before it reported Ready).
    for (i, (w, addr)) in workers.iter().enumerate() {
        let shard = format!("shard loaded stage={} rank={}", i / 2, i % 2);
        assert!(
            w.wait_for_stderr_line(|l| l.contains(&shard), Duration::from_secs(10)),
            "worker {i} ({addr}) did not log {shard:?}:\n{}",
            w.stderr_text()
        );
    }
}

/// `--dtype bf16` through a tp=2 cluster: the greedy tokens of the in-process bf16 plan, which
/// the cluster reproduces bit for bit (bf16 itself is within 3% of the f32 logits,
/// worker/tests/dtypes.rs).
#[test]
fn bf16_cluster_equals_the_in_process_bf16_plan() {
    let dir = folder("gemma-mha", &TinyGemma::mha_like_7b());
    let tok = tokenizer(&dir);
    let model = ModelFolder::open(&dir).expect("open");
    let opts = ShardOptions {
        dtype: DType::BF16,
        ..ShardOptions::default()
    };
    let plan = LocalCluster::load(&model, &PlanRequest::new(2, 1), &opts).expect("bf16 plan");
    let kv = KvBlockManager::new(opts.kv_blocks, opts.block_size);
    let c = start(&dir, &["--tp", "2", "--dtype", "bf16"]);
    for prompt in PROMPTS {
        let ids = tok.encode_prompt(prompt).expect("encode");
        let run = generate_greedy(
            &plan,
            &kv,
            &[ids],
            &GreedyOptions {
                max_new_tokens: NEW_TOKENS,
                prefill_chunk: 512,
            },
        )
        .expect("generate");
        let want = tok.decode(&run.tokens[0]).expect("decode");
        let (text, _) = greedy_http(&c.addr, prompt, NEW_TOKENS);
        assert_eq!(text, want, "{prompt:?}");
    }
    let m = metrics(&c.addr).expect("metrics");
    assert_eq!(m["gemma_cluster_kv_blocks_used"], 0.0);
}
