//! Property test of the worker's parsing of `StepRequest`s: any request (random sequence
//! counts, token ids in and out of the vocabulary, positions up to u64::MAX, block tables of any
//! length and content, any candidate counts) goes through `StepBatch::from_wire` and
//! `Shard::validate` on a tiny loaded shard; a batch accepted there runs through `Shard::step`
//! and the last stage's answer (`last_stage_output`: logit bias, penalties, bans, candidates,
//! Gumbel races). Each ends in a result or a typed error, never a panic; an accepted batch asks
//! for nothing unbounded (positions within the model's, candidates within the vocabulary, bias
//! and penalty ids inside it, biases finite within [-100, 100]), so what the worker allocates
//! for it is bounded by the model and the message's own size.
//! Deterministic: a fixed seed and no persistence files.

use std::cell::Cell;

use candle_core::Device;
use gemma_proto::{pb, PlanRequest, ShardPlan, StepBatch};
use gemma_testkit::TinyGemma;
use gemma_worker::server::last_stage_output;
use gemma_worker::{ModelFolder, Shard, ShardOptions, SoloCollective, StageOutput, StepError};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};

const VOCAB: usize = 512;
const KV_BLOCKS: u32 = 16;
const BLOCK_SIZE: usize = 4;

/// A tiny Gemma 3 (sliding and global layers) with a small vocabulary, loaded as the whole model
/// on one shard.
fn tiny_shard(dir: &std::path::Path) -> (Shard, usize) {
    let model = TinyGemma {
        vocab_size: VOCAB,
        ..TinyGemma::gemma3_like()
    };
    model.write(dir).expect("tiny model");
    let folder = ModelFolder::open(dir).expect("model folder");
    let plan = ShardPlan::new(&folder.config, &PlanRequest::new(1, 1)).expect("plan");
    let opts = ShardOptions {
        kv_blocks: KV_BLOCKS as usize,
        block_size: BLOCK_SIZE,
        device: Device::Cpu,
        ..ShardOptions::default()
    };
    let shard = Shard::load(
        &folder.weights,
        &folder.config,
        &plan.shards[0],
        &opts,
        Box::new(SoloCollective),
    )
    .expect("shard");
    (shard, folder.config.max_position_embeddings)
}

/// A sequence as a stranger could send it: anything in each field.
fn any_seq() -> impl Strategy<Value = pb::SeqStep> {
    (
        any::<u64>(),
        vec(prop_oneof![4 => 0..VOCAB as u32, 1 => any::<u32>()], 0..12),
        prop_oneof![4 => 0u64..40, 1 => 0u64..40_000, 1 => any::<u64>()],
        vec(prop_oneof![4 => 0..KV_BLOCKS + 2, 1 => any::<u32>()], 0..16),
        prop_oneof![3 => 0u32..4, 1 => 0u32..2000, 1 => any::<u32>()],
        any::<bool>(),
        proptest::option::of(sample_spec()),
    )
        .prop_map(
            |(seq_id, tokens, start_pos, block_table, top_candidates, log_probs, sampling)| {
                pb::SeqStep {
                    seq_id,
                    tokens,
                    start_pos,
                    block_table,
                    top_candidates,
                    log_probs,
                    sampling,
                }
            },
        )
}

