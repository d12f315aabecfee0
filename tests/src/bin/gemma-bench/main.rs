//! gemma-bench: the project's benchmark. Prints one table: each figure beside a reference
//! measured in the same run, and their ratio.
//!
//! `gemma-bench` runs everything; the other subcommands are the child processes it starts.
//! Environment: BENCH_SKIP_SERVING=1 leaves out the serving rows (the longest part);
//! BENCH_EXTRA=1 adds decode diagnostics on stderr; BENCH_ONLY_REAL=1 runs only the real-model
//! rows (gemma-3-270m beside llama.cpp, see `real_model`); BENCH_ONLY_ALLREDUCE=1 only the
//! data plane's rows (all-reduce against raw TCP, and with mutual TLS against without);
//! BENCH_ONLY_PREFIX=1 only the prefix cache's rows (see `prefix_cache`); BENCH_ONLY_PIPELINE=1
//! only pp=2 with pipeline overlap against without (see `pipeline`); BENCH_ONLY_STRUCTURED=1
//! only structured output's (see `structured`); BENCH_ONLY_LLAMA_SERVER=1 only the real model
//! served beside llama-server and llama.cpp's RPC pair (see `beside_llama_server`);
//! BENCH_ONLY_DECODE=1 only the real model's decode and prefill beside llama-bench;
//! BENCH_ONLY_NUMERICS=1 only quantized numerics against llama.cpp's (see `numerics`);
//! BENCH_THREADS=N runs every side on N
//! cores with N compute threads in all (default: all cores), and each row says how the threads
//! were split.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use gemma_coordinator::cluster::{Cluster, Prepared};
use gemma_coordinator::settings::{Args, Settings};
use gemma_proto::candidates::argmax;
use gemma_proto::{KvBlockManager, PlanRequest, SeqStep, ShardSpec, StepBatch};
use gemma_testkit::{LocalCluster, TinyGemma};
use gemma_worker::collective::Collective;
use gemma_worker::data_plane::{DataPlane, PlaneAbort, PlaneCollective, PlaneEndpoint};
use gemma_worker::{ModelFolder, ShardOptions};

mod beside_llama_server;
mod llama_cpp;
mod numerics;
mod pipeline;
mod prefix_cache;
mod real_model;
mod stream_timing;
mod structured;

const HIDDEN: usize = 3072;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => run_all(),
        Some("echo") => echo_server(),
        Some("allreduce-rank") => allreduce_rank(&args[1..]),
        Some(other) => bail!("unknown subcommand {other}; run gemma-bench without arguments"),
    }
}

struct Row {
    figure: String,
    value: f64,
    unit: &'static str,
    reference: String,
    ref_value: f64,
    /// Compute threads of the figure's side and of the reference's ("2 | 2", "2x1 | 2").
    threads: String,
}

/// Compute threads every side gets in all: BENCH_THREADS, else every core this process may use.
fn bench_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .map_or(cores, |n| n.min(cores))
}

/// Confines this process and every child it starts (workers, coordinator, llama.cpp) to the
/// first `threads` cores it may use, and sizes candle's pool to them: a side given more cores
/// than the other would not be a comparison.
fn confine_to(threads: usize) -> Result<()> {
    // SAFETY: sched_{get,set}affinity on this process with a cpu_set_t of the right size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
        }
        let mut keep: libc::cpu_set_t = std::mem::zeroed();
        let allowed = (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set));
        for cpu in allowed.take(threads) {
            libc::CPU_SET(cpu, &mut keep);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &keep) != 0 {
            bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
    }
    // Before any pool exists: candle and rayon read it once.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    Ok(())
}

/// How `threads` split over `world` processes reads in a row.
fn split(threads: usize, world: usize) -> String {
    if world == 1 {
        threads.to_string()
    } else {
        format!("{world}x{}", (threads / world).max(1))
    }
}

