//! The sampler held to the definitions of temperature, top-k, top-p and min-p, statistically.
//!
//! For fixed logits, thousands of seeded draws per parameter set are compared with the
//! distribution the definitions give, computed here on their own in f64, by Pearson's chi-square
//! goodness-of-fit test at the 0.001 significance level. The seeds are fixed, so every verdict is
//! the same on every run; and the same test must reject draws compared with a slightly wrong
//! distribution, or it would prove nothing.
//!
//! The definitions are HF transformers' warpers, in HF's order (temperature, top-k, top-p, min-p;
//! each renormalises what it keeps before the next one looks):
//! - temperature T: softmax(logits / T);
//! - top-k: keep the k most likely tokens;
//! - top-p: keep the smallest set of most likely tokens whose mass is at least p. HF's
//!   `TopPLogitsWarper` removes a token when the mass of it and every less likely token is at
//!   most 1 - p, i.e. when the tokens more likely than it already hold p: the same set. vLLM's
//!   top-p is the same; OpenAI documents only "the tokens with top_p probability mass";
//! - min-p: keep the tokens whose probability is at least min_p times the most likely one's.
//!
//! vLLM applies min-p before top-k/top-p; the two orders differ only when top-p and min-p are
//! combined. We follow HF.

use gemma_coordinator::sampler::{Sampler, SamplingParams};
use gemma_proto::candidates::{join_ranks, log_sum_exp, top_candidates};
use gemma_proto::{Compact, SeqLogits, SeqStep, StepBatch};

/// Draws per parameter set.
const DRAWS: usize = 8000;

/// Twelve distinct logits, not in id order, so that a mix-up of ids and ranks shows.
const LOGITS: [f32; 12] = [
    0.3, 2.0, -0.4, 1.0, -2.0, 1.6, 0.0, 0.8, -1.3, 1.3, 0.5, -0.8,
];

/// One parameter set: what the API takes (f32, as the sampler gets it).
#[derive(Debug, Clone, Copy)]
struct Filters {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
}

const PLAIN: Filters = Filters {
    temperature: 1.0,
    top_k: 0,
    top_p: 1.0,
    min_p: 0.0,
};

fn at(temperature: f32) -> Filters {
    Filters {
        temperature,
        ..PLAIN
    }
}

impl Filters {
    fn params(self, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            seed,
            ..SamplingParams::default()
        }
    }
}

/// The distribution over token ids that the definitions give for `logits` (see the module doc).
fn expected(logits: &[f32], f: Filters) -> Vec<f64> {
    let t = f64::from(f.temperature);
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<f64> = logits
        .iter()
        .map(|&l| ((f64::from(l) - f64::from(max)) / t).exp())
        .collect();
    renormalise(&mut p);
    // Ids from most to least likely (the logits are distinct, so no ties).
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if f.top_k > 0 {
        for &id in order.iter().skip(f.top_k) {
            p[id] = 0.0;
        }
        renormalise(&mut p);
    }
    if f.top_p < 1.0 {
        let top_p = f64::from(f.top_p);
        let mut before = 0.0;
        for &id in &order {
            // A boundary this close would make the kept set a matter of rounding.
            assert!(
                (before - top_p).abs() > 1e-6,
                "top_p {top_p} falls on a cumulative mass; choose another case"
            );
            if before >= top_p {
                p[id] = 0.0;
            }
            before += p[id];
        }
        renormalise(&mut p);
    }
    if f.min_p > 0.0 {
        let floor = f64::from(f.min_p) * p.iter().copied().fold(0.0, f64::max);
        for q in p.iter_mut() {
            assert!(
                *q == 0.0 || (*q - floor).abs() > 1e-9,
                "a probability falls on the min_p floor; choose another case"
            );
            if *q < floor {
                *q = 0.0;
            }
        }
        renormalise(&mut p);
    }
    p
}

fn renormalise(p: &mut [f64]) {
    let total: f64 = p.iter().sum();
    p.iter_mut().for_each(|q| *q /= total);
}

/// How often each token id is drawn in `draws` samples with `seed`, from every logit.
fn counts(logits: &[f32], f: Filters, seed: u64, draws: usize) -> Vec<u64> {
    let mut sampler = Sampler::new(f.params(seed), &[]);
    let mut counts = vec![0u64; logits.len()];
    for _ in 0..draws {
        let token = sampler
            .sample(SeqLogits::Full(logits.to_vec()))
            .expect("sampled")
            .token;
        counts[token as usize] += 1;
    }
    counts
}

