//! One soak client: requests in a loop, each ending in one `Outcome`. A request that ends in
//! anything but text, a clear error or the client's own cancellation is `Silent`: the soak's
//! one unforgivable result.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gemma_proto::SplitMix64;
use serde_json::{json, Value};

/// How one request ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// 200 with text and a finish reason (streamed: `[DONE]` last).
    Text,
    /// The client hung up mid-stream on purpose.
    Cancelled,
    /// An OpenAI error body (or, streamed, an error chunk then `[DONE]`): status and error type.
    Error { status: u16, kind: String },
    /// Anything else: a reset connection, a stream without `[DONE]`, a body that is not
    /// OpenAI's. The reason says which.
    Silent(String),
}

/// One finished request, for the report.
pub struct Record {
    pub started: Duration,
    pub latency: Duration,
    pub streamed: bool,
    pub outcome: Outcome,
}

/// What every client shares.
pub struct Shared {
    pub addr: String,
    /// The model name the API serves.
    pub model: String,
    pub t0: Instant,
    pub stop: AtomicBool,
    /// While set, clients send no new request (the soak measures memory at a quiet moment).
    pub paused: AtomicBool,
}

/// Runs requests until `shared.stop`; returns every request's record.
pub fn run(shared: Arc<Shared>, seed: u64) -> Vec<Record> {
    let mut rng = SplitMix64::new(seed);
    let mut records = Vec::new();
    while !shared.stop.load(Ordering::Relaxed) {
        while shared.paused.load(Ordering::Relaxed) && !shared.stop.load(Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let streamed = rng.next_f64() < 0.5;
        // A fifth of the streamed requests hang up after a few events.
        let cancel_after = (streamed && rng.next_f64() < 0.2).then(|| 1 + (rng.next_u64() % 4));
        let max_tokens = 1 + rng.next_u64() % 24;
        let body = json!({
            "model": shared.model,
            // A bounded set of prompts: the tokenizer's BPE cache keeps every distinct word it
            // saw (up to 10 000 words under 256 bytes); unique numbers in every prompt would
            // show that bounded cache filling as growth over the whole run.
            "prompt": format!("Soak request {} of client {seed}:", records.len() % 16),
            "max_tokens": max_tokens,
            "temperature": if rng.next_f64() < 0.5 { 0.0 } else { 0.8 },
            "seed": rng.next_u64() % 1000,
            "stream": streamed,
        });
        let start = Instant::now();
        let outcome = match streamed {
            true => streamed_request(&shared.addr, &body, cancel_after),
            false => plain_request(&shared.addr, &body),
        };
        records.push(Record {
            started: start - shared.t0,
            latency: start.elapsed(),
            streamed,
            outcome,
        });
        // A refused request comes back at once: pace the retries as a real client would,
        // instead of spinning on the 503s.
        if matches!(
            records.last(),
            Some(Record {
                outcome: Outcome::Error { .. },
                ..
            })
        ) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    records
}

/// Every wait of a request; far past any deadline the cluster keeps.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

fn plain_request(addr: &str, body: &Value) -> Outcome {
    let r = match gemma_cluster_tests::http::request(
        addr,
        "POST",
        "/v1/completions",
        Some(body),
        REQUEST_TIMEOUT,
    ) {
        Ok(r) => r,
        Err(e) => return Outcome::Silent(format!("transport: {e:#}")),
    };
    let Ok(v) = serde_json::from_slice::<Value>(&r.body) else {
        return Outcome::Silent(format!("{} with a body that is not JSON", r.status));
    };
    match r.status {
        200 if v["choices"][0]["finish_reason"].is_string() => Outcome::Text,
        200 => Outcome::Silent("200 without a finish reason".into()),
        status => error_outcome(status, &v),
    }
}

/// OpenAI's error body: `{"error": {"message", "type", ...}}` with a message.
fn error_outcome(status: u16, v: &Value) -> Outcome {
    let e = &v["error"];
    match (e["message"].as_str(), e["type"].as_str()) {
        (Some(m), Some(kind)) if !m.is_empty() => Outcome::Error {
            status,
            kind: kind.to_string(),
        },
        _ => Outcome::Silent(format!("{status} without OpenAI's error body: {v}")),
    }
}

fn streamed_request(addr: &str, body: &Value, cancel_after: Option<u64>) -> Outcome {
    match read_stream(addr, body, cancel_after) {
        Ok(o) => o,
        Err(e) => Outcome::Silent(format!("transport: {e}")),
    }
}

/// Sends a streaming request and reads its events as they come (chunked transfer decoded here,
/// so a cancellation happens after exactly `cancel_after` events).
fn read_stream(addr: &str, body: &Value, cancel_after: Option<u64>) -> std::io::Result<Outcome> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let payload = body.to_string();
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    )?;
    let mut reader = BufReader::new(stream);
    let (status, chunked) = read_head(&mut reader)?;
    if status != 200 {
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest)?;
        let body = if chunked { dechunk(&rest) } else { rest };
        return Ok(match serde_json::from_slice::<Value>(&body) {
            Ok(v) => error_outcome(status, &v),
            Err(_) => Outcome::Silent(format!("{status} with a body that is not JSON")),
        });
    }
    let mut events = Events::default();
    let mut error: Option<Outcome> = None;
    let mut finished = false;
    loop {
        let Some(chunk) = next_chunk(&mut reader)? else {
            return Ok(Outcome::Silent("the stream ended without [DONE]".into()));
        };
        for data in events.push(&chunk) {
            if data == "[DONE]" {
                return Ok(match (error, finished) {
                    (Some(e), _) => e,
                    (None, true) => Outcome::Text,
                    (None, false) => Outcome::Silent("[DONE] without a finish reason".into()),
                });
            }
            let Ok(v) = serde_json::from_str::<Value>(&data) else {
                return Ok(Outcome::Silent(format!(
                    "an event that is not JSON: {data}"
                )));
            };
            if v.get("error").is_some() {
                error = Some(error_outcome(200, &v));
            } else if v["choices"][0]["finish_reason"].is_string() {
                finished = true;
            }
            events.seen += 1;
            if cancel_after.is_some_and(|n| events.seen >= n) {
                // Dropping the connection is the cancellation.
                return Ok(Outcome::Cancelled);
            }
        }
    }
}

fn read_head(reader: &mut impl BufRead) -> std::io::Result<(u16, bool)> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut chunked = false;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        let l = line.trim_end().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        chunked |= l.starts_with("transfer-encoding:") && l.contains("chunked");
    }
    Ok((status, chunked))
}

/// The next chunk of a chunked body; None at the last (empty) chunk or at EOF.
fn next_chunk(reader: &mut impl BufRead) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
        .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
    if size == 0 {
        return Ok(None);
    }
    let mut chunk = vec![0; size + 2];
    reader.read_exact(&mut chunk)?;
    chunk.truncate(size);
    Ok(Some(chunk))
}

/// A whole chunked body, decoded.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = next_chunk(&mut raw) {
        out.extend_from_slice(&chunk);
    }
    out
}

/// SSE `data:` payloads out of a byte stream cut anywhere.
#[derive(Default)]
struct Events {
    pending: Vec<u8>,
    seen: u64,
}

impl Events {
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = find(&self.pending, b"\n\n") {
            let event: Vec<u8> = self.pending.drain(..end + 2).collect();
            for line in String::from_utf8_lossy(&event).lines() {
                if let Some(d) = line.strip_prefix("data:") {
                    out.push(d.trim_start().to_string());
                }
            }
        }
        out
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
