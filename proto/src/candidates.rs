//! What the sampler receives for one sequence: every logit, or the largest ones plus the
//! log-sum-exp of the whole distribution. Top-k, top-p, min-p, temperature and log-probabilities
//! computed from the candidates equal those computed from every logit, so the last stage sends
//! a few hundred bytes per sequence instead of the whole vocabulary.

use std::cmp::Ordering;

use crate::error::WireError;
use crate::step::{SeqStep, StepBatch};

/// The sampler's view of one sequence's next-token logits.
#[derive(Debug, Clone, PartialEq)]
pub enum SeqLogits {
    /// Every logit, indexed by token id.
    Full(Vec<f32>),
    /// The largest logits as (logit, token id), by [`candidate_order`], and the log-sum-exp of
    /// every logit.
    Top {
        candidates: Vec<(f32, u32)>,
        log_sum_exp: f32,
    },
    /// What a step with a `SampleSpec` asked for (see `compact`).
    Compact(crate::compact::Compact),
}

/// Larger logit first; on a tie the lower token id (so greedy equals a first-index argmax).
pub fn candidate_order(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Index of the largest logit; the first on ties (what greedy decoding picks).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The `n` largest of `logits` as (logit, `first_id` + index), in [`candidate_order`]; one
/// pass that rejects most values with a single comparison.
pub fn top_candidates(logits: &[f32], n: usize, first_id: u32) -> Vec<(f32, u32)> {
    let n = n.min(logits.len());
    if n == 0 {
        return Vec::new();
    }
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(n + 1);
    for (i, &v) in logits.iter().enumerate() {
        let c = (v, first_id + i as u32);
        if best.len() == n {
            // `best` is sorted: its last entry is the weakest kept.
            if candidate_order(&c, &best[n - 1]) != Ordering::Less {
                continue;
            }
            best.pop();
        }
        let at = best.partition_point(|b| candidate_order(b, &c) == Ordering::Less);
        best.insert(at, c);
    }
    best
}

/// [`top_candidates`] for every column of a row-major `[vocab, seqs]` matrix (the last stage's
/// vocabulary-major logits) in one pass over memory: column `s` keeps its `wanted[s]` best.
pub fn top_candidates_by_column(
    values: &[f32],
    seqs: usize,
    wanted: &[usize],
    first_id: u32,
) -> Vec<Vec<(f32, u32)>> {
    // No column can keep more than the slice's rows, whatever was asked.
    let rows = values.len() / seqs.max(1);
    let mut best: Vec<Vec<(f32, u32)>> = wanted
        .iter()
        .map(|&n| Vec::with_capacity(n.min(rows) + 1))
        .collect();
    // The weakest kept logit per column once it is full: most values fail this one comparison.
    let mut floor = vec![f32::NEG_INFINITY; seqs];
    for (v, row) in values.chunks_exact(seqs.max(1)).enumerate() {
        for (s, &x) in row.iter().enumerate() {
            let n = wanted[s];
            if n == 0 || x < floor[s] {
                continue;
            }
            let c = (x, first_id + v as u32);
            let list = &mut best[s];
            if list.len() == n {
                if candidate_order(&c, &list[n - 1]) != Ordering::Less {
                    continue;
                }
                list.pop();
            }
            let at = list.partition_point(|b| candidate_order(b, &c) == Ordering::Less);
            list.insert(at, c);
            if list.len() == n {
                floor[s] = list[n - 1].0;
            }
        }
    }
    best
}

/// The largest value of each column of a row-major `[vocab, seqs]` matrix.
fn column_max(values: &[f32], seqs: usize) -> Vec<f32> {
    let mut max = vec![f32::NEG_INFINITY; seqs];
    for row in values.chunks_exact(seqs.max(1)) {
        for (m, &x) in max.iter_mut().zip(row) {
            *m = m.max(x);
        }
    }
    max
}

/// [`log_sum_exp`] of the columns of a row-major `[vocab, seqs]` matrix that are `wanted`
/// (NaN for the others).
pub fn log_sum_exp_by_column(values: &[f32], seqs: usize, wanted: &[bool]) -> Vec<f32> {
    if !wanted.iter().any(|&w| w) {
        return vec![f32::NAN; seqs];
    }
    let max = column_max(values, seqs);
    let mut sum = vec![0f64; seqs];
    for row in values.chunks_exact(seqs.max(1)) {
        for s in 0..seqs {
            if wanted[s] {
                sum[s] += (f64::from(row[s]) - f64::from(max[s])).exp();
            }
        }
    }
    (0..seqs)
        .map(|s| match wanted[s] && max[s].is_finite() {
            true => (f64::from(max[s]) + sum[s].ln()) as f32,
            false if wanted[s] => max[s],
            false => f32::NAN,
        })
        .collect()
}

/// log(sum(exp(x / t))) of the columns of a row-major `[vocab, seqs]` matrix that have a
/// temperature `t` (NaN for the others), accumulated in f64.
pub fn scaled_log_sum_exp_by_column(
    values: &[f32],
    seqs: usize,
    temperatures: &[Option<f32>],
) -> Vec<f64> {
    let mut out = vec![f64::NAN; seqs];
    if temperatures.iter().all(Option::is_none) {
        return out;
    }
    let max = column_max(values, seqs);
    let mut sum = vec![0f64; seqs];
    for row in values.chunks_exact(seqs.max(1)) {
        for s in 0..seqs {
            if let Some(t) = temperatures[s] {
                sum[s] += ((f64::from(row[s]) - f64::from(max[s])) / f64::from(t)).exp();
            }
        }
    }
    for s in 0..seqs {
        if let Some(t) = temperatures[s] {
            out[s] = match max[s].is_finite() {
                true => f64::from(max[s]) / f64::from(t) + sum[s].ln(),
                false => f64::from(max[s]),
            };
        }
    }
    out
}

/// log(sum(exp(x))) computed stably (f64 accumulation).
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f64 = logits
        .iter()
        .map(|&v| (f64::from(v) - f64::from(max)).exp())
        .sum();
    (f64::from(max) + sum.ln()) as f32
}

