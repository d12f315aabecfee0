//! Per-request sampling: logit bias and penalties, then greedy or temperature / top-k / top-p /
//! min-p. A request's randomness is keyed by its own seed and the sampled position, so it never
//! depends on the cluster's shape or on other requests.
//!
//! The definitions, as vLLM applies them: OpenAI's logit_bias added to the model's logits, then
//! HF's repetition penalty over prompt and output tokens, then OpenAI's frequency and presence
//! penalties over output tokens only, then the bans (a bias of -100, which OpenAI says "should
//! result in a ban", and stop tokens before min_tokens: never drawn, where vLLM would only add
//! -100); then HF's warpers in HF's order, each on what the one before kept: temperature, top-k,
//! top-p (the smallest set of most likely tokens holding at least p), min-p (at least min_p times
//! the most likely token's probability). Log-probabilities are the raw model's, before bias,
//! penalties and temperature (vLLM's default).
//!
//! Draws are Gumbel-max races: argmax of logit / T + G over the kept tokens, G keyed by (seed,
//! position, token) (`gemma_proto::noise`), so a draw is the same wherever it is computed: on the
//! coordinator over candidates or every logit, or on the last stage's ranks over their slices.
//! The sampler asks the last stage (`ask`) for what its parameters need, never the vocabulary:
//! the race's winner for plain temperature sampling, candidates for top-k, candidates checked
//! for coverage for top-p / min-p (`Draw::Retry` asks again with more), bias and penalties
//! applied there (greedy included: a bias can move the argmax). `coordinator/tests/sampling_statistics.rs` holds the draws to these definitions.

use std::collections::BTreeMap;

pub use gemma_proto::candidates::argmax;
use gemma_proto::candidates::{candidate_order, log_sum_exp, top_candidates};
use gemma_proto::noise::{GumbelRace, NoiseKey};
use gemma_proto::sampling::MAX_LOGIT_BIAS;
use gemma_proto::{Compact, Penalties, SampleSpec, SeqLogits, TokenMask};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0: greedy.
    pub temperature: f32,
    /// 0: no limit.
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    /// HF-style, over prompt and output: >1 discourages repeats.
    pub repetition_penalty: f32,
    /// OpenAI-style, over the output: subtract per occurrence.
    pub frequency_penalty: f32,
    /// OpenAI-style, over the output: subtract once if present.
    pub presence_penalty: f32,
    pub seed: u64,
    /// OpenAI's logit_bias: (token, bias) by ascending id, each once, bias in [-100, 100]; added
    /// to the model's logit before the penalties; -100 bans the token.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// Largest candidate list the last stage is asked for; beyond it the full slice is cheaper.
pub const MAX_CANDIDATES: usize = 1024;

/// Candidates first asked for a top-p / min-p nucleus without top-k; then twice the last
/// nucleus, so a steady request asks once per token.
const FIRST_NUCLEUS_GUESS: usize = 64;

/// A sampled token with its log-probability under the model (log-softmax of the raw logits;
/// NaN when the request asked for none) and, when asked, the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
    /// (token, logprob), most likely first; `top_logprobs` of them.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// What one step's answer gave the sampler.
#[derive(Debug, Clone, PartialEq)]
pub enum Draw {
    Token(Sampled),
    /// The candidates did not cover the top-p / min-p nucleus: the step must be asked again
    /// (the sampler now asks for more); nothing was drawn or recorded.
    Retry,
}

/// Why no token could be sampled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SampleError {
    #[error(
        "no candidate tokens: the sequence's logits are empty; the last stage must send at least \
         one logit or candidate per sequence"
    )]
    NoCandidates,
    #[error(
        "the last stage's candidates did not cover the top-p / min-p nucleus; ask again with more"
    )]
    Uncovered,
    #[error(
        "every token is banned (logit_bias of -100, and stop tokens before min_tokens): nothing \
         left to draw"
    )]
    AllBanned,
}

/// Whether the candidates given to `pick` are the whole distribution its filters see (every
/// token, or at least the top-k), or only its start (then with the log-sum-exp of logit / T
/// over every token; NaN where only min-p needs it, which compares with the top token only).
#[derive(Debug, Clone, Copy)]
enum Coverage {
    Whole,
    Prefix { log_sum_exp: f64 },
}

/// What the sampler asks the last stage for, per step (`SeqStep`'s sampling fields).
#[derive(Debug, Clone, PartialEq)]
pub struct Ask {
    pub top_candidates: u32,
    pub log_probs: bool,
    pub sampling: Option<SampleSpec>,
}

/// How a request's tokens are chosen, fixed by its parameters (and, for a nucleus, by how many
/// candidates covered it so far).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Greedy,
    /// top-k within what the last stage sends (k <= MAX_CANDIDATES), then top-p / min-p.
    TopK(usize),
    /// Plain temperature: the Gumbel-max winner.
    Gumbel,
    /// top-p / min-p without top-k: candidates checked for coverage.
    Nucleus,
    /// Every logit (top-k beyond MAX_CANDIDATES, or a nucleus wider than it).
    Full,
}

