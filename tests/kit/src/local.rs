//! A whole shard plan in one process: every shard loaded, tensor ranks as threads joined by the
//! in-process collective, stages chained in order. The reference the multi-process cluster must
//! reproduce bit for bit.

use candle_core::Tensor;
use gemma_proto::{PlanRequest, ShardPlan, StepBatch};
use gemma_worker::collective::{
    Collective, InProcessCollective, SoloCollective, DEFAULT_COLLECTIVE_TIMEOUT,
};
use gemma_worker::{LoadError, ModelFolder, Shard, ShardOptions, StageOutput, StepError};

pub struct LocalCluster {
    plan: ShardPlan,
    /// stages[p][t]
    stages: Vec<Vec<Shard>>,
}

impl LocalCluster {
    pub fn load(
        folder: &ModelFolder,
        req: &PlanRequest,
        opts: &ShardOptions,
    ) -> Result<Self, LoadError> {
        let plan = ShardPlan::new(&folder.config, req)?;
        let mut stages = Vec::with_capacity(plan.pp);
        for stage in 0..plan.pp {
            let groups: Vec<Box<dyn Collective>> = if plan.tp == 1 {
                vec![Box::new(SoloCollective)]
            } else {
                InProcessCollective::group(plan.tp, DEFAULT_COLLECTIVE_TIMEOUT)
                    .into_iter()
                    .map(|g| Box::new(g) as Box<dyn Collective>)
                    .collect()
            };
            let shards = groups
                .into_iter()
                .zip(plan.shards[stage * plan.tp..(stage + 1) * plan.tp].iter())
                .map(|(group, spec)| {
                    Shard::load(&folder.weights, &folder.config, spec, opts, group)
                })
                .collect::<Result<Vec<_>, _>>()?;
            stages.push(shards);
        }
        Ok(Self { plan, stages })
    }

    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    /// One step through every stage; returns the full-vocabulary logits of each sequence's last
    /// token, [seqs, vocab] f32 (the ranks' slices concatenated in rank order).
    pub fn step(&self, batch: &StepBatch) -> Result<Tensor, StepError> {
        let mut hidden: Vec<Option<Tensor>> = vec![None; self.plan.tp];
        for shards in &self.stages {
            let outputs = run_stage(shards, batch, &hidden)?;
            let mut logits = Vec::new();
            hidden.clear();
            for out in outputs {
                match out {
                    StageOutput::Hidden(h) => hidden.push(Some(h)),
                    StageOutput::Logits(l) => logits.push(l),
                }
            }
            if !logits.is_empty() {
                return Ok(Tensor::cat(&logits, 0)?.t()?.contiguous()?);
            }
        }
        Err(StepError::Invalid(
            "the last stage produced no logits".to_string(),
        ))
    }
}

/// Runs the ranks of one stage concurrently (they meet in all-reduces); rank t takes the hidden
/// states that rank t of the previous stage produced.
fn run_stage(
    shards: &[Shard],
    batch: &StepBatch,
    inputs: &[Option<Tensor>],
) -> Result<Vec<StageOutput>, StepError> {
    if let [shard] = shards {
        let input = inputs.first().and_then(Option::as_ref);
        return Ok(vec![shard.step(&shard.validate(batch)?, input)?]);
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = shards
            .iter()
            .zip(inputs)
            .map(|(shard, input)| {
                s.spawn(move || shard.step(&shard.validate(batch)?, input.as_ref()))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(StepError::Invalid("a rank panicked".to_string())))
            })
            .collect()
    })
}
