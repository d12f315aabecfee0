//! What a step asks the last stage to compute from a sequence's logits so that the sampler never
//! needs the vocabulary: logit bias and penalties applied where the logits are, the Gumbel-max winner of each
//! rank's slice (plain temperature sampling), the log-sum-exp at the sampling temperature (so
//! the coordinator can tell whether the candidates cover a top-p / min-p nucleus), and, when
//! penalties reorder the logits, the model's own best tokens for log-probabilities.

use serde::{Deserialize, Serialize};

use crate::noise::NoiseKey;
use crate::token_mask::TokenMask;

/// The sampling-side request for one sequence of a step. With it, `SeqStep::top_candidates`
/// counts candidates by *sampling* logit (after penalties; 0: none) and no rank ever sends its
/// whole slice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleSpec {
    /// The sampling temperature (> 0 where `gumbel` or `scaled_log_sum_exp` is asked).
    pub temperature: f32,
    /// The request's seed: with the sampled position, the key of the Gumbel noise.
    pub seed: u64,
    /// Send the slice's Gumbel-max winner at `temperature`.
    pub gumbel: bool,
    /// Send log(sum(exp(logit / temperature))) over the slice, after penalties.
    pub scaled_log_sum_exp: bool,
    /// With penalties: how many of the slice's best *raw* logits to send (top_logprobs).
    pub top_logprobs: u32,
    pub penalties: Option<Penalties>,
}

/// What turns the model's logits into sampling logits, in vLLM's order: OpenAI's logit bias
/// added, then the repetition (HF), frequency and presence (OpenAI) penalties with the
/// sequence's token counts, then the bans. `ids` ascending, each once, `output_counts[i]` the
/// times `ids[i]` was generated (0: only in the prompt). Sent only when one of them is on, and
/// only the tokens each touches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Penalties {
    pub repetition: f32,
    pub frequency: f32,
    pub presence: f32,
    pub ids: Vec<u32>,
    pub output_counts: Vec<u32>,
    /// Tokens that may not be drawn (a logit_bias of -100; stop tokens before `min_tokens`):
    /// sampling logit -inf.
    #[serde(default)]
    pub banned: Vec<u32>,
    /// OpenAI's logit_bias: `bias[i]` is added to the model's logit of `bias_ids[i]` before any
    /// penalty; ids ascending, each once, biases finite in [-100, 100].
    #[serde(default)]
    pub bias_ids: Vec<u32>,
    #[serde(default)]
    pub bias: Vec<f32>,
    /// Structured output: the tokens the sequence's grammar allows next; every other id is
    /// banned (applied with the bans, last). A rank gets its own slice of it.
    #[serde(default)]
    pub allowed: Option<TokenMask>,
}

/// Sets to -inf every logit a grammar's mask bans, for each `(column, mask)` of a
/// vocabulary-major `[rows, stride]` slice whose first row is id `first_id`. Rows are visited in
/// blocks that stay in cache while every column's bans are written: a mask usually bans most of
/// the vocabulary, and one pass per column over the whole slice would read it from memory once
/// per sequence.
pub fn ban_outside_masks(
    logits: &mut [f32],
    first_id: u32,
    stride: usize,
    masks: &[(usize, &TokenMask)],
) {
    const BLOCK_ROWS: usize = 2048;
    let stride = stride.max(1);
    let first = first_id as usize;
    let rows = logits.len() / stride;
    let banned: Vec<Vec<std::ops::Range<usize>>> = masks
        .iter()
        .map(|(_, m)| m.banned_within(first..first + rows))
        .collect();
    let mut next = vec![0usize; masks.len()];
    for block in (0..rows).step_by(BLOCK_ROWS) {
        let end = (block + BLOCK_ROWS).min(rows);
        for (m, &(column, _)) in masks.iter().enumerate() {
            while let Some(r) = banned[m].get(next[m]) {
                let (lo, hi) = ((r.start - first).max(block), (r.end - first).min(end));
                for row in lo..hi {
                    logits[row * stride + column] = f32::NEG_INFINITY;
                }
                if r.end - first > end {
                    break; // continues in the next block
                }
                next[m] += 1;
            }
        }
    }
}

/// The largest logit bias magnitude (OpenAI's).
pub const MAX_LOGIT_BIAS: f32 = 100.0;

