//! A loaded shard of a Gemma model: pipeline stage p x tensor rank t of a [`ShardPlan`].
//!
//! [`ShardPlan`]: gemma_proto::ShardPlan

pub mod activation;
pub mod attention;
pub mod context;
pub mod decode_attention;
pub mod embedding;
pub mod layer;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod rope;

use candle_core::{DType, Device, Tensor};
use gemma_proto::{LayerKind, ModelConfig, ShardSpec, StepBatch};

use crate::collective::Collective;
use crate::error::{LoadError, StepError};
use crate::kv_cache::KvCache;
use crate::weights::{QuantizedWeights, WeightFiles};
use context::StepContext;
use embedding::VocabParallelEmbedding;
use layer::DecoderLayer;
use norm::RmsNorm;
use rope::Rope;

/// How a shard is loaded.
#[derive(Debug, Clone)]
pub struct ShardOptions {
    /// Compute dtype: f32 on the CPU by default (candle's bf16 CPU matmul is ~30x slower).
    pub dtype: DType,
    pub device: Device,
    /// KV blocks in this shard's pool (the same number on every shard of a cluster).
    pub kv_blocks: usize,
    pub block_size: usize,
    /// Whether quantized (GGUF) weights stay in their blocks.
    pub quantized: QuantizedWeights,
}

impl Default for ShardOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            kv_blocks: 256,
            block_size: gemma_proto::DEFAULT_BLOCK_SIZE,
            quantized: QuantizedWeights::Keep,
        }
    }
}

/// What a stage hands on: hidden states to the next stage, or (last stage) the logits of this
/// rank's vocabulary slice at each sequence's last token.
#[derive(Debug)]
pub enum StageOutput {
    /// [tokens, hidden] in the compute dtype.
    Hidden(Tensor),
    /// [vocab slice, seqs] in f32 (vocabulary-major: see `VocabParallelEmbedding::logits`).
    Logits(Tensor),
}

/// A step batch that a shard of this model accepts: only [`Shard::validate`] makes one, so
/// [`Shard::step`] never runs an unchecked batch and never checks one twice. The checks depend
/// only on the model's config, which every shard of a cluster shares.
#[derive(Debug, Clone, Copy)]
pub struct ValidBatch<'a>(&'a StepBatch);

impl<'a> ValidBatch<'a> {
    pub fn batch(&self) -> &'a StepBatch {
        self.0
    }
}

/// A shard's weights and the tables derived from them: everything of a loaded shard that does not
/// depend on its assignment. A worker re-assigned to the very same shard keeps these and rebuilds
/// only the KV cache and the collective ([`ShardWeights::attach`]).
pub struct ShardWeights {
    cfg: ModelConfig,
    spec: ShardSpec,
    dtype: DType,
    device: Device,
    /// Stage 0 embeds with it, the last stage computes logits with it (tied).
    embedding: Option<VocabParallelEmbedding>,
    layers: Vec<DecoderLayer>,
    final_norm: Option<RmsNorm>,
    /// The full-attention layers' RoPE.
    rope: Rope,
    /// The sliding layers' RoPE, where its base differs (Gemma 3).
    local_rope: Option<Rope>,
    weight_bytes: u64,
}

/// A shard that exists only loaded: there is no way to step one that is not.
pub struct Shard {
    weights: ShardWeights,
    kv: KvCache,
    group: Box<dyn Collective>,
}

