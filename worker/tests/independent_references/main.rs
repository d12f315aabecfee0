//! The worker's Gemma 2 and Gemma 3 held to references that share nothing with the project: not
//! its config parser (`gemma_proto::ModelConfig`), not its model code. The worker's paged model
//! (tp=1, and tp=2 x pp=2, as the cluster runs it) and the kit's plain reference are both held to:
//!
//! - HF transformers' golden files, `tests/golden/VARIANT.json`, made by
//!   scripts/golden/make-golden.sh (pinned CPU torch and transformers, float32, eager attention,
//!   the whole sequence recomputed at every step, so only transformers' masks decide what a query
//!   sees). Per prompt: the 32 greedy tokens and, at the prefill and at the last step, the 20
//!   largest logits, ten fixed ids and the row's log-sum-exp. They are the arbiter, and they hold
//!   every feature: `gemma2` (window 6 on every other layer, attention soft-cap 4 and final
//!   soft-cap 30, query_pre_attn_scalar 24 with head_dim 16) and `gemma3` (QK-norm, window 5 on
//!   two layers of three, local RoPE base 10^4 and global 10^6, linear RoPE scaling 2 on the
//!   global layers). `every_gemma2_feature_moves_the_golden_logits` and its Gemma 3 twin break
//!   each feature in turn and see the comparison fail.
//! - candle-transformers 0.11.1's `gemma2` and `gemma3` in f32, each reading config.json with its
//!   own serde `Config`. Read for this test, they do not implement everything, so each vouches
//!   only for a variant within what it implements (both variants are in the golden files, and
//!   candle is held to those too):
//!   * gemma2 scales scores by 1/sqrt(head_dim) (it parses query_pre_attn_scalar and never uses
//!     it) and windows every layer, one key wider than HF (`j + window < i` masks), and only
//!     while prefilling (a decode step sees the whole cache). It vouches for
//!     `gemma2-within-candle`: query_pre_attn_scalar = head_dim and the real 4096-token window,
//!     which no test sequence reaches; the soft-caps, sandwich norms and grouped-query attention
//!     still matter.
//!   * gemma3 reads no `rope_scaling` and ignores query_pre_attn_scalar (the tiny Gemma 3 has it
//!     equal to head_dim), so it vouches for `gemma3-unscaled`. Its prefill mask also admits one
//!     key more than HF's, but its decode path keeps a rotating cache of exactly `window` keys,
//!     HF's window: it is fed one token at a time. `candle_gemma3_prefill_admits_one_key_more`
//!     shows the difference.
//!
//! Measured worst differences: 4.8e-6 from HF (paged tp=1, tp=2 x pp=2, plain reference), 7.5e-6
//! from candle over whole rows; see `TOLERANCE`.

#[path = "../common/mod.rs"]
mod common;
mod golden;
mod runs;

use common::prompts;

use std::path::PathBuf;
use std::sync::OnceLock;

use gemma_proto::{LayerKind, ModelConfig, PlanRequest};
use gemma_testkit::compare::max_abs_diff;
use gemma_testkit::TinyGemma;
use golden::{check_provenance, Golden};
use runs::{candle, candle_gemma2, candle_gemma3, paged, plain, plain_prefill};
use runs::{Feed, Run};

/// Largest allowed difference of a logit (and of a row's log-sum-exp) between two f32
/// implementations. The logits are about +-10 (f32 spacing there: 9.5e-7); implementations that
/// sum in different orders through 4-6 layers differ by a few of those: measured 4.8e-6 from HF,
/// 7.5e-6 from candle, and HF differs from itself by 2.9e-6 between two matmul shapes. 1e-4
/// leaves 10x headroom, and stays 17x below the smallest effect of a broken feature seen (a
/// decode window one key wider: 1.7e-3 at the last step).
const TOLERANCE: f32 = 1e-4;
const NEW_TOKENS: usize = 32;

/// The tiny models as HF folders, written once per test binary.
fn folder(variant: &str) -> PathBuf {
    static ROOT: OnceLock<tempfile::TempDir> = OnceLock::new();
    let root = ROOT.get_or_init(|| {
        let root = tempfile::tempdir_in(gemma_testkit::process_scratch()).expect("temp dir");
        for name in [
            "gemma2",
            "gemma2-within-candle",
            "gemma3",
            "gemma3-unscaled",
        ] {
            let tiny = TinyGemma::variant(name).expect("kit variant");
            tiny.write(&root.path().join(name))
                .expect("write tiny model");
        }
        root
    });
    root.path().join(variant)
}

fn tiny(variant: &str) -> TinyGemma {
    TinyGemma::variant(variant).expect("kit variant")
}

/// The project's reading of the tiny model's config (for the plain reference).
fn project_config(variant: &str) -> ModelConfig {
    ModelConfig::from_file(&folder(variant).join("config.json")).expect("config")
}

