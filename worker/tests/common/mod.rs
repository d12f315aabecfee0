//! Fixtures shared by the worker's tests: tiny models written once per test binary, prompts, and
//! the single-process reference (candle-transformers' Gemma, in f32).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::gemma;
use gemma_proto::candidates::argmax;
use gemma_proto::{KvBlockManager, ModelConfig, PlanRequest, SplitMix64};
pub use gemma_testkit::compare::{max_abs_diff, top2_margin};
use gemma_testkit::{
    generate_greedy, GreedyOptions, GreedyOutput, LocalCluster, Storage, TinyGemma,
};
use gemma_worker::{ModelFolder, ShardOptions};

pub const NEW_TOKENS: usize = 32;
/// Logits of a plan vs the single-process reference (f32).
pub const F32_TOLERANCE: f32 = 1e-4;

struct Fixtures {
    _root: tempfile::TempDir,
    mha: PathBuf,
    mqa: PathBuf,
    mha_bf16: PathBuf,
    mha_f16: PathBuf,
    mha_sharded_files: PathBuf,
    gemma2: PathBuf,
    gemma3: PathBuf,
}

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let root = tempfile::tempdir_in(gemma_testkit::process_scratch()).expect("temp dir");
        let write = |name: &str, m: TinyGemma| {
            let dir = root.path().join(name);
            m.write(&dir).expect("write tiny model");
            dir
        };
        Fixtures {
            mha: write("mha", TinyGemma::mha_like_7b()),
            mqa: write("mqa", TinyGemma::mqa_like_2b()),
            mha_bf16: write(
                "mha-bf16",
                TinyGemma::mha_like_7b().with_storage(Storage::Bf16),
            ),
            mha_f16: write(
                "mha-f16",
                TinyGemma::mha_like_7b().with_storage(Storage::F16),
            ),
            mha_sharded_files: write("mha-3-files", TinyGemma::mha_like_7b().with_files(3)),
            gemma2: write("gemma2", TinyGemma::gemma2_like()),
            gemma3: write("gemma3", TinyGemma::gemma3_like()),
            _root: root,
        }
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Model {
    Mha,
    Mqa,
    MhaBf16,
    MhaF16,
    MhaShardedFiles,
    Gemma2,
    Gemma3,
}

impl Model {
    pub fn dir(self) -> &'static Path {
        let f = fixtures();
        match self {
            Model::Mha => &f.mha,
            Model::Mqa => &f.mqa,
            Model::MhaBf16 => &f.mha_bf16,
            Model::MhaF16 => &f.mha_f16,
            Model::MhaShardedFiles => &f.mha_sharded_files,
            Model::Gemma2 => &f.gemma2,
            Model::Gemma3 => &f.gemma3,
        }
    }

    /// The tiny model behind the fixture.
    pub fn tiny(self) -> TinyGemma {
        match self {
            Model::Mha | Model::MhaShardedFiles => TinyGemma::mha_like_7b(),
            Model::Mqa => TinyGemma::mqa_like_2b(),
            Model::MhaBf16 => TinyGemma::mha_like_7b().with_storage(Storage::Bf16),
            Model::MhaF16 => TinyGemma::mha_like_7b().with_storage(Storage::F16),
            Model::Gemma2 => TinyGemma::gemma2_like(),
            Model::Gemma3 => TinyGemma::gemma3_like(),
        }
    }
}

/// Three prompts of different lengths, each starting with <bos>.
pub fn prompts() -> Vec<Vec<u32>> {
    let mut rng = SplitMix64::new(42);
    [5usize, 11, 23]
        .iter()
        .map(|&n| {
            std::iter::once(2)
                .chain((1..n).map(|_| 3 + (rng.next_u64() % 255_990) as u32))
                .collect()
        })
        .collect()
}

/// The reference: each prompt alone through candle-transformers' Gemma, greedy, with the
/// smallest top-two margin seen along the way.
pub struct Reference {
    pub prefill_logits: Vec<Vec<f32>>,
    pub tokens: Vec<Vec<u32>>,
    pub min_margin: f32,
}

/// The reference for `model`'s weights (computed once per test binary).
pub fn reference(model: Model) -> &'static Reference {
    static MHA: OnceLock<Reference> = OnceLock::new();
    static MQA: OnceLock<Reference> = OnceLock::new();
    static MHA_BF16: OnceLock<Reference> = OnceLock::new();
    static MHA_F16: OnceLock<Reference> = OnceLock::new();
    static GEMMA2: OnceLock<Reference> = OnceLock::new();
    static GEMMA3: OnceLock<Reference> = OnceLock::new();
    let (cell, source) = match model {
        // candle-transformers' gemma2/gemma3 implement only part of these models: here every
        // plan is held to the plain reference, which independent_references/ holds (with the
        // paged model) to HF transformers' golden logits and to candle where candle agrees.
        Model::Gemma2 => return GEMMA2.get_or_init(|| naive_reference(model)),
        Model::Gemma3 => return GEMMA3.get_or_init(|| naive_reference(model)),
        // The same weights as Mha, split over three files.
        Model::Mha | Model::MhaShardedFiles => (&MHA, Model::Mha),
        Model::Mqa => (&MQA, Model::Mqa),
        Model::MhaBf16 => (&MHA_BF16, Model::MhaBf16),
        Model::MhaF16 => (&MHA_F16, Model::MhaF16),
    };
    cell.get_or_init(|| run_reference(source.dir()))
}

