//! The faults the soak injects, and the moments it sees the cluster notice and heal them.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use gemma_cluster_tests::http;
use gemma_cluster_tests::process::{signal, wait_gone, WorkerProcess};

use crate::client::Shared;

/// When each fault happened and when its effect was seen, as offsets from the start.
#[derive(Default)]
pub struct Timeline {
    pub kill: Duration,
    pub kill_unready: Option<Duration>,
    pub restart: Duration,
    pub restart_ready: Option<Duration>,
    pub stop: Duration,
    pub stop_unready: Option<Duration>,
    pub cont: Duration,
    pub cont_ready: Option<Duration>,
}

impl Timeline {
    /// From the first fault until the cluster served again after the last.
    pub fn fault_window(&self) -> (Duration, Duration) {
        (self.kill, self.cont_ready.unwrap_or(Duration::MAX))
    }
}

/// Kills the last worker and restarts it at the same address, then stops the first one and
/// lets it go on. `workers` gets the restarted process.
pub fn inject(
    shared: &Shared,
    addr: &str,
    workers: &mut [WorkerProcess],
    duration: Duration,
) -> Result<Timeline> {
    let t0 = shared.t0;
    let since = |t: Instant| t - t0;
    let mut tl = Timeline::default();
    let threads = worker_threads(workers.len());

    sleep_until(t0 + duration.mul_f64(0.25));
    let victim = workers.last_mut().context("no worker")?;
    let pid = victim.pid().context("the worker has no pid")?;
    signal(pid, libc::SIGKILL)?;
    wait_gone(pid, Duration::from_secs(5));
    tl.kill = since(Instant::now());
    eprintln!(
        "soak: SIGKILL worker {} (pid {pid}) at {:?}",
        victim.addr, tl.kill
    );
    tl.kill_unready = wait_ready(addr, false, Duration::from_secs(30)).map(since);
    sleep_until(t0 + tl.kill + (duration / 12).min(Duration::from_secs(5)));
    let same_addr = victim.addr.clone();
    *victim = WorkerProcess::start(&same_addr, threads).context("restarting the worker")?;
    tl.restart = since(Instant::now());
    eprintln!("soak: restarted {same_addr} at {:?}", tl.restart);
    tl.restart_ready = wait_ready(addr, true, Duration::from_secs(60)).map(since);

    let not_before = Instant::now() + Duration::from_secs(2);
    sleep_until((t0 + duration.mul_f64(0.55)).max(not_before));
    let stopped = workers.first().context("no worker")?;
    let pid = stopped.pid().context("the worker has no pid")?;
    signal(pid, libc::SIGSTOP)?;
    tl.stop = since(Instant::now());
    eprintln!(
        "soak: SIGSTOP worker {} (pid {pid}) at {:?}",
        stopped.addr, tl.stop
    );
    tl.stop_unready = wait_ready(addr, false, Duration::from_secs(30)).map(since);
    sleep_until(t0 + tl.stop + (duration / 10).min(Duration::from_secs(8)));
    signal(pid, libc::SIGCONT)?;
    tl.cont = since(Instant::now());
    eprintln!("soak: SIGCONT at {:?}", tl.cont);
    tl.cont_ready = wait_ready(addr, true, Duration::from_secs(60)).map(since);
    Ok(tl)
}

/// Compute threads per worker: the machine's cores shared evenly, as the coordinator shares
/// them among local workers.
pub fn worker_threads(workers: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / workers.max(1)).max(1)
}

/// Polls /ready every 50 ms until it answers 200 (`ready`) or anything else (`!ready`); the
/// moment it did, or None past `timeout`.
fn wait_ready(addr: &str, ready: bool, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let ok = http::request(addr, "GET", "/ready", None, Duration::from_secs(2))
            .is_ok_and(|r| r.status == 200);
        if ok == ready {
            return Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

pub fn sleep_until(t: Instant) {
    std::thread::sleep(t.saturating_duration_since(Instant::now()));
}

/// KV blocks the coordinator holds once every client is done (they are freed between steps,
/// so it is given a few seconds to reach 0); None if /metrics cannot be read.
pub fn kv_blocks_in_use(addr: &str) -> Option<f64> {
    const USED: &str = "gemma_cluster_kv_blocks_used";
    let zero = |m: &std::collections::HashMap<String, f64>| m.get(USED) == Some(&0.0);
    match http::wait_for_metrics(addr, Duration::from_secs(10), zero) {
        Ok(m) => m.get(USED).copied(),
        Err(_) => http::metrics(addr).ok()?.get(USED).copied(),
    }
}
