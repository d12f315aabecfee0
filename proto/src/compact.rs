//! The compact answer for a sequence whose step carried a [`SampleSpec`](crate::sampling::SampleSpec):
//! what one rank sends from its slice, and the same joined across the last stage's ranks. The
//! joined form tells the sampler how far its candidates are certainly the distribution's best,
//! so a top-p / min-p nucleus is either covered (sampled exactly) or asked for again with more.

use crate::candidates::{
    candidate_order, combine_log_sum_exp, log_sum_exp, merge_candidates,
    scaled_log_sum_exp_by_column, top_candidates,
};
use crate::noise::{GumbelPick, GumbelRace};
use crate::step::SeqStep;

/// One rank's compact answer, or (after [`join_compact`]) the whole vocabulary's.
#[derive(Debug, Clone, PartialEq)]
pub struct Compact {
    /// The best candidates by sampling logit (after bias and penalties), as (sampling logit, id) in
    /// candidate order. Joined: only the prefix that is certainly the global order.
    pub candidates: Vec<(f32, u32)>,
    /// The model's logit of each candidate (equal to the sampling logit without penalties).
    pub raw_logits: Vec<f32>,
    /// With penalties: the best by the model's logit (for top_logprobs), candidate order.
    pub top_raw: Vec<(f32, u32)>,
    /// log-sum-exp of the model's logits; NaN unless log-probabilities were asked.
    pub log_sum_exp: f32,
    /// log-sum-exp of sampling logit / temperature; NaN unless asked.
    pub scaled_log_sum_exp: f64,
    /// The Gumbel-max winner, where asked.
    pub gumbel: Option<GumbelPick>,
    /// Every token of the slice (joined: of the vocabulary) is among `candidates`.
    pub complete: bool,
}

impl Compact {
    /// One rank's answer from its slice of one sequence's logits (ids from `first_id`), as the
    /// step `seq` asks it: the plain definition, one column at a time, that the last stage's
    /// batched selection must equal.
    pub fn of_slice(logits: &[f32], first_id: u32, seq: &SeqStep) -> Option<Compact> {
        let spec = seq.sampling.as_ref()?;
        let mut sampling = logits.to_vec();
        if let Some(p) = &spec.penalties {
            p.apply_to_rows(&mut sampling, first_id, 1, 0);
        }
        let candidates = top_candidates(&sampling, seq.top_candidates as usize, first_id);
        let top_raw = match spec.penalties {
            Some(_) => top_candidates(logits, spec.top_logprobs as usize, first_id),
            None => Vec::new(),
        };
        let gumbel = match spec.gumbel {
            true => {
                let key = spec.noise_key(seq.end_pos());
                let mut race = GumbelRace::new(key, spec.temperature);
                for (i, (&l, &r)) in sampling.iter().zip(logits).enumerate() {
                    race.offer(first_id + i as u32, l, r);
                }
                race.winner()
            }
            false => None,
        };
        Some(Compact {
            raw_logits: candidates
                .iter()
                .map(|&(_, id)| logits[(id - first_id) as usize])
                .collect(),
            complete: seq.top_candidates as usize >= logits.len(),
            candidates,
            top_raw,
            log_sum_exp: match seq.log_probs {
                true => log_sum_exp(logits),
                false => f32::NAN,
            },
            scaled_log_sum_exp: match spec.scaled_log_sum_exp {
                true => scaled_log_sum_exp_by_column(&sampling, 1, &[Some(spec.temperature)])[0],
                false => f64::NAN,
            },
            gumbel,
        })
    }
}

/// Joins the ranks' compact answers for one sequence (rank order); `top_raw` keeps the best
/// `top_logprobs`.
pub fn join_compact(parts: Vec<Compact>, top_logprobs: usize) -> Compact {
    let complete = parts.iter().all(|p| p.complete);
    // An incomplete rank's unsent tokens all come after its last candidate (or after every
    // token, if it sent none), so the merged list is the global order up to the earliest of
    // those last candidates.
    let mut boundary: Option<(f32, u32)> = None;
    let mut no_exact = false;
    for p in parts.iter().filter(|p| !p.complete) {
        match p.candidates.last() {
            Some(&last) => {
                boundary = Some(match boundary {
                    Some(b) if candidate_order(&b, &last).is_lt() => b,
                    _ => last,
                });
            }
            None => no_exact = true,
        }
    }
    let mut merged: Vec<((f32, u32), f32)> = parts
        .iter()
        .flat_map(|p| {
            p.candidates
                .iter()
                .copied()
                .zip(p.raw_logits.iter().copied())
        })
        .collect();
    merged.sort_unstable_by(|a, b| candidate_order(&a.0, &b.0));
    if no_exact {
        merged.clear();
    } else if let Some(b) = boundary {
        let exact = merged.partition_point(|c| candidate_order(&c.0, &b).is_le());
        merged.truncate(exact);
    }
    let tops: Vec<Vec<(f32, u32)>> = parts.iter().map(|p| p.top_raw.clone()).collect();
    let lses: Vec<f32> = parts.iter().map(|p| p.log_sum_exp).collect();
    Compact {
        candidates: merged.iter().map(|c| c.0).collect(),
        raw_logits: merged.iter().map(|c| c.1).collect(),
        top_raw: merge_candidates(&tops, top_logprobs),
        log_sum_exp: combine_log_sum_exp(&lses),
        scaled_log_sum_exp: log_sum_exp_f64(parts.iter().map(|p| p.scaled_log_sum_exp)),
        gumbel: parts
            .iter()
            .filter_map(|p| p.gumbel)
            .reduce(GumbelPick::better),
        complete,
    }
}

/// log(sum(exp(x))) of f64 values, stably; NaN in, NaN out.
pub fn log_sum_exp_f64(values: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = values.clone().fold(f64::NEG_INFINITY, f64::max);
    if values.clone().any(f64::is_nan) {
        return f64::NAN;
    }
    if !max.is_finite() {
        return max;
    }
    max + values.map(|v| (v - max).exp()).sum::<f64>().ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(logits: &[f32], first: u32, n: usize) -> Compact {
        let candidates = top_candidates(logits, n, first);
        Compact {
            raw_logits: candidates.iter().map(|c| c.0).collect(),
            complete: n >= logits.len(),
            candidates,
            top_raw: Vec::new(),
            log_sum_exp: f32::NAN,
            scaled_log_sum_exp: f64::NAN,
            gumbel: None,
        }
    }

    /// The joined prefix is exactly the global order, and as long as it can be.
    #[test]
    fn the_joined_prefix_is_the_global_order() {
        let logits: Vec<f32> = (0..3000u32)
            .map(|i| ((i.wrapping_mul(2654435761) >> 9) % 701) as f32 / 50.0)
            .collect();
        let mut global: Vec<(f32, u32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (l, i as u32))
            .collect();
        global.sort_by(candidate_order);
        for n in [1, 7, 64, 1000, 3000] {
            let parts = vec![
                rank(&logits[..1000], 0, n),
                rank(&logits[1000..2500], 1000, n),
                rank(&logits[2500..], 2500, n),
            ];
            let joined = join_compact(parts, 0);
            let len = joined.candidates.len();
            assert!(len >= n.min(3000), "n {n}: {len}");
            assert_eq!(joined.candidates[..], global[..len], "n {n}");
            assert_eq!(joined.complete, n >= 1500);
        }
    }
}
