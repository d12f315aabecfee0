//! Real processes for tests and benchmarks: the project's binaries found beside the test
//! executable, a coordinator started on an OS-chosen port and stopped on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

/// A binary of this workspace, from the target directory the running test was built into.
/// Tests need `cargo build --bins` first (README's test command does it).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let dirs = [exe.parent(), exe.parent().and_then(Path::parent)];
    dirs.iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not built next to {}; run `cargo build --workspace --bins` first",
                exe.display()
            )
        })
}

/// Lines a reader thread collects from a pipe, and a signal to whoever waits for one.
#[derive(Default)]
struct Lines {
    lines: Mutex<Vec<String>>,
    added: Condvar,
}

impl Lines {
    fn lock(&self) -> MutexGuard<'_, Vec<String>> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, line: String) {
        self.lock().push(line);
        self.added.notify_all();
    }
}

/// A process whose stdout and stderr lines are collected as they come.
pub struct Spawned {
    child: Option<Child>,
    stdout: mpsc::Receiver<String>,
    stderr: Arc<Lines>,
    /// Ends when the process closes stderr (at exit at the latest).
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl Spawned {
    pub fn start(bin: &Path, args: &[String]) -> Result<Self> {
        Self::start_with_env(bin, args, &[])
    }

    pub fn start_with_env(bin: &Path, args: &[String], env: &[(&str, &str)]) -> Result<Self> {
        let mut child = Command::new(bin)
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let (tx, stdout) = mpsc::channel();
        let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Lines::default());
        let err = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        let sink = stderr.clone();
        let stderr_reader = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                sink.push(line);
            }
        });
        Ok(Self {
            child: Some(child),
            stdout,
            stderr,
            stderr_reader: Some(stderr_reader),
        })
    }

    /// The next stdout line, or None if the process closed stdout or `timeout` passed.
    pub fn next_line(&self, timeout: Duration) -> Option<String> {
        self.stdout.recv_timeout(timeout).ok()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().join("\n")
    }

    /// Waits, at most `timeout`, until the stderr reader has collected a line for which `is_it`
    /// holds; false if none came.
    pub fn wait_for_stderr_line(&self, is_it: impl Fn(&str) -> bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut lines = self.stderr.lock();
        loop {
            if lines.iter().any(|l| is_it(l)) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            lines = self
                .stderr
                .added
                .wait_timeout(lines, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for the process to exit on its own, at most `timeout`; kills it past that.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let mut child = self.child.take().ok_or_else(|| anyhow!("already waited"))?;
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        // `Child::wait` blocks: a thread turns it into a bounded wait on a channel.
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(timeout) {
            Ok(status) => {
                // The process is gone: its stderr is complete once the reader drains the pipe.
                if let Some(reader) = self.stderr_reader.take() {
                    let _ = reader.join();
                }
                Ok(status?)
            }
            Err(_) => {
                // SAFETY: the child is not reaped yet (its waiter holds it), so the pid is its.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
                Err(anyhow!(
                    "process {pid} still running after {timeout:?}; killed"
                ))
            }
        }
    }

    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM first so a coordinator stops its workers; SIGKILL if it lingers.
            // SAFETY: our own unreaped child.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let (tx, rx) = mpsc::channel();
            let pid = child.id();
            std::thread::spawn(move || {
                let _ = tx.send(child.wait());
            });
            if rx.recv_timeout(Duration::from_secs(10)).is_err() {
                // SAFETY: still unreaped (the waiter has not returned).
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
            }
        }
    }
}

/// A coordinator started on an OS-chosen port; stopped (with its workers) on drop.
pub struct CoordinatorProcess {
    pub process: Spawned,
    /// host:port of its HTTP API.
    pub addr: String,
}

impl CoordinatorProcess {
    /// Starts `gemma-coordinator --listen 127.0.0.1:0 ARGS..` and waits until it serves.
    pub fn start(args: &[&str]) -> Result<Self> {
        Self::start_with_env(args, &[])
    }

