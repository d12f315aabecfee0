//! The real gemma-3-270m (GGUF Q4_K_M, fetched by scripts/fetch-model.sh): decode and prefill
//! tokens/s in one process and in a tp=2 cluster, beside llama.cpp's own `llama-bench` on the
//! same file in the same run.
//!
//! The model is looked for in $GEMMA_REAL_MODEL, else in the fetch script's cache; llama.cpp's
//! programs where scripts/llama-cpp builds them (see `llama_cpp`). Either missing: its rows say
//! so and the rest still run.
//!
//! The same work on both sides: a prefill of 512 tokens from an empty cache, and 128 decode
//! steps after a 512-token context (llama-bench `-p 512 -n 0` and `-p 0 -n 128 -d 512`, the
//! mean of its 3 repetitions after its warm-up; here a warm-up run, then the median of
//! `REPEATS` runs); both sides get the same compute threads on the same cores.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
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
        Ok((d, p)) => (*d, *p, "llama.cpp llama-bench".to_string()),
        Err(why) => {
            eprintln!("llama.cpp reference skipped: {why}");
            (f64::NAN, f64::NAN, "llama.cpp: skipped".to_string())
        }
    };
    let single = single_process(&model)?;
    let batched = batched_decode(&model)?;
    let tp2 = cluster(&model, 2)?;
    let row = |figure: &str, value: f64, reference: f64, world: usize| Row {
        figure: figure.to_string(),
        value,
        unit: "tok/s",
        reference: ref_name.clone(),
        ref_value: reference,
        threads: format!("{} | {threads}", super::split(threads, world)),
    };
    let mut rows = vec![
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
    ];
    for (seqs, speed) in batched {
        rows.push(Row {
            figure: format!("gemma-3-270m decode, {seqs} seqs per step, 1 process"),
            value: speed,
            unit: "tok/s",
            reference: "1 seq per step (same run)".into(),
            ref_value: single.decode,
            threads: format!("{t} | {t}", t = super::split(threads, 1)),
        });
    }
    Ok(rows)
}

/// Decode tokens/s of steps of 16 and 64 sequences (each after its own 128-token prompt) in one
/// process: what continuous batching gets from one step, without a server around it.
fn batched_decode(model: &Path) -> Result<Vec<(usize, f64)>> {
    const CONTEXT: usize = 128;
    const STEPS: usize = 16;
    let folder = ModelFolder::open(model)?;
    let opts = ShardOptions {
        kv_blocks: 64 * (CONTEXT + STEPS + 16) / 16,
        ..ShardOptions::default()
    };
    let cluster = LocalCluster::load(&folder, &PlanRequest::new(1, 1), &opts)?;
    let kv = KvBlockManager::new(opts.kv_blocks, 16);
    let mut out = Vec::new();
    for seqs in [16usize, 64] {
        let allocs = (0..seqs)
            .map(|_| kv.allocate(CONTEXT + STEPS + 1))
            .collect::<Result<Vec<_>, _>>()?;
        let batch = |tokens: &dyn Fn(usize) -> Vec<u32>, start: usize| StepBatch {
            seqs: allocs
                .iter()
                .enumerate()
                .map(|(i, a)| SeqStep {
                    seq_id: i as u64,
                    tokens: tokens(i),
                    start_pos: start,
                    block_table: a.block_table().to_vec(),
                    top_candidates: 1,
                    log_probs: false,
                    sampling: None,
                })
                .collect(),
        };
        let prompt = prompt(CONTEXT);
        cluster.step(&batch(
            &|i| prompt.iter().map(|&t| t + i as u32).collect(),
            0,
        ))?;
        let t = Instant::now();
        for step in 0..STEPS {
            cluster.step(&batch(&|i| vec![1000 + i as u32], CONTEXT + step))?;
        }
        out.push((seqs, (seqs * STEPS) as f64 / t.elapsed().as_secs_f64()));
    }
    Ok(out)
}

pub(super) fn model_path() -> Option<PathBuf> {
    let path = gemma_testkit::real_model_path();
    path.exists().then_some(path)
}

/// Decode (after 512 tokens) and prefill (512 tokens) tokens/s of llama-bench on `model`.
fn llama_cpp(model: &Path, threads: usize) -> Result<(f64, f64)> {
    let llama = super::llama_cpp::LlamaCpp::find()?;
    let gguf = gemma_proto::ModelFiles::locate(model)?.weights;
    let depth = PREFILL_TOKENS.to_string();
    let decode = llama.bench(
        &gguf,
        threads,
        &["-p", "0", "-n", &DECODE_TOKENS.to_string(), "-d", &depth],
    )?;
    let prefill = llama.bench(&gguf, threads, &["-p", &depth, "-n", "0"])?;
    match (decode.as_slice(), prefill.as_slice()) {
        ([d], [p]) => Ok((*d, *p)),
        _ => bail!(
            "llama-bench ran {} and {} tests, one each expected",
            decode.len(),
            prefill.len()
        ),
    }
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

/// A warm-up run (prefill, 8 decode steps), then
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
