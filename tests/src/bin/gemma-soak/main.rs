//! gemma-soak: load under faults, on loopback. Starts tp x pp workers as separate processes (as
//! pods), a coordinator given their addresses, and `--clients` clients mixing streamed and plain
//! requests with random cancellations. A quarter of the way in it SIGKILLs one worker and
//! restarts it at the same address; past half-way it SIGSTOPs another and SIGCONTs it. Then it
//! prints what was served, errors by kind, latency percentiles before, during and after the
//! faults, how fast the failure was seen and healed, KV blocks held at the end, and memory at
//! over the run; it exits non-zero if any request ended silently, blocks leaked, the cluster
//! did not heal, or memory grew by more than 10 % while serving steadily after the faults.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use gemma_cluster_tests::process::{CoordinatorProcess, WorkerProcess};

mod client;
mod faults;
mod report;

#[derive(Parser)]
#[command(about = "Load under faults: kills, stops and restarts workers under concurrent clients")]
struct Cli {
    /// How long the clients run, in seconds.
    #[arg(long, default_value_t = 300)]
    duration: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Tensor-parallel ranks (workers per stage).
    #[arg(long, default_value_t = 2)]
    tp: usize,
    /// Pipeline stages.
    #[arg(long, default_value_t = 1)]
    pp: usize,
    /// Each worker's KV budget, MiB. Small by default: a KV pool's pages become resident as its
    /// blocks are first used, so a pool that the load fills before the faults makes the memory
    /// at start and at end comparable (what is left is what leaks).
    #[arg(long, default_value_t = 8)]
    kv_budget_mib: u64,
    /// Whether memory growth fails the run. A short run's steady window (what follows the last
    /// recovery) is too short to tell a leak from an allocator settling: CI's 60-second run
    /// prints the memory but leaves the judgement to full runs.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    judge_memory: bool,
    /// A model folder; default: the tiny test model with the real tokenizer, made here.
    #[arg(long)]
    model: Option<std::path::PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if cli.duration < 20 {
        bail!(
            "--duration {} is too short for the faults; give at least 20 seconds",
            cli.duration
        );
    }
    let (_tmp, model) = match &cli.model {
        Some(m) => (None, m.clone()),
        None => {
            let (tmp, dir) = gemma_cluster_tests::tiny_servable_model();
            (Some(tmp), dir)
        }
    };
    let world = cli.tp * cli.pp;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut workers = (0..world)
        .map(|_| WorkerProcess::start("127.0.0.1:0", (cores / world).max(1)))
        .collect::<Result<Vec<_>>>()?;
    let addrs: Vec<String> = workers.iter().map(|w| w.addr.clone()).collect();
    let model_arg = model.display().to_string();
    let (tp, pp, list) = (cli.tp.to_string(), cli.pp.to_string(), addrs.join(","));
    let coord = CoordinatorProcess::start(&[
        "--model",
        &model_arg,
        "--tp",
        &tp,
        "--pp",
        &pp,
        "--workers",
        &list,
        "--kv-budget-mib",
        &cli.kv_budget_mib.to_string(),
    ])
    .context("starting the coordinator")?;
    eprintln!(
        "soak: {world} workers, coordinator on {}, {} clients for {} s",
        coord.addr, cli.clients, cli.duration
    );

    let models = gemma_cluster_tests::http::request(
        &coord.addr,
        "GET",
        "/v1/models",
        None,
        Duration::from_secs(10),
    )?
    .json()?;
    let model_name = models["data"][0]["id"]
        .as_str()
        .context("/v1/models names no model")?
        .to_string();
    let shared = Arc::new(client::Shared {
        addr: coord.addr.clone(),
        model: model_name,
        t0: Instant::now(),
        stop: Default::default(),
        paused: Default::default(),
    });
    let clients: Vec<_> = (0..cli.clients)
        .map(|i| {
            let shared = shared.clone();
            std::thread::spawn(move || client::run(shared, i as u64 + 1))
        })
        .collect();

    let duration = Duration::from_secs(cli.duration);
    let mut memory = report::Memory::default();
    let series = {
        let (shared, pids) = (shared.clone(), pids(&coord, &workers));
        std::thread::spawn(move || report::sample_memory(&shared, &pids))
    };
    // Warm-up under load, then memory at a quiet moment; the faults follow with the load back on.
    faults::sleep_until(shared.t0 + duration.mul_f64(0.15));
    shared.paused.store(true, Ordering::Relaxed);
    memory.start = report::quiet_memory(&coord.addr, &pids(&coord, &workers));
    shared.paused.store(false, Ordering::Relaxed);
    eprintln!(
        "soak: quiet memory before the faults (MiB): {}",
        report::mib_list(&memory.start)
    );
    let timeline = faults::inject(&shared, &coord.addr, &mut workers, duration)?;
    faults::sleep_until(shared.t0 + duration);
    shared.stop.store(true, Ordering::Relaxed);
    let records: Vec<client::Record> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap_or_default())
        .collect();
    let kv_used = faults::kv_blocks_in_use(&coord.addr);
    // The restarted worker's slot compares its successor with it.
    memory.end = report::quiet_memory(&coord.addr, &pids(&coord, &workers));
    memory.series = series.join().unwrap_or_default();
    memory.judged = cli.judge_memory;
    let verdict = report::print(&records, &timeline, kv_used, &memory);
    drop(coord);
    drop(workers);
    verdict
}

/// The coordinator's pid, then each worker's (the restarted one's new pid at the end).
fn pids(coord: &CoordinatorProcess, workers: &[WorkerProcess]) -> Vec<u32> {
    std::iter::once(coord.process.id())
        .chain(workers.iter().map(WorkerProcess::pid))
        .flatten()
        .collect()
}
