//! The cluster with real processes on loopback: a coordinator and 2 or 4 gRPC workers whose
//! logits are bit-identical to the in-process run of the same plan and within the first issue's
//! tolerance of the single-process run; greedy and seeded text over HTTP; clean failures.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use gemma_cluster_tests::http::post_json;
use gemma_cluster_tests::process::{
    alive, binary, wait_gone, worker_pids, CoordinatorProcess, Spawned,
};
use gemma_coordinator::chat::{ChatMessage, ChatTemplate};
use gemma_coordinator::cluster::{Cluster, Prepared};
use gemma_coordinator::sampler::{argmax, Sampler, SamplingParams};
use gemma_coordinator::settings::{Args, Settings};
use gemma_coordinator::tokenizer::TextTokenizer;
use gemma_proto::{KvBlockManager, PlanRequest, SeqLogits, SeqStep, StepBatch};
use gemma_testkit::{add_tokenizer, LocalCluster, TinyGemma};
use gemma_worker::{ModelFolder, ShardOptions};
use serde_json::json;

const DECODE_STEPS: usize = 6;

struct Models {
    _root: tempfile::TempDir,
    mha: std::path::PathBuf,
    mqa: std::path::PathBuf,
}

fn models() -> &'static Models {
    static M: OnceLock<Models> = OnceLock::new();
    M.get_or_init(|| {
        let root = tempfile::tempdir_in(gemma_testkit::process_scratch()).expect("tmp");
        let write = |name: &str, m: TinyGemma| {
            let dir = root.path().join(name);
            m.write(&dir).expect("write model");
            add_tokenizer(&dir).expect("tokenizer");
            dir
        };
        Models {
            mha: write("gemma-mha", TinyGemma::mha_like_7b()),
            mqa: write("gemma-mqa", TinyGemma::mqa_like_2b()),
            _root: root,
        }
    })
}

fn tokenizer(dir: &Path) -> TextTokenizer {
    TextTokenizer::from_dir(dir, 2, 1).expect("tokenizer")
}

/// A chat-template prompt, a raw prompt already beginning with <bos>, and unicode with emoji.
fn prompts(dir: &Path) -> Vec<Vec<u32>> {
    let tok = tokenizer(dir);
    let chat = ChatTemplate::from_dir(dir)
        .expect("template")
        .expect("has a template");
    let rendered = chat
        .render(&[ChatMessage {
            role: "user".into(),
            content: "What is the capital of France?".into(),
        }])
        .expect("render");
    assert!(
        rendered.starts_with("<bos><start_of_turn>user\n"),
        "{rendered:?}"
    );
    let raw = tok
        .encode_prompt("<bos>The quick brown fox")
        .expect("encode");
    assert_eq!(
        raw.iter().filter(|&&t| t == 2).count(),
        1,
        "one <bos>: {raw:?}"
    );
    vec![
        tok.encode_prompt(&rendered).expect("encode"),
        raw,
        tok.encode_prompt("Grüße, 世界! 🎉🚀 naïve café")
            .expect("encode"),
    ]
}

fn settings(dir: &Path, tp: usize, pp: usize) -> Settings {
    Settings::load(&Args {
        model: Some(dir.to_path_buf()),
        tp: Some(tp),
        pp: Some(pp),
        worker_bin: Some(binary("gemma-worker")),
        kv_budget_mib: Some(16),
        ..Args::default()
    })
    .expect("settings")
}

/// Steps prompts together: one prefill step, then greedy decodes, recording every step's logits.
struct GreedyDriver {
    allocs: Vec<gemma_proto::KvAllocation>,
    next: Vec<Vec<u32>>,
    pos: Vec<usize>,
    logits: Vec<Vec<Vec<f32>>>,
}

impl GreedyDriver {
    fn new(prompts: &[Vec<u32>], kv: &KvBlockManager) -> Self {
        Self {
            allocs: prompts
                .iter()
                .map(|p| kv.allocate(p.len() + DECODE_STEPS + 1).expect("blocks"))
                .collect(),
            next: prompts.to_vec(),
            pos: vec![0; prompts.len()],
            logits: Vec::new(),
        }
    }

    fn batch(&self) -> StepBatch {
        StepBatch {
            seqs: (0..self.next.len())
                .map(|i| SeqStep {
                    seq_id: i as u64,
                    tokens: self.next[i].clone(),
                    start_pos: self.pos[i],
                    block_table: self.allocs[i].block_table().to_vec(),
                    top_candidates: 0,
                    log_probs: false,
                    sampling: None,
                })
                .collect(),
        }
    }

