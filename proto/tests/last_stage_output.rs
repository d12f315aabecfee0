//! The last stage's answer on the wire, as a property: random steps (sequence counts, every
//! logit or top candidates, log-probabilities or not), random vocabulary splits across ranks.
//! What a rank encodes decodes to itself and joins to what one unsharded vocabulary gives;
//! truncated, oversized and corrupted answers are refused with the error that names the fault,
//! and no input makes decoding panic. Deterministic: fixed SplitMix64 seeds.

use std::ops::Range;

use gemma_proto::candidates::{
    join_ranks, log_sum_exp, log_sum_exp_by_column, top_candidates, top_candidates_by_column,
};
use gemma_proto::{pb, SeqLogits, SeqStep, SplitMix64, StepBatch, WireError};
use prost::Message;

fn below(rng: &mut SplitMix64, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

/// A random step and every sequence's logits over the whole vocabulary.
struct Case {
    batch: StepBatch,
    /// Each rank's vocabulary rows, in rank order, covering the vocabulary.
    rows: Vec<Range<usize>>,
    /// Per sequence, every logit.
    logits: Vec<Vec<f32>>,
}

fn random_case(rng: &mut SplitMix64) -> Case {
    let vocab = 1 + below(rng, 300);
    let tp = 1 + below(rng, 4.min(vocab));
    let mut cuts: Vec<usize> = Vec::new();
    while cuts.len() < tp - 1 {
        let c = 1 + below(rng, vocab - 1);
        if !cuts.contains(&c) {
            cuts.push(c);
        }
    }
    cuts.sort_unstable();
    let bounds: Vec<usize> = std::iter::once(0)
        .chain(cuts)
        .chain(std::iter::once(vocab))
        .collect();
    let rows = bounds.windows(2).map(|w| w[0]..w[1]).collect();
    let seqs = 1 + below(rng, 6);
    let batch = StepBatch {
        seqs: (0..seqs)
            .map(|i| SeqStep {
                seq_id: 100 + i as u64,
                tokens: vec![1],
                start_pos: 0,
                block_table: vec![i as u32],
                top_candidates: match below(rng, 3) {
                    0 => 0,
                    _ => 1 + below(rng, 40) as u32,
                },
                log_probs: rng.next_f64() < 0.5,
                sampling: None,
            })
            .collect(),
    };
    // Coarse values, so that ties (broken by the lower id) are frequent.
    let logits = (0..seqs)
        .map(|_| {
            (0..vocab)
                .map(|_| below(rng, 24) as f32 / 4.0 - 3.0)
                .collect()
        })
        .collect();
    Case {
        batch,
        rows,
        logits,
    }
}

/// What rank `r` answers, selected as the worker does: from its slice laid out
/// vocabulary-major (`[rows, seqs]`), in one pass for every sequence.
fn rank_answer(case: &Case, r: usize) -> Vec<SeqLogits> {
    let rows = &case.rows[r];
    let seqs = case.batch.seqs.len();
    let values: Vec<f32> = rows
        .clone()
        .flat_map(|v| case.logits.iter().map(move |l| l[v]))
        .collect();
    let wanted: Vec<usize> = case
        .batch
        .seqs
        .iter()
        .map(|s| s.top_candidates as usize)
        .collect();
    let mut top = top_candidates_by_column(&values, seqs, &wanted, rows.start as u32);
    let lse_wanted: Vec<bool> = case.batch.seqs.iter().map(|s| s.log_probs).collect();
    let lse = log_sum_exp_by_column(&values, seqs, &lse_wanted);
    case.batch
        .seqs
        .iter()
        .enumerate()
        .map(|(i, s)| match s.top_candidates {
            0 => SeqLogits::Full(case.logits[i][rows.clone()].to_vec()),
            _ => SeqLogits::Top {
                candidates: std::mem::take(&mut top[i]),
                log_sum_exp: lse[i],
            },
        })
        .collect()
}

/// Through protobuf bytes, as it travels.
fn over_the_wire(answer: Vec<SeqLogits>) -> pb::LastStageOutput {
    let bytes = pb::LastStageOutput::from(answer).encode_to_vec();
    <pb::LastStageOutput as Message>::decode(bytes.as_slice()).expect("prost decodes its own bytes")
}

/// Bit-for-bit equality (NaN equals NaN).
fn same(a: &SeqLogits, b: &SeqLogits) -> bool {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    match (a, b) {
        (SeqLogits::Full(x), SeqLogits::Full(y)) => bits(x) == bits(y),
        (
            SeqLogits::Top {
                candidates: c,
                log_sum_exp: l,
            },
            SeqLogits::Top {
                candidates: d,
                log_sum_exp: m,
            },
        ) => {
            l.to_bits() == m.to_bits()
                && c.len() == d.len()
                && c.iter()
                    .zip(d)
                    .all(|(p, q)| p.0.to_bits() == q.0.to_bits() && p.1 == q.1)
        }
        _ => false,
    }
}

#[test]
fn answers_round_trip_and_join_to_the_unsharded_vocabulary() {
    let mut rng = SplitMix64::new(0x1a57_57a6e);
    for case_no in 0..500 {
        let case = random_case(&mut rng);
        let mut ranks = Vec::new();
        for (r, rows) in case.rows.iter().enumerate() {
            let sent = rank_answer(&case, r);
            let got = over_the_wire(sent.clone())
                .into_logits(&case.batch, rows)
                .unwrap_or_else(|e| panic!("case {case_no} rank {r}: {e}"));
            assert_eq!(got.len(), sent.len());
            for (i, (g, s)) in got.iter().zip(&sent).enumerate() {
                assert!(
                    same(g, s),
                    "case {case_no} rank {r} seq {i}: {g:?} != {s:?}"
                );
            }
            ranks.push(got);
        }
        let joined = join_ranks(ranks, &case.batch).expect("decoded ranks join");
        for (i, (seq, got)) in case.batch.seqs.iter().zip(&joined).enumerate() {
            let all = &case.logits[i];
            let want = match seq.top_candidates {
                0 => SeqLogits::Full(all.clone()),
                n => SeqLogits::Top {
                    candidates: top_candidates(all, n as usize, 0),
                    log_sum_exp: f32::NAN,
                },
            };
            match (got, &want) {
                (
                    SeqLogits::Top {
                        candidates,
                        log_sum_exp: lse,
                    },
                    SeqLogits::Top { candidates: c, .. },
                ) => {
                    assert_eq!(candidates, c, "case {case_no} seq {i}: merged candidates");
                    if seq.log_probs {
                        let whole = log_sum_exp(all);
                        assert!(
                            (lse - whole).abs() <= 1e-5 * whole.abs().max(1.0),
                            "case {case_no} seq {i}: log-sum-exp {lse} != {whole}"
                        );
                    }
                }
                _ => assert!(same(got, &want), "case {case_no} seq {i}: every logit"),
            }
        }
    }
}

/// One way of spoiling a rank's answer, and the refusal it must meet.
type Corruption = (
    &'static str,
    fn(&mut pb::LastStageOutput, &Case, usize, &mut SplitMix64) -> bool,
    fn(&WireError) -> bool,
);

/// The first sequence asking for every logit (`full`) or for candidates (`top`), if any.
fn seq_asking(case: &Case, full: bool) -> Option<usize> {
    case.batch
        .seqs
        .iter()
        .position(|s| (s.top_candidates == 0) == full)
}

const CORRUPTIONS: &[Corruption] = &[
    (
        "a sequence missing",
        |o, _, _, _| o.seqs.pop().is_some(),
        |e| matches!(e, WireError::SequenceCount { .. }),
    ),
    (
        "a sequence too many",
        |o, _, _, _| {
            o.seqs.push(pb::SeqOutput::default());
            true
        },
        |e| matches!(e, WireError::SequenceCount { .. }),
    ),
    (
        "`full` truncated",
        |o, c, _, rng| {
            let Some(i) = seq_asking(c, true) else {
                return false;
            };
            let full = &mut o.seqs[i].full;
            let cut = 1 + below(rng, full.len());
            full.truncate(full.len() - cut);
            true
        },
        |e| matches!(e, WireError::FullLength { .. }),
    ),
    (
        "`full` oversized",
        |o, c, _, rng| {
            let Some(i) = seq_asking(c, true) else {
                return false;
            };
            let extra = 1 + below(rng, 9);
            o.seqs[i].full.extend(std::iter::repeat_n(0x3f, extra));
            true
        },
        |e| matches!(e, WireError::FullLength { .. }),
    ),
    (
        "candidates where every logit was asked",
        |o, c, r, _| {
            let Some(i) = seq_asking(c, true) else {
                return false;
            };
            o.seqs[i].ids.push(c.rows[r].start as u32);
            o.seqs[i].logits.push(0.0);
            true
        },
        |e| matches!(e, WireError::CandidatesForFull { .. }),
    ),
    (
        "every logit where candidates were asked",
        |o, c, r, _| {
            let Some(i) = seq_asking(c, false) else {
                return false;
            };
            o.seqs[i].full = vec![0; 4 * c.rows[r].len()];
            true
        },
        |e| matches!(e, WireError::FullForTop { .. }),
    ),
    (
        "an id without its logit",
        |o, c, _, _| {
            let Some(i) = seq_asking(c, false) else {
                return false;
            };
            o.seqs[i].logits.pop().is_some()
        },
        |e| matches!(e, WireError::CandidateLengths { .. }),
    ),
    (
        "a logit without its id",
        |o, c, _, _| {
            let Some(i) = seq_asking(c, false) else {
                return false;
            };
            o.seqs[i].ids.pop().is_some()
        },
        |e| matches!(e, WireError::CandidateLengths { .. }),
    ),
    (
        "a candidate too few",
        |o, c, _, _| {
            let Some(i) = seq_asking(c, false) else {
                return false;
            };
            o.seqs[i].ids.pop();
            o.seqs[i].logits.pop().is_some()
        },
        |e| matches!(e, WireError::CandidateCount { .. }),
    ),
    (
        "a candidate too many",
        |o, c, r, _| {
            let Some(i) = seq_asking(c, false) else {
                return false;
            };
            o.seqs[i].ids.push(c.rows[r].end as u32 - 1);
            o.seqs[i].logits.push(f32::NEG_INFINITY);
            true
        },
        |e| matches!(e, WireError::CandidateCount { .. }),
    ),
    (
        "an id outside the rank's rows",
        |o, c, r, rng| {
            let Some(i) = seq_asking(c, false) else {
                return false;
            };
            let rows = &c.rows[r];
            let ids = &mut o.seqs[i].ids;
            let at = below(rng, ids.len());
            ids[at] = match (rows.start, rng.next_u64() % 2) {
                (0, _) | (_, 0) => (rows.end + below(rng, 1000)) as u32,
                (s, _) => below(rng, s) as u32,
            };
            true
        },
        |e| matches!(e, WireError::CandidateOutsideSlice { .. }),
    ),
    (
        "candidates swapped",
        |o, c, _, _| {
            let Some(i) = seq_asking(c, false) else {
                return false;
            };
            let s = &mut o.seqs[i];
            if s.ids.len() < 2 {
                return false;
            }
            s.ids.swap(0, 1);
            s.logits.swap(0, 1);
            true
        },
        |e| matches!(e, WireError::CandidatesOutOfOrder { at: 0, .. }),
    ),
    (
        "a candidate repeated",
        |o, c, _, _| {
            let Some(i) = seq_asking(c, false) else {
                return false;
            };
            let s = &mut o.seqs[i];
            let n = s.ids.len();
            if n < 2 {
                return false;
            }
            s.ids[n - 1] = s.ids[n - 2];
            s.logits[n - 1] = s.logits[n - 2];
            true
        },
        |e| matches!(e, WireError::CandidatesOutOfOrder { .. }),
    ),
];

#[test]
fn spoiled_answers_are_refused_with_the_fault_named() {
    let mut rng = SplitMix64::new(0xbad_a115);
    let mut applied = vec![0usize; CORRUPTIONS.len()];
    for case_no in 0..600 {
        let case = random_case(&mut rng);
        let r = below(&mut rng, case.rows.len());
        for (k, (what, spoil, expected)) in CORRUPTIONS.iter().enumerate() {
            let mut answer = pb::LastStageOutput::from(rank_answer(&case, r));
            if !spoil(&mut answer, &case, r, &mut rng) {
                continue;
            }
            applied[k] += 1;
            match answer.into_logits(&case.batch, &case.rows[r]) {
                Err(e) => {
                    assert!(expected(&e), "case {case_no} ({what}): refused as {e:?}");
                    assert!(
                        e.to_string().len() > 20,
                        "the message says what was wrong: {e}"
                    );
                }
                Ok(_) => panic!("case {case_no} ({what}): accepted"),
            }
        }
    }
    for ((what, ..), n) in CORRUPTIONS.iter().zip(applied) {
        assert!(n >= 50, "{what} was tried only {n} times");
    }
}

/// Whatever bytes arrive, decoding returns; what it accepts has the shape the step asked for.
#[test]
fn no_input_makes_decoding_panic() {
    let mut rng = SplitMix64::new(0x00f0_2200);
    let mut accepted = 0;
    for _ in 0..2000 {
        let case = random_case(&mut rng);
        let r = below(&mut rng, case.rows.len());
        let mut bytes = pb::LastStageOutput::from(rank_answer(&case, r)).encode_to_vec();
        for _ in 0..below(&mut rng, 4) {
            if bytes.is_empty() {
                break;
            }
            let at = below(&mut rng, bytes.len());
            match below(&mut rng, 3) {
                0 => bytes[at] ^= 1 << below(&mut rng, 8),
                1 => bytes.truncate(at),
                _ => bytes.insert(at, rng.next_u64() as u8),
            }
        }
        let Ok(answer) = <pb::LastStageOutput as Message>::decode(bytes.as_slice()) else {
            continue;
        };
        let rows = &case.rows[r];
        let Ok(seqs) = answer.into_logits(&case.batch, rows) else {
            continue;
        };
        accepted += 1;
        assert_eq!(seqs.len(), case.batch.seqs.len());
        for (asked, got) in case.batch.seqs.iter().zip(&seqs) {
            match (asked.top_candidates, got) {
                (0, SeqLogits::Full(v)) => assert_eq!(v.len(), rows.len()),
                (n, SeqLogits::Top { candidates, .. }) if n > 0 => {
                    assert_eq!(candidates.len(), (n as usize).min(rows.len()));
                    assert!(candidates.iter().all(|c| rows.contains(&(c.1 as usize))));
                }
                (n, got) => panic!("asked for {n} candidates, accepted {got:?}"),
            }
        }
    }
    // Untouched and harmlessly changed answers pass; the test saw both outcomes.
    assert!(accepted > 100, "only {accepted} answers accepted");
}

#[test]
fn ranks_that_disagree_do_not_join() {
    let batch = StepBatch {
        seqs: vec![SeqStep {
            seq_id: 7,
            tokens: vec![1],
            start_pos: 0,
            block_table: vec![0],
            top_candidates: 2,
            log_probs: false,
            sampling: None,
        }],
    };
    let top = SeqLogits::Top {
        candidates: vec![(1.0, 0)],
        log_sum_exp: f32::NAN,
    };
    let full = SeqLogits::Full(vec![0.5]);
    assert_eq!(join_ranks(Vec::new(), &batch), Err(WireError::NoRanks));
    assert_eq!(
        join_ranks(vec![vec![top.clone()], vec![full.clone()]], &batch),
        Err(WireError::MixedForms { seq_id: 7 })
    );
    assert_eq!(
        join_ranks(vec![vec![full], vec![top.clone()]], &batch),
        Err(WireError::MixedForms { seq_id: 7 })
    );
    assert_eq!(
        join_ranks(vec![vec![top.clone()], vec![top.clone(), top]], &batch),
        Err(WireError::SequenceCount {
            sent: 2,
            expected: 1
        })
    );
}
