//! Conversions between the contract's Rust types and the generated wire types.

use std::cmp::Ordering;
use std::fmt;
use std::ops::Range;

use crate::candidates::{candidate_order, SeqLogits};
use crate::compact::Compact;
use crate::error::WireError;
use crate::noise::GumbelPick;
use crate::pb;
use crate::plan::ShardSpec;
use crate::sampling::{Penalties, SampleSpec};
use crate::step::{SeqStep, StepBatch};
use crate::token_mask::{MaskEncoding, TokenMask};

fn span(r: &std::ops::Range<usize>) -> Option<pb::Span> {
    Some(pb::Span {
        start: r.start as u64,
        end: r.end as u64,
    })
}

fn range(s: Option<pb::Span>, field: &'static str) -> Result<std::ops::Range<usize>, WireError> {
    let s = s.ok_or(WireError::Missing(field))?;
    if s.start > s.end {
        return Err(WireError::Invalid(format!(
            "{field} {}..{} is reversed",
            s.start, s.end
        )));
    }
    Ok(s.start as usize..s.end as usize)
}

impl From<&ShardSpec> for pb::ShardSpec {
    fn from(s: &ShardSpec) -> Self {
        Self {
            stage: s.stage as u32,
            rank: s.rank as u32,
            tp: s.tp as u32,
            pp: s.pp as u32,
            layers: span(&s.layers),
            q_heads: span(&s.q_heads),
            kv_heads: span(&s.kv_heads),
            mlp_cols: span(&s.mlp_cols),
            vocab_rows: span(&s.vocab_rows),
        }
    }
}

impl TryFrom<pb::ShardSpec> for ShardSpec {
    type Error = WireError;
    fn try_from(s: pb::ShardSpec) -> Result<Self, WireError> {
        Ok(Self {
            stage: s.stage as usize,
            rank: s.rank as usize,
            tp: s.tp as usize,
            pp: s.pp as usize,
            layers: range(s.layers, "layers")?,
            q_heads: range(s.q_heads, "q_heads")?,
            kv_heads: range(s.kv_heads, "kv_heads")?,
            mlp_cols: range(s.mlp_cols, "mlp_cols")?,
            vocab_rows: range(s.vocab_rows, "vocab_rows")?,
        })
    }
}

impl From<&SeqStep> for pb::SeqStep {
    fn from(s: &SeqStep) -> Self {
        Self {
            seq_id: s.seq_id,
            tokens: s.tokens.clone(),
            start_pos: s.start_pos as u64,
            block_table: s.block_table.clone(),
            top_candidates: s.top_candidates,
            log_probs: s.log_probs,
            sampling: s.sampling.as_ref().map(pb::SampleSpec::from),
        }
    }
}

impl From<&SampleSpec> for pb::SampleSpec {
    fn from(s: &SampleSpec) -> Self {
        Self {
            temperature: s.temperature,
            seed: s.seed,
            gumbel: s.gumbel,
            scaled_log_sum_exp: s.scaled_log_sum_exp,
            top_logprobs: s.top_logprobs,
            penalties: s.penalties.as_ref().map(|p| pb::Penalties {
                repetition: p.repetition,
                frequency: p.frequency,
                presence: p.presence,
                ids: p.ids.clone(),
                output_counts: p.output_counts.clone(),
                banned: p.banned.clone(),
                bias_ids: p.bias_ids.clone(),
                bias: p.bias.clone(),
                allowed: p.allowed.as_ref().map(pb::TokenMask::from),
            }),
        }
    }
}

impl From<pb::SampleSpec> for SampleSpec {
    fn from(s: pb::SampleSpec) -> Self {
        Self {
            temperature: s.temperature,
            seed: s.seed,
            gumbel: s.gumbel,
            scaled_log_sum_exp: s.scaled_log_sum_exp,
            top_logprobs: s.top_logprobs,
            penalties: s.penalties.map(|p| Penalties {
                repetition: p.repetition,
                frequency: p.frequency,
                presence: p.presence,
                ids: p.ids,
                output_counts: p.output_counts,
                banned: p.banned,
                bias_ids: p.bias_ids,
                bias: p.bias,
                allowed: p.allowed.as_ref().map(TokenMask::from),
            }),
        }
    }
}