    fn advance(&mut self, logits: Vec<Vec<f32>>) {
        for (i, row) in logits.iter().enumerate() {
            self.pos[i] += self.next[i].len();
            self.next[i] = vec![argmax(row)];
        }
        self.logits.push(logits);
    }
}

/// Every logit of each sequence (the driver asks for full logits).
fn full_rows(logits: Vec<SeqLogits>) -> Vec<Vec<f32>> {
    logits
        .into_iter()
        .map(|l| match l {
            SeqLogits::Full(row) => row,
            SeqLogits::Top { .. } | SeqLogits::Compact(_) => {
                panic!("asked for every logit, got candidates")
            }
        })
        .collect()
}

fn in_process(dir: &Path, req: PlanRequest, prompts: &[Vec<u32>]) -> Vec<Vec<Vec<f32>>> {
    let folder = ModelFolder::open(dir).expect("folder");
    let cluster = LocalCluster::load(&folder, &req, &ShardOptions::default()).expect("load");
    let kv = KvBlockManager::new(256, gemma_proto::DEFAULT_BLOCK_SIZE);
    let mut d = GreedyDriver::new(prompts, &kv);
    for _ in 0..=DECODE_STEPS {
        let logits = cluster
            .step(&d.batch())
            .expect("step")
            .to_vec2::<f32>()
            .expect("logits");
        d.advance(logits);
    }
    d.logits
}

/// Every step's logits of the greedy driver through `tp x pp` real worker processes.
fn cluster_logits(dir: &Path, tp: usize, pp: usize, prompts: &[Vec<u32>]) -> Vec<Vec<Vec<f32>>> {
    let s = settings(dir, tp, pp);
    let prepared = Prepared::new(&s).expect("prepare");
    // Spawned from this (long-lived) test thread; stopped when the cluster drops.
    let local = prepared.spawn_local_workers(&s).expect("spawn");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut cluster = Cluster::connect(prepared, &s, local)
            .await
            .expect("connect");
        let kv = KvBlockManager::new(cluster.kv_blocks, cluster.block_size);
        let mut d = GreedyDriver::new(prompts, &kv);
        for _ in 0..=DECODE_STEPS {
            let out = cluster.step(&d.batch()).await.expect("cluster step");
            d.advance(full_rows(out.logits));
        }
        d.logits
    })
}

fn check_cluster(dir: &Path, tp: usize, pp: usize) {
    let prompts = prompts(dir);
    let remote = cluster_logits(dir, tp, pp, &prompts);
    let same_plan = in_process(dir, PlanRequest::new(tp, pp), &prompts);
    let single = in_process(dir, PlanRequest::new(1, 1), &prompts);
    for (step, ((r, l), one)) in remote.iter().zip(&same_plan).zip(&single).enumerate() {
        for (seq, ((r, l), one)) in r.iter().zip(l).zip(one).enumerate() {
            let rb: Vec<u32> = r.iter().map(|v| v.to_bits()).collect();
            let lb: Vec<u32> = l.iter().map(|v| v.to_bits()).collect();
            assert!(rb == lb, "tp={tp} pp={pp} step {step} seq {seq}: cluster logits differ from the in-process run");
            let d = r
                .iter()
                .zip(one)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                d <= 1e-4,
                "tp={tp} pp={pp} step {step} seq {seq}: {d} from the single-process run"
            );
        }
    }
}

#[test]
fn mha_tp2_cluster_is_bit_identical() {
    check_cluster(&models().mha, 2, 1);
}

#[test]
fn mha_tp4_cluster_is_bit_identical() {
    check_cluster(&models().mha, 4, 1);
}

#[test]
fn mha_tp2_pp2_cluster_is_bit_identical() {
    check_cluster(&models().mha, 2, 2);
}

#[test]
fn mqa_tp2_cluster_is_bit_identical() {
    check_cluster(&models().mqa, 2, 1);
}

#[test]
fn mqa_tp4_cluster_is_bit_identical() {
    check_cluster(&models().mqa, 4, 1);
}

#[test]
fn mqa_tp2_pp2_cluster_is_bit_identical() {
    check_cluster(&models().mqa, 2, 2);
}