/// Combines log-sum-exps of disjoint slices into that of their union.
pub fn combine_log_sum_exp(parts: &[f32]) -> f32 {
    log_sum_exp(parts)
}

/// The global `n` best of every rank's candidates (each rank's best `n` of its own slice, so
/// the union holds the global best `n`).
pub fn merge_candidates(ranks: &[Vec<(f32, u32)>], n: usize) -> Vec<(f32, u32)> {
    let mut all: Vec<(f32, u32)> = ranks.iter().flatten().copied().collect();
    all.sort_unstable_by(candidate_order);
    all.truncate(n);
    all
}

/// The last stage's answers joined across its ranks (in rank order, each already decoded against
/// `batch` by `pb::LastStageOutput::into_logits`): per sequence, the slices concatenated into every
/// logit, or the candidates merged to the `top_candidates` best and the log-sum-exps combined.
pub fn join_ranks(
    ranks: Vec<Vec<SeqLogits>>,
    batch: &StepBatch,
) -> Result<Vec<SeqLogits>, WireError> {
    if ranks.is_empty() {
        return Err(WireError::NoRanks);
    }
    if let Some(r) = ranks.iter().find(|r| r.len() != batch.seqs.len()) {
        return Err(WireError::SequenceCount {
            sent: r.len(),
            expected: batch.seqs.len(),
        });
    }
    let mut ranks: Vec<_> = ranks.into_iter().map(Vec::into_iter).collect();
    batch
        .seqs
        .iter()
        .map(|seq| {
            let parts: Vec<SeqLogits> = ranks.iter_mut().filter_map(Iterator::next).collect();
            join_sequence(parts, seq)
        })
        .collect()
}