fn run_all() -> Result<()> {
    let threads = bench_threads();
    confine_to(threads)?;
    eprintln!("gemma-bench: {threads} compute threads on {threads} cores for every side");
    // Each BENCH_ONLY_* runs one part alone.
    let parts: [(&str, Part); 7] = [
        ("BENCH_ONLY_ALLREDUCE", &|_| {
            Ok((data_plane_rows()?, Vec::new()))
        }),
        ("BENCH_ONLY_PREFIX", &|t| {
            Ok((prefix_cache::rows(t)?, Vec::new()))
        }),
        ("BENCH_ONLY_STRUCTURED", &|t| {
            Ok((structured::rows(t)?, Vec::new()))
        }),
        ("BENCH_ONLY_PIPELINE", &|t| {
            Ok((pipeline::rows(t)?, Vec::new()))
        }),
        ("BENCH_ONLY_DECODE", &|t| {
            Ok((real_model::rows(t)?, Vec::new()))
        }),
        ("BENCH_ONLY_NUMERICS", &|t| {
            Ok((numerics::rows(t)?, Vec::new()))
        }),
        ("BENCH_ONLY_LLAMA_SERVER", &beside_llama_server_rows),
    ];
    if let Some((_, part)) = parts
        .iter()
        .find(|(var, _)| std::env::var_os(var).is_some())
    {
        let (rows, latency) = part(threads)?;
        print_table(rows);
        print_latency_table(&latency);
        return Ok(());
    }
    let mut rows = Vec::new();
    if std::env::var_os("BENCH_ONLY_REAL").is_none() {
        rows.extend(synthetic_rows(threads)?);
        rows.extend(prefix_cache::rows(threads)?);
        rows.extend(pipeline::rows(threads)?);
    }
    rows.extend(real_model::rows(threads)?);
    rows.extend(numerics::rows(threads)?);
    let (serving, latency) = beside_llama_server_rows(threads)?;
    rows.extend(serving);
    rows.extend(structured::rows(threads)?);
    print_table(rows);
    print_latency_table(&latency);
    Ok(())
}

/// One part of the benchmark: its rows, and its latency rows (where it has any).
type Part<'a> = &'a dyn Fn(usize) -> Result<(Vec<Row>, Vec<LatencyRow>)>;

/// The real model served beside llama-server, then its long prompts one at a time.
fn beside_llama_server_rows(threads: usize) -> Result<(Vec<Row>, Vec<LatencyRow>)> {
    let (mut rows, latency) = beside_llama_server::rows(threads)?;
    rows.extend(beside_llama_server::long_prompt_rows(threads)?);
    Ok((rows, latency))
}

/// TTFT and ITL of one load level beside the reference's at the same level.
struct LatencyRow {
    what: String,
    ours: Level,
    reference: Option<Level>,
    reference_name: &'static str,
}

/// The latency half of the rows measured beside llama.cpp's server: p50/p99 in ms, this
/// cluster's then the reference's.
fn print_latency_table(rows: &[LatencyRow]) {
    if rows.is_empty() {
        return;
    }
    println!();
    println!(
        "| {:<34} | {:>17} | {:>17} | {:<18} | {:>17} | {:>17} |",
        "serving (ms, p50 / p99)", "TTFT", "ITL", "reference", "ref TTFT", "ref ITL"
    );
    println!(
        "|{:-<36}|{:->19}|{:->19}|{:-<20}|{:->19}|{:->19}|",
        "", "", "", "", "", ""
    );
    let pair = |a: f64, b: f64| format!("{a:.0} / {b:.0}");
    for r in rows {
        let (rt, ri) = match &r.reference {
            Some(l) => (pair(l.ttft_p50, l.ttft_p99), pair(l.itl_p50, l.itl_p99)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {:<34} | {:>17} | {:>17} | {:<18} | {:>17} | {:>17} |",
            r.what,
            pair(r.ours.ttft_p50, r.ours.ttft_p99),
            pair(r.ours.itl_p50, r.ours.itl_p99),
            r.reference_name,
            rt,
            ri
        );
    }
}

/// The status code of GET `path` on `addr` (one request, its own connection).
fn http_get_status(addr: &str, path: &str) -> Result<u16> {
    let mut sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        sock,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut line = String::new();
    BufReader::new(sock).read_line(&mut line)?;
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("not an HTTP status line: {line:?}"))
}