/// Greedy text the in-process run produces for `prompt`: tokens until a stop token or
/// `max_tokens`, decoded.
fn in_process_greedy_text(
    dir: &Path,
    req: PlanRequest,
    prompt: &[u32],
    max_tokens: usize,
    params: SamplingParams,
) -> (String, usize) {
    let folder = ModelFolder::open(dir).expect("folder");
    let cluster = LocalCluster::load(&folder, &req, &ShardOptions::default()).expect("load");
    let tok = tokenizer(dir);
    let kv = KvBlockManager::new(256, gemma_proto::DEFAULT_BLOCK_SIZE);
    let alloc = kv.allocate(prompt.len() + max_tokens).expect("blocks");
    let mut sampler = Sampler::new(params, prompt);
    let (mut next, mut pos, mut out) = (prompt.to_vec(), 0, Vec::new());
    while out.len() < max_tokens {
        let batch = StepBatch {
            seqs: vec![SeqStep {
                seq_id: 0,
                tokens: next.clone(),
                start_pos: pos,
                block_table: alloc.block_table().to_vec(),
                top_candidates: 0,
                log_probs: false,
                sampling: None,
            }],
        };
        let mut logits = cluster
            .step(&batch)
            .expect("step")
            .to_vec2::<f32>()
            .expect("logits");
        pos += next.len();
        let t = sampler
            .sample(SeqLogits::Full(logits.remove(0)))
            .expect("sampled")
            .token;
        if tok.stop_ids().contains(&t) {
            break;
        }
        out.push(t);
        next = vec![t];
    }
    (tok.decode(&out).expect("decode"), out.len())
}

fn complete(addr: &str, prompt: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut body = json!({"prompt": prompt, "max_tokens": 12});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let r = post_json(addr, "/v1/completions", &body).expect("request");
    let v = r.json().expect("json");
    assert_eq!(r.status, 200, "{v}");
    v
}

#[test]
fn http_greedy_and_seeded_text_match_the_in_process_run() {
    let dir = &models().mha;
    let coord = CoordinatorProcess::start(&[
        "--model",
        &dir.display().to_string(),
        "--tp",
        "2",
        "--kv-budget-mib",
        "16",
    ])
    .expect("coordinator");
    let tok = tokenizer(dir);
    for prompt in [
        "<bos>The capital of France is",
        "Grüße, 世界! 🎉🚀",
        "Hello",
    ] {
        let ids = tok.encode_prompt(prompt).expect("encode");
        let greedy = SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        };
        let (want, n) = in_process_greedy_text(dir, PlanRequest::new(2, 1), &ids, 12, greedy);
        let v = complete(&coord.addr, prompt, json!({"temperature": 0}));
        assert_eq!(v["choices"][0]["text"], want, "greedy text for {prompt:?}");
        assert_eq!(v["usage"]["prompt_tokens"], ids.len());
        assert_eq!(v["usage"]["completion_tokens"], n);
        assert_eq!(v["object"], "text_completion");

        // Seeded sampling: the same text run after run, and the same as sampling the
        // single-process logits with the same seed (the cluster's shape does not matter).
        let seeded = json!({"temperature": 0.9, "top_k": 50, "top_p": 0.95, "seed": 1234});
        let a = complete(&coord.addr, prompt, seeded.clone());
        let b = complete(&coord.addr, prompt, seeded);
        assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
        let params = SamplingParams {
            temperature: 0.9,
            top_k: 50,
            top_p: 0.95,
            seed: 1234,
            ..SamplingParams::default()
        };
        let (want, _) = in_process_greedy_text(dir, PlanRequest::new(1, 1), &ids, 12, params);
        assert_eq!(a["choices"][0]["text"], want, "seeded text for {prompt:?}");
    }
    // Chat: the system message is folded into the first user turn.
    let r = post_json(
        &coord.addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0}),
    )
    .expect("chat");
    let v = r.json().expect("json");
    assert_eq!(r.status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let template = ChatTemplate::from_dir(dir).expect("t").expect("t");
    let rendered = template
        .render(&[ChatMessage {
            role: "user".into(),
            content: "Answer briefly.\n\nHi".into(),
        }])
        .expect("render");
    assert_eq!(
        v["usage"]["prompt_tokens"],
        tok.encode_prompt(&rendered).expect("encode").len()
    );
    // Bad input is refused with what is allowed.
    let r = post_json(
        &coord.addr,
        "/v1/completions",
        &json!({"prompt": "x", "top_p": 0}),
    )
    .expect("req");
    let v = r.json().expect("json");
    assert_eq!(r.status, 400);
    assert_eq!(v["error"]["param"], "top_p");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("greater than 0")),
        "{v}"
    );
}

/// Runs the coordinator expecting it to fail; returns its log.
fn failing_coordinator(args: &[&str]) -> (String, Vec<u32>) {
    failing_coordinator_with_env(args, &[])
}

