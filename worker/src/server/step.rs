//! One step on the compute thread: checked, run through the shard, handed on or answered.

use gemma_proto::{candidates, pb, SeqLogits, StepBatch};

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

/// Per sequence, what its sampler asked for from this rank's vocabulary slice: the whole slice,
/// or its largest logits and log-sum-exp (a few hundred bytes instead of the vocabulary).
fn last_stage_output(
    batch: &StepBatch,
    logits: &candle_core::Tensor,
    first_id: u32,
) -> Result<pb::LastStageOutput, WireTensorError> {
    with_elements::<f32, _>(logits, |values| {
        select_outputs(batch, values, first_id).into()
    })
}

/// [`last_stage_output`] over the logits' elements, `[vocab slice, seqs]` row-major: one pass
/// selects every sequence's candidates; only a sequence that wants every logit copies its column.
fn select_outputs(batch: &StepBatch, values: &[f32], first_id: u32) -> Vec<SeqLogits> {
    let seqs = batch.seqs.len();
    let wanted: Vec<usize> = batch
        .seqs
        .iter()
        .map(|s| s.top_candidates as usize)
        .collect();
    let mut top = candidates::top_candidates_by_column(values, seqs, &wanted, first_id);
    let lse_wanted: Vec<bool> = batch.seqs.iter().map(|s| s.log_probs).collect();
    let lse = candidates::log_sum_exp_by_column(values, seqs, &lse_wanted);
    batch
        .seqs
        .iter()
        .enumerate()
        .map(|(i, seq)| match seq.top_candidates {
            0 => SeqLogits::Full(values.iter().skip(i).step_by(seqs).copied().collect()),
            _ => SeqLogits::Top {
                candidates: std::mem::take(&mut top[i]),
                log_sum_exp: lse[i],
            },
        })
        .collect()
}
