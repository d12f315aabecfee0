//! The real gemma-3-270m (GGUF Q4_K_M, fetched by scripts/fetch-model.sh): decode and prefill
//! tokens/s in one process and in a tp=2 cluster, beside llama.cpp (llama-cpp-python) on the
//! same file in the same run.
//!
//! The model is looked for in $GEMMA_REAL_MODEL, else in the fetch script's cache; llama.cpp is
//! run by scripts/llama_cpp_bench.py with $BENCH_PYTHON, else the bench venv the README names,
//! else python3. Either missing: its rows say so and the rest still run.
//!
//! Both sides are timed the same way: a warm-up run, then `REPEATS` runs of (prefill the
//! 512-token prompt from an empty cache, then 128 greedy decode steps from position 512), each
//! figure the median of the runs; both sides get the same compute threads on the same cores.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use gemma_proto::{KvBlockManager, PlanRequest, SeqLogits, SeqStep, StepBatch};
use gemma_testkit::LocalCluster;
use gemma_worker::{ModelFolder, ShardOptions};

use super::Row;

const PREFILL_TOKENS: usize = 512;
const DECODE_TOKENS: usize = 128;
const REPEATS: usize = 3;

pub fn rows(threads: usize) -> Result<Vec<Row>> {
    let Some(model) = model_path() else {
        eprintln!(
            "real model rows skipped: no gemma-3-270m found (run scripts/fetch-model.sh or set \
             GEMMA_REAL_MODEL)"
        );
        return Ok(Vec::new());
    };
    let llama = llama_cpp(&model, threads);
    let (ref_decode, ref_prefill, ref_name) = match &llama {
        Ok((d, p)) => (*d, *p, "llama.cpp (llama-cpp-python)".to_string()),
        Err(why) => {
            eprintln!("llama.cpp reference skipped: {why}");
            (f64::NAN, f64::NAN, "llama.cpp: skipped".to_string())
        }
    };
    let single = single_process(&model)?;
    let tp2 = cluster(&model, 2)?;
    let row = |figure: &str, value: f64, reference: f64, world: usize| Row {
        figure: figure.to_string(),
        value,
        unit: "tok/s",
        reference: ref_name.clone(),
        ref_value: reference,
        threads: format!("{} | {threads}", super::split(threads, world)),
    };
    Ok(vec![
        row(
            "gemma-3-270m decode, 1 process",
            single.decode,
            ref_decode,
            1,
        ),
        row(
            "gemma-3-270m prefill 512, 1 process",
            single.prefill,
            ref_prefill,
            1,
        ),
        row(
            "gemma-3-270m decode, tp=2 cluster",
            tp2.decode,
            ref_decode,
            2,
        ),
        row(
            "gemma-3-270m prefill 512, tp=2 cluster",
            tp2.prefill,
            ref_prefill,
            2,
        ),
    ])
}

pub(super) fn model_path() -> Option<PathBuf> {
    let path = gemma_testkit::real_model_path();
    path.exists().then_some(path)
}

/// Decode and prefill tokens/s of llama.cpp on `model`.
fn llama_cpp(model: &Path, threads: usize) -> Result<(f64, f64)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/llama_cpp_bench.py");
    let venv = PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
        .join(".cache/gemma-cluster/bench-venv/bin/python");
    let python = std::env::var_os("BENCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            if venv.is_file() {
                venv
            } else {
                PathBuf::from("python3")
            }
        });
    let gguf = gemma_proto::ModelFiles::locate(model)?.weights;
    let out = Command::new(&python)
        .arg(&script)
        .args(["--model", &gguf.display().to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--prompt-tokens", &PREFILL_TOKENS.to_string()])
        .args(["--decode-tokens", &DECODE_TOKENS.to_string()])
        .args(["--repeats", &REPEATS.to_string()])
        .output()
        .with_context(|| format!("running {} {}", python.display(), script.display()))?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr));
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    if let Some(why) = json.get("skipped") {
        bail!("{why}");
    }
    let num = |k: &str| json.get(k).and_then(|v| v.as_f64()).context(k.to_string());
    Ok((num("decode_tok_s")?, num("prefill_tok_s")?))
}

struct Speeds {
    decode: f64,
    prefill: f64,
}

/// A deterministic prompt of `n` ids (no tokenizer involved), as the llama.cpp script builds it.
fn prompt(n: usize) -> Vec<u32> {
    std::iter::once(2)
        .chain((1..n).map(|i| ((i * 7919) % 200_000 + 1000) as u32))
        .collect()
}

fn one_seq(tokens: Vec<u32>, start_pos: usize, blocks: &[u32]) -> StepBatch {
    StepBatch {
        seqs: vec![SeqStep {
            seq_id: 0,
            tokens,
            start_pos,
            block_table: blocks.to_vec(),
            top_candidates: 1,
            log_probs: false,
            sampling: None,
        }],
    }
}

/// As scripts/llama_cpp_bench.py measures: a warm-up run (prefill, 8 decode steps), then
/// `REPEATS` runs of one prefill of `PREFILL_TOKENS` in one step followed by `DECODE_TOKENS`
/// greedy steps (positions 512..640); each figure is the median over the runs. `step` returns
/// the greedy next token.
fn measure(kv: &KvBlockManager, mut step: impl FnMut(StepBatch) -> Result<u32>) -> Result<Speeds> {
    let alloc = kv.allocate(PREFILL_TOKENS + DECODE_TOKENS + 8)?;
    let blocks = alloc.block_table().to_vec();
    let long = prompt(PREFILL_TOKENS);
    let mut run = |decode_tokens: usize| -> Result<(f64, f64)> {
        let t = Instant::now();
        let mut next = step(one_seq(long.clone(), 0, &blocks))?;
        let prefill = PREFILL_TOKENS as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        for pos in long.len()..long.len() + decode_tokens {
            next = step(one_seq(vec![next], pos, &blocks))?;
        }
        let decode = decode_tokens as f64 / t.elapsed().as_secs_f64();
        Ok((prefill, decode))
    };
    run(8)?; // warm-up
    let (mut prefills, mut decodes) = (Vec::new(), Vec::new());
    for _ in 0..REPEATS {
        let (p, d) = run(DECODE_TOKENS)?;
        prefills.push(p);
        decodes.push(d);
    }
    Ok(Speeds {
        decode: super::median(&mut decodes),
        prefill: super::median(&mut prefills),
    })
}

fn single_process(model: &Path) -> Result<Speeds> {
    let folder = ModelFolder::open(model)?;
    let cluster = LocalCluster::load(&folder, &PlanRequest::new(1, 1), &ShardOptions::default())?;
    let kv = KvBlockManager::new(64, 16);
    measure(&kv, |b| {
        let logits = cluster.step(&b)?.to_vec2::<f32>()?;
        Ok(gemma_proto::candidates::argmax(&logits[0]))
    })
}

fn cluster(model: &Path, tp: usize) -> Result<Speeds> {
    let (rt, mut cluster) = super::start_cluster(model, tp)?;
    let kv = KvBlockManager::new(cluster.kv_blocks.min(64), 16);
    measure(&kv, |b| {
        let out = rt.block_on(cluster.step(&b))?;
        match out.logits.into_iter().next() {
            Some(SeqLogits::Top { candidates, .. }) if !candidates.is_empty() => {
                Ok(candidates[0].1)
            }
            Some(SeqLogits::Full(row)) => Ok(gemma_proto::candidates::argmax(&row)),
            _ => bail!("the cluster returned no candidates"),
        }
    })
}
