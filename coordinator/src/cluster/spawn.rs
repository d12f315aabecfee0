//! Local workers: tp x pp `gemma-worker` processes on loopback, started with the coordinator,
//! respawned by it when one dies, and stopped with it (on drop, and by the kernel if the
//! coordinator dies: PR_SET_PDEATHSIG).

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use super::ClusterError;

/// How long a fresh worker may take to print its addresses.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct LocalWorkers {
    /// To the thread that owns the children.
    commands: mpsc::Sender<Request>,
    owner: Option<std::thread::JoinHandle<()>>,
    /// gRPC address of each worker as first started, in spawn order.
    pub addrs: Vec<String>,
    pids: Arc<Mutex<Vec<u32>>>,
}

enum Request {
    /// Start worker `index` again if it has exited; reply with its new address.
    RespawnIfDead {
        index: usize,
        reply: oneshot::Sender<Result<Option<String>, ClusterError>>,
    },
}

impl LocalWorkers {
    /// Starts `n` workers, each with `threads` compute threads, and waits for their addresses.
    ///
    /// The kernel's parent-death signal fires when the spawning *thread* exits, not the process:
    /// so one dedicated thread, which lives exactly as long as this value, spawns every worker
    /// and every respawn. A worker started from a short-lived thread (tokio's blocking pool)
    /// would be killed when that thread retires.
    /// `extra` goes to every worker's command line (its TLS files).
    pub fn spawn(
        bin: &Path,
        n: usize,
        threads: usize,
        extra: Vec<String>,
    ) -> Result<Self, ClusterError> {
        let (commands, inbox) = mpsc::channel();
        let (started_tx, started) = mpsc::channel();
        let pids = Arc::new(Mutex::new(Vec::new()));
        let mut group = Group {
            bin: bin.to_path_buf(),
            threads,
            extra,
            children: Vec::with_capacity(n),
            pids: pids.clone(),
        };
        let owner = std::thread::Builder::new()
            .name("local-workers".into())
            .spawn(move || group.own(n, inbox, started_tx))
            .map_err(|e| ClusterError::Spawn {
                bin: bin.display().to_string(),
                reason: format!("cannot start the thread that owns the workers: {e}"),
            })?;
        let addrs = started.recv().unwrap_or_else(|_| {
            Err(ClusterError::Spawn {
                bin: bin.display().to_string(),
                reason: "the thread that owns the workers ended".into(),
            })
        })?;
        Ok(Self {
            commands,
            owner: Some(owner),
            addrs,
            pids,
        })
    }

    /// Pids of the workers now (a respawned worker's replaces its predecessor's).
    pub fn pids(&self) -> Vec<u32> {
        lock(&self.pids).clone()
    }

    /// Starts worker `index` again if its process has exited: Some(its new address), None if it
    /// still runs (it may only hang; then the coordinator waits for it).
    pub async fn respawn_if_dead(&self, index: usize) -> Result<Option<String>, ClusterError> {
        let (reply, answer) = oneshot::channel();
        let gone = || ClusterError::Spawn {
            bin: "gemma-worker".into(),
            reason: "the thread that owns the local workers has stopped".into(),
        };
        self.commands
            .send(Request::RespawnIfDead { index, reply })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The children, owned by the dedicated thread.
struct Group {
    /// Arguments every worker gets besides its address and threads.
    extra: Vec<String>,
    bin: PathBuf,
    threads: usize,
    children: Vec<Child>,
    pids: Arc<Mutex<Vec<u32>>>,
}

impl Group {
    /// The owner thread's life: start every worker, serve respawns, stop them all when the
    /// `LocalWorkers` is dropped (its sender goes away).
    fn own(
        &mut self,
        n: usize,
        inbox: mpsc::Receiver<Request>,
        started: mpsc::Sender<Result<Vec<String>, ClusterError>>,
    ) {
        let addrs: Result<Vec<String>, ClusterError> = (0..n).map(|i| self.start(i)).collect();
        let failed = addrs.is_err();
        let _ = started.send(addrs);
        if !failed {
            while let Ok(request) = inbox.recv() {
                match request {
                    Request::RespawnIfDead { index, reply } => {
                        let _ = reply.send(self.respawn_if_dead(index));
                    }
                }
            }
        }
        self.stop();
    }

    /// Starts worker `index` (a new one, or in place of the one at that index).
    fn start(&mut self, index: usize) -> Result<String, ClusterError> {
        let mut cmd = Command::new(&self.bin);
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--threads",
            &self.threads.to_string(),
        ])
        .args(&self.extra)
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
            bin: self.bin.display().to_string(),
            reason: e.to_string(),
        })?;
        let pid = child.id();
        let stdout = child.stdout.take();
        if index < self.children.len() {
            self.children[index] = child;
            lock(&self.pids)[index] = pid;
        } else {
            self.children.push(child);
            lock(&self.pids).push(pid);
        }
        let addr = read_announce(stdout, index)?;
        tracing::info!(worker = index, pid, %addr, "started local worker");
        Ok(addr)
    }

    fn respawn_if_dead(&mut self, index: usize) -> Result<Option<String>, ClusterError> {
        let child = self.children.get_mut(index).ok_or(ClusterError::Announce {
            index,
            reason: "no such local worker".into(),
        })?;
        let status = match child.try_wait() {
            Ok(None) => return Ok(None),
            Ok(Some(status)) => status.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(worker = index, pid = child.id(), %status, "local worker exited; respawning it");
        self.start(index).map(Some)
    }

    fn stop(&mut self) {
        for child in &mut self.children {
            // SIGTERM lets a worker close its sockets; SIGKILL if it does not go quickly.
            let pid = child.id() as libc::pid_t;
            // SAFETY: signalling our own child by pid; it is not yet reaped, so the pid is its.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        // One deadline for the whole group: the stop stays bounded however many workers hang.
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
    /// Stops every worker: the owner thread sees its inbox close, stops the group (bounded: 3 s)
    /// and ends.
    fn drop(&mut self) {
        let (closed, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.commands, closed));
        if let Some(owner) = self.owner.take() {
            let _ = owner.join();
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
