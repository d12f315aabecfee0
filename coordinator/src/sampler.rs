//! Per-request sampling from the full-vocabulary logits: penalties, then greedy or
//! temperature / top-k / top-p / min-p. A request's randomness is its own seeded stream, one
//! draw per sampled token, so it never depends on the cluster's shape or on other requests.

use std::collections::{HashMap, HashSet};

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
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// SplitMix64: a tiny generator whose stream is fixed by its seed forever.
#[derive(Debug, Clone)]
pub struct SeededRng(u64);

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: SeededRng,
    /// Output token counts (frequency / presence penalties).
    output_counts: HashMap<u32, u32>,
    /// Every token of prompt and output (repetition penalty).
    seen: HashSet<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        Self {
            rng: SeededRng::new(params.seed),
            seen: prompt.iter().copied().collect(),
            output_counts: HashMap::new(),
            params,
        }
    }

    /// Picks the next token from `logits` (modified in place by the penalties) and records it.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.apply_penalties(logits);
        let token = if self.params.is_greedy() {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        *self.output_counts.entry(token).or_default() += 1;
        self.seen.insert(token);
        token
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&t, &n) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.frequency_penalty * n as f32 + p.presence_penalty;
                }
            }
        }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let mut cands: Vec<(f32, u32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (l, i as u32))
            .collect();
        let by_logit = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if p.top_k > 0 && p.top_k < cands.len() {
            cands.select_nth_unstable_by(p.top_k - 1, by_logit);
            cands.truncate(p.top_k);
        }
        cands.sort_unstable_by(by_logit);
        let Some(&(max, first)) = cands.first() else {
            return 0;
        };
        // Softmax in f64 over the candidates at this temperature.
        let t = f64::from(p.temperature);
        let mut probs: Vec<f64> = cands
            .iter()
            .map(|&(l, _)| ((f64::from(l) - f64::from(max)) / t).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= f64::from(p.top_p) {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = f64::from(p.min_p) * probs[0];
            keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
        }
        let kept: f64 = probs[..keep].iter().sum();
        let mut u = self.rng.next_f64() * kept;
        for (i, q) in probs[..keep].iter().enumerate() {
            if u < *q {
                return cands[i].1;
            }
            u -= q;
        }
        cands.get(keep - 1).map_or(first, |c| c.1)
    }
}

/// Index of the largest logit; the first on ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(s.sample(&mut [0.0, 3.0, 2.0]), 2);
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
                .map(|_| s.sample(&mut logits.clone()))
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
        assert_eq!(s.sample(&mut logits.clone()), 0);
        assert_eq!(s.sample(&mut logits.clone()), 1, "2.0 - 1 < 1.5");
    }
}
