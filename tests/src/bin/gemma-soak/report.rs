//! What the soak prints, and its verdict.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::client::{Outcome, Record};
use crate::faults::Timeline;

/// Resident memory of the coordinator, then each worker, at start and at end.
#[derive(Default)]
pub struct Memory {
    pub start: Vec<Option<u64>>,
    pub end: Vec<Option<u64>>,
    /// Every 5 s, each process as started (a restarted worker's series ends at its death).
    pub series: Vec<Vec<Option<u64>>>,
    /// Whether growth past [`MEMORY_GROWTH`] fails the run.
    pub judged: bool,
}

/// Samples the resident memory of `pids` every 5 s until the clients stop: whether memory
/// climbs steadily (a leak) or levels off (pools warming up) shows in the series.
pub fn sample_memory(shared: &crate::client::Shared, pids: &[u32]) -> Vec<Vec<Option<u64>>> {
    let mut series = Vec::new();
    while !shared.stop.load(std::sync::atomic::Ordering::Relaxed) {
        series.push(
            pids.iter()
                .map(|&p| gemma_cluster_tests::process::rss_bytes(p))
                .collect(),
        );
        std::thread::sleep(Duration::from_secs(5));
    }
    series
}

/// Resident memory of `pids` at a quiet moment: no request in flight or waiting, then a few
/// seconds for the processes to go idle and give their freed buffers back (a worker does after
/// half a second without a step, the coordinator after a second without one). Comparing two quiet
/// moments compares what each process keeps, not the load it happens to be carrying: a leak is
/// memory kept. The smallest of three samples a second apart is taken.
pub fn quiet_memory(addr: &str, pids: &[u32]) -> Vec<Option<u64>> {
    let idle = |m: &std::collections::HashMap<String, f64>| {
        ["kv_blocks_used", "queue_length", "running_sequences"]
            .iter()
            .all(|g| m.get(&format!("gemma_cluster_{g}")) == Some(&0.0))
    };
    if gemma_cluster_tests::http::wait_for_metrics(addr, Duration::from_secs(30), idle).is_err() {
        eprintln!("soak: the cluster did not go quiet within 30 s; memory sampled anyway");
    }
    let mut least: Vec<Option<u64>> = vec![None; pids.len()];
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(1));
        for (l, &p) in least.iter_mut().zip(pids) {
            let now = gemma_cluster_tests::process::rss_bytes(p);
            *l = match (*l, now) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
    }
    least
}

/// Resident memory per process, in MiB, for a log line.
pub fn mib_list(rss: &[Option<u64>]) -> String {
    let shown: Vec<String> = rss
        .iter()
        .map(|b| {
            b.map_or("-".into(), |b| {
                format!("{:.1}", b as f64 / (1 << 20) as f64)
            })
        })
        .collect();
    shown.join(" ")
}

/// Most a process's memory may grow from start to end.
const MEMORY_GROWTH: f64 = 0.10;

pub fn print(
    records: &[Record],
    tl: &Timeline,
    kv_used: Option<f64>,
    memory: &Memory,
) -> Result<()> {
    let mut failures = Vec::new();
    let count = |f: fn(&Outcome) -> bool| records.iter().filter(|r| f(&r.outcome)).count();
    let silent: Vec<&str> = records
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Silent(why) => Some(why.as_str()),
            _ => None,
        })
        .collect();
    println!(
        "requests              {} ({} streamed): {} text, {} clear errors, {} cancelled by the client, {} silent",
        records.len(),
        records.iter().filter(|r| r.streamed).count(),
        count(|o| *o == Outcome::Text),
        count(|o| matches!(o, Outcome::Error { .. })),
        count(|o| *o == Outcome::Cancelled),
        silent.len()
    );
    for (kind, n) in errors_by_kind(records) {
        println!("  error {kind:<26} {n}");
    }
    for why in silent.iter().take(5) {
        println!("  silent: {why}");
    }
    if !silent.is_empty() {
        failures.push(format!("{} requests ended silently", silent.len()));
    }
    print_latencies(records, tl);
    print_fault_times(records, tl, &mut failures);
    match kv_used {
        Some(n) => println!("KV blocks in use at the end   {n}"),
        None => println!("KV blocks in use at the end   unknown (/metrics unreadable)"),
    }
    if kv_used != Some(0.0) {
        failures.push(format!("KV blocks in use at the end: {kv_used:?}, not 0"));
    }
    print_memory(memory, &mut failures);
    if failures.is_empty() {
        println!("verdict: ok");
        Ok(())
    } else {
        println!("verdict: FAILED");
        bail!("{}", failures.join("; "))
    }
}

