//! Quantized numerics: how far the quantized gemma-3-270m's next-token distributions are from
//! the same weights dequantized to f32, teacher-forced over real text, for this cluster at tp=1
//! and tp=2 and for llama.cpp on the same GGUF (its perplexity tool's KL mode against an F32
//! GGUF of the same weights).
//!
//! Both sides measure the same way, llama-perplexity's, on the same tokens (read back from its
//! logits file): the text (README.md and docs/ARCHITECTURE.md) is tokenized once with <bos> in
//! front, cut into `CHUNKS` windows of `CONTEXT` tokens, each window's first token replaced by
//! <bos>; the logits at positions
//! CONTEXT/2 .. CONTEXT-1 of every window are scored: KL(dequantized || quantized) and whether
//! both put the same token first. Here the first half and one token are one prefill step, the
//! rest single-token decode steps fed the text's own next token (the path generation takes);
//! every chunk is a sequence of the same batch. tp=2 is `LocalCluster`, which the process
//! cluster reproduces bit for bit.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use gemma_coordinator::tokenizer::TextTokenizer;
use gemma_proto::candidates::argmax;
use gemma_proto::{KvAllocation, KvBlockManager, PlanRequest, SeqStep, StepBatch};
use gemma_testkit::LocalCluster;
use gemma_worker::weights::QuantizedWeights;
use gemma_worker::{ModelFolder, ShardOptions};

use super::llama_cpp::LlamaCpp;
use super::Row;

const CONTEXT: usize = 512;
const CHUNKS: usize = 12;
const BLOCK: usize = 16;

pub fn rows(threads: usize) -> Result<Vec<Row>> {
    let Some(model) = super::real_model::model_path() else {
        eprintln!("numerics rows skipped: no gemma-3-270m (scripts/fetch-model.sh)");
        return Ok(Vec::new());
    };
    let text = corpus()?;
    let reference = match llama_cpp_numerics(&model, &text, threads) {
        Ok(s) => Some(s),
        Err(why) => {
            eprintln!("llama.cpp numerics skipped: {why:#}");
            None
        }
    };
    // The very tokens llama.cpp scored, where it ran; else this tokenizer's.
    let tokens = match &reference {
        Some(r) => r.tokens.clone(),
        None => {
            let tokenizer = TextTokenizer::from_dir(&model, 2, 1)?;
            let mut ids = vec![tokenizer.bos()];
            ids.extend(tokenizer.encode_text(&text.text)?);
            ids
        }
    };
    let ours = cluster_numerics(&model, &windows(&tokens)?)?;
    let (ref_top, ref_kl) = reference
        .as_ref()
        .map_or((f64::NAN, f64::NAN), |s| (s.same_top, s.mean_kl));
    let llama = "llama.cpp Q4_K_M vs its F32";
    let mut rows = Vec::new();
    for (tp, stats) in [(1, &ours.tp1), (2, &ours.tp2)] {
        for (what, value, unit, reference) in [
            ("same top-1 as", stats.same_top, "%", ref_top),
            (
                "mean KL from",
                stats.mean_kl * 1000.0,
                "mnat",
                ref_kl * 1000.0,
            ),
        ] {
            rows.push(Row {
                figure: format!("numerics tp={tp}: {what} --dequantize"),
                value,
                unit,
                reference: llama.into(),
                ref_value: reference,
                threads: format!("{} | {threads}", super::split(threads, 1)),
            });
        }
    }
    rows.push(Row {
        figure: "numerics tp=2: mean KL from --dequantize".into(),
        value: ours.tp2.mean_kl * 1000.0,
        unit: "mnat",
        reference: "tp=1 (same run)".into(),
        ref_value: ours.tp1.mean_kl * 1000.0,
        threads: "-".into(),
    });
    rows.push(Row {
        figure: "numerics: mean KL tp=1 -> tp=2 (sum order)".into(),
        value: ours.between.mean_kl * 1000.0,
        unit: "mnat",
        reference: "tp=1 from --dequantize".into(),
        ref_value: ours.tp1.mean_kl * 1000.0,
        threads: "-".into(),
    });
    Ok(rows)
}

/// The text both sides read, written to a file for llama-perplexity.
struct Corpus {
    text: String,
    file: tempfile::NamedTempFile,
}

fn corpus() -> Result<Corpus> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut text = String::new();
    for doc in ["README.md", "docs/ARCHITECTURE.md"] {
        let path = root.join(doc);
        text.push_str(
            &std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?,
        );
    }
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), &text)?;
    Ok(Corpus { text, file })
}

#[derive(Default)]
struct Agreement {
    positions: usize,
    same_top_count: usize,
    kl_sum: f64,
    same_top: f64,
    mean_kl: f64,
}

impl Agreement {
    fn add(&mut self, reference: &[f32], model: &[f32]) {
        self.positions += 1;
        self.same_top_count += usize::from(argmax(reference) == argmax(model));
        self.kl_sum += kl_divergence(reference, model);
    }