impl ShardWeights {
    /// Loads `spec`'s slices of the model.
    pub fn load(
        files: &WeightFiles,
        cfg: &ModelConfig,
        spec: &ShardSpec,
        opts: &ShardOptions,
    ) -> Result<Self, LoadError> {
        let (dtype, device) = (opts.dtype, &opts.device);
        let before = files.bytes_read();
        let embedding = if spec.is_first_stage() || spec.is_last_stage() {
            Some(VocabParallelEmbedding::load(
                files,
                cfg.vocab_size,
                cfg.hidden_size,
                spec.vocab_rows.clone(),
                opts,
            )?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(spec.layers.len());
        for i in spec.layers.clone() {
            layers.push(DecoderLayer::load(files, i, cfg, spec, opts)?);
            tracing::debug!(
                stage = spec.stage,
                rank = spec.rank,
                layer = i,
                bytes_loaded = files.bytes_read() - before,
                "loaded layer"
            );
        }
        let final_norm = if spec.is_last_stage() {
            Some(RmsNorm::load(
                files,
                "model.norm.weight",
                cfg.hidden_size,
                cfg.rms_norm_eps,
                device,
            )?)
        } else {
            None
        };
        let rope_err = |source| LoadError::Candle {
            tensor: "rope tables".to_string(),
            source,
        };
        let rope = Rope::new(
            cfg.head_dim,
            cfg.rope_theta,
            cfg.rope_scaling_factor,
            cfg.max_position_embeddings,
            dtype,
            device,
        )
        .map_err(rope_err)?;
        let local_differs =
            cfg.rope_local_theta != cfg.rope_theta || cfg.rope_scaling_factor != 1.0;
        let local_rope = match local_differs && cfg.layer_kinds.contains(&LayerKind::Sliding) {
            true => Some(
                Rope::new(
                    cfg.head_dim,
                    cfg.rope_local_theta,
                    1.0,
                    cfg.max_position_embeddings,
                    dtype,
                    device,
                )
                .map_err(rope_err)?,
            ),
            false => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            spec: spec.clone(),
            dtype,
            device: device.clone(),
            embedding,
            layers,
            final_norm,
            rope,
            local_rope,
            weight_bytes: files.bytes_read() - before,
        })
    }

    pub fn spec(&self) -> &ShardSpec {
        &self.spec
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes of weights this shard read from the model files.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// A servable shard: these weights with a fresh (empty) KV pool of `kv_blocks` blocks and
    /// `group`, the collective of the stage's ranks.
    pub fn attach(
        self,
        kv_blocks: usize,
        block_size: usize,
        group: Box<dyn Collective>,
    ) -> Result<Shard, LoadError> {
        let kv = KvCache::new(
            self.layers.len(),
            kv_blocks,
            block_size,
            self.spec.kv_heads.len(),
            self.cfg.head_dim,
            self.dtype,
            &self.device,
        )
        .map_err(LoadError::KvCache)?;
        Ok(Shard {
            weights: self,
            kv,
            group,
        })
    }
}

impl Shard {
    /// Loads `spec`'s slices of the model; `group` connects it to the other ranks of its stage.
    pub fn load(
        files: &WeightFiles,
        cfg: &ModelConfig,
        spec: &ShardSpec,
        opts: &ShardOptions,
        group: Box<dyn Collective>,
    ) -> Result<Self, LoadError> {
        ShardWeights::load(files, cfg, spec, opts)?.attach(opts.kv_blocks, opts.block_size, group)
    }

    /// Gives up the KV cache and the collective and keeps the weights, for a later
    /// [`ShardWeights::attach`] to the same shard.
    pub fn into_weights(self) -> ShardWeights {
        self.weights
    }

    pub fn spec(&self) -> &ShardSpec {
        &self.weights.spec
    }

    pub fn config(&self) -> &ModelConfig {
        &self.weights.cfg
    }

    /// Bytes of weights this shard read from the model files.
    pub fn weight_bytes(&self) -> u64 {
        self.weights.weight_bytes
    }

    pub fn kv_blocks(&self) -> usize {
        self.kv.num_blocks()
    }

    pub fn dtype(&self) -> DType {
        self.weights.dtype
    }

    /// Checks a batch against this shard's model: what would corrupt the cache or index out of
    /// range is refused here, identically on every rank and before any collective, so a bad step
    /// fails cleanly everywhere. A later stage checks before waiting for its input, so a batch
    /// refused everywhere never leaves a stage waiting for the one before.
    pub fn validate<'a>(&self, batch: &'a StepBatch) -> Result<ValidBatch<'a>, StepError> {
        let invalid = |m: String| Err(StepError::Invalid(m));
        if batch.seqs.is_empty() {
            return invalid("the step has no sequences".to_string());
        }
        for seq in &batch.seqs {
            if seq.tokens.is_empty() {
                return invalid(format!("sequence {} has no tokens", seq.seq_id));
            }
            if let Some(t) = seq
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.weights.cfg.vocab_size)
            {
                return invalid(format!(
                    "sequence {}: token id {t} is outside the vocabulary of {}",
                    seq.seq_id, self.weights.cfg.vocab_size
                ));
            }
            // Candidate lists are allocated by the count asked for: more than the vocabulary
            // could never be filled, and a stranger's u32::MAX would abort the process.
            if seq.top_candidates as usize > self.weights.cfg.vocab_size {
                return invalid(format!(
                    "sequence {}: {} top candidates asked for; allowed: 0 (every logit) to the \
                     vocabulary size, {}",
                    seq.seq_id, seq.top_candidates, self.weights.cfg.vocab_size
                ));
            }
            // Sampling asks are checked here too, so every rank refuses the same batch alike
            // and none waits for a peer that refused.
            if let Some(spec) = &seq.sampling {
                spec.check(seq.seq_id, self.weights.cfg.vocab_size)?;
            }
            if seq.end_pos() > self.weights.rope.max_positions() {
                return invalid(format!(
                    "sequence {}: positions up to {} exceed max_position_embeddings {}",
                    seq.seq_id,
                    seq.end_pos(),
                    self.weights.rope.max_positions()
                ));
            }
        }
        crate::kv_cache::check_block_sharing(&batch.seqs, self.kv.block_size())?;
        Ok(ValidBatch(batch))
    }

    /// Runs one checked step through this shard's layers. Stage 0 embeds the batch's tokens;
    /// later stages take the previous stage's hidden states as `input`.
    pub fn step(
        &self,
        batch: &ValidBatch<'_>,
        input: Option<&Tensor>,
    ) -> Result<StageOutput, StepError> {
        let batch = batch.batch();
        let _span = tracing::debug_span!(
            "shard_step",
            stage = self.weights.spec.stage,
            rank = self.weights.spec.rank,
            seqs = batch.seqs.len(),
            tokens = batch.num_tokens()
        )
        .entered();
        self.validate_input(batch, input)?;
        let window = self
            .weights
            .cfg
            .sliding_window
            .filter(|_| self.weights.cfg.layer_kinds.contains(&LayerKind::Sliding));
        let ctx = StepContext::new(
            batch,
            (&self.weights.rope, self.weights.local_rope.as_ref()),
            window,
            &self.kv,
            &self.weights.device,
        )?;
        let result = self.forward(batch, input, &ctx);
        if let Err(e) = &result {
            // Peers may be waiting in a collective this rank will never reach.
            self.group.abort(&e.to_string());
        }
        result
    }

    fn forward(
        &self,
        batch: &StepBatch,
        input: Option<&Tensor>,
        ctx: &StepContext,
    ) -> Result<StageOutput, StepError> {
        let mut x = match (&self.weights.embedding, input) {
            (Some(emb), _) if self.weights.spec.is_first_stage() => self.embed(emb, batch)?,
            (_, Some(hidden)) => hidden.clone(),
            _ => return Err(StepError::Invalid("no input hidden states".to_string())),
        };
        for (i, layer) in self.weights.layers.iter().enumerate() {
            let kv = self
                .kv
                .layer(i)
                .ok_or_else(|| StepError::Invalid(format!("no KV cache for layer {i}")))?;
            x = layer.forward(&x, ctx, kv, self.group.as_ref())?;
        }
        match (&self.weights.final_norm, &self.weights.embedding) {
            (Some(norm), Some(emb)) => {
                let last = x.index_select(&ctx.last_rows, 0)?;
                let logits = emb.logits(&norm.forward(&last)?)?;
                let logits = match self.weights.cfg.final_logit_softcapping {
                    Some(cap) => ((logits / cap)?.tanh()? * cap)?,
                    None => logits,
                };
                Ok(StageOutput::Logits(logits))
            }
            _ => Ok(StageOutput::Hidden(x)),
        }
    }

    /// Vocab-parallel embedding, all-reduced, times sqrt(hidden) rounded to the compute dtype
    /// first (in bf16 sqrt(3072) is 55.5).
    fn embed(&self, emb: &VocabParallelEmbedding, batch: &StepBatch) -> Result<Tensor, StepError> {
        let tokens: Vec<u32> = batch
            .seqs
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect();
        let x = self.group.all_reduce_sum(&emb.embed_partial(&tokens)?)?;
        let normalizer = Tensor::new(
            (self.weights.cfg.hidden_size as f32).sqrt(),
            &self.weights.device,
        )?
        .to_dtype(self.weights.dtype)?;
        Ok(x.broadcast_mul(&normalizer)?)
    }

    /// The previous stage's hidden states, for a stage that is not the first.
    fn validate_input(&self, batch: &StepBatch, input: Option<&Tensor>) -> Result<(), StepError> {
        let invalid = |m: String| Err(StepError::Invalid(m));
        if !self.weights.spec.is_first_stage() {
            let expected = [batch.num_tokens(), self.weights.cfg.hidden_size];
            match input {
                Some(h) if h.dims() == expected && h.dtype() == self.weights.dtype => {}
                Some(h) => {
                    return invalid(format!(
                        "stage {} expects hidden states {expected:?} {:?}, got {:?} {:?}",
                        self.weights.spec.stage,
                        self.weights.dtype,
                        h.dims(),
                        h.dtype()
                    ))
                }
                None => {
                    return invalid(format!(
                        "stage {} needs the previous stage's hidden states",
                        self.weights.spec.stage
                    ))
                }
            }
        }
        Ok(())
    }
}