/// Sampling requests, sensible or not: any temperature, penalties with any ids and counts,
/// logit biases with any ids (ascending or not, inside the vocabulary or not) and any values.
fn sample_spec() -> impl Strategy<Value = pb::SampleSpec> {
    let float = prop_oneof![3 => -2.0f32..4.0, 1 => any::<f32>()];
    let id = || prop_oneof![4 => 0..VOCAB as u32, 1 => any::<u32>()];
    let bias = prop_oneof![
        4 => -100.0f32..=100.0,
        1 => Just(-100.0f32),
        1 => Just(100.0f32),
        1 => any::<f32>(),
    ];
    let sorted = |mut ids: Vec<u32>| {
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    let bias_ids = prop_oneof![
        3 => vec(0..VOCAB as u32, 0..6).prop_map(sorted),
        1 => vec(id(), 0..6),
    ];
    // Grammar masks as a coordinator cuts them, or anything: spans past the vocabulary, runs
    // past the span, bitmaps short or long, no bits at all.
    let bits = prop_oneof![
        3 => vec(prop_oneof![3 => 0u32..64, 1 => any::<u32>()], 0..12)
            .prop_map(|lengths| Some(pb::token_mask::Bits::Runs(pb::RunLengths { lengths }))),
        2 => vec(any::<u8>(), 0..80).prop_map(|b| Some(pb::token_mask::Bits::Bitmap(b))),
        1 => Just(None),
    ];
    let mask = proptest::option::of(
        (
            id(),
            prop_oneof![3 => 0..VOCAB as u32, 1 => any::<u32>()],
            bits,
        )
            .prop_map(|(first, len, bits)| pb::TokenMask { first, len, bits }),
    );
    let penalties = (
        (float.clone(), float.clone(), float.clone()),
        vec(id(), 0..6),
        vec(0u32..5, 0..6),
        vec(id(), 0..3),
        bias_ids,
        vec(bias, 0..6),
        mask,
    )
        .prop_map(
            |(
                (repetition, frequency, presence),
                ids,
                output_counts,
                banned,
                bias_ids,
                bias,
                allowed,
            )| {
                // Mostly one bias per id, as a coordinator sends them.
                let bias = match bias.len() % 3 {
                    0 => bias,
                    _ => bias.into_iter().cycle().take(bias_ids.len()).collect(),
                };
                pb::Penalties {
                    repetition,
                    frequency,
                    presence,
                    ids,
                    output_counts,
                    banned,
                    bias_ids,
                    bias,
                    allowed,
                }
            },
        );
    (
        float,
        any::<u64>(),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![3 => 0u32..4, 1 => any::<u32>()],
        proptest::option::of(penalties),
    )
        .prop_map(
            |(temperature, seed, gumbel, scaled_log_sum_exp, top_logprobs, penalties)| {
                pb::SampleSpec {
                    temperature,
                    seed,
                    gumbel,
                    scaled_log_sum_exp,
                    top_logprobs,
                    penalties,
                }
            },
        )
}

/// Sequences as a coordinator sends them: disjoint block tables that cover every position; now
/// and then a sampling request of any kind, so that accepted ones reach the last stage's answer.
fn well_formed_seqs() -> impl Strategy<Value = Vec<pb::SeqStep>> {
    let seq = (
        1usize..8,
        0u64..20,
        0u32..3,
        any::<bool>(),
        proptest::option::weighted(0.3, sample_spec()),
    );
    (
        vec(seq, 1..4),
        Just((0..KV_BLOCKS).collect::<Vec<u32>>()).prop_shuffle(),
        vec(0..VOCAB as u32, 8),
    )
        .prop_map(|(seqs, blocks, token_pool)| {
            let mut free = blocks.into_iter();
            seqs.into_iter()
                .enumerate()
                .map(|(i, (len, start, top, log_probs, sampling))| {
                    let needed = (start as usize + len).div_ceil(BLOCK_SIZE);
                    pb::SeqStep {
                        seq_id: i as u64,
                        tokens: token_pool[..len].to_vec(),
                        start_pos: start,
                        block_table: free.by_ref().take(needed).collect(),
                        top_candidates: top,
                        log_probs,
                        sampling,
                    }
                })
                .collect()
        })
}

fn step_request() -> impl Strategy<Value = pb::StepRequest> {
    let seqs = prop_oneof![vec(any_seq(), 0..5), well_formed_seqs()];
    (any::<u64>(), seqs).prop_map(|(step_id, seqs)| pb::StepRequest {
        step_id,
        seqs,
        session: None,
    })
}

#[test]
fn any_step_request_is_refused_with_a_reason_or_runs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (shard, max_positions) = tiny_shard(tmp.path());
    let config = Config {
        cases: 1500,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x57E9_0001),
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    // The runner takes an `Fn`: the tallies are cells.
    let (refused, ran) = (Cell::new(0usize), Cell::new(0usize));
    runner
        .run(&step_request(), |req| {
            let batch = StepBatch::from_wire(req);
            let valid = match shard.validate(&batch) {
                Ok(valid) => valid,
                Err(e @ (StepError::Invalid(_) | StepError::Sampling(_))) => {
                    prop_assert!(!e.to_string().is_empty());
                    refused.set(refused.get() + 1);
                    return Ok(());
                }
                Err(e) => return Err(TestCaseError::fail(format!("not a refusal: {e}"))),
            };
            for seq in &batch.seqs {
                prop_assert!(seq.tokens.iter().all(|&t| (t as usize) < VOCAB));
                prop_assert!(seq.end_pos() <= max_positions);
                prop_assert!(seq.top_candidates as usize <= VOCAB);
                if let Some(p) = seq.sampling.as_ref().and_then(|s| s.penalties.as_ref()) {
                    let ids = p.ids.iter().chain(&p.bias_ids).chain(&p.banned);
                    prop_assert!(ids.into_iter().all(|&id| (id as usize) < VOCAB));
                    prop_assert!(p.bias.iter().all(|b| b.abs() <= 100.0));
                    prop_assert_eq!(p.bias.len(), p.bias_ids.len());
                }
            }
            match shard.step(&valid, None) {
                Ok(StageOutput::Logits(logits)) => {
                    prop_assert_eq!(logits.dims(), &[VOCAB, batch.seqs.len()]);
                    let answer = last_stage_output(&batch, &logits, 0)
                        .map_err(|e| TestCaseError::fail(format!("no answer: {e}")))?;
                    prop_assert_eq!(answer.seqs.len(), batch.seqs.len());
                    ran.set(ran.get() + 1);
                }
                Ok(StageOutput::Hidden(_)) => {
                    return Err(TestCaseError::fail("the only stage returned hidden states"))
                }
                Err(StepError::Invalid(reason)) => {
                    prop_assert!(!reason.is_empty());
                    refused.set(refused.get() + 1);
                }
                Err(e) => return Err(TestCaseError::fail(format!("not a refusal: {e}"))),
            }
            Ok(())
        })
        .expect("every request refused with a reason or run");
    // Both outcomes were reached often enough for the property to mean something.
    let (ran, refused) = (ran.get(), refused.get());
    assert!(ran >= 200 && refused >= 200, "{ran} ran, {refused} refused");
}