    fn finish(&mut self) {
        self.same_top = 100.0 * self.same_top_count as f64 / self.positions.max(1) as f64;
        self.mean_kl = self.kl_sum / self.positions.max(1) as f64;
    }
}

/// KL(softmax(p) || softmax(q)) in nats, in f64.
fn kl_divergence(p: &[f32], q: &[f32]) -> f64 {
    let log_softmax = |x: &[f32]| -> Vec<f64> {
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
        x.iter().map(|&v| v as f64 - lse).collect()
    };
    let (lp, lq) = (log_softmax(p), log_softmax(q));
    lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum()
}

struct ClusterNumerics {
    tp1: Agreement,
    tp2: Agreement,
    /// tp=1 against tp=2: what the order of the sums alone changes.
    between: Agreement,
}

/// The windows llama-perplexity scores: the first `CHUNKS` x `CONTEXT` tokens of <bos> + the
/// text, each window's first token replaced by <bos>.
fn windows(tokens: &[u32]) -> Result<Vec<Vec<u32>>> {
    const BOS: u32 = 2;
    anyhow::ensure!(
        tokens.len() >= CHUNKS * CONTEXT,
        "the corpus has {} tokens; {CHUNKS} windows of {CONTEXT} need more",
        tokens.len()
    );
    Ok(tokens
        .chunks_exact(CONTEXT)
        .take(CHUNKS)
        .map(|w| {
            let mut w = w.to_vec();
            w[0] = BOS;
            w
        })
        .collect())
}

fn cluster_numerics(model: &Path, windows: &[Vec<u32>]) -> Result<ClusterNumerics> {
    let folder = ModelFolder::open(model)?;
    let opts = |quantized| ShardOptions {
        kv_blocks: CHUNKS * CONTEXT / BLOCK,
        block_size: BLOCK,
        quantized,
        ..ShardOptions::default()
    };
    let load =
        |tp, quantized| LocalCluster::load(&folder, &PlanRequest::new(tp, 1), &opts(quantized));
    let reference = load(1, QuantizedWeights::Dequantize)?;
    let tp1 = load(1, QuantizedWeights::Keep)?;
    let tp2 = load(2, QuantizedWeights::Keep)?;
    let kv = KvBlockManager::new(CHUNKS * CONTEXT / BLOCK, BLOCK);
    let allocations: Vec<KvAllocation> = windows
        .iter()
        .map(|_| kv.allocate(CONTEXT))
        .collect::<Result<_, _>>()?;
    let (mut a1, mut a2) = (Agreement::default(), Agreement::default());
    let mut between = Agreement::default();
    // Positions 0..=CONTEXT/2 in one prefill step, then one token per step up to CONTEXT-2:
    // the logits at positions CONTEXT/2 ..= CONTEXT-2 are scored, as llama-perplexity scores.
    let first = CONTEXT / 2;
    let mut span = (0, first + 1);
    while span.1 < CONTEXT {
        let batch = StepBatch {
            seqs: windows
                .iter()
                .zip(&allocations)
                .enumerate()
                .map(|(i, (w, a))| SeqStep {
                    seq_id: i as u64,
                    tokens: w[span.0..span.1].to_vec(),
                    start_pos: span.0,
                    block_table: a.block_table().to_vec(),
                    top_candidates: 0,
                    log_probs: false,
                    sampling: None,
                })
                .collect(),
        };
        let r = reference.step(&batch)?.to_vec2::<f32>()?;
        let q1 = tp1.step(&batch)?.to_vec2::<f32>()?;
        let q2 = tp2.step(&batch)?.to_vec2::<f32>()?;
        for s in 0..windows.len() {
            a1.add(&r[s], &q1[s]);
            a2.add(&r[s], &q2[s]);
            between.add(&q1[s], &q2[s]);
        }
        span = (span.1, span.1 + 1);
    }
    a1.finish();
    a2.finish();
    between.finish();
    eprintln!(
        "numerics: {} positions; tp=1 {:.2} % same top-1, KL {:.5}; tp=2 {:.2} %, KL {:.5}",
        a1.positions, a1.same_top, a1.mean_kl, a2.same_top, a2.mean_kl
    );
    Ok(ClusterNumerics {
        tp1: a1,
        tp2: a2,
        between,
    })
}

fn llama_cpp_numerics(
    model: &Path,
    corpus: &Corpus,
    threads: usize,
) -> Result<super::llama_cpp::KlStats> {
    let llama = LlamaCpp::find()?;
    let gguf: PathBuf = gemma_proto::ModelFiles::locate(model)?.weights;
    let dir = tempfile::tempdir()?;
    let f32_model = dir.path().join("f32.gguf");
    llama.dequantize(&gguf, &f32_model, threads)?;
    let stats = llama.kl_divergence(
        &f32_model,
        &gguf,
        corpus.file.path(),
        CONTEXT,
        CHUNKS,
        threads,
    )?;
    eprintln!(
        "numerics: llama.cpp {:.2} % same top-1, KL {:.5}",
        stats.same_top, stats.mean_kl
    );
    Ok(stats)
}