impl From<&TokenMask> for pb::TokenMask {
    fn from(m: &TokenMask) -> Self {
        let (first, len, encoding) = m.encode();
        let bits = match encoding {
            MaskEncoding::Runs(lengths) => pb::token_mask::Bits::Runs(pb::RunLengths { lengths }),
            MaskEncoding::Bitmap(bytes) => pb::token_mask::Bits::Bitmap(bytes),
        };
        Self {
            first,
            len,
            bits: Some(bits),
        }
    }
}

/// Never fails: a mask without bits, or bits short of its span, bans what they leave out.
impl From<&pb::TokenMask> for TokenMask {
    fn from(m: &pb::TokenMask) -> Self {
        let encoding = match &m.bits {
            Some(pb::token_mask::Bits::Runs(r)) => MaskEncoding::Runs(r.lengths.clone()),
            Some(pb::token_mask::Bits::Bitmap(b)) => MaskEncoding::Bitmap(b.clone()),
            None => MaskEncoding::Runs(Vec::new()),
        };
        TokenMask::decode(m.first, m.len, &encoding)
    }
}

impl From<pb::SeqStep> for SeqStep {
    fn from(s: pb::SeqStep) -> Self {
        Self {
            seq_id: s.seq_id,
            tokens: s.tokens,
            start_pos: s.start_pos as usize,
            block_table: s.block_table,
            top_candidates: s.top_candidates,
            log_probs: s.log_probs,
            sampling: s.sampling.map(SampleSpec::from),
        }
    }
}

impl StepBatch {
    /// The step as the workers of `session` receive it.
    pub fn to_wire(&self, step_id: u64, session: crate::Session) -> pb::StepRequest {
        pb::StepRequest {
            step_id,
            seqs: self.seqs.iter().map(pb::SeqStep::from).collect(),
            session: Some(session.into()),
        }
    }

    /// The step as one shard receives it: token masks cut to a last-stage rank's vocabulary
    /// rows (a grammar's mask over 262k tokens is up to 32 KiB; a rank needs only its slice)
    /// and left out for other stages, which sample nothing. Without masks every shard gets
    /// `to_wire`'s request.
    pub fn to_wire_for(
        &self,
        step_id: u64,
        session: crate::Session,
        shard: &ShardSpec,
    ) -> pb::StepRequest {
        let mut request = self.to_wire(step_id, session);
        let last_stage = shard.stage + 1 == shard.pp;
        let rows = shard.vocab_rows.start as u32..shard.vocab_rows.end as u32;
        for (wire, seq) in request.seqs.iter_mut().zip(&self.seqs) {
            let mask = seq
                .sampling
                .as_ref()
                .and_then(|s| s.penalties.as_ref())
                .and_then(|p| p.allowed.as_ref());
            let wire_penalties = wire.sampling.as_mut().and_then(|s| s.penalties.as_mut());
            if let (Some(mask), Some(p)) = (mask, wire_penalties) {
                p.allowed = last_stage.then(|| pb::TokenMask::from(&mask.slice(rows.clone())));
            }
        }
        request
    }

    /// Whether any sequence carries a token mask (then each shard gets its own request).
    pub fn has_token_masks(&self) -> bool {
        self.seqs.iter().any(|s| {
            s.sampling
                .as_ref()
                .and_then(|s| s.penalties.as_ref())
                .is_some_and(|p| p.allowed.is_some())
        })
    }

    pub fn from_wire(req: pb::StepRequest) -> Self {
        Self {
            seqs: req.seqs.into_iter().map(SeqStep::from).collect(),
        }
    }
}

impl pb::TensorData {
    pub fn dims(&self) -> Vec<usize> {
        self.shape.iter().map(|&d| d as usize).collect()
    }
}

/// The worker's answer as the last stage: one rank's `SeqLogits` per sequence of the step, for
/// its own vocabulary slice (`Full`: the slice's logits; `Top`: its best candidates, with global
/// ids, and the slice's log-sum-exp).
impl From<Vec<SeqLogits>> for pb::LastStageOutput {
    fn from(seqs: Vec<SeqLogits>) -> Self {
        Self {
            seqs: seqs.into_iter().map(pb::SeqOutput::from).collect(),
        }
    }
}