fn errors_by_kind(records: &[Record]) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for r in records {
        if let Outcome::Error { status, kind } = &r.outcome {
            let place = if *status == 200 { "in stream" } else { "" };
            *kinds
                .entry(format!("{status} {kind} {place}").trim().to_string())
                .or_insert(0) += 1;
        }
    }
    kinds
}

/// Percentiles of the requests that got their text, by when they started.
fn print_latencies(records: &[Record], tl: &Timeline) {
    let (from, to) = tl.fault_window();
    println!("latency of answered requests (ms)   n      p50     p90     p99     max");
    let phases = [
        ("before the faults", Duration::ZERO, from),
        ("during the faults", from, to),
        ("after the faults", to, Duration::MAX),
    ];
    for (name, start, end) in phases {
        let mut ms: Vec<f64> = records
            .iter()
            .filter(|r| r.outcome == Outcome::Text && (start..end).contains(&r.started))
            .map(|r| r.latency.as_secs_f64() * 1e3)
            .collect();
        ms.sort_by(f64::total_cmp);
        let p = |q: f64| {
            ms.get(((ms.len() as f64 - 1.0) * q).round() as usize)
                .copied()
        };
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        println!(
            "  {name:<30} {:>6} {:>8} {:>7} {:>7} {:>7}",
            ms.len(),
            f(p(0.5)),
            f(p(0.9)),
            f(p(0.99)),
            f(ms.last().copied())
        );
    }
}

fn print_fault_times(records: &[Record], tl: &Timeline, failures: &mut Vec<String>) {
    let ended = |r: &Record| r.started + r.latency;
    let first_503_after = |t: Duration| {
        records
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Error { status: 503, .. }) && ended(r) >= t)
            .map(|r| ended(r) - t)
            .min()
    };
    // Every request in flight when the worker died must end (in text or an error) soon after.
    let in_flight_end = records
        .iter()
        .filter(|r| r.started < tl.kill && ended(r) > tl.kill)
        .map(|r| ended(r) - tl.kill)
        .max();
    let ms =
        |d: Option<Duration>| d.map_or("never".to_string(), |d| format!("{} ms", d.as_millis()));
    let after = |t: Option<Duration>, since: Duration| t.map(|t| t.saturating_sub(since));
    println!(
        "SIGKILL -> first 503           {}",
        ms(first_503_after(tl.kill))
    );
    println!(
        "SIGKILL -> /ready 503          {}",
        ms(after(tl.kill_unready, tl.kill))
    );
    println!(
        "SIGKILL -> last in-flight request ended  {}",
        ms(in_flight_end)
    );
    println!(
        "restart -> /ready 200          {}",
        ms(after(tl.restart_ready, tl.restart))
    );
    println!(
        "SIGSTOP -> first 503           {}",
        ms(first_503_after(tl.stop))
    );
    println!(
        "SIGSTOP -> /ready 503          {}",
        ms(after(tl.stop_unready, tl.stop))
    );
    println!(
        "SIGCONT -> /ready 200          {}",
        ms(after(tl.cont_ready, tl.cont))
    );
    if tl.restart_ready.is_none() {
        failures.push("the cluster did not heal after the worker restarted".into());
    }
    if tl.cont_ready.is_none() {
        failures.push("the cluster did not heal after the stopped worker went on".into());
    }
}

fn print_memory(memory: &Memory, failures: &mut Vec<String>) {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    for i in 0..memory.start.len() {
        let row: Vec<String> = memory
            .series
            .iter()
            .map(|s| {
                s.get(i)
                    .copied()
                    .flatten()
                    .map_or("-".into(), |b| format!("{:.0}", mib(b)))
            })
            .collect();
        println!("RSS every 5 s, process {i} (MiB): {}", row.join(" "));
    }
    for (i, (start, end)) in memory.start.iter().zip(&memory.end).enumerate() {
        let name = match i {
            0 => "coordinator".to_string(),
            n => format!("worker {}", n - 1),
        };
        match (start, end) {
            (Some(s), Some(e)) => {
                let growth = *e as f64 / (*s).max(1) as f64 - 1.0;
                println!(
                    "RSS {name:<12} {:>8.1} MiB quiet before the faults -> {:>8.1} MiB quiet at the end ({:+.1} %)",
                    mib(*s),
                    mib(*e),
                    growth * 100.0
                );
                if memory.judged && growth > MEMORY_GROWTH {
                    failures.push(format!("{name} grew by {:.1} %", growth * 100.0));
                }
            }
            _ => println!("RSS {name:<12} unknown (the process was gone)"),
        }
    }
}
