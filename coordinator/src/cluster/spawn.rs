//! Local workers: tp x pp `gemma-worker` processes on loopback, started with the coordinator and
//! stopped with it (on drop, and by the kernel if the coordinator dies: PR_SET_PDEATHSIG).

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::ClusterError;

/// How long a fresh worker may take to print its addresses.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct LocalWorkers {
    children: Vec<Child>,
    /// gRPC address of each worker, in spawn order.
    pub addrs: Vec<String>,
}

impl LocalWorkers {
    /// Starts `n` workers, each with `threads` compute threads, and waits for their addresses.
    /// Call from a thread that lives as long as the workers should: the kernel kills them when
    /// the spawning thread exits.
    pub fn spawn(bin: &Path, n: usize, threads: usize) -> Result<Self, ClusterError> {
        let mut workers = Self {
            children: Vec::with_capacity(n),
            addrs: Vec::with_capacity(n),
        };
        for i in 0..n {
            let mut cmd = Command::new(bin);
            cmd.args(["--listen", "127.0.0.1:0", "--threads", &threads.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let mut child = cmd.spawn().map_err(|e| ClusterError::Spawn {
                bin: bin.display().to_string(),
                reason: e.to_string(),
            })?;
            let pid = child.id();
            let stdout = child.stdout.take();
            workers.children.push(child);
            let addr = read_announce(stdout, i)?;
            tracing::info!(worker = i, pid, %addr, "started local worker");
            workers.addrs.push(addr);
        }
        Ok(workers)
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

/// Reads `gemma-worker listening on ADDR data ADDR` from the worker's stdout.
fn read_announce(
    stdout: Option<std::process::ChildStdout>,
    index: usize,
) -> Result<String, ClusterError> {
    let stdout = stdout.ok_or_else(|| ClusterError::Announce {
        index,
        reason: "no stdout".into(),
    })?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next());
        // Drain anything else so the worker never blocks on a full pipe.
        for _ in lines {}
    });
    let line = match rx.recv_timeout(ANNOUNCE_TIMEOUT) {
        Ok(Some(Ok(line))) => line,
        Ok(_) => {
            return Err(ClusterError::Announce {
                index,
                reason: "it exited before announcing its address (see its log above)".into(),
            })
        }
        Err(_) => {
            return Err(ClusterError::Announce {
                index,
                reason: format!("no address within {ANNOUNCE_TIMEOUT:?}"),
            })
        }
    };
    line.strip_prefix("gemma-worker listening on ")
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .ok_or_else(|| ClusterError::Announce {
            index,
            reason: format!("unexpected first line {line:?}"),
        })
}

impl Drop for LocalWorkers {
    fn drop(&mut self) {
        for child in &mut self.children {
            // SIGTERM lets a worker close its sockets; SIGKILL if it does not go quickly.
            let pid = child.id() as libc::pid_t;
            // SAFETY: signalling our own child by pid; it is not yet reaped, so the pid is its.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        // One deadline for the whole group: the drop stays bounded however many workers hang.
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        for child in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if std::time::Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    }
}

/// The worker binary: the configured one, or `gemma-worker` beside this executable.
pub fn worker_binary(configured: Option<&Path>) -> Result<PathBuf, ClusterError> {
    let path = match configured {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("gemma-worker")))
            .unwrap_or_else(|| PathBuf::from("gemma-worker")),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(ClusterError::Spawn {
            bin: path.display().to_string(),
            reason: "no such file; build it (cargo build --release --bins) or pass --worker-bin"
                .into(),
        })
    }
}