impl From<SeqLogits> for pb::SeqOutput {
    fn from(logits: SeqLogits) -> Self {
        match logits {
            SeqLogits::Full(values) => {
                let mut full = Vec::with_capacity(values.len() * 4);
                for v in &values {
                    full.extend_from_slice(&v.to_le_bytes());
                }
                Self {
                    full,
                    ..Self::default()
                }
            }
            SeqLogits::Top {
                candidates,
                log_sum_exp,
            } => {
                let (logits, ids) = candidates.into_iter().unzip();
                Self {
                    ids,
                    logits,
                    log_sum_exp,
                    ..Self::default()
                }
            }
            SeqLogits::Compact(c) => {
                // Raw logits only where penalties made them differ from the sampling logits.
                let penalized = c
                    .candidates
                    .iter()
                    .zip(&c.raw_logits)
                    .any(|(a, r)| a.0 != *r);
                let (logits, ids) = c.candidates.into_iter().unzip();
                let (raw_top_logits, raw_top_ids) = c.top_raw.into_iter().unzip();
                Self {
                    ids,
                    logits,
                    log_sum_exp: c.log_sum_exp,
                    full: Vec::new(),
                    raw_logits: if penalized { c.raw_logits } else { Vec::new() },
                    raw_top_ids,
                    raw_top_logits,
                    scaled_log_sum_exp: c.scaled_log_sum_exp,
                    gumbel: c.gumbel.map(|g| pb::GumbelPick {
                        id: g.token,
                        score: g.score,
                        logit: g.logit,
                    }),
                }
            }
        }
    }
}

impl pb::LastStageOutput {
    /// One rank's answer to `batch`, that rank holding `vocab_rows` of the vocabulary; checked
    /// against what each sequence asked for, so that the merge across ranks and the sampler
    /// only ever see what the step asked for: every logit of the slice (4 bytes per row), or
    /// exactly `min(top_candidates, rows)` candidates inside the slice, in candidate order.
    /// The log-sum-exp is NaN where the step did not ask for log-probabilities.
    pub fn into_logits(
        self,
        batch: &StepBatch,
        vocab_rows: &Range<usize>,
    ) -> Result<Vec<SeqLogits>, WireError> {
        if self.seqs.len() != batch.seqs.len() {
            return Err(WireError::SequenceCount {
                sent: self.seqs.len(),
                expected: batch.seqs.len(),
            });
        }
        self.seqs
            .into_iter()
            .zip(&batch.seqs)
            .map(
                |(out, asked)| match (&asked.sampling, asked.top_candidates) {
                    (Some(spec), n) => out.decode_compact(asked, spec, n, vocab_rows),
                    (None, 0) => out.decode_full(asked.seq_id, vocab_rows),
                    (None, n) => out.decode_top(asked, n, vocab_rows),
                },
            )
            .collect()
    }
}

impl pb::SeqOutput {
    fn decode_full(self, seq_id: u64, rows: &Range<usize>) -> Result<SeqLogits, WireError> {
        if !self.ids.is_empty() || !self.logits.is_empty() {
            return Err(WireError::CandidatesForFull {
                seq_id,
                candidates: self.ids.len().max(self.logits.len()),
            });
        }
        let expected = rows.len() * 4;
        if self.full.len() != expected {
            return Err(WireError::FullLength {
                seq_id,
                bytes: self.full.len(),
                rows: rows.clone(),
                expected,
            });
        }
        let values = self
            .full
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(SeqLogits::Full(values))
    }