/// The all-reduce over the data plane against the raw TCP floor, then with mutual TLS against
/// the same group over plain TCP.
fn data_plane_rows() -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let floor_small = ping_pong(64)?;
    let floor_row = ping_pong(HIDDEN * 4)?;
    let floor_big = ping_pong(64 * HIDDEN * 4)?;
    rows.push(Row {
        figure: "raw TCP one-way, 64 B (RTT/2)".into(),
        value: floor_small,
        unit: "us",
        reference: "-".into(),
        ref_value: f64::NAN,
        threads: "-".into(),
    });
    let pki = tempfile::tempdir()?;
    let ca = gemma_testkit::pki::TestCa::new(pki.path(), "bench")?;
    for rank in 0..4 {
        ca.issue(&format!("rank{rank}"), &["127.0.0.1"])?;
    }
    for world in [2usize, 4] {
        for (rows_n, floor) in [(1usize, floor_row), (64, floor_big)] {
            let us = allreduce(world, rows_n, None)?;
            rows.push(Row {
                figure: format!("all-reduce {rows_n}x{HIDDEN} f32, {world} processes"),
                value: us,
                unit: "us",
                reference: format!("raw TCP one-way {} B", rows_n * HIDDEN * 4),
                ref_value: floor,
                threads: "-".into(),
            });
            let tls_us = allreduce(world, rows_n, Some(pki.path()))?;
            rows.push(Row {
                figure: format!("all-reduce {rows_n}x{HIDDEN} f32, {world} processes, mTLS"),
                value: tls_us,
                unit: "us",
                reference: "the same over plain TCP".into(),
                ref_value: us,
                threads: "-".into(),
            });
        }
    }
    Ok(rows)
}

fn synthetic_rows(threads: usize) -> Result<Vec<Row>> {
    let mut rows = data_plane_rows()?;
    let (single, cluster) = decode_speeds()?;
    rows.push(Row {
        figure: "decode, tp=2 cluster (2 worker processes)".into(),
        value: cluster,
        unit: "ms/token",
        reference: "one process, tp=1".into(),
        ref_value: single,
        threads: format!("{} | {threads}", split(threads, 2)),
    });
    if std::env::var_os("BENCH_SKIP_SERVING").is_none() {
        rows.extend(serving(threads)?);
    }
    Ok(rows)
}