    /// Like [`Self::start`], with extra environment variables (GEMMA_* settings).
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        let mut all = vec!["--listen".to_string(), "127.0.0.1:0".to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        let mut process = Spawned::start_with_env(&binary("gemma-coordinator"), &all, env)?;
        let Some(line) = process.next_line(Duration::from_secs(120)) else {
            let status = process.wait(Duration::from_secs(10));
            return Err(anyhow!(
                "coordinator did not start ({status:?}):\n{}",
                process.stderr_text()
            ));
        };
        let addr = line
            .strip_prefix("gemma-coordinator listening on http://")
            .ok_or_else(|| anyhow!("unexpected first line {line:?}"))?
            .to_string();
        // stdout and stderr are two pipes read by two threads: the announcement above says
        // nothing about how far the stderr reader has got. The coordinator logs `serving` just
        // before it announces, after every `started local worker` line; once the reader has
        // that line, the log holds everything written before the announcement.
        let serving = format!("addr={addr}");
        if !process.wait_for_stderr_line(
            |l| l.contains(" serving ") && l.contains(&serving),
            Duration::from_secs(10),
        ) {
            return Err(anyhow!(
                "the coordinator announced {addr} without logging `serving addr={addr}`:\n{}",
                process.stderr_text()
            ));
        }
        Ok(Self { process, addr })
    }

    /// Pids of the local workers it started (from its log, complete once it serves).
    pub fn worker_pids(&self) -> Vec<u32> {
        worker_pids(&self.process.stderr_text())
    }
}

/// Pids from a coordinator log's `started local worker ... pid=N` lines.
pub fn worker_pids(log: &str) -> Vec<u32> {
    log.lines()
        .filter(|l| l.contains("started local worker"))
        .filter_map(|l| {
            l.split("pid=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2).is_none_or(|state| state != "Z"))
        .unwrap_or(false)
}

/// Waits, at most `timeout`, for the process `pid` (any process, not only a child) to exit;
/// true once it has (a zombie counts as exited). Uses a pidfd, which becomes readable when the
/// process exits: a real wait, not a polling loop, and safe against pid reuse once opened.
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        // ESRCH: no such process any more.
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    }
    let fd = fd as libc::c_int;
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd; the fd is ours and closed right after.
    let ready = unsafe { libc::poll(&mut poll, 1, ms) };
    unsafe {
        libc::close(fd);
    }
    ready == 1
}

/// A `gemma-worker` started on its own, as a Kubernetes pod runs one (the coordinator is given
/// its address with `--workers`); stopped on drop.
pub struct WorkerProcess {
    pub process: Spawned,
    /// host:port of its gRPC service.
    pub addr: String,
    /// host:port of its data plane.
    pub data_addr: String,
}

impl WorkerProcess {
    /// Starts `gemma-worker --listen LISTEN --threads THREADS` and waits for its announcement.
    /// `listen` may be `127.0.0.1:0`, or the address of a worker that died: a restarted pod.
    pub fn start(listen: &str, threads: usize) -> Result<Self> {
        Self::start_with(listen, threads, &[])
    }

    /// [`Self::start`] with more arguments (its TLS files).
    pub fn start_with(listen: &str, threads: usize, extra: &[String]) -> Result<Self> {
        let mut args = vec![
            "--listen".to_string(),
            listen.to_string(),
            "--threads".to_string(),
            threads.to_string(),
        ];
        args.extend_from_slice(extra);
        let mut process = Spawned::start(&binary("gemma-worker"), &args)?;
        let Some(line) = process.next_line(Duration::from_secs(30)) else {
            let status = process.wait(Duration::from_secs(5));
            return Err(anyhow!(
                "worker did not start ({status:?}):\n{}",
                process.stderr_text()
            ));
        };
        // gemma-worker listening on ADDR data ADDR
        let words: Vec<&str> = line
            .strip_prefix("gemma-worker listening on ")
            .map(|rest| rest.split_whitespace().collect())
            .unwrap_or_default();
        let [addr, "data", data_addr] = words[..] else {
            return Err(anyhow!("unexpected first line {line:?}"));
        };
        Ok(Self {
            addr: addr.to_string(),
            data_addr: data_addr.to_string(),
            process,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.id()
    }
}

/// Resident memory of a process in bytes (VmRSS), None once it is gone.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Sends `signal` to `pid` (SIGKILL, SIGSTOP, SIGCONT: the faults the soak and the failure
/// tests inject).
pub fn signal(pid: u32, signal: libc::c_int) -> Result<()> {
    // SAFETY: kill(2) with a pid and a signal number has no memory effects.
    if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
        return Err(anyhow!(
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