/// One sequence's parts from every rank, joined.
fn join_sequence(parts: Vec<SeqLogits>, seq: &SeqStep) -> Result<SeqLogits, WireError> {
    let mixed = WireError::MixedForms { seq_id: seq.seq_id };
    if let Some(SeqLogits::Compact(_)) = parts.first() {
        let compacts = parts
            .into_iter()
            .map(|p| match p {
                SeqLogits::Compact(c) => Ok(c),
                _ => Err(WireError::MixedForms { seq_id: seq.seq_id }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let top_logprobs = seq.sampling.as_ref().map_or(0, |s| s.top_logprobs as usize);
        return Ok(SeqLogits::Compact(crate::compact::join_compact(
            compacts,
            top_logprobs,
        )));
    }
    if let Some(SeqLogits::Full(_)) = parts.first() {
        let rest: usize = parts[1..]
            .iter()
            .map(|p| match p {
                SeqLogits::Full(v) => v.len(),
                SeqLogits::Top { .. } | SeqLogits::Compact(_) => 0,
            })
            .sum();
        // The first rank's slice becomes the row: with one rank (tp=1) nothing is copied.
        let mut parts = parts.into_iter();
        let Some(SeqLogits::Full(mut row)) = parts.next() else {
            return Err(mixed);
        };
        row.reserve_exact(rest);
        for part in parts {
            match part {
                SeqLogits::Full(v) => row.extend_from_slice(&v),
                SeqLogits::Top { .. } | SeqLogits::Compact(_) => return Err(mixed),
            }
        }
        return Ok(SeqLogits::Full(row));
    }
    let mut lists = Vec::with_capacity(parts.len());
    let mut lses = Vec::with_capacity(parts.len());
    for part in parts {
        match part {
            SeqLogits::Top {
                candidates,
                log_sum_exp,
            } => {
                lists.push(candidates);
                lses.push(log_sum_exp);
            }
            SeqLogits::Full(_) | SeqLogits::Compact(_) => return Err(mixed),
        }
    }
    Ok(SeqLogits::Top {
        candidates: merge_candidates(&lists, seq.top_candidates as usize),
        log_sum_exp: combine_log_sum_exp(&lses),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_rank_candidates_equal_the_global_top() {
        let logits: Vec<f32> = (0..1000u32)
            .map(|i| ((i.wrapping_mul(2654435761) >> 7) % 997) as f32 / 37.0)
            .collect();
        let mut want: Vec<(f32, u32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &v)| (v, i as u32))
            .collect();
        want.sort_by(candidate_order);
        want.truncate(20);
        let halves = [&logits[..500], &logits[500..]];
        let ranks: Vec<_> = halves
            .iter()
            .enumerate()
            .map(|(r, s)| top_candidates(s, 20, 500 * r as u32))
            .collect();
        assert_eq!(merge_candidates(&ranks, 20), want);
        let lse = combine_log_sum_exp(&[log_sum_exp(halves[0]), log_sum_exp(halves[1])]);
        assert!((lse - log_sum_exp(&logits)).abs() < 1e-5);
    }

    #[test]
    fn by_column_equals_per_column() {
        // Three sequences' logits, vocabulary-major.
        let vocab = 700;
        let columns: Vec<Vec<f32>> = (0..3u32)
            .map(|s| {
                (0..vocab as u32)
                    .map(|v| ((v * 7919 + s * 104729) % 1009) as f32 / 13.0)
                    .collect()
            })
            .collect();
        let values: Vec<f32> = (0..vocab)
            .flat_map(|v| columns.iter().map(move |c| c[v]))
            .collect();
        let wanted = [5, 0, 64];
        let got = top_candidates_by_column(&values, 3, &wanted, 1000);
        for s in 0..3 {
            assert_eq!(
                got[s],
                top_candidates(&columns[s], wanted[s], 1000),
                "column {s}"
            );
        }
        let lse = log_sum_exp_by_column(&values, 3, &[true, false, true]);
        assert!((lse[0] - log_sum_exp(&columns[0])).abs() < 1e-6);
        assert!(lse[1].is_nan());
        assert!((lse[2] - log_sum_exp(&columns[2])).abs() < 1e-6);
    }
}
