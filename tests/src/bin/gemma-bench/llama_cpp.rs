//! llama.cpp's own programs, the reference of every real-model row: `llama-bench`,
//! `llama-server` (alone, or over two `ggml-rpc-server`s), `llama-perplexity` and
//! `llama-quantize`, built by scripts/llama-cpp from the llama.cpp inside PyPI's
//! llama-cpp-python sdist. Found in $BENCH_LLAMA_CPP, else where that script caches them.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::KillOnDrop;

/// The llama-cpp-python release whose llama.cpp scripts/llama-cpp builds.
const VERSION: &str = "0.3.36";
/// How long a server may take to load the model and answer /health.
const START_DEADLINE: Duration = Duration::from_secs(120);

pub struct LlamaCpp {
    bin: PathBuf,
}

impl LlamaCpp {
    /// The programs' directory, or why there is none (the rows that need it say so).
    pub fn find() -> Result<Self> {
        let bin = match std::env::var_os("BENCH_LLAMA_CPP") {
            Some(dir) => PathBuf::from(dir),
            None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(format!(
                ".cache/gemma-cluster/llama.cpp-{VERSION}/build/bin"
            )),
        };
        for program in [
            "llama-bench",
            "llama-server",
            "ggml-rpc-server",
            "llama-perplexity",
        ] {
            if !bin.join(program).is_file() {
                bail!(
                    "{} has no {program}: run scripts/llama-cpp (about 15 minutes) or set \
                     BENCH_LLAMA_CPP",
                    bin.display()
                );
            }
        }
        Ok(Self { bin })
    }

    pub fn program(&self, name: &str) -> Command {
        Command::new(self.bin.join(name))
    }

