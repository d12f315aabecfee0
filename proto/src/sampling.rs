//! What a step asks the last stage to compute from a sequence's logits so that the sampler never
//! needs the vocabulary: penalties applied where the logits are, the Gumbel-max winner of each
//! rank's slice (plain temperature sampling), the log-sum-exp at the sampling temperature (so
//! the coordinator can tell whether the candidates cover a top-p / min-p nucleus), and, when
//! penalties reorder the logits, the model's own best tokens for log-probabilities.

use serde::{Deserialize, Serialize};

use crate::noise::NoiseKey;

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

/// Repetition (HF), frequency and presence (OpenAI) penalties with the sequence's token counts:
/// `ids` ascending, each once, `output_counts[i]` the times `ids[i]` was generated (0: only in the
/// prompt). Sent only when a penalty is on, and only the tokens it touches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Penalties {
    pub repetition: f32,
    pub frequency: f32,
    pub presence: f32,
    pub ids: Vec<u32>,
    pub output_counts: Vec<u32>,
    /// Tokens that may not be drawn (stop tokens before `min_tokens`): sampling logit -inf.
    #[serde(default)]
    pub banned: Vec<u32>,
}

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
}

impl SampleSpec {
    /// The noise key of the token sampled after `end_pos` positions (the sequence's next
    /// position), so a recomputed step draws the same noise.
    pub fn noise_key(&self, end_pos: usize) -> NoiseKey {
        NoiseKey::new(self.seed, end_pos)
    }

    pub fn check(&self, seq_id: u64) -> Result<(), SampleSpecError> {
        let needs_t = self.gumbel || self.scaled_log_sum_exp;
        if needs_t && !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(SampleSpecError::Temperature {
                seq_id,
                temperature: self.temperature,
            });
        }
        if let Some(p) = &self.penalties {
            p.check(seq_id)?;
        }
        Ok(())
    }
}

impl Penalties {
    fn check(&self, seq_id: u64) -> Result<(), SampleSpecError> {
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
        Ok(())
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
