//! Pipeline overlap's rows: pp=2 throughput at 16 and 64 concurrent streams with
//! `pipeline_overlap` on (one step in flight per stage) against off (one step at a time), two
//! coordinators on the same model and cores, up at once and measured in turns, median of 3.
//!
//! Two models. The serving rows' model split evenly (2 + 2 layers of 512): its last stage also
//! holds the 256k-row lm_head, about 16x the first stage's work, so overlap can win at most
//! 1/16 and pays for it with micro-batches half the size (each reads the weights once). And a
//! model whose stages can be balanced (24 narrow layers, `--layers-per-stage 22,2`: both stages
//! about 36M parameters), which shows what overlap does when both stages have work to overlap.
//!
//! Each of the two workers gets half the cores (one compute thread each on a 2-core machine)
//! and the coordinator shares them: without overlap one worker computes while the other waits
//! for it, so at most half the cores work; with it both stages compute at once.

use std::path::Path;

use anyhow::Result;
use gemma_testkit::TinyGemma;

use super::{load_level, serving_model, split, start_coordinator, Row};

const RUNS: usize = 3;

pub fn rows(threads: usize) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let balanced = tempfile::tempdir()?;
    balanced_model(balanced.path())?;
    rows.extend(overlap_rows(
        balanced.path(),
        "layers 22,2 (balanced)",
        &["--layers-per-stage", "22,2"],
        threads,
    )?);
    let uneven = tempfile::tempdir()?;
    serving_model(uneven.path())?;
    rows.extend(overlap_rows(
        uneven.path(),
        "layers 2,2 (uneven work)",
        &[],
        threads,
    )?);
    Ok(rows)
}

/// 24 narrow layers (hidden 128, MLP 4096: 1.6M parameters each) and the tokenizer's 256k
/// vocabulary (a 33M-parameter lm_head): 22 layers on stage 0 weigh as much as 2 layers and
/// the lm_head on stage 1.
fn balanced_model(dir: &Path) -> Result<()> {
    let model = TinyGemma {
        vocab_size: 256_000,
        hidden_size: 128,
        intermediate_size: 4096,
        num_hidden_layers: 24,
        num_attention_heads: 8,
        num_key_value_heads: 8,
        head_dim: 16,
        query_pre_attn_scalar: 16.0,
        ..TinyGemma::mha_like_7b()
    };
    model.write(dir)?;
    gemma_testkit::add_tokenizer(dir)?;
    Ok(())
}

fn overlap_rows(model: &Path, what: &str, plan: &[&str], threads: usize) -> Result<Vec<Row>> {
    let args = |overlap: &'static str| {
        let mut a = vec!["--pp", "2", overlap];
        a.extend_from_slice(plan);
        a
    };
    let (_on, on) = start_coordinator(model, &args("--pipeline-overlap=true"))?;
    let (_off, off) = start_coordinator(model, &args("--pipeline-overlap=false"))?;
    let mut rows = Vec::new();
    for streams in [16usize, 64] {
        let (mut with, mut without) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            without.push(load_level(&off, streams)?.tokens_per_s);
            with.push(load_level(&on, streams)?.tokens_per_s);
        }
        let (with, without) = (super::median(&mut with), super::median(&mut without));
        eprintln!(
            "pp=2 ({what}), {streams} streams: overlap {with:.1} tok/s, without {without:.1}"
        );
        rows.push(Row {
            figure: format!("pp=2 {what}, {streams} streams: overlap"),
            value: with,
            unit: "tok/s",
            reference: "same, no overlap".into(),
            ref_value: without,
            threads: format!("{} | {}", split(threads, 2), split(threads, 2)),
        });
    }
    Ok(rows)
}