/// The worker's model in two plans and the plain reference, each on `prompts`.
fn ours(variant: &str, prompts: &[Vec<u32>]) -> Vec<(String, Vec<Run>)> {
    let dir = folder(variant);
    vec![
        (
            "paged tp=1".into(),
            paged(&dir, PlanRequest::new(1, 1), prompts, NEW_TOKENS),
        ),
        (
            "paged tp=2 x pp=2".into(),
            paged(&dir, PlanRequest::new(2, 2), prompts, NEW_TOKENS),
        ),
        (
            "plain reference".into(),
            plain(&tiny(variant), project_config(variant), prompts, NEW_TOKENS),
        ),
    ]
}

/// Loads the golden file and checks it is one these tests can trust: its prompts are ours and
/// its greedy choices are clear of the tolerance.
fn golden(variant: &str) -> Golden {
    let g = Golden::load(variant);
    assert_eq!(g.variant, variant, "the file names its variant");
    assert_eq!(g.new_tokens, NEW_TOKENS);
    assert_eq!(g.prompts(), prompts(), "{variant}: the golden prompts");
    assert!(
        g.min_margin() > 10.0 * TOLERANCE,
        "{variant}: HF's top-two margins ({}) must stay clear of the tolerance",
        g.min_margin()
    );
    g
}

fn assert_matches_golden(variant: &str, who: &str, runs: &[Run], g: &Golden) {
    match g.check(runs, TOLERANCE) {
        Ok(worst) => eprintln!("{variant}: {who} within {worst:e} of HF transformers"),
        Err(e) => panic!("{variant}: {who} differs from HF transformers: {e}"),
    }
}

/// Full rows compared: both logit rows of every prompt within the tolerance, same tokens.
fn assert_runs_agree(variant: &str, who: &str, got: &[Run], reference: &[Run]) {
    let margin = reference
        .iter()
        .map(|r| r.min_margin)
        .fold(f32::INFINITY, f32::min);
    assert!(
        margin > 10.0 * TOLERANCE,
        "{variant}: the reference's top-two margins ({margin}) must stay clear of the tolerance"
    );
    let mut worst = 0f32;
    for (i, (a, b)) in got.iter().zip(reference).enumerate() {
        assert_eq!(a.tokens, b.tokens, "{variant}: {who}, prompt {i}: tokens");
        for (what, x, y) in [
            ("prefill", &a.prefill_logits, &b.prefill_logits),
            ("last step", &a.last_logits, &b.last_logits),
        ] {
            let d = max_abs_diff(x, y);
            assert!(
                d <= TOLERANCE,
                "{variant}: {who}, prompt {i}, {what}: logits differ by {d}"
            );
            worst = worst.max(d);
        }
    }
    eprintln!("{variant}: {who} within {worst:e} of candle-transformers");
}

#[test]
fn gemma2_matches_hf_transformers() {
    let g = golden("gemma2");
    for (who, runs) in ours("gemma2", &prompts()) {
        assert_matches_golden("gemma2", &who, &runs, &g);
    }
}

/// With linear RoPE scaling, which only transformers of the two references reads.
#[test]
fn gemma3_matches_hf_transformers() {
    let g = golden("gemma3");
    for (who, runs) in ours("gemma3", &prompts()) {
        assert_matches_golden("gemma3", &who, &runs, &g);
    }
}

#[test]
fn gemma2_within_candle_matches_candle_gemma2_and_hf() {
    let variant = "gemma2-within-candle";
    let reference = candle(
        &mut candle_gemma2(&folder(variant)),
        Feed::WholePrompt,
        &prompts(),
        NEW_TOKENS,
    );
    candle_and_ours_match_hf(variant, "candle gemma2", &reference);
}

#[test]
fn gemma3_unscaled_matches_candle_gemma3_and_hf() {
    let variant = "gemma3-unscaled";
    let reference = candle(
        &mut candle_gemma3(&folder(variant)),
        Feed::TokenByToken,
        &prompts(),
        NEW_TOKENS,
    );
    candle_and_ours_match_hf(variant, "candle gemma3, token by token", &reference);
}

/// candle's runs (`reference`) match the HF golden file, and each of ours matches both.
fn candle_and_ours_match_hf(variant: &str, candle_name: &str, reference: &[Run]) {
    let g = golden(variant);
    assert_matches_golden(variant, candle_name, reference, &g);
    for (who, runs) in ours(variant, &prompts()) {
        assert_runs_agree(variant, &who, &runs, reference);
        assert_matches_golden(variant, &who, &runs, &g);
    }
}