/// Why a sampling request cannot be served (checked on every rank before the step runs).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SampleSpecError {
    #[error("sequence {seq_id}: temperature {temperature} must be finite and > 0 for sampling")]
    Temperature { seq_id: u64, temperature: f32 },
    #[error("sequence {seq_id}: repetition penalty {value} must be finite and > 0")]
    Repetition { seq_id: u64, value: f32 },
    #[error("sequence {seq_id}: frequency and presence penalties must be finite")]
    Additive { seq_id: u64 },
    #[error(
        "sequence {seq_id}: {ids} penalty ids but {counts} counts; ids must ascend, each once, \
         with one count each"
    )]
    Counts {
        seq_id: u64,
        ids: usize,
        counts: usize,
    },
    #[error(
        "sequence {seq_id}: {ids} logit bias ids and {values} biases; ids must ascend, each \
         once, with one finite bias in [-100, 100] each"
    )]
    Bias {
        seq_id: u64,
        ids: usize,
        values: usize,
    },
    #[error("sequence {seq_id}: token id {id} is outside the vocabulary of {vocab_size}")]
    OutsideVocabulary {
        seq_id: u64,
        id: u32,
        vocab_size: usize,
    },
}

impl SampleSpec {
    /// The noise key of the token sampled after `end_pos` positions (the sequence's next
    /// position), so a recomputed step draws the same noise.
    pub fn noise_key(&self, end_pos: usize) -> NoiseKey {
        NoiseKey::new(self.seed, end_pos)
    }

    /// Refuses what no sampler sends: a temperature that cannot scale, penalties or biases that
    /// are not finite or not one per id, ids outside a vocabulary of `vocab_size`.
    pub fn check(&self, seq_id: u64, vocab_size: usize) -> Result<(), SampleSpecError> {
        let needs_t = self.gumbel || self.scaled_log_sum_exp;
        if needs_t && !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(SampleSpecError::Temperature {
                seq_id,
                temperature: self.temperature,
            });
        }
        if let Some(p) = &self.penalties {
            p.check(seq_id, vocab_size)?;
        }
        Ok(())
    }
}

impl Penalties {
    fn check(&self, seq_id: u64, vocab_size: usize) -> Result<(), SampleSpecError> {
        if !(self.repetition.is_finite() && self.repetition > 0.0) {
            return Err(SampleSpecError::Repetition {
                seq_id,
                value: self.repetition,
            });
        }
        if !(self.frequency.is_finite() && self.presence.is_finite()) {
            return Err(SampleSpecError::Additive { seq_id });
        }
        let ascending = self.ids.windows(2).all(|w| w[0] < w[1]);
        if self.ids.len() != self.output_counts.len() || !ascending {
            return Err(SampleSpecError::Counts {
                seq_id,
                ids: self.ids.len(),
                counts: self.output_counts.len(),
            });
        }
        let ascending = self.bias_ids.windows(2).all(|w| w[0] < w[1]);
        let in_range = self
            .bias
            .iter()
            .all(|b| (-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(b));
        if self.bias_ids.len() != self.bias.len() || !ascending || !in_range {
            return Err(SampleSpecError::Bias {
                seq_id,
                ids: self.bias_ids.len(),
                values: self.bias.len(),
            });
        }
        let ids = self.ids.iter().chain(&self.bias_ids).chain(&self.banned);
        if let Some(&id) = ids.into_iter().find(|&&id| id as usize >= vocab_size) {
            return Err(SampleSpecError::OutsideVocabulary {
                seq_id,
                id,
                vocab_size,
            });
        }
        Ok(())
    }

    /// Turns one sequence's logits of the vocabulary rows `first_id..` into its sampling logits,
    /// in vLLM's order: the bias added, the penalties applied, the bans set to -inf; ids outside
    /// the rows belong to another rank. Row r's logit is `logits[r * stride + column]`: the last
    /// stage's vocabulary-major `[rows, seqs]` layout, or (stride 1, column 0) one sequence's.
    pub fn apply_to_rows(&self, logits: &mut [f32], first_id: u32, stride: usize, column: usize) {
        self.apply_sparse_to_rows(logits, first_id, stride, column);
        if let Some(mask) = &self.allowed {
            ban_outside_masks(logits, first_id, stride, &[(column, mask)]);
        }
    }

    /// `apply_to_rows` without the grammar's mask: the bias, penalties and bans, which touch
    /// only the ids they list. The last stage applies every sequence's mask afterwards in one
    /// pass ([`ban_outside_masks`]).
    pub fn apply_sparse_to_rows(
        &self,
        logits: &mut [f32],
        first_id: u32,
        stride: usize,
        column: usize,
    ) {
        let first = first_id as usize;
        let rows = first..first + logits.len() / stride.max(1);
        let at = |id: u32| (id as usize - first) * stride + column;
        for (id, bias) in self.bias_within(rows.clone()) {
            logits[at(id)] += bias;
        }
        for (id, count) in self.within(rows.clone()) {
            logits[at(id)] = self.apply(logits[at(id)], count);
        }
        for id in self.banned_within(rows) {
            logits[at(id)] = f32::NEG_INFINITY;
        }
    }

    /// The penalized logit of a token: HF's repetition penalty for every token seen (prompt or
    /// output), then OpenAI's frequency and presence penalties for generated ones (vLLM's order).
    pub fn apply(&self, logit: f32, output_count: u32) -> f32 {
        let mut l = logit;
        if self.repetition != 1.0 {
            l = if l > 0.0 {
                l / self.repetition
            } else {
                l * self.repetition
            };
        }
        if output_count > 0 {
            l -= self.frequency * output_count as f32 + self.presence;
        }
        l
    }

    /// The banned ids inside `rows` (global ids).
    pub fn banned_within(&self, rows: std::ops::Range<usize>) -> impl Iterator<Item = u32> + '_ {
        self.banned
            .iter()
            .copied()
            .filter(move |&id| rows.contains(&(id as usize)))
    }