fn failing_coordinator_with_env(args: &[&str], env: &[(&str, &str)]) -> (String, Vec<u32>) {
    let mut all = vec!["--listen".to_string(), "127.0.0.1:0".to_string()];
    all.extend(args.iter().map(|s| s.to_string()));
    let mut p = Spawned::start_with_env(&binary("gemma-coordinator"), &all, env).expect("start");
    let status = p
        .wait(Duration::from_secs(60))
        .expect("coordinator must exit");
    assert!(!status.success(), "the coordinator should have failed");
    let log = p.stderr_text();
    let pids = worker_pids(&log);
    (log, pids)
}

#[test]
fn coordinator_refuses_what_cannot_work_and_leaves_no_worker_behind() {
    let dir = models().mha.display().to_string();
    // A worker that cannot be reached.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let addr = format!("127.0.0.1:{port}");
    let (log, _) = failing_coordinator(&["--model", &dir, "--workers", &addr]);
    assert!(
        log.contains(&format!("cannot reach worker {addr}")),
        "{log}"
    );

    let (log, _) = failing_coordinator(&["--model", "/nonexistent/gemma-7b"]);
    assert!(
        log.contains("model /nonexistent/gemma-7b does not exist"),
        "{log}"
    );

    let (log, _) = failing_coordinator(&["--model", &dir, "--tp", "3"]);
    assert!(
        log.contains("tp=3 does not divide 4 attention heads; use 1, 2 or 4"),
        "{log}"
    );

    let (log, _) = failing_coordinator(&["--model", &dir, "--tp", "2", "--workers", "127.0.0.1:1"]);
    assert!(
        log.contains("1 workers given, but tp=2 x pp=1 needs 2"),
        "{log}"
    );

    // Workers start, then fail to load a truncated file: the coordinator reports the worker's
    // error and stops every worker it started.
    let broken = tempfile::tempdir().expect("tmp");
    TinyGemma::mqa_like_2b()
        .write(broken.path())
        .expect("write");
    add_tokenizer(broken.path()).expect("tokenizer");
    let weights = broken.path().join("model.safetensors");
    let len = std::fs::metadata(&weights).expect("meta").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .expect("open")
        .set_len(len / 2)
        .expect("truncate");
    let (log, pids) =
        failing_coordinator(&["--model", &broken.path().display().to_string(), "--tp", "2"]);
    assert!(
        log.contains("failed to load its shard") && log.contains("truncated"),
        "{log}"
    );
    assert_eq!(pids.len(), 2, "{log}");
    for pid in pids {
        // Bounded: a worker is gone within the coordinator's 3 s stop deadline, and one killed
        // by its parent-death signal is gone moments after the coordinator.
        assert!(
            wait_gone(pid, Duration::from_secs(10)),
            "worker {pid} outlived the coordinator"
        );
    }
}

#[test]
fn coordinator_refuses_a_misspelled_setting_before_starting_workers() {
    let dir = models().mha.display().to_string();
    let tmp = tempfile::tempdir().expect("tmp");
    let file = tmp.path().join("config.toml");
    std::fs::write(&file, "max_runing = 4\n").expect("write");
    let file = file.display().to_string();
    let (log, pids) = failing_coordinator(&["--model", &dir, "--config", &file]);
    assert!(
        log.contains(&format!(
            "unknown setting `max_runing` in {file}; did you mean `max_running`?"
        )),
        "{log}"
    );
    assert!(pids.is_empty(), "{log}");

    let (log, pids) =
        failing_coordinator_with_env(&["--model", &dir], &[("GEMMA_MAX_RUNING", "4")]);
    assert!(
        log.contains(
            "unknown setting `GEMMA_MAX_RUNING` in the environment; did you mean `GEMMA_MAX_RUNNING`?"
        ),
        "{log}"
    );
    assert!(pids.is_empty(), "{log}");
}

#[test]
fn stopping_the_coordinator_stops_its_workers() {
    let dir = models().mqa.display().to_string();
    let coord =
        CoordinatorProcess::start(&["--model", &dir, "--tp", "2", "--pp", "2"]).expect("start");
    let pids = coord.worker_pids();
    assert_eq!(pids.len(), 4);
    assert!(pids.iter().all(|&p| alive(p)));
    drop(coord); // SIGTERM, bounded wait
    for pid in pids {
        // Bounded: a worker is gone within the coordinator's 3 s stop deadline, and one killed
        // by its parent-death signal is gone moments after the coordinator.
        assert!(
            wait_gone(pid, Duration::from_secs(10)),
            "worker {pid} outlived the coordinator"
        );
    }
}

