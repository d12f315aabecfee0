//! The shard plan: which worker holds which layers, heads, MLP columns and vocabulary rows.
//!
//! Megatron-style: attention is split by heads (q/k/v column-parallel, o row-parallel), the MLP by
//! intermediate columns (gate/up column-parallel, down row-parallel), the embedding and the tied
//! lm_head by vocabulary rows. Layers are split into contiguous pipeline stages.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::error::PlanError;

/// What the operator asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRequest {
    /// Tensor-parallel ranks per stage.
    pub tp: usize,
    /// Pipeline stages.
    pub pp: usize,
    /// Optional explicit layer count per stage (hosts of different sizes); even split otherwise.
    pub layers_per_stage: Option<Vec<usize>>,
}

impl PlanRequest {
    pub fn new(tp: usize, pp: usize) -> Self {
        Self {
            tp,
            pp,
            layers_per_stage: None,
        }
    }

    pub fn with_layers(mut self, layers_per_stage: Vec<usize>) -> Self {
        self.layers_per_stage = Some(layers_per_stage);
        self
    }
}

/// One worker's share of the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSpec {
    /// Pipeline stage, 0-based.
    pub stage: usize,
    /// Tensor rank within the stage, 0-based.
    pub rank: usize,
    pub tp: usize,
    pub pp: usize,
    /// Decoder layers of this stage.
    pub layers: Range<usize>,
    /// Query heads this rank computes.
    pub q_heads: Range<usize>,
    /// Key-value heads this rank holds; when tp exceeds num_key_value_heads several ranks hold
    /// the same head (replication).
    pub kv_heads: Range<usize>,
    /// Columns of gate/up (rows of down) this rank holds.
    pub mlp_cols: Range<usize>,
    /// Rows of the embedding (= lm_head) this rank holds.
    pub vocab_rows: Range<usize>,
}

impl ShardSpec {
    pub fn is_first_stage(&self) -> bool {
        self.stage == 0
    }

    pub fn is_last_stage(&self) -> bool {
        self.stage + 1 == self.pp
    }

    /// Weight parameters this shard holds (what its loading progress counts toward).
    pub fn num_parameters(&self, cfg: &ModelConfig) -> usize {
        let h = cfg.hidden_size;
        let hd = cfg.head_dim;
        let embedding = if self.is_first_stage() || self.is_last_stage() {
            self.vocab_rows.len() * h
        } else {
            0
        };
        let per_layer = 2 * self.q_heads.len() * hd * h
            + 2 * self.kv_heads.len() * hd * h
            + 3 * self.mlp_cols.len() * h
            + 2 * h;
        let final_norm = if self.is_last_stage() { h } else { 0 };
        embedding + self.layers.len() * per_layer + final_norm
    }

    /// Index of this shard in the plan's stage-major order.
    pub fn index(&self) -> usize {
        self.stage * self.tp + self.rank
    }
}

/// The whole cluster's assignment, stage-major: shard `stage * tp + rank`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPlan {
    pub tp: usize,
    pub pp: usize,
    pub shards: Vec<ShardSpec>,
}

impl ShardPlan {
    /// Computes the plan, or explains why the request cannot work and what would.
    pub fn new(cfg: &ModelConfig, req: &PlanRequest) -> Result<Self, PlanError> {
        let (tp, pp) = (req.tp, req.pp);
        if tp == 0 {
            return Err(PlanError::Zero {
                what: "tp",
                value: 0,
            });
        }
        if pp == 0 {
            return Err(PlanError::Zero {
                what: "pp",
                value: 0,
            });
        }
        check_heads(cfg, tp)?;
        if tp > cfg.intermediate_size {
            return Err(PlanError::TooManyRanks {
                tp,
                intermediate: cfg.intermediate_size,
            });
        }
        let stage_layers = stage_layer_ranges(cfg.num_hidden_layers, pp, req)?;
        let shards = stage_layers
            .iter()
            .enumerate()
            .flat_map(|(stage, layers)| {
                (0..tp).map(move |rank| ShardSpec {
                    stage,
                    rank,
                    tp,
                    pp,
                    layers: layers.clone(),
                    q_heads: even_slice(cfg.num_attention_heads, tp, rank),
                    kv_heads: kv_heads_of_rank(cfg, tp, rank),
                    mlp_cols: even_slice(cfg.intermediate_size, tp, rank),
                    vocab_rows: even_slice(cfg.vocab_size, tp, rank),
                })
            })
            .collect();
        Ok(Self { tp, pp, shards })
    }

