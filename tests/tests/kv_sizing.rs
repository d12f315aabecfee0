//! The KV pool's default size comes from the worker's host (a fraction of its available memory,
//! less the weights, at most every running sequence at the whole context), and
//! `--kv-budget-mib` overrides it: real coordinator and worker processes, the pool read from
//! `/metrics` (`kv_blocks_total`).

use std::path::Path;
use std::time::Duration;

use gemma_cluster_tests::http::wait_for_metrics;
use gemma_cluster_tests::process::CoordinatorProcess;
use gemma_proto::{ModelConfig, PlanRequest, ShardPlan, DEFAULT_BLOCK_SIZE};
use gemma_worker::kv_cache::KvCache;

/// The model's one shard (tp=1): bytes of a KV block and of the f32 weights.
fn footprint(dir: &Path) -> (u64, u64) {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).expect("config");
    let plan = ShardPlan::new(&cfg, &PlanRequest::new(1, 1)).expect("plan");
    let spec = &plan.shards[0];
    let per_block = KvCache::bytes_per_block(
        spec.layers.len(),
        DEFAULT_BLOCK_SIZE,
        spec.kv_heads.len(),
        cfg.head_dim,
        candle_core::DType::F32,
    ) as u64;
    (per_block, spec.num_parameters(&cfg) as u64 * 4)
}

fn mem_available() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    let line = meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .expect("MemAvailable");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("a number of kB");
    kib * 1024
}

/// The pool the coordinator schedules, once it serves.
fn kv_blocks(args: &[&str]) -> u64 {
    let coord = CoordinatorProcess::start(args).expect("coordinator");
    let m = wait_for_metrics(&coord.addr, Duration::from_secs(10), |m| {
        m.contains_key("gemma_cluster_kv_blocks_total")
    })
    .expect("metrics");
    m["gemma_cluster_kv_blocks_total"] as u64
}

#[test]
fn the_pool_is_sized_from_memory_unless_a_budget_is_given() {
    let (_tmp, dir) = gemma_cluster_tests::tiny_servable_model();
    let (per_block, weights) = footprint(&dir);
    let model = dir.display().to_string();
    let context = 8192; // the tiny Gemma 1's max_position_embeddings

    // Plenty of memory: capped at every running sequence at the whole context.
    let capped = kv_blocks(&["--model", &model, "--max-running", "2"]);
    assert_eq!(capped, (2 * context / DEFAULT_BLOCK_SIZE) as u64);

    // A fraction small enough to bind: what the host had available then, less the weights.
    let fraction = 0.005;
    let before = mem_available();
    let derived = kv_blocks(&["--model", &model, "--kv-memory-fraction", "0.005"]);
    let after = mem_available();
    let expect =
        |available: u64| ((available as f64 * fraction) as u64).saturating_sub(weights) / per_block;
    let (low, high) = (expect(before.min(after)), expect(before.max(after)));
    // The host's memory moves while the test runs (other tests, other processes): a band.
    assert!(
        derived * 4 >= low * 3 && derived * 4 <= high * 5,
        "{derived} blocks from memory; {low}..{high} expected from MemAvailable {before} and \
         {after}, {weights} bytes of weights, {per_block} bytes a block"
    );
    let default_cap = (64 * context / DEFAULT_BLOCK_SIZE) as u64;
    assert!(derived < default_cap, "memory bound it, not the cap");

    // The flag wins over the fraction: exactly what 1 MiB holds.
    let budget = kv_blocks(&[
        "--model",
        &model,
        "--kv-budget-mib",
        "1",
        "--kv-memory-fraction",
        "0.01",
    ]);
    assert_eq!(budget, (1 << 20) / per_block);
}

#[test]
fn a_fraction_outside_zero_to_one_is_refused_before_any_worker_starts() {
    let (_tmp, dir) = gemma_cluster_tests::tiny_servable_model();
    let model = dir.display().to_string();
    let e = CoordinatorProcess::start(&["--model", &model, "--kv-memory-fraction", "1.5"])
        .err()
        .expect("refused");
    assert!(e.to_string().contains("kv_memory_fraction 1.5"), "{e}");
    assert!(!e.to_string().contains("started local worker"), "{e}");
}
