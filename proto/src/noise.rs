//! Gumbel noise from a counter-based stream: the noise of token `t` at a sequence's position `p`
//! is a pure function of (seed, p, t), so each rank of the last stage perturbs its own slice of
//! the vocabulary and the winner is the same whatever the split (tp 1, 2, 4; any pp).
//!
//! The Gumbel-max trick: argmax_i (logit_i / T + G_i), G_i independent standard Gumbel, is a draw
//! from softmax(logit / T). Each rank sends its slice's winner; the coordinator keeps the best.

/// The key of one draw: a request's seed and the position of the token being sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoiseKey(u64);

/// SplitMix64's output function (Steele, Lea and Flood, 2014).
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Bits of uniform randomness per token: U = (bits + 1/2) / 2^52 is exactly representable and
/// never 0 or 1.
const BITS: u32 = 52;

/// The largest noise [`NoiseKey::gumbel`] can return: -ln(-ln(1 - 2^-53)) = 53 ln 2 < 37.
pub const MAX_GUMBEL: f64 = 37.0;

impl NoiseKey {
    pub fn new(seed: u64, position: usize) -> Self {
        Self(mix(seed ^ mix((position as u64).wrapping_add(GOLDEN))))
    }

    /// 52 uniform bits for `token`: SplitMix64 seeded with the key, output number `token + 1`
    /// (the stream is jumpable, so no token waits for another).
    fn bits(self, token: u32) -> u64 {
        mix(self
            .0
            .wrapping_add((u64::from(token) + 1).wrapping_mul(GOLDEN)))
            >> (64 - BITS)
    }

    /// The standard Gumbel noise of `token`: -ln(-ln(U)), U = (bits + 1/2) / 2^52 in (0, 1).
    pub fn gumbel(self, token: u32) -> f64 {
        let u = (self.bits(token) as f64 + 0.5) / (1u64 << BITS) as f64;
        -(-u.ln()).ln()
    }

    /// An upper bound of [`gumbel`](Self::gumbel) from the bits alone (no logarithm): with
    /// r = 2^52 - bits, 1 - U >= r / 2^53, and -ln(-ln U) <= -ln(1 - U) <= ln 2 (53 - floor(log2 r))
    /// (plus a hair for the logarithms' rounding). Half the tokens are bounded by 1.4, one in 2^k
    /// by 0.7 (k + 1): most never need the logarithms.
    fn gumbel_bound(bits: u64) -> f64 {
        let r = (1u64 << BITS) - bits;
        let floor_log2 = 63 - r.leading_zeros();
        std::f64::consts::LN_2 * f64::from(BITS + 1 - floor_log2) + 1e-9
    }
}

/// The winner of one slice's Gumbel-max race: the token, its perturbed score logit / T + G, and
/// its logit as the model gave it (for its log-probability).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GumbelPick {
    pub token: u32,
    pub score: f64,
    pub logit: f32,
}

impl GumbelPick {
    /// The better of two picks: the higher score; on an exact tie the lower token id.
    pub fn better(self, other: Self) -> Self {
        match other.score > self.score || (other.score == self.score && other.token < self.token) {
            true => other,
            false => self,
        }
    }
}

/// Score of one token at temperature `t` (> 0).
fn score(logit: f32, t: f64, noise: f64) -> f64 {
    f64::from(logit) / t + noise
}

/// One column's race while scanning: the key, temperature and best pick so far.
#[derive(Debug, Clone, Copy)]
pub struct GumbelRace {
    key: NoiseKey,
    temperature: f64,
    /// 1 / temperature, for the rejections only (the score itself divides, as everywhere).
    inverse: f64,
    best: Option<GumbelPick>,
}

/// Slack for the rejections' rounding (logit * inverse vs logit / temperature): far below any
/// difference of scores that matters, far above the rounding.
const REJECT_SLACK: f64 = 1e-9;

impl GumbelRace {
    pub fn new(key: NoiseKey, temperature: f32) -> Self {
        Self {
            key,
            temperature: f64::from(temperature),
            inverse: 1.0 / f64::from(temperature),
            best: None,
        }
    }

    /// Starts the race from a known token (the slice's largest logit is a good one: it usually
    /// wins, and every token that cannot beat it is rejected without a logarithm).
    pub fn seed_with(&mut self, token: u32, logit: f32, raw: f32) {
        self.offer_exact(token, logit, raw);
    }

    fn offer_exact(&mut self, token: u32, logit: f32, raw: f32) {
        let pick = GumbelPick {
            token,
            score: score(logit, self.temperature, self.key.gumbel(token)),
            logit: raw,
        };
        self.best = Some(match self.best {
            Some(b) => b.better(pick),
            None => pick,
        });
    }

    /// Offers `token` with sampling logit `logit` (after penalties) and model logit `raw`.
    #[inline]
    pub fn offer(&mut self, token: u32, logit: f32, raw: f32) {
        if let Some(b) = self.best {
            let base = f64::from(logit) * self.inverse + REJECT_SLACK;
            // Cheap rejections first: no noise can lift it, then no noise these bits can give.
            if base + MAX_GUMBEL < b.score {
                return;
            }
            if base + NoiseKey::gumbel_bound(self.key.bits(token)) < b.score {
                return;
            }
        }
        self.offer_exact(token, logit, raw);
    }