/// The plain reference (gemma_testkit::reference) on each prompt alone, greedy.
pub fn naive_reference(model: Model) -> Reference {
    let naive = model.tiny().reference();
    let mut out = Reference {
        prefill_logits: Vec::new(),
        tokens: Vec::new(),
        min_margin: f32::INFINITY,
    };
    for prompt in prompts() {
        let g = naive.greedy(&prompt, NEW_TOKENS);
        out.prefill_logits.push(g.prefill_logits);
        out.tokens.push(g.tokens);
        out.min_margin = out.min_margin.min(g.min_margin);
    }
    out
}

fn run_reference(dir: &Path) -> Reference {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).expect("config");
    let rcfg = gemma::Config {
        attention_bias: false,
        head_dim: cfg.head_dim,
        hidden_act: None,
        hidden_activation: Some(candle_nn::Activation::GeluPytorchTanh),
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        num_attention_heads: cfg.num_attention_heads,
        num_hidden_layers: cfg.num_hidden_layers,
        num_key_value_heads: cfg.num_key_value_heads,
        rms_norm_eps: cfg.rms_norm_eps,
        rope_theta: cfg.rope_theta,
        vocab_size: cfg.vocab_size,
        max_position_embeddings: cfg.max_position_embeddings,
    };
    let dev = Device::Cpu;
    // SAFETY: the fixture file is written once and never modified while mapped.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &dev)
    }
    .expect("reference weights");
    let mut m = gemma::Model::new(false, &rcfg, vb).expect("reference model");
    let mut out = Reference {
        prefill_logits: Vec::new(),
        tokens: Vec::new(),
        min_margin: f32::INFINITY,
    };
    for prompt in prompts() {
        m.clear_kv_cache();
        let input = Tensor::new(prompt.as_slice(), &dev)
            .and_then(|t| t.unsqueeze(0))
            .expect("ids");
        let mut logits = last_logits(&m.forward(&input, 0).expect("prefill"));
        out.prefill_logits.push(logits.clone());
        let mut toks = Vec::new();
        for pos in prompt.len()..prompt.len() + NEW_TOKENS {
            out.min_margin = out.min_margin.min(top2_margin(&logits));
            let t = argmax(&logits);
            toks.push(t);
            let input = Tensor::new(&[[t]], &dev).expect("id");
            logits = last_logits(&m.forward(&input, pos).expect("decode"));
        }
        out.tokens.push(toks);
    }
    out
}

fn last_logits(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("logits")
}

/// Loads `model` with `req` in one process and generates greedily for [`prompts`].
pub fn run_plan(model: Model, req: PlanRequest, opts: ShardOptions) -> GreedyOutput {
    let folder = ModelFolder::open(model.dir()).expect("open model folder");
    let cluster = LocalCluster::load(&folder, &req, &opts).expect("load plan");
    let kv = KvBlockManager::new(opts.kv_blocks, opts.block_size);
    let out = generate_greedy(
        &cluster,
        &kv,
        &prompts(),
        &GreedyOptions {
            max_new_tokens: NEW_TOKENS,
            prefill_chunk: 8,
        },
    )
    .expect("generate");
    assert_eq!(kv.used_blocks(), 0, "every KV block returns to the pool");
    out
}

/// Small blocks so that prompts span several blocks and the tables are non-trivial.
pub fn small_blocks() -> ShardOptions {
    ShardOptions {
        kv_blocks: 64,
        block_size: 4,
        ..ShardOptions::default()
    }
}

/// Asserts a run agrees with the reference: logits within `tol`, identical greedy tokens.
pub fn assert_matches_reference(out: &GreedyOutput, reference: &Reference, tol: f32) {
    assert!(
        reference.min_margin > 10.0 * tol,
        "the prompts must keep the reference's top-two margins ({}) clear of the tolerance {tol}",
        reference.min_margin
    );
    for (i, (got, want)) in out
        .prefill_logits
        .iter()
        .zip(&reference.prefill_logits)
        .enumerate()
    {
        let d = max_abs_diff(got, want);
        assert!(
            d <= tol,
            "prompt {i}: last-position logits differ by {d} > {tol}"
        );
    }
    assert_eq!(
        out.tokens, reference.tokens,
        "greedy tokens differ from the reference"
    );
}
