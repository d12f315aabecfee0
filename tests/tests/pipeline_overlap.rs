//! Pipeline stages in flight together (`pipeline_overlap`): real pp=2 and tp=2 x pp=2 clusters
//! of a tiny Gemma give several concurrent requests, greedy and seeded, the same text with the
//! overlap on as off; a preempting pool (1 MiB: 32 blocks at pp=2) and chunked prefill
//! included. The engine's unit tests hold that no sequence is ever in two steps in flight at
//! once.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use gemma_cluster_tests::http::{self, post_json};
use gemma_cluster_tests::process::CoordinatorProcess;
use gemma_testkit::{add_tokenizer, TinyGemma};
use serde_json::{json, Value};

/// Four layers (two per stage), four KV heads of 32: 32 KiB a block per worker at pp=2.
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

fn start(model: &str, plan: &[&str], overlap: bool, budget_mib: &str) -> CoordinatorProcess {
    let overlap = format!("--pipeline-overlap={overlap}");
    let mut args = vec![
        "--model",
        model,
        "--kv-budget-mib",
        budget_mib,
        // Prompts prefill in several chunks, beside decoding sequences.
        "--max-batch-tokens",
        "24",
        &overlap,
    ];
    args.extend_from_slice(plan);
    CoordinatorProcess::start(&args).expect("coordinator")
}

/// Eight requests of different lengths (`max_tokens` from `tokens`): half greedy, half seeded
/// at temperature 1.
fn bodies(tokens: usize) -> Vec<Value> {
    (0..8)
        .map(|i| {
            let prompt = format!(
                "Request {i}: {} the library opens at nine and closes at six",
                "and then ".repeat(i + 1)
            );
            let mut body = json!({"prompt": prompt, "max_tokens": tokens + i, "ignore_eos": true});
            let params = match i % 2 {
                0 => json!({"temperature": 0}),
                _ => json!({"temperature": 1.0, "seed": 100 + i}),
            };
            if let (Some(b), Some(p)) = (body.as_object_mut(), params.as_object()) {
                b.extend(p.clone());
            }
            body
        })
        .collect()
}

/// Every request's text, all sent at once; and the metrics afterwards.
fn texts(c: &CoordinatorProcess, tokens: usize) -> (Vec<String>, HashMap<String, f64>) {
    let addr = c.addr.as_str();
    let texts = std::thread::scope(|s| {
        let handles: Vec<_> = bodies(tokens)
            .into_iter()
            .map(|body| {
                s.spawn(move || {
                    let r = post_json(addr, "/v1/completions", &body).expect("request");
                    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                    let v = r.json().expect("json");
                    v["choices"][0]["text"].as_str().expect("text").to_string()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let metrics = http::wait_for_metrics(&c.addr, Duration::from_secs(10), |m| {
        m.get("gemma_cluster_kv_blocks_used") == Some(&0.0)
    })
    .expect("every block back");
    (texts, metrics)
}

/// The texts with overlap off and on; the metrics of the run with it on.
fn same_text_with_and_without_overlap(
    plan: &[&str],
    budget_mib: &str,
    tokens: usize,
) -> HashMap<String, f64> {
    let model = model_dir().display().to_string();
    let (off, _) = texts(&start(&model, plan, false, budget_mib), tokens);
    let (on, metrics) = texts(&start(&model, plan, true, budget_mib), tokens);
    assert!(off.iter().all(|t| !t.is_empty()), "{off:?}");
    for (i, (a, b)) in off.iter().zip(&on).enumerate() {
        assert_eq!(a, b, "request {i}: overlap off vs on");
    }
    metrics
}

#[test]
fn pp2_gives_the_same_text_with_overlap_on_and_off() {
    same_text_with_and_without_overlap(&["--pp", "2"], "32", 12);
}

/// 32 blocks of 16 tokens; eight requests growing to 80-100 tokens (6-7 blocks) each: sequences
/// in flight are preempted and recomputed.
#[test]
fn pp2_under_kv_pressure_gives_the_same_text() {
    let m = same_text_with_and_without_overlap(&["--pp", "2"], "1", 64);
    assert_eq!(m["gemma_cluster_kv_blocks_total"], 32.0);
    assert!(m["gemma_cluster_preemptions_total"] > 0.0, "{m:?}");
}

#[test]
fn tp2_pp2_gives_the_same_text_with_overlap_on_and_off() {
    same_text_with_and_without_overlap(&["--tp", "2", "--pp", "2"], "32", 12);
}