    pub fn winner(self) -> Option<GumbelPick> {
        self.best
    }
}

/// The Gumbel-max winner of one slice of logits (ids from `first_id`): a draw from
/// softmax(logits / temperature) keyed by `key`.
pub fn gumbel_winner(
    logits: &[f32],
    first_id: u32,
    key: NoiseKey,
    temperature: f32,
) -> Option<GumbelPick> {
    let mut race = GumbelRace::new(key, temperature);
    let (at, &max) = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))?;
    race.seed_with(first_id + at as u32, max, max);
    for (i, &l) in logits.iter().enumerate() {
        race.offer(first_id + i as u32, l, l);
    }
    race.winner()
}

/// The Gumbel-max winner of every column of row-major `[vocab, seqs]` logits that has a race
/// (`sampling`: after penalties; `raw`: the model's, same shape), in two passes over memory: the
/// columns' largest logits seed the races, then every token is offered.
pub fn gumbel_by_column(
    sampling: &[f32],
    raw: &[f32],
    races: &mut [Option<GumbelRace>],
    first_id: u32,
) {
    let seqs = races.len();
    if seqs == 0 || races.iter().all(Option::is_none) {
        return;
    }
    let mut best: Vec<Option<(usize, f32)>> = vec![None; seqs];
    for (v, row) in sampling.chunks_exact(seqs).enumerate() {
        for (b, &x) in best.iter_mut().zip(row) {
            if b.is_none_or(|(_, m)| x > m) {
                *b = Some((v, x));
            }
        }
    }
    for (s, race) in races.iter_mut().enumerate() {
        if let (Some(race), Some((v, x))) = (race.as_mut(), best[s]) {
            race.seed_with(first_id + v as u32, x, raw[v * seqs + s]);
        }
    }
    for (v, (row, raw_row)) in sampling
        .chunks_exact(seqs)
        .zip(raw.chunks_exact(seqs))
        .enumerate()
    {
        let token = first_id + v as u32;
        for ((race, &x), &r) in races.iter_mut().zip(row).zip(raw_row) {
            if let Some(race) = race {
                race.offer(token, x, r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_holds_and_noise_is_a_function_of_its_key() {
        let key = NoiseKey::new(42, 7);
        for token in 0..200_000u32 {
            let g = key.gumbel(token);
            assert!(
                g <= NoiseKey::gumbel_bound(key.bits(token)),
                "token {token}"
            );
            assert!(g < MAX_GUMBEL && g > -4.0);
            assert_eq!(g, NoiseKey::new(42, 7).gumbel(token));
        }
        assert_ne!(key.gumbel(3), NoiseKey::new(42, 8).gumbel(3));
        assert_ne!(key.gumbel(3), NoiseKey::new(43, 7).gumbel(3));
        // The extremes of the bits.
        assert!(NoiseKey::gumbel_bound((1 << 52) - 1) >= 36.7);
        assert!(NoiseKey::gumbel_bound((1 << 52) - 1) < MAX_GUMBEL);
        assert!(NoiseKey::gumbel_bound(0) > 0.69);
    }

    #[test]
    fn the_winner_does_not_depend_on_the_split() {
        let logits: Vec<f32> = (0..5000u32)
            .map(|i| ((i.wrapping_mul(2654435761) >> 9) % 1000) as f32 / 150.0)
            .collect();
        for seed in 0..50 {
            let key = NoiseKey::new(seed, 11);
            let whole = gumbel_winner(&logits, 0, key, 0.9).expect("a winner");
            let split = [0usize, 1234, 2500, 5000]
                .windows(2)
                .filter_map(|w| gumbel_winner(&logits[w[0]..w[1]], w[0] as u32, key, 0.9))
                .reduce(GumbelPick::better)
                .expect("a winner");
            assert_eq!(whole, split);
            // The filters reject nothing that could win: a plain scan agrees.
            let plain = (0..5000u32)
                .map(|t| GumbelPick {
                    token: t,
                    score: score(logits[t as usize], f64::from(0.9f32), key.gumbel(t)),
                    logit: logits[t as usize],
                })
                .reduce(GumbelPick::better)
                .expect("a winner");
            assert_eq!(whole, plain);
        }
    }

    #[test]
    fn by_column_equals_per_column() {
        let columns: Vec<Vec<f32>> = (0..3u32)
            .map(|s| {
                (0..900u32)
                    .map(|v| ((v * 7919 + s * 104729) % 1009) as f32 / 113.0)
                    .collect()
            })
            .collect();
        let values: Vec<f32> = (0..900)
            .flat_map(|v| columns.iter().map(move |c| c[v]))
            .collect();
        let keys = [
            NoiseKey::new(1, 5),
            NoiseKey::new(2, 9),
            NoiseKey::new(3, 1),
        ];
        let mut races = [
            Some(GumbelRace::new(keys[0], 1.0)),
            None,
            Some(GumbelRace::new(keys[2], 0.4)),
        ];
        gumbel_by_column(&values, &values, &mut races, 100);
        assert_eq!(
            races[0].and_then(GumbelRace::winner),
            gumbel_winner(&columns[0], 100, keys[0], 1.0)
        );
        assert!(races[1].is_none());
        assert_eq!(
            races[2].and_then(GumbelRace::winner),
            gumbel_winner(&columns[2], 100, keys[2], 0.4)
        );
    }
}
