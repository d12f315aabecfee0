//! Runs a whole shard plan in one process (ranks as threads, stages chained) and generates token
//! ids greedily: the single-process form of the cluster, and the reference it must reproduce.
//!
//! `--only-shard N` loads just shard N of the plan and reports its memory: what one worker of
//! that plan would hold.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Parser;
use gemma_proto::{KvBlockManager, PlanRequest, ShardPlan};
use gemma_testkit::{generate_greedy, GreedyOptions, LocalCluster};
use gemma_worker::{ModelFolder, Shard, ShardOptions, SoloCollective};

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// HuggingFace model folder (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Tensor-parallel ranks per stage.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Pipeline stages.
    #[arg(long, default_value_t = 1)]
    pp: usize,
    /// Explicit layer count per stage, e.g. 12,6.
    #[arg(long, value_delimiter = ',')]
    layers_per_stage: Option<Vec<usize>>,
    /// Compute dtype: f32 (default on CPU), bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Prompt token ids, comma-separated; repeat the flag for a batch of prompts.
    #[arg(long = "prompt-ids", value_delimiter = ',', num_args = 1, action = clap::ArgAction::Append)]
    prompt_ids: Vec<u32>,
    /// Tokens to generate per prompt.
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// KV blocks per shard.
    #[arg(long, default_value_t = 256)]
    kv_blocks: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = gemma_proto::DEFAULT_BLOCK_SIZE)]
    block_size: usize,
    /// Load only this shard (stage-major index) and print its memory figures as JSON.
    #[arg(long)]
    only_shard: Option<usize>,
}

fn main() -> Result<()> {
    gemma_proto::process::init_tracing();
    let args = Args::parse();
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => bail!("--dtype {other} is not supported; use f32, bf16 or f16"),
    };
    let opts = ShardOptions {
        dtype,
        kv_blocks: args.kv_blocks,
        block_size: args.block_size,
        ..ShardOptions::default()
    };
    let mut req = PlanRequest::new(args.tp, args.pp);
    req.layers_per_stage = args.layers_per_stage.clone();
    let folder = ModelFolder::open(&args.model)?;
    if let Some(index) = args.only_shard {
        return load_one_shard(&folder, &req, index, &opts);
    }
    let cluster = LocalCluster::load(&folder, &req, &opts)?;
    tracing::info!(plan = ?cluster.plan().shards.iter().map(|s| (s.stage, s.rank, s.layers.clone())).collect::<Vec<_>>(), "loaded");
    let prompt = if args.prompt_ids.is_empty() {
        vec![folder.config.bos_token_id]
    } else {
        args.prompt_ids.clone()
    };
    let kv = KvBlockManager::new(args.kv_blocks, args.block_size);
    let started = std::time::Instant::now();
    let out = generate_greedy(
        &cluster,
        &kv,
        &[prompt],
        &GreedyOptions {
            max_new_tokens: args.max_new_tokens,
            prefill_chunk: 512,
        },
    )?;
    let elapsed = started.elapsed();
    for tokens in &out.tokens {
        let ids: Vec<String> = tokens.iter().map(u32::to_string).collect();
        println!("{}", ids.join(","));
    }
    tracing::info!(
        ms_per_token = elapsed.as_secs_f64() * 1000.0 / args.max_new_tokens.max(1) as f64,
        "generated"
    );
    Ok(())
}

/// Loads one shard as its worker would and prints weight bytes and peak memory.
fn load_one_shard(
    folder: &ModelFolder,
    req: &PlanRequest,
    index: usize,
    opts: &ShardOptions,
) -> Result<()> {
    let plan = ShardPlan::new(&folder.config, req)?;
    let Some(spec) = plan.shards.get(index) else {
        bail!(
            "--only-shard {index} is outside the plan's {} shards (0 to {})",
            plan.world_size(),
            plan.world_size() - 1
        );
    };
    // A lone shard never meets its peers: a group of one is enough to load it.
    let shard = Shard::load(
        &folder.weights,
        &folder.config,
        spec,
        opts,
        Box::new(SoloCollective),
    )?;
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    println!(
        "{}",
        serde_json::json!({
            "shard": index,
            "weight_bytes": shard.weight_bytes(),
            "vm_hwm_kib": field("VmHWM:"),
            "vm_rss_kib": field("VmRSS:"),
        })
    );
    Ok(())
}