    /// Candidates as `decode_top` checks them (possibly none), then the compact fields the spec
    /// asked for, each checked against the slice.
    fn decode_compact(
        self,
        asked: &SeqStep,
        spec: &SampleSpec,
        n: u32,
        rows: &Range<usize>,
    ) -> Result<SeqLogits, WireError> {
        let seq_id = asked.seq_id;
        let bad = |what: String| WireError::Compact { seq_id, what };
        let raw_logits = self.raw_logits;
        let (raw_top_ids, raw_top_logits) = (self.raw_top_ids, self.raw_top_logits);
        let scaled_log_sum_exp = self.scaled_log_sum_exp;
        let gumbel = self.gumbel;
        let log_sum_exp = self.log_sum_exp;
        let head = pb::SeqOutput {
            ids: self.ids,
            logits: self.logits,
            log_sum_exp: self.log_sum_exp,
            full: self.full,
            ..Self::default()
        };
        let candidates = match n {
            0 if head.ids.is_empty() && head.logits.is_empty() && head.full.is_empty() => {
                Vec::new()
            }
            0 => return Err(bad("candidates sent, but none were asked".into())),
            n => match head.decode_top(asked, n, rows)? {
                SeqLogits::Top { candidates, .. } => candidates,
                _ => Vec::new(),
            },
        };
        let raw_logits = match raw_logits.len() {
            0 => candidates.iter().map(|c| c.0).collect(),
            len if len == candidates.len() && spec.penalties.is_some() => raw_logits,
            len => {
                return Err(bad(format!(
                    "{len} raw logits for {} candidates (only with penalties, one each)",
                    candidates.len()
                )))
            }
        };
        let top_raw = decode_raw_top(raw_top_ids, raw_top_logits, spec, rows).map_err(bad)?;
        let gumbel = match (spec.gumbel, gumbel) {
            (false, None) => None,
            (true, Some(g)) if rows.contains(&(g.id as usize)) => Some(GumbelPick {
                token: g.id,
                score: g.score,
                logit: g.logit,
            }),
            (true, None) if rows.is_empty() => None,
            (asked, sent) => {
                return Err(bad(format!(
                    "Gumbel winner asked: {asked}, sent: {:?} (must be inside rows {rows:?})",
                    sent.map(|g| g.id)
                )))
            }
        };
        Ok(SeqLogits::Compact(Compact {
            complete: n as usize >= rows.len(),
            candidates,
            raw_logits,
            top_raw,
            log_sum_exp: match asked.log_probs {
                true => log_sum_exp,
                false => f32::NAN,
            },
            scaled_log_sum_exp: match spec.scaled_log_sum_exp {
                true => scaled_log_sum_exp,
                false => f64::NAN,
            },
            gumbel,
        }))
    }

    fn decode_top(
        self,
        asked: &SeqStep,
        n: u32,
        rows: &Range<usize>,
    ) -> Result<SeqLogits, WireError> {
        let seq_id = asked.seq_id;
        if !self.full.is_empty() {
            return Err(WireError::FullForTop { seq_id, asked: n });
        }
        if self.ids.len() != self.logits.len() {
            return Err(WireError::CandidateLengths {
                seq_id,
                ids: self.ids.len(),
                logits: self.logits.len(),
            });
        }
        // Each rank's n best: fewer would lose some of the global n best in the merge.
        let expected = (n as usize).min(rows.len());
        if self.ids.len() != expected {
            return Err(WireError::CandidateCount {
                seq_id,
                sent: self.ids.len(),
                asked: n,
                rows: rows.clone(),
                expected,
            });
        }
        if let Some(&id) = self.ids.iter().find(|&&id| !rows.contains(&(id as usize))) {
            return Err(WireError::CandidateOutsideSlice {
                seq_id,
                id,
                rows: rows.clone(),
            });
        }
        let candidates: Vec<(f32, u32)> = self.logits.into_iter().zip(self.ids).collect();
        if let Some(at) = candidates
            .windows(2)
            .position(|w| candidate_order(&w[0], &w[1]) != Ordering::Less)
        {
            return Err(WireError::CandidatesOutOfOrder { seq_id, at });
        }
        Ok(SeqLogits::Top {
            candidates,
            log_sum_exp: match asked.log_probs {
                true => self.log_sum_exp,
                false => f32::NAN,
            },
        })
    }
}

/// The best raw logits a rank sends with penalties: exactly min(top_logprobs, rows), inside the
/// slice, in candidate order; none without penalties.
fn decode_raw_top(
    ids: Vec<u32>,
    logits: Vec<f32>,
    spec: &SampleSpec,
    rows: &Range<usize>,
) -> Result<Vec<(f32, u32)>, String> {
    let expected = match spec.penalties {
        Some(_) => (spec.top_logprobs as usize).min(rows.len()),
        None => 0,
    };
    if ids.len() != expected || logits.len() != expected {
        return Err(format!(
            "{} raw top ids and {} logits; {expected} expected",
            ids.len(),
            logits.len()
        ));
    }
    if let Some(id) = ids.iter().find(|&&id| !rows.contains(&(id as usize))) {
        return Err(format!("raw top id {id} outside rows {rows:?}"));
    }
    let top: Vec<(f32, u32)> = logits.into_iter().zip(ids).collect();
    if top
        .windows(2)
        .any(|w| candidate_order(&w[0], &w[1]) != Ordering::Less)
    {
        return Err("raw top candidates out of order".into());
    }
    Ok(top)
}

/// Worker states by name, for messages (`loading`, not `2`).
impl fmt::Display for pb::WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.as_str_name().trim_start_matches("WORKER_STATE_");
        f.write_str(&name.to_ascii_lowercase())
    }
}
