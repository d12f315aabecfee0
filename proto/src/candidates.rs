//! What the sampler receives for one sequence: every logit, or the largest ones plus the
//! log-sum-exp of the whole distribution. Top-k, top-p, min-p, temperature and log-probabilities
//! computed from the candidates equal those computed from every logit, so the last stage sends
//! a few hundred bytes per sequence instead of the whole vocabulary.

use std::cmp::Ordering;

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
}

/// Larger logit first; on a tie the lower token id (so greedy equals a first-index argmax).
pub fn candidate_order(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
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
}