/// A tiny Gemma 3 as a GGUF file beside the real tokenizer, quantized as llama.cpp's Q4_K_M
/// quantizes gemma-3-270m where the shapes allow: Q8_0; Q5_0 (rewritten as Q8_0 at load); Q6_K
/// and Q4_K down projections, whose 512 input columns tp=2 splits on 256-value block
/// boundaries, so they stay quantized at tp=2. With the reference of the values the file holds.
struct GgufModel {
    _root: tempfile::TempDir,
    dir: std::path::PathBuf,
    reference: gemma_testkit::reference::NaiveGemma,
}

fn gguf_model() -> &'static GgufModel {
    static M: OnceLock<GgufModel> = OnceLock::new();
    M.get_or_init(|| {
        use candle_core::quantized::GgmlDType;
        let root = tempfile::tempdir_in(gemma_testkit::process_scratch()).expect("tmp");
        let dir = root.path().join("gemma3-q4-k-m");
        std::fs::create_dir(&dir).expect("dir");
        // Every sixth layer global: the pattern llama.cpp assumes for Gemma 3 (GGUF does not
        // store it).
        let model = TinyGemma {
            intermediate_size: 512,
            sliding_pattern: 6,
            ..TinyGemma::gemma3_like()
        };
        let held = model
            .write_gguf(&dir.join("tiny-gemma3.gguf"), |name| {
                if name == "model.layers.0.mlp.down_proj.weight" {
                    GgmlDType::Q6K
                } else if name.ends_with("down_proj.weight") {
                    GgmlDType::Q4K
                } else if name.ends_with("k_proj.weight") || name.ends_with("gate_proj.weight") {
                    GgmlDType::Q5_0
                } else {
                    GgmlDType::Q8_0
                }
            })
            .expect("write gguf");
        add_tokenizer(&dir).expect("tokenizer");
        let cfg =
            gemma_proto::ModelConfig::from_json(&model.config_json().to_string()).expect("config");
        GgufModel {
            _root: root,
            dir,
            reference: gemma_testkit::reference::NaiveGemma::new(cfg, held),
        }
    })
}

fn assert_same_bits(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: steps");
    for (step, (a, b)) in a.iter().zip(b).enumerate() {
        for (seq, (a, b)) in a.iter().zip(b).enumerate() {
            let same =
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{what}: step {step} seq {seq} differs");
        }
    }
}

/// The default deployment, GGUF weights kept quantized, across worker processes: bit-identical
/// to the in-process run of the same plan, and pipeline stages (even or uneven) change no bit.
/// Every step mixes a chat prompt, a raw one and unicode, prefilled together, then decoding.
#[test]
fn quantized_gguf_cluster_is_bit_identical_to_the_in_process_plan() {
    let dir = &gguf_model().dir;
    let prompts = prompts(dir);
    let tp2 = in_process(dir, PlanRequest::new(2, 1), &prompts);
    let mut uneven = PlanRequest::new(2, 3);
    uneven.layers_per_stage = Some(vec![1, 2, 3]);
    for req in [PlanRequest::new(2, 2), uneven] {
        let staged = in_process(dir, req.clone(), &prompts);
        assert_same_bits(&staged, &tp2, &format!("in-process {req:?} vs tp=2"));
    }
    // So the cluster's tp=2 x pp=2 has the in-process tp=2 x pp=2 plan's bits too.
    let remote = cluster_logits(dir, 2, 2, &prompts);
    assert_same_bits(&remote, &tp2, "cluster tp=2 x pp=2 vs in-process tp=2");
}

/// `--dequantize` through the cluster: the weights decoded at load are the file's values, so
/// the cluster serves the greedy text of the reference run on them.
#[test]
fn dequantized_gguf_cluster_serves_the_reference_text() {
    let m = gguf_model();
    let dir = m.dir.display().to_string();
    let coord = CoordinatorProcess::start(&[
        "--model",
        &dir,
        "--tp",
        "2",
        "--pp",
        "2",
        "--dequantize",
        "--kv-budget-mib",
        "16",
    ])
    .expect("coordinator");
    let tok = tokenizer(&m.dir);
    for prompt in ["The capital of France is", "Grüße, 世界! 🎉🚀"] {
        let ids = tok.encode_prompt(prompt).expect("encode");
        let want = m.reference.greedy(&ids, 8);
        assert!(
            want.min_margin > 1e-3,
            "{prompt:?}: a near-tie ({}) in the reference; pick another prompt",
            want.min_margin
        );
        let v = complete(
            &coord.addr,
            prompt,
            json!({"temperature": 0, "max_tokens": 8, "ignore_eos": true}),
        );
        assert_eq!(
            v["choices"][0]["text"],
            tok.decode(&want.tokens).expect("decode"),
            "{prompt:?}"
        );
    }
}
