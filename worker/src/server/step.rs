//! One step on the compute thread: checked, run through the shard, handed on or answered.

use gemma_proto::noise::{self, GumbelRace};
use gemma_proto::sampling::ban_outside_masks;
use gemma_proto::{candidates, pb, Compact, SampleSpec, SeqLogits, StepBatch};

use crate::data_plane::DataPlane;
use crate::error::{StepError, WireTensorError};
use crate::model::{Shard, StageOutput};
use crate::wire::with_elements;

/// An answer that carries `error` instead of a result.
pub fn failed(step_id: u64, epoch: u64, error: String) -> pb::StepResponse {
    pb::StepResponse {
        step_id,
        epoch,
        collective_us: 0,
        result: Some(pb::step_response::Result::Error(error)),
    }
}

/// The gRPC edge of a step: its result, or its error as the message the coordinator shows.
pub fn respond(
    step_id: u64,
    epoch: u64,
    result: Result<pb::step_response::Result, StepError>,
    plane: &DataPlane,
) -> pb::StepResponse {
    match result {
        Ok(result) => pb::StepResponse {
            step_id,
            epoch,
            collective_us: plane.take_wait_micros(),
            result: Some(result),
        },
        Err(e) => {
            tracing::warn!(step_id, epoch, error = %e, "step failed");
            failed(step_id, epoch, e.to_string())
        }
    }
}

/// One checked step: validated before waiting for the previous stage (a batch refused everywhere
/// never leaves a stage waiting), run, and handed on or answered.
pub fn run_step(
    shard: &Shard,
    plane: &DataPlane,
    batch: &StepBatch,
) -> Result<pb::step_response::Result, StepError> {
    let batch = shard.validate(batch)?;
    let input = match shard.spec().is_first_stage() {
        true => None,
        false => {
            let dims = [batch.batch().num_tokens(), shard.config().hidden_size];
            Some(plane.recv_prev(&dims, shard.dtype())?)
        }
    };
    match shard.step(&batch, input.as_ref())? {
        StageOutput::Hidden(h) => {
            plane.send_next(&h)?;
            Ok(pb::step_response::Result::Done(pb::StepDone {}))
        }
        StageOutput::Logits(l) => {
            let first_id = shard.spec().vocab_rows.start as u32;
            let output = last_stage_output(batch.batch(), &l, first_id)?;
            Ok(pb::step_response::Result::Output(output))
        }
    }
}

/// Per sequence, what its sampler asked for from this rank's vocabulary slice (`logits`:
/// `[slice rows, seqs]`, ids from `first_id`): the whole slice, its largest logits and
/// log-sum-exp (a few hundred bytes instead of the vocabulary), or the compact answer of a
/// `SampleSpec`.
pub fn last_stage_output(
    batch: &StepBatch,
    logits: &candle_core::Tensor,
    first_id: u32,
) -> Result<pb::LastStageOutput, WireTensorError> {
    with_elements::<f32, _>(logits, |values| {
        select_outputs(batch, values, first_id).into()
    })
}

/// [`last_stage_output`] over the logits' elements, `[vocab slice, seqs]` row-major: one pass
/// selects every sequence's candidates; only a sequence that wants every logit copies its column;
/// sequences with a `SampleSpec` get their compact answer (penalties applied to a copy of the
/// logits, only when some sequence has them).
fn select_outputs(batch: &StepBatch, values: &[f32], first_id: u32) -> Vec<SeqLogits> {
    let seqs = batch.seqs.len();
    let penalized = penalize(batch, values, first_id);
    let sampling = penalized.as_deref().unwrap_or(values);
    let wanted: Vec<usize> = batch
        .seqs
        .iter()
        .map(|s| s.top_candidates as usize)
        .collect();
    let mut top = candidates::top_candidates_by_column(sampling, seqs, &wanted, first_id);
    let lse_wanted: Vec<bool> = batch.seqs.iter().map(|s| s.log_probs).collect();
    let lse = candidates::log_sum_exp_by_column(values, seqs, &lse_wanted);
    let specs: Vec<Option<&SampleSpec>> = batch.seqs.iter().map(|s| s.sampling.as_ref()).collect();
    // With penalties the model's own best tokens (top_logprobs) are not the candidates.
    let raw_wanted: Vec<usize> = specs
        .iter()
        .map(|s| match s {
            Some(s) if s.penalties.is_some() => s.top_logprobs as usize,
            _ => 0,
        })
        .collect();
    // A pass over the whole slice, only when some sequence asked for log-probabilities.
    let mut raw_top = match penalized {
        Some(_) if raw_wanted.iter().any(|&n| n > 0) => {
            candidates::top_candidates_by_column(values, seqs, &raw_wanted, first_id)
        }
        _ => vec![Vec::new(); seqs],
    };
    let temperatures: Vec<Option<f32>> = specs
        .iter()
        .map(|s| s.filter(|s| s.scaled_log_sum_exp).map(|s| s.temperature))
        .collect();
    let scaled = candidates::scaled_log_sum_exp_by_column(sampling, seqs, &temperatures);
    let mut races: Vec<Option<GumbelRace>> = batch
        .seqs
        .iter()
        .map(|s| match &s.sampling {
            Some(spec) if spec.gumbel => Some(GumbelRace::new(
                spec.noise_key(s.end_pos()),
                spec.temperature,
            )),
            _ => None,
        })
        .collect();
    noise::gumbel_by_column(sampling, values, &mut races, first_id);
    let rows = values.len() / seqs.max(1);
    batch
        .seqs
        .iter()
        .enumerate()
        .map(|(i, seq)| match (&seq.sampling, seq.top_candidates) {
            (Some(_), _) => {
                let candidates = std::mem::take(&mut top[i]);
                let raw_logits = candidates
                    .iter()
                    .map(|&(_, id)| values[(id - first_id) as usize * seqs + i])
                    .collect();
                SeqLogits::Compact(Compact {
                    complete: seq.top_candidates as usize >= rows,
                    candidates,
                    raw_logits,
                    top_raw: std::mem::take(&mut raw_top[i]),
                    log_sum_exp: lse[i],
                    scaled_log_sum_exp: scaled[i],
                    gumbel: races[i].and_then(GumbelRace::winner),
                })
            }
            (None, 0) => SeqLogits::Full(values.iter().skip(i).step_by(seqs).copied().collect()),
            (None, _) => SeqLogits::Top {
                candidates: std::mem::take(&mut top[i]),
                log_sum_exp: lse[i],
            },
        })
        .collect()
}