/// The same, from what a multi-rank last stage sends when top-k is set: the k best candidates
/// and the log-sum-exp.
fn counts_from_candidates(logits: &[f32], f: Filters, seed: u64, draws: usize) -> Vec<u64> {
    let mut sampler = Sampler::new(f.params(seed), &[]);
    let n = sampler.candidates_needed() as usize;
    assert_eq!(n, f.top_k, "top-k alone asks for k candidates");
    let mut counts = vec![0u64; logits.len()];
    for _ in 0..draws {
        let token = sampler
            .sample(SeqLogits::Top {
                candidates: top_candidates(logits, n, 0),
                log_sum_exp: log_sum_exp(logits),
            })
            .expect("sampled")
            .token;
        counts[token as usize] += 1;
    }
    counts
}

/// The same through what the engine asks a two-rank last stage for (ranks of 5 and 7 tokens):
/// the Gumbel-max race for plain temperature (a new position, so new noise, per draw), the
/// candidates for top-k and for a nucleus; each rank's answer built by the definition the
/// workers' batched selection is held to.
fn counts_compact(logits: &[f32], f: Filters, seed: u64, draws: usize) -> Vec<u64> {
    // A one-token prompt: the step that samples position p feeds the token at p - 1.
    let mut sampler = Sampler::new(f.params(seed), &[0]);
    let mut counts = vec![0u64; logits.len()];
    for _ in 0..draws {
        let ask = sampler.ask();
        let seq = SeqStep {
            seq_id: 1,
            tokens: vec![0],
            start_pos: sampler.next_position() - 1,
            block_table: Vec::new(),
            top_candidates: ask.top_candidates,
            log_probs: ask.log_probs,
            sampling: ask.sampling,
        };
        let ranks = [(0usize, 5usize), (5, 12)]
            .iter()
            .map(|&(a, b)| {
                let slice = &logits[a..b];
                vec![match &seq.sampling {
                    Some(_) => SeqLogits::Compact(
                        Compact::of_slice(slice, a as u32, &seq).expect("compact"),
                    ),
                    None => SeqLogits::Top {
                        candidates: top_candidates(slice, seq.top_candidates as usize, a as u32),
                        log_sum_exp: log_sum_exp(slice),
                    },
                }]
            })
            .collect();
        let batch = StepBatch { seqs: vec![seq] };
        let joined = join_ranks(ranks, &batch).expect("joined").remove(0);
        let token = sampler.sample(joined).expect("sampled").token;
        counts[token as usize] += 1;
    }
    counts
}

/// Pearson's chi-square statistic of `counts` against `probs` and its degrees of freedom.
/// Tokens of probability 0 are left out (the caller checks they were never drawn). A chi-square
/// needs expected counts of at least 5 per bin: rarer tokens are pooled into one bin, which joins
/// the rarest regular bin if it is still under 5. None when fewer than two bins remain.
fn chi_square(counts: &[u64], probs: &[f64]) -> Option<(f64, usize)> {
    let n = counts.iter().sum::<u64>() as f64;
    let mut bins: Vec<(f64, f64)> = Vec::new(); // (observed, expected)
    let mut pooled = (0.0, 0.0);
    for (&c, &p) in counts.iter().zip(probs) {
        if p == 0.0 {
            continue;
        }
        let bin = (c as f64, n * p);
        if bin.1 >= 5.0 {
            bins.push(bin);
        } else {
            pooled = (pooled.0 + bin.0, pooled.1 + bin.1);
        }
    }
    if pooled.1 >= 5.0 {
        bins.push(pooled);
    } else if pooled.1 > 0.0 {
        let rarest = bins
            .iter_mut()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("at least one bin of expected count >= 5");
        *rarest = (rarest.0 + pooled.0, rarest.1 + pooled.1);
    }
    if bins.len() < 2 {
        return None;
    }
    let statistic = bins.iter().map(|(o, e)| (o - e) * (o - e) / e).sum();
    Some((statistic, bins.len() - 1))
}

/// The chi-square distribution's 0.999 quantile (critical value at p = 0.001) for 1 to 15
/// degrees of freedom, from the standard tables (e.g. NIST/SEMATECH e-Handbook, 1.3.6.7.4);
/// `critical_values_are_the_quantiles` checks every entry.
const CRITICAL_0_001: [f64; 15] = [
    10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.125, 27.877, 29.588, 31.264, 32.909,
    34.528, 36.123, 37.697,
];

fn critical(df: usize) -> f64 {
    CRITICAL_0_001[df - 1]
}

/// P(X > x) for X chi-square with `df` degrees of freedom, in closed form: for even df = 2m the
/// probability of fewer than m events of a Poisson process of mean x/2,
/// exp(-x/2) sum_{i<m} (x/2)^i / i!; for odd df = 2m + 1,
/// erfc(sqrt(x/2)) + sqrt(2x/pi) exp(-x/2) sum_{i=1..m} x^(i-1) / (1 3 5 ... (2i-1)).
fn chi_square_tail(x: f64, df: usize) -> f64 {
    let mut term = 1.0;
    let mut sum = 0.0;
    if df.is_multiple_of(2) {
        for i in 0..df / 2 {
            if i > 0 {
                term *= x / 2.0 / i as f64;
            }
            sum += term;
        }
        return (-x / 2.0).exp() * sum;
    }
    for i in 1..=df / 2 {
        if i > 1 {
            term *= x / (2 * i - 1) as f64;
        }
        sum += term;
    }
    erfc((x / 2.0).sqrt()) + (2.0 * x / std::f64::consts::PI).sqrt() * (-x / 2.0).exp() * sum
}

