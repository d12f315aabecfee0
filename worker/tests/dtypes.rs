//! bf16 and f16 checkpoints load exactly (the same logits as the reference reading the same file
//! in f32), and bf16 compute agrees with f32 within bf16's precision.

mod common;

use candle_core::DType;
use common::*;
use gemma_proto::PlanRequest;
use gemma_worker::ShardOptions;

#[test]
fn bf16_storage_decodes_exactly() {
    let out = run_plan(Model::MhaBf16, PlanRequest::new(2, 2), small_blocks());
    assert_matches_reference(&out, reference(Model::MhaBf16), F32_TOLERANCE);
}

#[test]
fn f16_storage_decodes_exactly() {
    let out = run_plan(Model::MhaF16, PlanRequest::new(4, 1), small_blocks());
    assert_matches_reference(&out, reference(Model::MhaF16), F32_TOLERANCE);
}

/// bf16 keeps 8 bits of mantissa: activations carry ~0.4% relative error per rounding, and a few
/// layers of it stay within a few percent of the logits' range.
const BF16_RELATIVE_TOLERANCE: f32 = 0.03;

#[test]
fn bf16_storage_agrees_with_f32_weights_within_bf16_tolerance() {
    let out = run_plan(Model::MhaBf16, PlanRequest::new(2, 1), small_blocks());
    check_close(&out.prefill_logits, &reference(Model::Mha).prefill_logits);
}

#[test]
fn bf16_compute_agrees_within_bf16_tolerance() {
    let opts = ShardOptions {
        dtype: DType::BF16,
        ..small_blocks()
    };
    let out = run_plan(Model::MhaBf16, PlanRequest::new(2, 2), opts);
    check_close(
        &out.prefill_logits,
        &reference(Model::MhaBf16).prefill_logits,
    );
}

fn check_close(got: &[Vec<f32>], want: &[Vec<f32>]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let range = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = max_abs_diff(g, w);
        eprintln!("prompt {i}: max |diff| {d} of logit range {range}");
        assert!(
            d <= BF16_RELATIVE_TOLERANCE * range,
            "prompt {i}: logits differ by {d}, more than {BF16_RELATIVE_TOLERANCE} x {range}"
        );
    }
}