fn print_table(rows: Vec<Row>) {
    println!();
    println!(
        "| {:<46} | {:>12} | {:<30} | {:>12} | {:>6} | {:<10} |",
        "figure", "value", "reference (same run)", "reference", "ratio", "threads"
    );
    println!(
        "|{:-<48}|{:->14}|{:-<32}|{:->14}|{:->8}|{:-<12}|",
        "", "", "", "", "", ""
    );
    for r in rows {
        let ratio = if r.ref_value.is_nan() {
            "-".to_string()
        } else {
            format!("{:.2}", r.value / r.ref_value)
        };
        let rv = if r.ref_value.is_nan() {
            "-".to_string()
        } else {
            format!("{:.1} {}", r.ref_value, r.unit)
        };
        println!(
            "| {:<46} | {:>12} | {:<30} | {:>12} | {:>6} | {:<10} |",
            r.figure,
            format!("{:.1} {}", r.value, r.unit),
            r.reference,
            rv,
            ratio,
            r.threads
        );
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn self_exe() -> Result<std::path::PathBuf> {
    std::env::current_exe().context("current_exe")
}

/// Child: echoes every message back (length-prefixed), TCP_NODELAY.
fn echo_server() -> Result<()> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    println!("{}", l.local_addr()?);
    std::io::stdout().flush()?;
    let (mut s, _) = l.accept()?;
    s.set_nodelay(true)?;
    let mut buf = Vec::new();
    loop {
        let mut len = [0u8; 4];
        if s.read_exact(&mut len).is_err() {
            return Ok(());
        }
        buf.resize(u32::from_le_bytes(len) as usize, 0);
        s.read_exact(&mut buf)?;
        s.write_all(&len)?;
        s.write_all(&buf)?;
    }
}

/// Starts this binary as a child with `threads` compute threads (as a worker sharing the machine
/// gets: candle's pool spin-waits, so oversubscribed cores slow every process down).
fn spawn_child(
    args: &[&str],
    threads: usize,
) -> Result<(Child, BufReader<std::process::ChildStdout>)> {
    let mut child = Command::new(self_exe()?)
        .args(args)
        .env("RAYON_NUM_THREADS", threads.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let out = BufReader::new(child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?);
    Ok((child, out))
}

/// Median one-way latency (RTT / 2) of `size`-byte messages to another process, in us.
fn ping_pong(size: usize) -> Result<f64> {
    let (mut child, mut out) = spawn_child(&["echo"], 1)?;
    let mut addr = String::new();
    out.read_line(&mut addr)?;
    let mut s = TcpStream::connect(addr.trim())?;
    s.set_nodelay(true)?;
    let msg = vec![7u8; size];
    let mut back = vec![0u8; size];
    let iters = if size > 100_000 { 300 } else { 3000 };
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters + 100 {
        let t = Instant::now();
        s.write_all(&(size as u32).to_le_bytes())?;
        s.write_all(&msg)?;
        let mut len = [0u8; 4];
        s.read_exact(&mut len)?;
        s.read_exact(&mut back)?;
        if i >= 100 {
            times.push(t.elapsed().as_secs_f64() * 1e6 / 2.0);
        }
    }
    drop(s);
    let _ = child.wait();
    Ok(median(&mut times))
}

/// Median all-reduce latency among `world` processes for [rows, 3072] f32, in us (rank 0's).
/// Median µs of an all-reduce among `world` rank processes; over mutual TLS when `pki` holds
/// the `bench` CA's certificates for every rank.
fn allreduce(world: usize, rows: usize, pki: Option<&std::path::Path>) -> Result<f64> {
    let mut children = Vec::new();
    let mut addrs = Vec::new();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for i in 0..world {
        let (index, world_s, rows_s) = (i.to_string(), world.to_string(), rows.to_string());
        let pki_s = pki.map(|p| p.display().to_string());
        let mut args = vec!["allreduce-rank", &index, &world_s, &rows_s];
        args.extend(pki_s.as_deref());
        let (child, mut out) = spawn_child(&args, (cores / world).max(1))?;
        let mut line = String::new();
        out.read_line(&mut line)?;
        addrs.push(line.trim().to_string());
        children.push((child, out));
    }
    let list = addrs.join(",") + "\n";
    for (child, _) in &mut children {
        child
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("no stdin"))?
            .write_all(list.as_bytes())?;
    }
    let mut result = f64::NAN;
    for (i, (mut child, mut out)) in children.into_iter().enumerate() {
        let mut line = String::new();
        out.read_line(&mut line)?;
        if i == 0 {
            result = line
                .trim()
                .parse()
                .with_context(|| format!("rank 0 said {line:?}"))?;
        }
        child.wait()?;
    }
    Ok(result)
}

/// Child: one rank of an all-reduce group over the worker's data plane.
fn allreduce_rank(args: &[String]) -> Result<()> {
    let (index, world, rows, pki) = match args {
        [i, w, r] => (i, w, r, None),
        [i, w, r, p] => (i, w, r, Some(std::path::Path::new(p))),
        _ => bail!("usage: allreduce-rank INDEX WORLD ROWS [PKI_DIR]"),
    };
    let (index, world, rows): (usize, usize, usize) =
        (index.parse()?, world.parse()?, rows.parse()?);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("{}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let addrs: Vec<String> = line.trim().split(',').map(str::to_string).collect();
    let spec = ShardSpec {
        stage: 0,
        rank: index,
        tp: world,
        pp: 1,
        layers: 0..1,
        q_heads: index..index + 1,
        kv_heads: index..index + 1,
        mlp_cols: index..index + 1,
        vocab_rows: index..index + 1,
    };
    // Every rank of the bench's group presents the same fixed session.
    let session = gemma_proto::Session {
        cluster_id: gemma_proto::ClusterId::from_bytes([7; 16]),
        epoch: 1,
    };
    let plane = DataPlane::connect(
        &spec,
        session,
        &addrs,
        PlaneEndpoint {
            listener,
            tls: rank_tls(pki, index)?,
        },
        Duration::from_secs(30),
        Device::Cpu,
        PlaneAbort::default(),
    )?;
    let group = PlaneCollective(std::sync::Arc::new(plane));
    let x = Tensor::ones((rows, HIDDEN), candle_core::DType::F32, &Device::Cpu)?;
    let iters = if rows > 1 { 300 } else { 3000 };
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters + 100 {
        let t = Instant::now();
        let y = group.all_reduce_sum(&x)?;
        if i >= 100 {
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
        drop(y);
    }
    println!("{:.2}", median(&mut times));
    Ok(())
}

/// A rank's data-plane TLS from the files `TestCa` wrote for it (`bench-rankN.pem`, ...).
fn rank_tls(
    pki: Option<&std::path::Path>,
    rank: usize,
) -> Result<Option<std::sync::Arc<gemma_worker::peer_stream::PlaneTls>>> {
    let Some(dir) = pki else { return Ok(None) };
    let file = |name: String| dir.join(name);
    let identity = gemma_proto::tls::TlsIdentity::from_options(
        Some(&file(format!("bench-rank{rank}.pem"))),
        Some(&file(format!("bench-rank{rank}-key.pem"))),
        Some(&file("bench-ca.pem".into())),
    )?
    .ok_or_else(|| anyhow!("no TLS files in {}", dir.display()))?;
    Ok(Some(std::sync::Arc::new(
        gemma_worker::peer_stream::PlaneTls::new(&identity)?,
    )))
}

/// Decode ms/token of one model: in one process (tp=1) and as a tp=2 cluster of 2 processes.
fn decode_speeds() -> Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let model = TinyGemma {
        vocab_size: 32_000,
        hidden_size: 1024,
        intermediate_size: 8192,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: 8,
        head_dim: 128,
        ..TinyGemma::mha_like_7b()
    };
    model.write(dir.path())?;
    eprintln!(
        "decode model: {} MiB of f32 weights (hidden 1024, 4 layers, vocab 32000)",
        model.f32_bytes() >> 20
    );
    let single = {
        let folder = ModelFolder::open(dir.path())?;
        let cluster =
            LocalCluster::load(&folder, &PlanRequest::new(1, 1), &ShardOptions::default())?;
        let kv = KvBlockManager::new(64, 16);
        time_decode(&kv, |b| Ok(cluster.step(&b)?.to_vec2::<f32>()?))?
    };
    // Diagnostics for a slow cluster: in-process tp=2 (no network) and a one-worker cluster (no
    // all-reduce) separate the data plane's cost from the gRPC step's.
    if std::env::var_os("BENCH_EXTRA").is_some() {
        let folder = ModelFolder::open(dir.path())?;
        let cluster =
            LocalCluster::load(&folder, &PlanRequest::new(2, 1), &ShardOptions::default())?;
        let kv = KvBlockManager::new(64, 16);
        let t = time_decode(&kv, |b| Ok(cluster.step(&b)?.to_vec2::<f32>()?))?;
        eprintln!("EXTRA in-process tp=2: {t:.1} ms/token");
        let c1 = cluster_decode(dir.path(), 1)?;
        eprintln!("EXTRA cluster tp=1: {c1:.1} ms/token");
    }
    let tp2 = cluster_decode(dir.path(), 2)?;
    Ok((single, tp2))
}

/// A cluster of `tp` local worker processes on `model`, driven from this thread.
fn start_cluster(model: &std::path::Path, tp: usize) -> Result<(tokio::runtime::Runtime, Cluster)> {
    let settings = Settings::load(&Args {
        model: Some(model.to_path_buf()),
        tp: Some(tp),
        worker_bin: Some(sibling("gemma-worker")?),
        kv_budget_mib: Some(64),
        ..Args::default()
    })?;
    let prepared = Prepared::new(&settings)?;
    let local = prepared.spawn_local_workers(&settings)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cluster = rt.block_on(Cluster::connect(prepared, &settings, local))?;
    Ok((rt, cluster))
}

fn cluster_decode(dir: &std::path::Path, tp: usize) -> Result<f64> {
    {
        let (rt, mut cluster) = start_cluster(dir, tp)?;
        let kv = KvBlockManager::new(cluster.kv_blocks.min(64), 16);
        time_decode(&kv, |b| {
            let out = rt.block_on(cluster.step(&b))?;
            Ok(out
                .logits
                .into_iter()
                .map(|l| match l {
                    gemma_proto::SeqLogits::Full(row) => row,
                    gemma_proto::SeqLogits::Top { .. } | gemma_proto::SeqLogits::Compact(_) => {
                        Vec::new()
                    }
                })
                .collect())
        })
    }
}

fn sibling(name: &str) -> Result<std::path::PathBuf> {
    let exe = self_exe()?;
    let p = exe.parent().map(|d| d.join(name)).unwrap_or_default();
    if p.is_file() {
        Ok(p)
    } else {
        bail!(
            "{} not found; build with cargo build --release --bins",
            p.display()
        )
    }
}

/// Prefill 16 tokens, then time 64 greedy decode steps; ms per token.
fn time_decode(
    kv: &KvBlockManager,
    mut step: impl FnMut(StepBatch) -> Result<Vec<Vec<f32>>>,
) -> Result<f64> {
    let prompt: Vec<u32> = (0..16).map(|i| 2 + i * 97).collect();
    let alloc = kv.allocate(16 + 64 + 8)?;
    let batch = |tokens: Vec<u32>, start_pos: usize| StepBatch {
        seqs: vec![SeqStep {
            seq_id: 0,
            tokens,
            start_pos,
            block_table: alloc.block_table().to_vec(),
            top_candidates: 0,
            log_probs: false,
            sampling: None,
        }],
    };
    let logits = step(batch(prompt.clone(), 0))?;
    let mut next = argmax(&logits[0]);
    let mut pos = prompt.len();
    // Warm up, then measure.
    for _ in 0..4 {
        let l = step(batch(vec![next], pos))?;
        next = argmax(&l[0]);
        pos += 1;
    }
    let t = Instant::now();
    for _ in 0..64 {
        let l = step(batch(vec![next], pos))?;
        next = argmax(&l[0]);
        pos += 1;
    }
    Ok(t.elapsed().as_secs_f64() * 1000.0 / 64.0)
}

/// Serving throughput: generated tokens/s (the server's own usage counts) at concurrency 1, 4, 16,
/// 64 against a coordinator with tp=1 and tp=2, with time to first token, inter-token latency
/// (kernel arrival times of each token's event) and time per output token, on a 590 MB model.
/// The serving rows' model (4 layers of 512, f32) with the real tokenizer, in `dir`.
fn serving_model(dir: &std::path::Path) -> Result<()> {
    let model = TinyGemma {
        vocab_size: 256_000,
        hidden_size: 512,
        intermediate_size: 2048,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: 8,
        head_dim: 64,
        ..TinyGemma::mha_like_7b()
    };
    model.write(dir)?;
    gemma_testkit::add_tokenizer(dir)?;
    eprintln!(
        "serving model: {} MiB of f32 weights",
        model.f32_bytes() >> 20
    );
    Ok(())
}

fn serving(threads: usize) -> Result<Vec<Row>> {
    let dir = tempfile::tempdir()?;
    serving_model(dir.path())?;
    let mut rows = Vec::new();
    for tp in [1usize, 2] {
        let tp_s = tp.to_string();
        let (_coordinator, addr) = start_coordinator(dir.path(), &["--tp", &tp_s])?;
        let mut base = f64::NAN;
        for c in [1usize, 4, 16, 64] {
            let level = load_level(&addr, c)?;
            if c == 1 {
                base = level.tokens_per_s;
            }
            let sides = format!("{} | {}", split(threads, tp), split(threads, tp));
            rows.push(Row {
                figure: format!("serving tp={tp}, concurrency {c}: throughput"),
                value: level.tokens_per_s,
                unit: "tok/s",
                reference: format!("concurrency 1, tp={tp}"),
                ref_value: base,
                threads: sides.clone(),
            });
            for (what, v, unit) in [
                ("TTFT p50", level.ttft_p50, "ms"),
                ("TTFT p99", level.ttft_p99, "ms"),
                ("ITL p50", level.itl_p50, "ms"),
                ("ITL p99", level.itl_p99, "ms"),
                ("TPOT p50", level.tpot_p50, "ms"),
                ("tokens merged in one read", level.merged_percent, "%"),
            ] {
                rows.push(Row {
                    figure: format!("serving tp={tp}, concurrency {c}: {what}"),
                    value: v,
                    unit,
                    reference: "-".into(),
                    ref_value: f64::NAN,
                    threads: split(threads, tp),
                });
            }
        }
    }
    Ok(rows)
}

/// A coordinator (and its local workers) on `model` with `args`, KV budget 512 MiB and up to 64
/// running sequences; stopped when the guard drops. Returns its address.
fn start_coordinator(model: &std::path::Path, args: &[&str]) -> Result<(KillOnDrop, String)> {
    let coordinator = Command::new(sibling("gemma-coordinator")?)
        .args(["--model", &model.display().to_string()])
        .args(args)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--kv-budget-mib",
            "512",
            "--max-running",
            "64",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut guard = KillOnDrop(coordinator);
    let mut out = BufReader::new(guard.0.stdout.take().ok_or_else(|| anyhow!("no stdout"))?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("gemma-coordinator listening on http://")
        .ok_or_else(|| anyhow!("coordinator said {line:?}"))?
        .to_string();
    Ok((guard, addr))
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SIGTERM: the coordinator stops its workers on the way out.
        // SAFETY: our own unreaped child.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

#[derive(Clone)]
struct Level {
    tokens_per_s: f64,
    ttft_p50: f64,
    ttft_p99: f64,
    itl_p50: f64,
    itl_p99: f64,
    tpot_p50: f64,
    /// Token events that shared a read() with an earlier one: their ITL is 0 by construction.
    merged_percent: f64,
}

/// `c` clients each streaming greedy 32-token requests back to back.
fn load_level(addr: &str, c: usize) -> Result<Level> {
    // Each client sends requests back to back, so the concurrency holds past the ramp-up.
    let per_client = (128 / c).clamp(2, 8);
    load_level_with(addr, c, per_client, &|i, r| {
        let prompt = format!("Client {i} request {r}: once upon a time");
        format!(
            r#"{{"prompt":{},"max_tokens":32,"temperature":0,"stream":true,"stream_options":{{"include_usage":true}}}}"#,
            serde_json_string(&prompt)
        )
    })
}

/// `c` clients, each streaming `per_client` `/v1/completions` requests back to back;
/// `body(client, request)` is each request's body (streamed, with `include_usage`).
fn load_level_with(
    addr: &str,
    c: usize,
    per_client: usize,
    body: &(dyn Fn(usize, usize) -> String + Sync),
) -> Result<Level> {
    let started = Instant::now();
    let realtime = std::sync::atomic::AtomicBool::new(true);
    let realtime_readers = &realtime;
    let results: Vec<Result<Vec<stream_timing::StreamTimes>>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..c)
            .map(|i| {
                s.spawn(move || {
                    realtime_readers.fetch_and(
                        stream_timing::prefer_realtime(),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    (0..per_client)
                        .map(|r| stream_timing::stream(addr, "/v1/completions", &body(i, r)))
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("client panicked"))))
            .collect()
    });
    let wall = started.elapsed().as_secs_f64();
    let (mut ttft, mut itl, mut tpot) = (Vec::new(), Vec::new(), Vec::new());
    let (mut tokens, mut events, mut merged) = (0usize, 0usize, 0usize);
    for r in results {
        for times in r? {
            ttft.push(times.ttft().ok_or_else(|| anyhow!("no token arrived"))?);
            itl.extend(times.gaps());
            tpot.extend(times.tpot());
            tokens += times.completion_tokens;
            events += times.arrivals.len();
            merged += times.merged;
        }
    }
    if !realtime.load(std::sync::atomic::Ordering::Relaxed) {
        eprintln!(
            "concurrency {c}: the client threads could not get real-time priority (needs \
             CAP_SYS_NICE); late wake-ups may merge tokens, see the merged row"
        );
    }
    let pct = |v: &mut Vec<f64>, q: f64| -> f64 {
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * q).round() as usize]
    };
    Ok(Level {
        tokens_per_s: tokens as f64 / wall,
        ttft_p50: pct(&mut ttft, 0.5),
        ttft_p99: pct(&mut ttft, 0.99),
        itl_p50: pct(&mut itl, 0.5),
        itl_p99: pct(&mut itl, 0.99),
        tpot_p50: pct(&mut tpot, 0.5),
        merged_percent: 100.0 * merged as f64 / events.max(1) as f64,
    })
}

fn serde_json_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}