/// erfc(z) = 2/sqrt(pi) times the integral of exp(-t^2) from z to infinity, by Simpson's rule
/// over [z, z + 8] (beyond, the integrand is below exp(-64)).
fn erfc(z: f64) -> f64 {
    const STEPS: usize = 8192;
    let h = 8.0 / STEPS as f64;
    let f = |i: usize| (-(z + i as f64 * h).powi(2)).exp();
    let inner: f64 = (1..STEPS)
        .map(|i| if i % 2 == 1 { 4.0 * f(i) } else { 2.0 * f(i) })
        .sum();
    2.0 / std::f64::consts::PI.sqrt() * h / 3.0 * (f(0) + inner + f(STEPS))
}

#[test]
fn critical_values_are_the_quantiles() {
    // erfc against known values: erfc(1) and erfc(3).
    assert!((erfc(1.0) - 0.157_299_207_050_285_1).abs() < 1e-12);
    assert!((erfc(3.0) - 2.209_049_699_858_544e-5).abs() < 1e-15);
    for df in 1..=15 {
        // The tail beyond each table value is 0.001 up to the table's rounding: x to 0.0005
        // moves the tail by 0.0005 x density, and the density there is below half the tail.
        let tail = chi_square_tail(critical(df), df);
        assert!((tail - 0.001).abs() < 2.5e-7, "df {df}: tail {tail}");
    }
}

/// Draws `f` from `LOGITS` with `seed` and holds them to the definitions.
fn check_fits(f: Filters, seed: u64) {
    let probs = expected(&LOGITS, f);
    let drawn = counts(&LOGITS, f, seed, DRAWS);
    check_counts(&drawn, &probs, &format!("{f:?}"));
    let compact = counts_compact(&LOGITS, f, seed, DRAWS);
    check_counts(&compact, &probs, &format!("{f:?} through the last stage"));
    if f.top_k > 0 {
        let from_candidates = counts_from_candidates(&LOGITS, f, seed, DRAWS);
        assert_eq!(
            from_candidates, drawn,
            "{f:?}: the candidates path draws what the full logits draw"
        );
    }
}

fn check_counts(drawn: &[u64], probs: &[f64], case: &str) {
    for (id, (&c, &p)) in drawn.iter().zip(probs).enumerate() {
        assert!(
            p > 0.0 || c == 0,
            "{case}: token {id} is filtered out but was drawn {c} times"
        );
    }
    match chi_square(drawn, probs) {
        Some((statistic, df)) => {
            println!(
                "{case}: chi-square {statistic:.2}, {df} df, critical {}",
                critical(df)
            );
            assert!(
                statistic < critical(df),
                "{case}: chi-square {statistic:.2} with {df} degrees of freedom exceeds {} \
             (p < 0.001): drawn {drawn:?}, expected {:?}",
                critical(df),
                probs.iter().map(|p| p * DRAWS as f64).collect::<Vec<_>>()
            );
        }
        // One token left: every draw is that token.
        None => {
            let kept: Vec<usize> = (0..probs.len()).filter(|&i| probs[i] > 0.0).collect();
            assert_eq!(kept.len(), 1, "{case}: {probs:?}");
            assert_eq!(drawn[kept[0]], DRAWS as u64, "{case}");
        }
    }
}

#[test]
fn temperatures_fit_the_softmax() {
    for (i, t) in [0.5, 1.0, 1.7].into_iter().enumerate() {
        check_fits(at(t), 100 + i as u64);
    }
}

#[test]
fn top_k_fits_its_definition() {
    check_fits(Filters { top_k: 5, ..PLAIN }, 200);
    check_fits(
        Filters {
            top_k: 3,
            ..at(1.7)
        },
        201,
    );
    // The k best at a low temperature: the candidates path at its narrowest.
    check_fits(
        Filters {
            top_k: 2,
            ..at(0.5)
        },
        202,
    );
}

#[test]
fn top_p_fits_its_definition() {
    for (i, (t, top_p)) in [(1.0, 0.7), (0.5, 0.9), (1.7, 0.5), (1.0, 0.2)]
        .into_iter()
        .enumerate()
    {
        let f = Filters { top_p, ..at(t) };
        let kept = expected(&LOGITS, f).iter().filter(|&&p| p > 0.0).count();
        assert!(
            (1..LOGITS.len()).contains(&kept),
            "{f:?} keeps {kept}: a case that filters nothing proves nothing"
        );
        check_fits(f, 300 + i as u64);
    }
}