/// candle's gemma3 prefill mask (`j + window < i`) lets a sliding layer's query see `window + 1`
/// keys; HF's (`i - j < window`) and ours see `window`. The golden file tells them apart on the
/// 23-token prompt, which is why candle is fed one token at a time above.
#[test]
fn candle_gemma3_prefill_admits_one_key_more() {
    let variant = "gemma3-unscaled";
    let g = golden(variant);
    let long = prompts()[2..].to_vec();
    let mut model = candle_gemma3(&folder(variant));
    let whole = candle(&mut model, Feed::WholePrompt, &long, 1);
    let by_token = candle(&mut model, Feed::TokenByToken, &long, 1);
    let by_token = g.check_prefill_row(2, &by_token[0].prefill_logits, TOLERANCE);
    assert!(
        by_token.is_ok(),
        "token by token, candle agrees with HF: {by_token:?}"
    );
    let whole = g.check_prefill_row(2, &whole[0].prefill_logits, TOLERANCE);
    assert!(
        whole.is_err(),
        "candle's whole-prompt prefill now agrees with HF: its mask was fixed, so the tests above \
         may feed it whole prompts"
    );
}

/// A broken copy of a config and what was broken.
type Mutation = (&'static str, Box<dyn Fn(&mut ModelConfig)>);

/// Each feature matters within these prompts: the plain reference with any one of them broken
/// no longer matches the golden prefill logits.
fn assert_each_mutation_fails(variant: &str, mutations: Vec<Mutation>) {
    let g = golden(variant);
    let tiny = tiny(variant);
    let cfg = project_config(variant);
    let intact = plain_prefill(&tiny, cfg.clone(), &prompts());
    assert!(g.check_prefill(&intact, TOLERANCE).is_ok());
    for (what, mutate) in mutations {
        let mut broken = cfg.clone();
        mutate(&mut broken);
        let rows = plain_prefill(&tiny, broken, &prompts());
        match g.check_prefill(&rows, TOLERANCE) {
            Ok(worst) => panic!(
                "{variant}: with {what} the logits still match HF (within {worst}): the tiny \
                 model does not make that feature matter"
            ),
            Err(e) => eprintln!("{variant}: {what} is caught: {e}"),
        }
    }
}

fn window_by(delta: isize) -> Box<dyn Fn(&mut ModelConfig)> {
    Box::new(move |c: &mut ModelConfig| {
        c.sliding_window = c.sliding_window.map(|w| w.saturating_add_signed(delta));
    })
}

fn common_mutations() -> Vec<Mutation> {
    vec![
        ("a window one key wider", window_by(1)),
        ("a window one key narrower", window_by(-1)),
        (
            "no sliding layers",
            Box::new(|c: &mut ModelConfig| c.layer_kinds.fill(LayerKind::Full)),
        ),
        (
            "the layer kinds swapped",
            Box::new(|c: &mut ModelConfig| {
                c.layer_kinds.iter_mut().for_each(|k| {
                    *k = match k {
                        LayerKind::Full => LayerKind::Sliding,
                        LayerKind::Sliding => LayerKind::Full,
                    }
                })
            }),
        ),
    ]
}

#[test]
fn every_gemma2_feature_moves_the_golden_logits() {
    let mut mutations = common_mutations();
    mutations.extend::<Vec<Mutation>>(vec![
        (
            "query_pre_attn_scalar read as head_dim",
            Box::new(|c: &mut ModelConfig| c.query_pre_attn_scalar = c.head_dim as f64),
        ),
        (
            "no attention soft-cap",
            Box::new(|c: &mut ModelConfig| c.attn_logit_softcapping = None),
        ),
        (
            "no final soft-cap",
            Box::new(|c: &mut ModelConfig| c.final_logit_softcapping = None),
        ),
    ]);
    assert_each_mutation_fails("gemma2", mutations);
}

#[test]
fn every_gemma3_feature_moves_the_golden_logits() {
    let mut mutations = common_mutations();
    mutations.extend::<Vec<Mutation>>(vec![
        (
            "RoPE scaling ignored",
            Box::new(|c: &mut ModelConfig| c.rope_scaling_factor = 1.0),
        ),
        (
            "the global RoPE base on sliding layers",
            Box::new(|c: &mut ModelConfig| c.rope_local_theta = c.rope_theta),
        ),
        (
            "the local RoPE base on global layers",
            Box::new(|c: &mut ModelConfig| c.rope_theta = c.rope_local_theta),
        ),
    ]);
    assert_each_mutation_fails("gemma3", mutations);
}

/// A golden file made from another tiny model is refused, naming what changed.
#[test]
fn a_stale_golden_file_is_refused() {
    let recorded = tiny("gemma3").provenance();
    assert_eq!(check_provenance(&recorded, &tiny("gemma3")), Ok(()));
    let reseeded = TinyGemma {
        seed: 4,
        ..tiny("gemma3")
    };
    let why = check_provenance(&recorded, &reseeded).expect_err("another seed");
    assert!(why.contains("seed: file 3, kit 4"), "{why}");
    assert!(why.contains("weights_fnv1a64"), "{why}");
    let rewindowed = TinyGemma {
        sliding_window: 6,
        ..tiny("gemma3")
    };
    let why = check_provenance(&recorded, &rewindowed).expect_err("another window");
    assert!(
        why.contains("config.sliding_window: file 5, kit 6"),
        "{why}"
    );
}