    /// `llama-bench` on `model` with `threads` and `args` (its `-p`, `-n`, `-d`): tokens/s of
    /// each test it ran, in order, averaged over its repetitions.
    pub fn bench(&self, model: &Path, threads: usize, args: &[&str]) -> Result<Vec<f64>> {
        let out = self
            .program("llama-bench")
            .args(["-m", &model.display().to_string()])
            .args(["-t", &threads.to_string(), "-r", "3", "-o", "json"])
            .args(args)
            .stderr(Stdio::null())
            .output()
            .context("running llama-bench")?;
        if !out.status.success() {
            bail!("llama-bench {args:?} failed with {}", out.status);
        }
        let tests: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).with_context(|| {
                format!(
                    "llama-bench's JSON: {}",
                    String::from_utf8_lossy(&out.stdout)
                )
            })?;
        tests
            .iter()
            .map(|t| {
                t["avg_ts"]
                    .as_f64()
                    .context("llama-bench result without avg_ts")
            })
            .collect()
    }

    /// `llama-server` on `model`: `--parallel` slots of `slot_context` tokens each, continuous
    /// batching, `threads` compute threads; over `rpc` (its servers' addresses) when given, every
    /// layer offloaded to them. Returns once /health answers 200.
    pub fn server(
        &self,
        model: &Path,
        threads: usize,
        parallel: usize,
        slot_context: usize,
        rpc: Option<&RpcPair>,
    ) -> Result<(KillOnDrop, String)> {
        let port = free_port()?;
        let mut cmd = self.program("llama-server");
        cmd.args(["-m", &model.display().to_string()])
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-t", &threads.to_string(), "-tb", &threads.to_string()])
            .args(["--parallel", &parallel.to_string()])
            .args(["-c", &(parallel * slot_context).to_string()])
            .args(["--no-webui", "--log-disable"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(rpc) = rpc {
            cmd.args(["--rpc", &rpc.addresses(), "-ngl", "99"]);
        }
        let guard = KillOnDrop(cmd.spawn().context("starting llama-server")?);
        let addr = format!("127.0.0.1:{port}");
        wait_healthy(&addr)?;
        Ok((guard, addr))
    }

    /// Two `ggml-rpc-server`s of `threads` compute threads each, accepting connections.
    pub fn rpc_pair(&self, threads: usize) -> Result<RpcPair> {
        let mut servers = Vec::new();
        for _ in 0..2 {
            let port = free_port()?;
            let child = self
                .program("ggml-rpc-server")
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .args(["-t", &threads.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting ggml-rpc-server")?;
            servers.push((KillOnDrop(child), format!("127.0.0.1:{port}")));
        }
        for (_, addr) in &servers {
            let deadline = Instant::now() + START_DEADLINE;
            while TcpStream::connect(addr).is_err() {
                if Instant::now() > deadline {
                    bail!("ggml-rpc-server on {addr} did not listen within {START_DEADLINE:?}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(RpcPair { servers })
    }
}

pub struct RpcPair {
    servers: Vec<(KillOnDrop, String)>,
}

impl RpcPair {
    fn addresses(&self) -> String {
        let addrs: Vec<&str> = self.servers.iter().map(|(_, a)| a.as_str()).collect();
        addrs.join(",")
    }
}

/// A loopback port free right now (llama.cpp's programs take a port, not a bound socket; the
/// window in which another process could take it is the child's start-up).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Polls GET /health until 200 (llama-server answers 503 while it loads the model).
fn wait_healthy(addr: &str) -> Result<()> {
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        if super::http_get_status(addr, "/health").is_ok_and(|s| s == 200) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("llama-server on {addr} was not healthy within {START_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What `llama-perplexity`'s KL mode reports for a model against a reference's logits.
pub struct KlStats {
    /// Mean KL(reference || model) per scored position, nats.
    pub mean_kl: f64,
    /// Share of scored positions where both pick the same most likely token, in %.
    pub same_top: f64,
    /// The text's tokens as llama.cpp read them (every window's, before its first becomes
    /// <bos>): so another side can score exactly the same positions.
    pub tokens: Vec<u32>,
}

impl LlamaCpp {
    /// `model` dequantized to an F32 GGUF at `out` (`llama-quantize --allow-requantize`): the
    /// same weights as llama.cpp's reference for `model`'s numerics.
    pub fn dequantize(&self, model: &Path, out: &Path, threads: usize) -> Result<()> {
        let status = self
            .program("llama-quantize")
            .arg("--allow-requantize")
            .args([model, out])
            .args(["F32", &threads.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running llama-quantize")?;
        if !status.success() {
            bail!("llama-quantize to F32 failed with {status}");
        }
        Ok(())
    }

    /// Teacher-forced over `text` in `chunks` windows of `context` tokens (each starting with
    /// <bos>; the second half of each scored): `model` against `reference`'s logits, with
    /// llama-perplexity's KL mode.
    pub fn kl_divergence(
        &self,
        reference: &Path,
        model: &Path,
        text: &Path,
        context: usize,
        chunks: usize,
        threads: usize,
    ) -> Result<KlStats> {
        let dir = tempfile::tempdir()?;
        let base = dir.path().join("reference.kld");
        let run = |model: &Path, args: &[&std::ffi::OsStr]| -> Result<String> {
            let out = self
                .program("llama-perplexity")
                .args(["-m".as_ref(), model.as_os_str()])
                .args(["-t", &threads.to_string(), "-c", &context.to_string()])
                .args(["--chunks", &chunks.to_string()])
                .args(args)
                .output()
                .context("running llama-perplexity")?;
            if !out.status.success() {
                bail!(
                    "llama-perplexity failed with {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            // Its statistics go to stdout, its log to stderr.
            let mut log = String::from_utf8_lossy(&out.stdout).into_owned();
            log.push_str(&String::from_utf8_lossy(&out.stderr));
            Ok(log)
        };
        run(
            reference,
            &[
                "-f".as_ref(),
                text.as_os_str(),
                "--kl-divergence-base".as_ref(),
                base.as_os_str(),
            ],
        )?;
        let log = run(
            model,
            &[
                "--kl-divergence-base".as_ref(),
                base.as_os_str(),
                "--kl-divergence".as_ref(),
            ],
        )?;
        Ok(KlStats {
            mean_kl: stat(&log, "Mean    KLD:")?,
            same_top: stat(&log, "Same top p:")?,
            tokens: saved_tokens(&base)?,
        })
    }
}

/// The tokens a `--kl-divergence-base` file holds: after "_logits_", n_ctx (u32), n_vocab and
/// n_chunk (i32), n_ctx x n_chunk token ids (i32), then the log-probabilities.
fn saved_tokens(path: &Path) -> Result<Vec<u32>> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut header = [0u8; 20];
    file.read_exact(&mut header)?;
    if &header[..8] != b"_logits_" {
        bail!("{} is not a llama-perplexity logits file", path.display());
    }
    let word =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let count = word(8) as usize * word(16) as usize;
    let mut ids = vec![0u8; count * 4];
    file.read_exact(&mut ids)?;
    Ok(ids
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The number after `label` on llama-perplexity's statistics line.
fn stat(log: &str, label: &str) -> Result<f64> {
    log.lines()
        .find_map(|l| l.split_once(label))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("llama-perplexity printed no {label:?}"))
}