fn with_penalties(seq: &gemma_proto::SeqStep) -> Option<&gemma_proto::Penalties> {
    seq.sampling.as_ref()?.penalties.as_ref()
}

/// The sampling logits: each sequence's logit bias, penalties and bans applied to the ids inside
/// this slice (global ids), or None when no sequence of the batch has any.
fn penalize(batch: &StepBatch, values: &[f32], first_id: u32) -> Option<Vec<f32>> {
    let seqs = batch.seqs.len();
    batch.seqs.iter().find_map(with_penalties)?;
    let mut out = values.to_vec();
    let mut masks = Vec::new();
    for (s, seq) in batch.seqs.iter().enumerate() {
        if let Some(p) = with_penalties(seq) {
            p.apply_sparse_to_rows(&mut out, first_id, seqs, s);
            masks.extend(p.allowed.as_ref().map(|m| (s, m)));
        }
    }
    // Every grammar's bans in one pass over the slice (what apply_to_rows does per column).
    ban_outside_masks(&mut out, first_id, seqs, &masks);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemma_proto::{Penalties, SeqStep, SplitMix64};

    fn seq(id: u64, top: u32, log_probs: bool, sampling: Option<SampleSpec>) -> SeqStep {
        SeqStep {
            seq_id: id,
            tokens: vec![1, 2],
            start_pos: 5 + id as usize,
            block_table: Vec::new(),
            top_candidates: top,
            log_probs,
            sampling,
        }
    }

    fn spec(gumbel: bool, scaled: bool, penalties: bool) -> SampleSpec {
        SampleSpec {
            temperature: 0.8,
            seed: 9,
            gumbel,
            scaled_log_sum_exp: scaled,
            top_logprobs: 2,
            penalties: penalties.then(|| Penalties {
                repetition: 1.3,
                frequency: 0.5,
                presence: 0.25,
                ids: vec![3, 1003, 1100, 1499, 4000],
                output_counts: vec![1, 0, 2, 1, 7],
                banned: vec![1001, 1200, 7],
                // Inside and outside the slice (1000..1500), on a penalized id, past the best.
                bias_ids: vec![2, 1003, 1004, 1250, 1498, 2000],
                bias: vec![5.0, -2.5, 100.0, 7.5, -100.0, 3.0],
                // A grammar's mask: a run across the slice's start, one inside, one past it.
                allowed: Some(gemma_proto::TokenMask::from_ranges(
                    0,
                    4096,
                    [990..1010, 1100..1300, 1497..1600],
                )),
            }),
        }
    }

    /// The batched, vocabulary-major selection equals the one-column definition for every mix
    /// of asks in one batch.
    #[test]
    fn batched_selection_equals_the_per_column_definition() {
        let batch = StepBatch {
            seqs: vec![
                seq(0, 4, true, None),
                seq(1, 3, true, Some(spec(true, false, true))),
                seq(2, 0, false, Some(spec(true, false, false))),
                seq(3, 64, true, Some(spec(false, true, true))),
                seq(4, 0, false, None),
            ],
        };
        let (rows, first_id) = (500usize, 1000u32);
        let seqs = batch.seqs.len();
        let mut rng = SplitMix64::new(4);
        let values: Vec<f32> = (0..rows * seqs)
            .map(|_| (rng.next_f64() * 10.0 - 5.0) as f32)
            .collect();
        let got = select_outputs(&batch, &values, first_id);
        for (i, (out, s)) in got.into_iter().zip(&batch.seqs).enumerate() {
            let column: Vec<f32> = values.iter().skip(i).step_by(seqs).copied().collect();
            match s.sampling {
                Some(_) => {
                    let want = Compact::of_slice(&column, first_id, s).expect("compact");
                    // Debug text: NaN (a log-sum-exp not asked for) equals itself there.
                    let want = SeqLogits::Compact(want);
                    assert_eq!(format!("{out:?}"), format!("{want:?}"), "sequence {i}");
                }
                None if s.top_candidates == 0 => assert_eq!(out, SeqLogits::Full(column)),
                None => assert_eq!(
                    out,
                    SeqLogits::Top {
                        candidates: candidates::top_candidates(&column, 4, first_id),
                        log_sum_exp: candidates::log_sum_exp(&column),
                    }
                ),
            }
        }
    }
}