    pub fn shard(&self, stage: usize, rank: usize) -> Option<&ShardSpec> {
        if stage < self.pp && rank < self.tp {
            self.shards.get(stage * self.tp + rank)
        } else {
            None
        }
    }

    pub fn world_size(&self) -> usize {
        self.shards.len()
    }
}

/// TP values that would work for this model, for error messages.
fn allowed_tp(cfg: &ModelConfig) -> String {
    let ok: Vec<String> = (1..=cfg.num_attention_heads)
        .filter(|&tp| heads_fit(cfg, tp))
        .map(|tp| tp.to_string())
        .collect();
    match ok.as_slice() {
        [] => "1".to_string(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} or {}", rest.join(", "), last),
    }
}

/// TP must divide the query heads, and either divide the KV heads (each rank owns whole KV heads)
/// or be a multiple of them (each KV head is replicated on the ranks whose query heads read it).
fn heads_fit(cfg: &ModelConfig, tp: usize) -> bool {
    let (heads, kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    heads.is_multiple_of(tp) && (kv.is_multiple_of(tp) || tp.is_multiple_of(kv))
}

fn check_heads(cfg: &ModelConfig, tp: usize) -> Result<(), PlanError> {
    let heads = cfg.num_attention_heads;
    let kv = cfg.num_key_value_heads;
    if !heads.is_multiple_of(tp) {
        return Err(PlanError::HeadsNotDivisible {
            tp,
            heads,
            allowed: allowed_tp(cfg),
        });
    }
    if !heads_fit(cfg, tp) {
        return Err(PlanError::KvHeadsIncompatible {
            tp,
            kv_heads: kv,
            allowed: allowed_tp(cfg),
        });
    }
    Ok(())
}

fn kv_heads_of_rank(cfg: &ModelConfig, tp: usize, rank: usize) -> Range<usize> {
    let kv = cfg.num_key_value_heads;
    if tp <= kv {
        even_slice(kv, tp, rank)
    } else {
        // Replicated: the rank's first query head decides its KV head; check_heads guarantees
        // all its query heads share it.
        let q_per_rank = cfg.num_attention_heads / tp;
        let head = rank * q_per_rank / cfg.queries_per_kv_head();
        head..head + 1
    }
}

/// Rank `rank`'s part of `n` items split `parts` ways: contiguous, sizes differing by at most one
/// (the first `n % parts` ranks take one more), never empty while `parts <= n`.
pub fn even_slice(n: usize, parts: usize, rank: usize) -> Range<usize> {
    let (base, extra) = (n / parts, n % parts);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

fn stage_layer_ranges(
    layers: usize,
    pp: usize,
    req: &PlanRequest,
) -> Result<Vec<Range<usize>>, PlanError> {
    if pp > layers {
        return Err(PlanError::TooManyStages { pp, layers });
    }
    let counts = match &req.layers_per_stage {
        Some(given) => {
            if given.len() != pp {
                return Err(PlanError::StageCountMismatch {
                    given: given.clone(),
                    len: given.len(),
                    pp,
                });
            }
            if let Some(stage) = given.iter().position(|&c| c == 0) {
                return Err(PlanError::EmptyStage {
                    given: given.clone(),
                    stage,
                });
            }
            let sum: usize = given.iter().sum();
            if sum != layers {
                return Err(PlanError::LayerSumMismatch {
                    given: given.clone(),
                    sum,
                    layers,
                });
            }
            given.clone()
        }
        None => (0..pp).map(|s| even_slice(layers, pp, s).len()).collect(),
    };
    let mut start = 0;
    Ok(counts
        .iter()
        .map(|&c| {
            let r = start..start + c;
            start += c;
            r
        })
        .collect())
}