    /// The biased ids inside `rows` (global ids) with their biases.
    pub fn bias_within(
        &self,
        rows: std::ops::Range<usize>,
    ) -> impl Iterator<Item = (u32, f32)> + '_ {
        let start = self
            .bias_ids
            .partition_point(|&id| (id as usize) < rows.start);
        let end = self
            .bias_ids
            .partition_point(|&id| (id as usize) < rows.end);
        self.bias_ids[start..end]
            .iter()
            .copied()
            .zip(self.bias[start..end].iter().copied())
    }

    /// The ids inside `rows` (global ids) with their counts.
    pub fn within(&self, rows: std::ops::Range<usize>) -> impl Iterator<Item = (u32, u32)> + '_ {
        let start = self.ids.partition_point(|&id| (id as usize) < rows.start);
        let end = self.ids.partition_point(|&id| (id as usize) < rows.end);
        self.ids[start..end]
            .iter()
            .copied()
            .zip(self.output_counts[start..end].iter().copied())
    }
}

#[cfg(test)]
// A list of one allowed range is what a mask often is.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    fn penalties() -> Penalties {
        Penalties {
            repetition: 2.0,
            frequency: 0.5,
            presence: 0.25,
            ids: vec![1, 4, 7],
            output_counts: vec![0, 2, 1],
            banned: vec![5],
            bias_ids: vec![1, 2, 7, 8],
            bias: vec![-3.0, 1.5, 10.0, -100.0],
            allowed: None,
        }
    }

    /// Each rank's slice, in global ids and in any layout, gets exactly what the whole row gets:
    /// the bias first (token 1: 1 - 3 = -2, then x 2 as a negative logit), then the penalties,
    /// then the bans.
    #[test]
    fn a_rank_biases_and_penalizes_its_slice_in_global_ids() {
        let raw: Vec<f32> = vec![0.5, 1.0, 2.0, -1.0, 3.0, 4.0, 0.0, 1.0, 2.0, 0.25];
        let mut whole = raw.clone();
        let p = penalties();
        p.apply_to_rows(&mut whole, 0, 1, 0);
        let want = [
            0.5,
            (1.0 - 3.0) * 2.0,
            2.0 + 1.5,
            -1.0,
            3.0 / 2.0 - 2.0 * 0.5 - 0.25,
            f32::NEG_INFINITY,
            0.0,
            (1.0 + 10.0) / 2.0 - 0.5 - 0.25,
            2.0 - 100.0,
            0.25,
        ];
        assert_eq!(whole, want);
        // Ranks of 4, 4 and 2 rows, each in a vocabulary-major [rows, 3 seqs] layout, column 1.
        for (first, len) in [(0usize, 4usize), (4, 4), (8, 2)] {
            let mut layout = vec![7.0f32; len * 3];
            for r in 0..len {
                layout[r * 3 + 1] = raw[first + r];
            }
            p.apply_to_rows(&mut layout, first as u32, 3, 1);
            for r in 0..len {
                assert_eq!(layout[r * 3 + 1], want[first + r], "row {}", first + r);
                assert_eq!((layout[r * 3], layout[r * 3 + 2]), (7.0, 7.0));
            }
        }
    }

    /// The one-pass, blocked application of many masks equals applying each column's mask on
    /// its own, across block boundaries and at the slice's edges.
    #[test]
    fn masks_banned_in_one_pass_equal_each_column_alone() {
        let (first, rows, seqs) = (3000u32, 5000usize, 3usize);
        let masks = [
            TokenMask::from_ranges(0, 10_000, [3000..3001, 4000..6100, 7999..8000]),
            TokenMask::from_ranges(3500, 4000, [3500..7500]),
            TokenMask::from_ranges(0, 10_000, []),
        ];
        let raw: Vec<f32> = (0..rows * seqs).map(|i| (i % 97) as f32).collect();
        let mut one_pass = raw.clone();
        let pairs: Vec<(usize, &TokenMask)> = masks.iter().enumerate().collect();
        ban_outside_masks(&mut one_pass, first, seqs, &pairs);
        let mut each = raw;
        for (column, mask) in masks.iter().enumerate() {
            let p = Penalties {
                repetition: 1.0,
                frequency: 0.0,
                presence: 0.0,
                ids: vec![],
                output_counts: vec![],
                banned: vec![],
                bias_ids: vec![],
                bias: vec![],
                allowed: Some(mask.clone()),
            };
            p.apply_to_rows(&mut each, first, seqs, column);
        }
        assert_eq!(one_pass, each);
        let allowed = |c: usize| {
            (0..rows)
                .filter(|r| one_pass[r * seqs + c].is_finite())
                .count()
        };
        assert_eq!(
            (allowed(0), allowed(1), allowed(2)),
            (1 + 2100 + 1, 4000, 0)
        );
    }

    #[test]
    fn malformed_biases_and_foreign_ids_are_refused() {
        let spec = |p: Penalties| SampleSpec {
            temperature: 1.0,
            seed: 0,
            gumbel: true,
            scaled_log_sum_exp: false,
            top_logprobs: 0,
            penalties: Some(p),
        };
        assert_eq!(spec(penalties()).check(3, 10), Ok(()));
        let broken = [
            Penalties {
                bias: vec![1.0],
                ..penalties()
            },
            Penalties {
                bias_ids: vec![2, 1, 7, 8],
                ..penalties()
            },
            Penalties {
                bias_ids: vec![1, 1, 7, 8],
                ..penalties()
            },
            Penalties {
                bias: vec![0.0, 0.0, f32::NAN, 0.0],
                ..penalties()
            },
            Penalties {
                bias: vec![0.0, 0.0, 100.5, 0.0],
                ..penalties()
            },
            Penalties {
                bias: vec![0.0, 0.0, f32::INFINITY, 0.0],
                ..penalties()
            },
        ];
        for p in broken {
            let e = spec(p.clone()).check(3, 10).expect_err("refused");
            assert!(
                matches!(e, SampleSpecError::Bias { seq_id: 3, .. }),
                "{p:?}: {e}"
            );
        }
        for (field, p) in [
            (
                "ids",
                Penalties {
                    ids: vec![1, 4, 10],
                    ..penalties()
                },
            ),
            (
                "bias",
                Penalties {
                    bias_ids: vec![1, 2, 7, 10],
                    ..penalties()
                },
            ),
            (
                "banned",
                Penalties {
                    banned: vec![u32::MAX],
                    ..penalties()
                },
            ),
        ] {
            let e = spec(p).check(3, 10).expect_err("refused");
            assert!(
                matches!(e, SampleSpecError::OutsideVocabulary { .. }),
                "{field}: {e}"
            );
        }
    }
}