pub struct Sampler {
    params: SamplingParams,
    /// Whether log-probabilities are reported at all.
    logprobs: bool,
    top_logprobs: usize,
    /// Tokens of the prompt and output so far: the position of the next token, which keys its
    /// noise.
    position: usize,
    /// Every token of prompt and output (repetition penalty) with its output count (frequency /
    /// presence penalties), by id.
    counts: BTreeMap<u32, u32>,
    mode: Mode,
    /// Candidates to ask for in `Mode::Nucleus`.
    nucleus_guess: usize,
    prompt_len: usize,
    /// Tokens not drawn while fewer than `min_tokens` were output (vLLM's min_tokens).
    banned: Vec<u32>,
    min_tokens: usize,
    /// Structured output: the tokens the sequence's grammar allows at the next draw (set by the
    /// engine after every token); every other token is banned.
    allowed: Option<TokenMask>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        Self {
            logprobs: false,
            ..Self::with_logprobs(params, prompt, 0)
        }
    }

    /// Whether the last stage must send log-sum-exps (only for log-probabilities).
    pub fn needs_log_sum_exp(&self) -> bool {
        self.logprobs
    }

    /// A sampler that also reports log-probabilities, with the `top_logprobs` most likely
    /// tokens at each step.
    pub fn with_logprobs(params: SamplingParams, prompt: &[u32], top_logprobs: usize) -> Self {
        let mode = match (params.is_greedy(), params.top_k) {
            (true, _) => Mode::Greedy,
            (false, k) if k > MAX_CANDIDATES => Mode::Full,
            (false, 0) if params.top_p >= 1.0 && params.min_p <= 0.0 => Mode::Gumbel,
            (false, 0) => Mode::Nucleus,
            (false, k) => Mode::TopK(k),
        };
        Self {
            logprobs: true,
            position: prompt.len(),
            counts: prompt.iter().map(|&t| (t, 0)).collect(),
            top_logprobs,
            params,
            mode,
            nucleus_guess: FIRST_NUCLEUS_GUESS,
            prompt_len: prompt.len(),
            banned: Vec::new(),
            min_tokens: 0,
            allowed: None,
        }
    }

    /// The same sampler, never drawing `stop_ids` before `min_tokens` tokens are out.
    pub fn with_min_tokens(mut self, min_tokens: usize, stop_ids: &[u32]) -> Self {
        self.min_tokens = min_tokens;
        self.banned = stop_ids.to_vec();
        self
    }

    /// Structured output: only `mask`'s tokens may be drawn next (until the next call).
    pub fn set_allowed(&mut self, mask: TokenMask) {
        self.allowed = Some(mask);
    }

    fn banning(&self) -> bool {
        !self.banned.is_empty() && self.position - self.prompt_len < self.min_tokens
    }

    /// Whether the sampling logits differ from the model's: a logit bias, penalties, stop
    /// tokens banned before min_tokens, or a grammar's mask.
    fn alters_logits(&self) -> bool {
        let p = &self.params;
        !p.logit_bias.is_empty()
            || p.repetition_penalty != 1.0
            || p.frequency_penalty != 0.0
            || p.presence_penalty != 0.0
            || self.banning()
            || self.allowed.is_some()
    }

    /// How many candidates the last stage sends per rank (0 with `Mode::Full`: every logit; or,
    /// in a compact ask, none).
    pub fn candidates_needed(&self) -> u32 {
        self.ask().top_candidates
    }

    /// What the next step must bring back for this sequence: never the vocabulary, except for
    /// top-k beyond [`MAX_CANDIDATES`] or a nucleus wider than it.
    pub fn ask(&self) -> Ask {
        let penalties = self.alters_logits();
        // Without penalties the best candidates are also the best for top_logprobs.
        let with_logprobs = |n: usize| match penalties {
            true => n,
            false => n.max(self.top_logprobs),
        };
        let (n, compact) = match self.mode {
            Mode::Full => (0, None),
            Mode::Greedy => (with_logprobs(1), penalties.then(|| self.spec(false, false))),
            Mode::TopK(k) => (with_logprobs(k), penalties.then(|| self.spec(false, false))),
            Mode::Gumbel => (with_logprobs(0), Some(self.spec(true, false))),
            Mode::Nucleus => (
                with_logprobs(self.nucleus_guess),
                Some(self.spec(false, self.params.top_p < 1.0)),
            ),
        };
        Ask {
            top_candidates: n.min(MAX_CANDIDATES.max(self.top_logprobs)) as u32,
            log_probs: self.logprobs,
            sampling: compact,
        }
    }

    fn spec(&self, gumbel: bool, scaled_log_sum_exp: bool) -> SampleSpec {
        SampleSpec {
            temperature: self.params.temperature,
            seed: self.params.seed,
            gumbel,
            scaled_log_sum_exp,
            top_logprobs: self.top_logprobs as u32,
            penalties: self.alters_logits().then(|| self.penalties()),
        }
    }

    /// The bias and penalties with the tokens they touch: every token seen for a repetition
    /// penalty, else only the generated ones; a bias of -100 is a ban.
    fn penalties(&self) -> Penalties {
        let p = &self.params;
        let all = p.repetition_penalty != 1.0;
        let (ids, output_counts) = self
            .counts
            .iter()
            .filter(|(_, &n)| all || n > 0)
            .map(|(&t, &n)| (t, n))
            .unzip();
        let is_ban = |b: &&(u32, f32)| b.1 <= -MAX_LOGIT_BIAS;
        let mut banned: Vec<u32> = p.logit_bias.iter().filter(is_ban).map(|b| b.0).collect();
        if self.banning() {
            banned.extend(&self.banned);
            banned.sort_unstable();
            banned.dedup();
        }
        let (bias_ids, bias) = p.logit_bias.iter().filter(|b| !is_ban(b)).copied().unzip();
        Penalties {
            repetition: p.repetition_penalty,
            frequency: p.frequency_penalty,
            presence: p.presence_penalty,
            ids,
            output_counts,
            banned,
            bias_ids,
            bias,
            allowed: self.allowed.clone(),
        }
    }

    /// Picks the next token and records it; a nucleus the candidates did not cover is
    /// [`SampleError::Uncovered`] (see [`draw`](Self::draw)).
    pub fn sample(&mut self, logits: SeqLogits) -> Result<Sampled, SampleError> {
        match self.draw(logits)? {
            Draw::Token(t) => Ok(t),
            Draw::Retry => Err(SampleError::Uncovered),
        }
    }

    /// Picks the next token and records it, or asks for the step again with more candidates.
    pub fn draw(&mut self, logits: SeqLogits) -> Result<Draw, SampleError> {
        let (candidates, log_sum_exp, top) = match logits {
            SeqLogits::Top {
                candidates,
                log_sum_exp,
            } => {
                let top = self.top_list(&candidates, log_sum_exp);
                (candidates, log_sum_exp, top)
            }
            SeqLogits::Full(row) => return self.sample_full(row).map(Draw::Token),
            SeqLogits::Compact(c) => return self.sample_compact(c),
        };
        let token = self
            .pick(&candidates, Coverage::Whole)?
            .ok_or(SampleError::Uncovered)?;
        let logprob = candidates
            .iter()
            .find(|c| c.1 == token)
            .map_or(f32::NEG_INFINITY, |c| c.0 - log_sum_exp);
        Ok(Draw::Token(self.record(token, logprob, top)))
    }

    /// Every logit: bias and penalties applied here, then the filters over the whole
    /// distribution.
    fn sample_full(&mut self, mut row: Vec<f32>) -> Result<Sampled, SampleError> {
        let lse = if self.logprobs {
            log_sum_exp(&row)
        } else {
            f32::NAN
        };
        let raw_top = if self.top_logprobs > 0 {
            self.top_list(&top_candidates(&row, self.top_logprobs, 0), lse)
        } else {
            Vec::new()
        };
        let raw = row.clone();
        self.apply_penalties(&mut row);
        let k = if self.params.is_greedy() {
            1
        } else {
            self.params.top_k
        };
        let cands = if k > 0 {
            top_candidates(&row, k, 0)
        } else {
            let mut all: Vec<(f32, u32)> = row
                .iter()
                .enumerate()
                .map(|(i, &l)| (l, i as u32))
                .collect();
            all.sort_unstable_by(candidate_order);
            all
        };
        // Log-probabilities are the model's: of the raw logits, before bias and penalties.
        let token = self
            .pick(&cands, Coverage::Whole)?
            .ok_or(SampleError::Uncovered)?;
        let logprob = raw
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |l| l - lse);
        Ok(self.record(token, logprob, raw_top))
    }

    /// The last stage's compact answer (bias and penalties already applied there).
    fn sample_compact(&mut self, c: Compact) -> Result<Draw, SampleError> {
        let lse = c.log_sum_exp;
        let top = match self.alters_logits() {
            true => self.top_list(&c.top_raw, lse),
            false => self.top_list(&c.candidates, lse),
        };
        let raw_of = |token: u32| {
            c.candidates
                .iter()
                .position(|x| x.1 == token)
                .map_or(f32::NEG_INFINITY, |i| c.raw_logits[i] - lse)
        };
        let (token, logprob) = match self.mode {
            Mode::Gumbel => {
                let g = c.gumbel.ok_or(SampleError::NoCandidates)?;
                // Only a banned token scores -inf, and it won only if every token is banned.
                if g.score == f64::NEG_INFINITY {
                    return Err(SampleError::AllBanned);
                }
                (g.token, g.logit - lse)
            }
            Mode::Nucleus => {
                let coverage = match c.complete {
                    true => Coverage::Whole,
                    false => Coverage::Prefix {
                        log_sum_exp: c.scaled_log_sum_exp,
                    },
                };
                match self.pick(&c.candidates, coverage)? {
                    Some(token) => {
                        self.learn_nucleus(&c.candidates, token);
                        (token, raw_of(token))
                    }
                    None => {
                        self.widen_nucleus();
                        return Ok(Draw::Retry);
                    }
                }
            }
            Mode::Greedy | Mode::TopK(_) | Mode::Full => {
                let token = self
                    .pick(&c.candidates, Coverage::Whole)?
                    .ok_or(SampleError::Uncovered)?;
                (token, raw_of(token))
            }
        };
        Ok(Draw::Token(self.record(token, logprob, top)))
    }

    /// After a nucleus was covered: ask for twice the rank of the token drawn next time (at
    /// least the first guess), so the guess follows the request's distribution.
    fn learn_nucleus(&mut self, candidates: &[(f32, u32)], token: u32) {
        let at = candidates.iter().position(|c| c.1 == token).unwrap_or(0);
        self.nucleus_guess = ((at + 1) * 2)
            .next_power_of_two()
            .clamp(FIRST_NUCLEUS_GUESS, MAX_CANDIDATES)
            .max(self.nucleus_guess / 2);
    }

    /// The candidates did not cover the nucleus: eight times as many, then every logit.
    fn widen_nucleus(&mut self) {
        if self.nucleus_guess >= MAX_CANDIDATES {
            self.mode = Mode::Full;
        } else {
            self.nucleus_guess = (self.nucleus_guess * 8).min(MAX_CANDIDATES);
        }
    }

    fn top_list(&self, candidates: &[(f32, u32)], lse: f32) -> Vec<(u32, f32)> {
        candidates
            .iter()
            .take(self.top_logprobs)
            .map(|&(l, t)| (t, l - lse))
            .collect()
    }

    /// The position of the token the next draw samples (prompt + output so far): with the seed,
    /// the key of its noise, here and on the last stage (`SeqStep::end_pos` of its step).
    pub fn next_position(&self) -> usize {
        self.position
    }

    fn record(&mut self, token: u32, logprob: f32, top_logprobs: Vec<(u32, f32)>) -> Sampled {
        *self.counts.entry(token).or_default() += 1;
        self.position += 1;
        Sampled {
            token,
            logprob,
            top_logprobs,
        }
    }

    /// The sampling logits of every token: what the last stage does to its slice.
    fn apply_penalties(&self, logits: &mut [f32]) {
        if self.alters_logits() {
            self.penalties().apply_to_rows(logits, 0, 1, 0);
        }
    }

    /// Greedy, or a draw from `cands` (sorted by [`candidate_order`]) at the request's
    /// temperature after top-k, top-p and min-p. With `Coverage::Prefix`, Ok(None) says the
    /// candidates end before the nucleus does, so nothing is drawn.
    fn pick(
        &mut self,
        cands: &[(f32, u32)],
        coverage: Coverage,
    ) -> Result<Option<u32>, SampleError> {
        let Some(&(max, first)) = cands.first() else {
            return Err(SampleError::NoCandidates);
        };
        // The best candidate is banned only if every token is.
        if max == f32::NEG_INFINITY {
            return Err(SampleError::AllBanned);
        }
        let p = &self.params;
        if p.is_greedy() {
            return Ok(Some(first));
        }
        let cands = match p.top_k {
            0 => cands,
            k => &cands[..k.min(cands.len())],
        };
        // Softmax in f64 at this temperature, over the candidates or over every token.
        let t = f64::from(p.temperature);
        let mut probs: Vec<f64> = cands
            .iter()
            .map(|&(l, _)| ((f64::from(l) - f64::from(max)) / t).exp())
            .collect();
        let sum: f64 = match coverage {
            Coverage::Prefix { log_sum_exp } if log_sum_exp.is_finite() => {
                (log_sum_exp - f64::from(max) / t).exp()
            }
            // min-p alone needs no normalizer: it compares with the most likely token.
            _ => probs.iter().sum(),
        };
        probs.iter_mut().for_each(|q| *q /= sum);
        // Where each filter ends the nucleus, if that is among the candidates.
        let mut cuts = Vec::with_capacity(2);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let holding_p = probs.iter().position(|q| {
                acc += q;
                acc >= f64::from(p.top_p)
            });
            cuts.extend(holding_p.map(|i| i + 1));
        }
        if p.min_p > 0.0 {
            let floor = f64::from(p.min_p) * probs[0];
            cuts.extend(probs.iter().position(|&q| q < floor));
        }
        // The nucleus ends at the earliest cut found; with no cut among them, at the end of
        // the candidates if they are the whole distribution, and beyond them otherwise.
        let keep = match (cuts.iter().min(), coverage) {
            (Some(&cut), _) => cut.max(1),
            (None, Coverage::Whole) => probs.len(),
            (None, Coverage::Prefix { .. }) => return Ok(None),
        };
        // The Gumbel-max race over the nucleus, with the noise the last stage would use: the
        // same draw whoever computes it, and robust to the rounding by which plans differ.
        let key = NoiseKey::new(p.seed, self.next_position());
        let mut race = GumbelRace::new(key, p.temperature);
        for &(l, t) in &cands[..keep] {
            race.offer(t, l, l);
        }
        Ok(race.winner().map(|w| w.token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemma_proto::SplitMix64;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: 7,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_largest_after_penalties() {
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                ..params(0.0)
            },
            &[1],
        );
        // Token 1 was in the prompt: 3.0 / 2 = 1.5 < 2.0.
        assert_eq!(
            s.sample(SeqLogits::Full(vec![0.0, 3.0, 2.0]))
                .expect("sampled")
                .token,
            2
        );
    }

    #[test]
    fn same_seed_same_draws_and_filters_hold() {
        // 37 is coprime with 1000: a permutation, so no two logits tie.
        let logits: Vec<f32> = (0..1000)
            .map(|i| ((i * 37) % 1000) as f32 / 100.0)
            .collect();
        let run = |p: SamplingParams| {
            let mut s = Sampler::new(p, &[]);
            (0..50)
                .map(|_| {
                    s.sample(SeqLogits::Full(logits.clone()))
                        .expect("sampled")
                        .token
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(params(0.8)), run(params(0.8)));
        let top2 = run(SamplingParams {
            top_k: 2,
            ..params(5.0)
        });
        let mut best: Vec<u32> = (0..1000u32).collect();
        best.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        assert!(top2.iter().all(|t| best[..2].contains(t)), "{top2:?}");
        // min_p = 1 keeps only the most likely token.
        let only = run(SamplingParams {
            min_p: 1.0,
            ..params(1.0)
        });
        assert!(only.iter().all(|&t| t == best[0]));
        // A tiny top_p keeps only the most likely token.
        let nucleus = run(SamplingParams {
            top_p: 1e-9,
            ..params(1.0)
        });
        assert!(nucleus.iter().all(|&t| t == best[0]));
    }

    /// What the last stage sends (per-rank top candidates and log-sum-exp, merged) samples
    /// exactly as every logit does, log-probabilities included.
    #[test]
    fn candidates_sample_exactly_like_full_logits() {
        use gemma_proto::candidates::{combine_log_sum_exp, merge_candidates};
        let mut rng = SplitMix64::new(99);
        for (k, temperature, top_p, min_p) in [
            (1, 0.0, 1.0, 0.0),
            (40, 0.8, 0.9, 0.0),
            (64, 1.3, 1.0, 0.05),
            (5, 1.0, 0.5, 0.0),
        ] {
            let p = SamplingParams {
                temperature,
                top_k: k,
                top_p,
                min_p,
                seed: 5,
                ..SamplingParams::default()
            };
            let mut full = Sampler::with_logprobs(p.clone(), &[], 5);
            let mut top = Sampler::with_logprobs(p, &[], 5);
            let n = top.candidates_needed() as usize;
            assert_eq!(n, k.max(5));
            for _ in 0..30 {
                let logits: Vec<f32> = (0..3000)
                    .map(|_| (rng.next_f64() * 12.0 - 6.0) as f32)
                    .collect();
                let slices = [&logits[..1000], &logits[1000..2000], &logits[2000..]];
                let ranks: Vec<_> = slices
                    .iter()
                    .enumerate()
                    .map(|(r, s)| top_candidates(s, n, 1000 * r as u32))
                    .collect();
                let lses: Vec<f32> = slices.iter().map(|s| log_sum_exp(s)).collect();
                let a = full
                    .sample(SeqLogits::Full(logits.clone()))
                    .expect("sampled");
                let b = top
                    .sample(SeqLogits::Top {
                        candidates: merge_candidates(&ranks, n),
                        log_sum_exp: combine_log_sum_exp(&lses),
                    })
                    .expect("sampled");
                assert_eq!(a.token, b.token);
                assert!((a.logprob - b.logprob).abs() < 1e-4);
                assert_eq!(a.top_logprobs.len(), 5);
                for (x, y) in a.top_logprobs.iter().zip(&b.top_logprobs) {
                    assert_eq!(x.0, y.0);
                    assert!((x.1 - y.1).abs() < 1e-4);
                }
            }
        }
        // Penalties are applied by the last stage; an unlimited top-k races Gumbel noise there.
        let penalized = Sampler::new(
            SamplingParams {
                repetition_penalty: 1.1,
                ..params(0.0)
            },
            &[3, 9],
        )
        .ask();
        assert_eq!(penalized.top_candidates, 1);
        let spec = penalized.sampling.expect("a compact ask");
        assert_eq!(spec.penalties.expect("penalties").ids, [3, 9]);
        let plain = Sampler::new(params(0.7), &[]).ask();
        assert_eq!(plain.top_candidates, 0);
        assert!(plain.sampling.expect("a compact ask").gumbel);
    }

    /// A last stage of `ranks` equal slices answering `ask` for `logits` at `end_pos`, joined.
    fn last_stage(logits: &[f32], ranks: usize, ask: &Ask, end_pos: usize) -> SeqLogits {
        use gemma_proto::candidates::join_ranks;
        use gemma_proto::{SeqStep, StepBatch};
        let seq = SeqStep {
            seq_id: 1,
            tokens: vec![0],
            start_pos: end_pos - 1,
            block_table: Vec::new(),
            top_candidates: ask.top_candidates,
            log_probs: ask.log_probs,
            sampling: ask.sampling.clone(),
        };
        let width = logits.len().div_ceil(ranks);
        let answers = logits
            .chunks(width)
            .enumerate()
            .map(|(r, slice)| {
                let first = (r * width) as u32;
                let answer = match &seq.sampling {
                    Some(_) => SeqLogits::Compact(
                        Compact::of_slice(slice, first, &seq).expect("a compact ask"),
                    ),
                    None if seq.top_candidates == 0 => SeqLogits::Full(slice.to_vec()),
                    None => SeqLogits::Top {
                        candidates: top_candidates(slice, seq.top_candidates as usize, first),
                        log_sum_exp: log_sum_exp(slice),
                    },
                };
                vec![answer]
            })
            .collect();
        let batch = StepBatch { seqs: vec![seq] };
        join_ranks(answers, &batch)
            .expect("joined")
            .pop()
            .expect("one sequence")
    }

    /// Asks until the sampler has a token (a nucleus may need more candidates), as the engine
    /// does; returns the token and how many steps it took.
    fn draw_compact(s: &mut Sampler, logits: &[f32], ranks: usize) -> (Sampled, usize) {
        for steps in 1..=4 {
            let answer = last_stage(logits, ranks, &s.ask(), s.next_position());
            match s.draw(answer).expect("drawn") {
                Draw::Token(t) => return (t, steps),
                Draw::Retry => continue,
            }
        }
        panic!("no token after 4 asks");
    }

    /// Penalties on the last stage, and a nucleus that needs more candidates than first asked,
    /// sample exactly as every logit on the coordinator does (same stream, same tokens), with
    /// the model's log-probabilities.
    #[test]
    fn compact_answers_sample_exactly_like_full_logits() {
        let mut rng = SplitMix64::new(3);
        let cases = [
            (0.0, 0, 1.0, 0.0, 1.3, 0.4, 0.2),
            (0.9, 40, 0.9, 0.0, 1.2, 0.0, 0.5),
            (1.0, 0, 0.97, 0.0, 1.0, 0.0, 0.0),
            (1.4, 0, 1.0, 0.002, 1.0, 0.3, 0.0),
            (0.8, 0, 0.9, 0.01, 1.5, 0.1, 0.1),
            (0.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0),
            (1.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0),
        ];
        // On every rank's slice (1000 tokens each), on a prompt token, a ban, a big lift.
        let bias = [
            (5, 2.0),
            (17, -100.0),
            (1500, 3.0),
            (2500, 1.0),
            (2999, -1.5),
        ];
        let mut retried = false;
        let cases = cases
            .into_iter()
            .flat_map(|c| [(c, Vec::new()), (c, bias.to_vec())]);
        for ((temperature, top_k, top_p, min_p, repetition, frequency, presence), bias) in cases {
            let p = SamplingParams {
                temperature,
                top_k,
                top_p,
                min_p,
                repetition_penalty: repetition,
                frequency_penalty: frequency,
                presence_penalty: presence,
                seed: 11,
                logit_bias: bias,
            };
            let prompt = [5, 17, 5, 2999];
            let mut full = Sampler::with_logprobs(p.clone(), &prompt, 3);
            let mut compact = Sampler::with_logprobs(p, &prompt, 3);
            for _ in 0..30 {
                // Flat enough that a top-p of 0.97 spans hundreds of tokens.
                let logits: Vec<f32> = (0..3000)
                    .map(|_| (rng.next_f64() * 3.0 - 1.5) as f32)
                    .collect();
                let a = full
                    .sample(SeqLogits::Full(logits.clone()))
                    .expect("sampled");
                let (b, steps) = draw_compact(&mut compact, &logits, 3);
                retried |= steps > 1;
                assert_eq!(a.token, b.token, "{temperature} {top_k} {top_p} {min_p}");
                assert_ne!(a.token, 17, "banned by a bias of -100");
                assert!((a.logprob - b.logprob).abs() < 1e-4, "{a:?} {b:?}");
                assert_eq!(a.top_logprobs.len(), b.top_logprobs.len());
                for (x, y) in a.top_logprobs.iter().zip(&b.top_logprobs) {
                    assert_eq!(x.0, y.0);
                    assert!((x.1 - y.1).abs() < 1e-4);
                }
            }
        }
        assert!(
            retried,
            "some nucleus needed more candidates than first asked"
        );
    }

    /// Plain temperature sampling draws the same tokens from one slice as from three: the noise
    /// belongs to (seed, position, token), not to a rank.
    #[test]
    fn gumbel_draws_do_not_depend_on_the_split() {
        let mut rng = SplitMix64::new(8);
        let p = SamplingParams {
            repetition_penalty: 1.2,
            ..params(0.9)
        };
        let mut one = Sampler::with_logprobs(p.clone(), &[4], 2);
        let mut three = Sampler::with_logprobs(p, &[4], 2);
        for _ in 0..50 {
            let logits: Vec<f32> = (0..1000)
                .map(|_| (rng.next_f64() * 8.0 - 4.0) as f32)
                .collect();
            let (a, _) = draw_compact(&mut one, &logits, 1);
            let (b, _) = draw_compact(&mut three, &logits, 3);
            // The same token; log-probabilities up to the rounding of joining log-sum-exps.
            assert_eq!(a.token, b.token);
            assert!((a.logprob - b.logprob).abs() < 1e-5);
        }
    }

    /// A sampler for `prompt` that has already output `generated` (recorded through one-candidate
    /// answers, which every parameter set samples as that candidate).
    fn after(params: SamplingParams, prompt: &[u32], generated: &[u32]) -> Sampler {
        let mut s = Sampler::new(params, prompt);
        for &t in generated {
            let only = SeqLogits::Top {
                candidates: vec![(0.0, t)],
                log_sum_exp: 0.0,
            };
            assert_eq!(s.sample(only).expect("sampled").token, t);
        }
        s
    }

    /// The logits every penalty test starts from: positive, negative and zero values.
    const RAW: [f32; 7] = [3.0, -1.5, 0.5, 2.0, -0.25, 1.0, 0.0];
    /// Token 0 and 3 are in the prompt only; 2 is output three times, 4, 5 and 6 once.
    const PROMPT: [u32; 3] = [0, 3, 0];
    const GENERATED: [u32; 6] = [2, 2, 4, 2, 5, 6];

    fn penalized(params: SamplingParams) -> Vec<f32> {
        let s = after(params, &PROMPT, &GENERATED);
        let mut logits = RAW.to_vec();
        s.apply_penalties(&mut logits);
        logits
    }

    fn assert_logits(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                g == w || (g - w).abs() < 1e-6,
                "token {i}: {g} != {w} ({got:?})"
            );
        }
    }

    /// OpenAI: logit[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty, c[j] the
    /// times j was sampled before (vLLM: output tokens only). Prompt tokens are not counted.
    #[test]
    fn frequency_and_presence_penalties_follow_openai() {
        let got = penalized(SamplingParams {
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..params(0.0)
        });
        // 2: 0.5 - 3 * 0.5 - 0.25; 4: -0.25 - 0.5 - 0.25; 5: 1.0 - 0.75; 6: 0.0 - 0.75.
        assert_logits(&got, &[3.0, -1.5, -1.25, 2.0, -1.0, 0.25, -0.75]);

        let presence_only = penalized(SamplingParams {
            presence_penalty: 1.5,
            ..params(0.0)
        });
        // Once per token, however often: 2: 0.5 - 1.5; 4: -0.25 - 1.5; 5: 1.0 - 1.5.
        assert_logits(&presence_only, &[3.0, -1.5, -1.0, 2.0, -1.75, -0.5, -1.5]);

        // Negative values (allowed down to -2) encourage repeats: 2: 0.5 + 3 * 0.5 + 1.
        let negative = penalized(SamplingParams {
            frequency_penalty: -0.5,
            presence_penalty: -1.0,
            ..params(0.0)
        });
        assert_logits(&negative, &[3.0, -1.5, 3.0, 2.0, 1.25, 2.5, 1.5]);
    }

    /// HF (CTRL): every token of prompt and output, once however often it occurs: a positive
    /// logit is divided by the penalty, a negative one multiplied (0 stays 0).
    #[test]
    fn repetition_penalty_follows_hf() {
        let got = penalized(SamplingParams {
            repetition_penalty: 2.0,
            ..params(0.0)
        });
        // 0: 3 / 2 (prompt); 2: 0.5 / 2 (three times, divided once); 3: 2 / 2 (prompt);
        // 4: -0.25 * 2; 5: 1 / 2; 6: 0 stays 0; 1 never seen.
        assert_logits(&got, &[1.5, -1.5, 0.25, 1.0, -0.5, 0.5, 0.0]);

        // Below 1 it favours seen tokens: 0: 3 / 0.5; 4: -0.25 * 0.5.
        let favour = penalized(SamplingParams {
            repetition_penalty: 0.5,
            ..params(0.0)
        });
        assert_logits(&favour, &[6.0, -1.5, 1.0, 4.0, -0.125, 2.0, 0.0]);
    }

    /// vLLM's order: the repetition penalty first, then frequency and presence.
    #[test]
    fn all_penalties_apply_repetition_first() {
        let got = penalized(SamplingParams {
            repetition_penalty: 1.25,
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..params(0.0)
        });
        // 0: 3 / 1.25; 2: 0.5 / 1.25 - 1.5 - 0.25; 3: 2 / 1.25; 4: -0.25 * 1.25 - 0.75;
        // 5: 1 / 1.25 - 0.75; 6: 0 - 0.75. (Frequency first would give 5: (1 - 0.75) / 1.25 = 0.2.)
        assert_logits(&got, &[2.4, -1.5, -1.35, 1.6, -1.0625, 0.05, -0.75]);
    }

    /// vLLM's order: the bias is added to the model's logit before any penalty (token 0: 3 + 1
    /// = 4, then / 2; token 4: -0.25 + 0.5 = 0.25, then / 2 as a positive logit - 0.5), and a
    /// bias of -100 bans the token.
    #[test]
    fn logit_bias_comes_before_the_penalties() {
        let got = penalized(SamplingParams {
            repetition_penalty: 2.0,
            frequency_penalty: 0.5,
            logit_bias: vec![(0, 1.0), (1, 2.5), (4, 0.5), (6, -100.0)],
            ..params(0.0)
        });
        assert_logits(
            &got,
            &[
                2.0,
                1.0,
                0.25 - 1.5,
                1.0,
                -0.375,
                0.5 - 0.5,
                f32::NEG_INFINITY,
            ],
        );
    }

    /// +100 on an unlikely token makes greedy take it (the ask carries the bias even with no
    /// penalty on); -100 keeps a likely token from ever being drawn at temperature 1; one rank
    /// or three, the same tokens.
    #[test]
    fn a_bias_of_100_wins_greedy_and_minus_100_is_never_drawn() {
        let mut rng = SplitMix64::new(21);
        let logits: Vec<f32> = (0..3000)
            .map(|_| (rng.next_f64() * 6.0 - 3.0) as f32)
            .collect();
        let best = argmax(&logits);
        let lifted = || {
            let p = SamplingParams {
                logit_bias: vec![(2222, 100.0)],
                ..params(0.0)
            };
            Sampler::with_logprobs(p, &[4], 0)
        };
        let spec = lifted()
            .ask()
            .sampling
            .expect("greedy asks the last stage for the bias");
        assert_eq!(spec.penalties.expect("bias").bias_ids, [2222]);
        let lse = log_sum_exp(&logits);
        for ranks in [1, 3] {
            let (t, _) = draw_compact(&mut lifted(), &logits, ranks);
            assert_eq!(t.token, 2222);
            // Its log-probability is the model's, not the biased one.
            assert!((t.logprob - (logits[2222] - lse)).abs() < 1e-5, "{t:?}");
        }
        let mut peaked = logits.clone();
        peaked[best as usize] = 10.0;
        let banned = SamplingParams {
            logit_bias: vec![(best, -100.0)],
            ..params(1.0)
        };
        let mut one = Sampler::new(banned.clone(), &[4]);
        let mut three = Sampler::new(banned.clone(), &[4]);
        let mut unbanned = Sampler::new(params(1.0), &[4]);
        let mut drawn_unbanned = 0;
        for _ in 0..500 {
            let (a, _) = draw_compact(&mut one, &peaked, 1);
            let (b, _) = draw_compact(&mut three, &peaked, 3);
            assert_eq!(a.token, b.token);
            assert_ne!(a.token, best);
            let (c, _) = draw_compact(&mut unbanned, &peaked, 3);
            drawn_unbanned += usize::from(c.token == best);
        }
        assert!(drawn_unbanned > 100, "the token is likely without its ban");
    }

    #[test]
    fn a_sequence_whose_every_token_is_banned_fails_instead_of_drawing_one() {
        let bias: Vec<(u32, f32)> = (0..4).map(|t| (t, -100.0)).collect();
        for p in [params(0.0), params(1.0), params(0.7)] {
            let mut s = Sampler::new(
                SamplingParams {
                    logit_bias: bias.clone(),
                    ..p.clone()
                },
                &[4],
            );
            let ask = s.ask();
            let answer = last_stage(&[1.0, 2.0, 3.0, 4.0], 2, &ask, s.next_position());
            assert_eq!(s.draw(answer), Err(SampleError::AllBanned), "{p:?}");
        }
    }

    /// What is sampled is the penalized logits; what is reported is the model's.
    #[test]
    fn greedy_takes_the_penalized_largest_and_reports_the_raw_logprob() {
        let p = SamplingParams {
            repetition_penalty: 1.6,
            presence_penalty: 2.0,
            ..params(0.0)
        };
        let mut s = Sampler::with_logprobs(p, &PROMPT, 0);
        let only = SeqLogits::Top {
            candidates: vec![(0.0, 0)],
            log_sum_exp: 0.0,
        };
        assert_eq!(s.sample(only).expect("sampled").token, 0);
        // Token 0 (prompt, output once): 3 / 1.6 - 2 = -0.125; token 3 (prompt): 2 / 1.6 = 1.25;
        // token 5 (unseen): 1.0. Without penalties token 0 would win.
        let greedy = s.sample(SeqLogits::Full(RAW.to_vec())).expect("sampled");
        assert_eq!(greedy.token, 3);
        // Its log-probability is the raw model's: 2.0 - log(sum(exp(RAW))).
        let lse = RAW.iter().map(|l| l.exp()).sum::<f32>().ln();
        assert!((greedy.logprob - (2.0 - lse)).abs() < 1e-6, "{greedy:?}");
    }

    #[test]
    fn frequency_penalty_moves_off_a_repeated_token() {
        let mut s = Sampler::new(
            SamplingParams {
                frequency_penalty: 1.0,
                ..params(0.0)
            },
            &[],
        );
        let logits = [2.0f32, 1.5, 0.0];
        assert_eq!(
            s.sample(SeqLogits::Full(logits.to_vec()))
                .expect("sampled")
                .token,
            0
        );
        assert_eq!(
            s.sample(SeqLogits::Full(logits.to_vec()))
                .expect("sampled")
                .token,
            1,
            "2.0 - 1 < 1.5"
        );
    }

    /// Before min_tokens the stop tokens are banned where the logits are (the ask carries them)
    /// and, given every logit, here; from then on they are ordinary tokens.
    #[test]
    fn stop_tokens_are_not_drawn_before_min_tokens() {
        let mut s = Sampler::with_logprobs(params(0.0), &[7], 1).with_min_tokens(2, &[1, 107]);
        let logits = || {
            let mut l = vec![0.0f32; 200];
            l[1] = 5.0;
            l[107] = 4.0;
            l[9] = 3.0;
            l
        };
        for _ in 0..2 {
            let ask = s.ask();
            let banned = ask.sampling.and_then(|s| s.penalties).map(|p| p.banned);
            assert_eq!(banned, Some(vec![1, 107]));
            let t = s.sample(SeqLogits::Full(logits())).expect("sampled");
            assert_eq!(t.token, 9);
            // The reported log-probability is the model's, and <eos> still leads its list.
            assert_eq!(t.top_logprobs[0].0, 1);
        }
        assert_eq!(s.ask().sampling, None, "greedy asks for candidates again");
        assert_eq!(
            s.sample(SeqLogits::Full(logits())).expect("sampled").token,
            1
        );
    }

    #[test]
    fn nothing_to_sample_from_is_an_error_not_token_0() {
        for p in [params(0.0), params(0.8)] {
            let mut s = Sampler::with_logprobs(p, &[], 2);
            assert_eq!(
                s.sample(SeqLogits::Full(Vec::new())),
                Err(SampleError::NoCandidates)
            );
            let empty = SeqLogits::Top {
                candidates: Vec::new(),
                log_sum_exp: 0.0,
            };
            assert_eq!(s.sample(empty), Err(SampleError::NoCandidates));
            // A single candidate is enough.
            let one = SeqLogits::Top {
                candidates: vec![(1.5, 42)],
                log_sum_exp: 1.5,
            };
            assert_eq!(s.sample(one).map(|t| t.token), Ok(42));
        }
    }
}
