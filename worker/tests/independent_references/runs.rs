//! Greedy runs of one tiny model by each implementation: the worker's paged model (a whole plan
//! in one process, as the cluster runs it), the kit's plain reference, and candle-transformers'
//! gemma2 and gemma3 reading config.json with their own serde `Config`.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{gemma2, gemma3};
use gemma_proto::candidates::argmax;
use gemma_proto::{KvBlockManager, ModelConfig, PlanRequest};
use gemma_testkit::compare::top2_margin;
use gemma_testkit::reference::NaiveGemma;
use gemma_testkit::{generate_greedy, stored_values, GreedyOptions, LocalCluster, TinyGemma};
use gemma_worker::{ModelFolder, ShardOptions};

/// One prompt's greedy continuation.
#[derive(Debug, Clone)]
pub struct Run {
    /// The logits at the last prompt token.
    pub prefill_logits: Vec<f32>,
    /// The logits that picked the last generated token.
    pub last_logits: Vec<f32>,
    pub tokens: Vec<u32>,
    /// The smallest lead of the best logit over the second along the way (infinite where the
    /// implementation does not report every row).
    pub min_margin: f32,
}

/// The worker's model under `req`: prompts admitted one per step while the others decode,
/// prefilled in chunks of 8 through a paged cache of 4-token blocks.
pub fn paged(dir: &Path, req: PlanRequest, prompts: &[Vec<u32>], new_tokens: usize) -> Vec<Run> {
    let folder = ModelFolder::open(dir).expect("open model folder");
    let opts = ShardOptions {
        kv_blocks: 64,
        block_size: 4,
        ..ShardOptions::default()
    };
    let cluster = LocalCluster::load(&folder, &req, &opts).expect("load plan");
    let kv = KvBlockManager::new(opts.kv_blocks, opts.block_size);
    let out = generate_greedy(
        &cluster,
        &kv,
        prompts,
        &GreedyOptions {
            max_new_tokens: new_tokens,
            prefill_chunk: 8,
        },
    )
    .expect("generate");
    assert!(out.max_batch >= 2, "steps carried several sequences");
    out.prefill_logits
        .into_iter()
        .zip(out.last_logits)
        .zip(out.tokens)
        .map(|((prefill_logits, last_logits), tokens)| Run {
            prefill_logits,
            last_logits,
            tokens,
            min_margin: f32::INFINITY,
        })
        .collect()
}

/// The kit's plain reference under `cfg` (the tiny model's own, parsed by the project, or a
/// deliberately broken one).
pub fn plain(
    tiny: &TinyGemma,
    cfg: ModelConfig,
    prompts: &[Vec<u32>],
    new_tokens: usize,
) -> Vec<Run> {
    let naive = plain_model(tiny, cfg);
    prompts
        .iter()
        .map(|prompt| {
            let mut session = naive.session();
            greedy(prompt, new_tokens, |tokens| {
                tokens.iter().for_each(|&t| session.feed(t));
                session.logits()
            })
        })
        .collect()
}

/// The plain reference's prefill logits only (cheap: one row of logits per prompt).
pub fn plain_prefill(tiny: &TinyGemma, cfg: ModelConfig, prompts: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let naive = plain_model(tiny, cfg);
    prompts
        .iter()
        .map(|prompt| {
            let mut session = naive.session();
            prompt.iter().for_each(|&t| session.feed(t));
            session.logits()
        })
        .collect()
}

fn plain_model(tiny: &TinyGemma, cfg: ModelConfig) -> NaiveGemma {
    let tensors = tiny
        .tensors()
        .into_iter()
        .map(|(name, shape, values)| (name, shape, stored_values(&values, tiny.storage)))
        .collect();
    NaiveGemma::new(cfg, tensors)
}

/// How a candle model takes the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// The whole prompt in one forward (candle's prefill masks).
    WholePrompt,
    /// One token per forward (candle's decode path, for the prompt too).
    TokenByToken,
}

/// What the two candle models have in common.
pub trait CandleGemma {
    fn forward(&mut self, ids: &Tensor, offset: usize) -> candle_core::Result<Tensor>;
    fn clear_kv_cache(&mut self);
}

impl CandleGemma for gemma2::Model {
    fn forward(&mut self, ids: &Tensor, offset: usize) -> candle_core::Result<Tensor> {
        gemma2::Model::forward(self, ids, offset)
    }
    fn clear_kv_cache(&mut self) {
        gemma2::Model::clear_kv_cache(self)
    }
}

impl CandleGemma for gemma3::Model {
    fn forward(&mut self, ids: &Tensor, offset: usize) -> candle_core::Result<Tensor> {
        gemma3::Model::forward(self, ids, offset)
    }
    fn clear_kv_cache(&mut self) {
        gemma3::Model::clear_kv_cache(self)
    }
}

/// candle-transformers' gemma2 in f32, configured by its own reading of `dir/config.json`.
pub fn candle_gemma2(dir: &Path) -> gemma2::Model {
    let cfg: gemma2::Config = serde_json::from_str(&read_config(dir)).expect("candle's gemma2");
    gemma2::Model::new(false, &cfg, var_builder(dir)).expect("candle gemma2 model")
}

/// candle-transformers' gemma3 in f32, configured by its own reading of `dir/config.json`.
pub fn candle_gemma3(dir: &Path) -> gemma3::Model {
    let cfg: gemma3::Config = serde_json::from_str(&read_config(dir)).expect("candle's gemma3");
    gemma3::Model::new(false, &cfg, var_builder(dir)).expect("candle gemma3 model")
}

/// Each prompt alone through a candle model, greedy.
pub fn candle(
    model: &mut impl CandleGemma,
    feed: Feed,
    prompts: &[Vec<u32>],
    new_tokens: usize,
) -> Vec<Run> {
    prompts
        .iter()
        .map(|prompt| {
            model.clear_kv_cache();
            let mut position = 0;
            greedy(prompt, new_tokens, |tokens| {
                let chunks: Vec<&[u32]> = match feed {
                    Feed::WholePrompt => vec![tokens],
                    Feed::TokenByToken => tokens.chunks(1).collect(),
                };
                let mut logits = Vec::new();
                for chunk in chunks {
                    let ids = Tensor::new(chunk, &Device::Cpu)
                        .and_then(|t| t.unsqueeze(0))
                        .expect("ids");
                    let out = model.forward(&ids, position).expect("candle forward");
                    logits = out
                        .flatten_all()
                        .and_then(|t| t.to_vec1::<f32>())
                        .expect("logits");
                    position += chunk.len();
                }
                logits
            })
        })
        .collect()
}

/// Greedy decoding of `prompt` (at least one new token) over `append`, which appends tokens
/// (first the prompt, then each picked token) and returns the logits after the last of them.
fn greedy(prompt: &[u32], new_tokens: usize, mut append: impl FnMut(&[u32]) -> Vec<f32>) -> Run {
    let mut logits = append(prompt);
    let prefill_logits = logits.clone();
    let mut tokens = Vec::with_capacity(new_tokens);
    let mut min_margin = f32::INFINITY;
    loop {
        min_margin = min_margin.min(top2_margin(&logits));
        let token = argmax(&logits);
        tokens.push(token);
        if tokens.len() >= new_tokens {
            return Run {
                prefill_logits,
                last_logits: logits,
                tokens,
                min_margin,
            };
        }
        logits = append(&[token]);
    }
}

fn read_config(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("config.json")).expect("config.json")
}

fn var_builder(dir: &Path) -> VarBuilder<'static> {
    // SAFETY: the fixture file is written once and never modified while mapped.
    unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .expect("candle weights")
}