#[test]
fn min_p_fits_its_definition() {
    for (i, (t, min_p)) in [(1.0, 0.1), (1.7, 0.2), (0.5, 0.06)]
        .into_iter()
        .enumerate()
    {
        check_fits(Filters { min_p, ..at(t) }, 400 + i as u64);
    }
}

#[test]
fn combined_filters_fit_in_hf_order() {
    let cases = [
        Filters {
            temperature: 1.3,
            top_k: 8,
            top_p: 0.85,
            min_p: 0.0,
        },
        Filters {
            temperature: 0.8,
            top_k: 0,
            top_p: 0.9,
            min_p: 0.15,
        },
        Filters {
            temperature: 1.7,
            top_k: 6,
            top_p: 1.0,
            min_p: 0.3,
        },
        Filters {
            temperature: 1.5,
            top_k: 9,
            top_p: 0.9,
            min_p: 0.1,
        },
    ];
    for (i, f) in cases.into_iter().enumerate() {
        check_fits(f, 500 + i as u64);
    }
}

/// The test has teeth: the same draws are rejected against a distribution that is slightly
/// wrong, so a pass above means the sampler follows the definitions, not that a chi-square
/// accepts anything.
#[test]
fn draws_do_not_fit_a_wrong_distribution() {
    let rejects = |drawn: &[u64], wrong: &[f64], what: &str| {
        let (statistic, df) = chi_square(drawn, wrong).expect("bins");
        println!(
            "{what}: chi-square {statistic:.2}, {df} df, critical {}",
            critical(df)
        );
        assert!(
            statistic > critical(df),
            "{what}: chi-square {statistic:.2} does not reject ({df} df)"
        );
    };
    // Temperature 1.0 drawn, 1.3 expected.
    let drawn = counts(&LOGITS, at(1.0), 100, DRAWS);
    rejects(&drawn, &expected(&LOGITS, at(1.3)), "T 1.0 against T 1.3");
    // And 1.0 against 0.85.
    rejects(&drawn, &expected(&LOGITS, at(0.85)), "T 1.0 against T 0.85");
    // The Gumbel race too.
    let raced = counts_compact(&LOGITS, at(1.0), 100, DRAWS);
    rejects(
        &raced,
        &expected(&LOGITS, at(1.3)),
        "raced T 1.0 against T 1.3",
    );
    rejects(
        &raced,
        &expected(&LOGITS, at(0.85)),
        "raced T 1.0 against T 0.85",
    );
    // top-k 5 drawn, top-k 6 expected: the sixth token is missing.
    let drawn = counts(&LOGITS, Filters { top_k: 5, ..PLAIN }, 200, DRAWS);
    rejects(
        &drawn,
        &expected(&LOGITS, Filters { top_k: 6, ..PLAIN }),
        "top-k 5 against 6",
    );
    // Top-p measured on the temperature-1 distribution instead of the tempered one keeps more
    // tokens at T 0.5.
    let f = Filters {
        top_p: 0.9,
        ..at(0.5)
    };
    let drawn = counts(&LOGITS, f, 301, DRAWS);
    let untempered_nucleus = expected(
        &LOGITS,
        Filters {
            top_p: 0.9,
            ..PLAIN
        },
    );
    let mut wrong = expected(&LOGITS, at(0.5));
    for (w, n) in wrong.iter_mut().zip(&untempered_nucleus) {
        if *n == 0.0 {
            *w = 0.0;
        }
    }
    renormalise(&mut wrong);
    let kept = |p: &[f64]| p.iter().filter(|&&q| q > 0.0).count();
    assert_ne!(
        kept(&wrong),
        kept(&expected(&LOGITS, f)),
        "the two orders must keep different sets here"
    );
    rejects(&drawn, &wrong, "top-p before temperature");
}

#[test]
fn seeds_choose_the_stream() {
    let stream = |seed: u64| {
        let mut sampler = Sampler::new(at(1.0).params(seed), &[]);
        (0..64)
            .map(|_| {
                sampler
                    .sample(SeqLogits::Full(LOGITS.to_vec()))
                    .expect("sampled")
                    .token
            })
            .collect::<Vec<u32>>()
    };
    let streams: Vec<Vec<u32>> = (0..4).map(stream).collect();
    for (i, a) in streams.iter().enumerate() {
        assert_eq!(a, &stream(i as u64), "seed {i} repeats its stream");
        for b in &streams[i + 1..] {
            assert_ne!(a, b, "different seeds give different streams");
        }
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(distinct.len() > 3, "a stream of 64 draws varies: {a:?}");
    }
}
