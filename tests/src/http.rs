//! A minimal HTTP/1.1 client for tests and benchmarks against loopback servers: one request per
//! connection, Content-Length or chunked bodies. Enough to talk to our own API without pulling a
//! TLS-capable client into the build.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "response is not JSON: {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request and reads the whole response (bounded by `timeout` per read).
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<HttpResponse> {
    request_with_headers(addr, method, path, body, &[], timeout)
}

/// [`request`] with extra header lines (`Authorization`, ...).
pub fn request_with_headers(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    extra_headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<HttpResponse> {
    let payload = body.map(|b| b.to_string().into_bytes());
    request_raw(
        addr,
        method,
        path,
        payload.as_deref(),
        extra_headers,
        timeout,
    )
}

/// Sends `body` as it is (any bytes, labelled application/json): for what a JSON value cannot
/// express, such as malformed JSON or invalid UTF-8.
pub fn request_raw(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    extra_headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<HttpResponse> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    let payload = body.unwrap_or_default();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if body.is_some() {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            payload.len()
        ));
    }
    for (name, value) in extra_headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(payload)?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {line:?}"))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if let Some(len) = find("content-length") {
        let len: usize = len.parse()?;
        body.resize(len, 0);
        reader.read_exact(&mut body)?;
    } else if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim(), 16)
                .map_err(|_| anyhow!("bad chunk size {line:?}"))?;
            if size == 0 {
                break;
            }
            let at = body.len();
            body.resize(at + size, 0);
            reader.read_exact(&mut body[at..])?;
            line.clear();
            reader.read_line(&mut line)?;
        }
    } else {
        reader.read_to_end(&mut body)?;
    }
    if status == 0 {
        bail!("no status");
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// POST a JSON body with a 60 s read timeout.
pub fn post_json(addr: &str, path: &str, body: &serde_json::Value) -> Result<HttpResponse> {
    request(addr, "POST", path, Some(body), Duration::from_secs(60))
}

/// The `data:` payloads of a server-sent-events body, in order.
pub fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.trim_start().to_string())
        .collect()
}

/// Starts a streaming POST and returns the open connection after `events` SSE events arrived;
/// dropping it is a client that goes away mid-stream.
/// A streamed completion's text and finish reason (`stream` is set on `body`), its SSE framing
/// checked on the way: 200, `text/event-stream`, `text_completion` chunks, `[DONE]` last, a
/// finish reason on exactly one chunk.
pub fn streamed_completion(
    addr: &str,
    mut body: serde_json::Value,
    timeout: Duration,
) -> Result<(String, String)> {
    body["stream"] = serde_json::Value::Bool(true);
    let r = request(addr, "POST", "/v1/completions", Some(&body), timeout)?;
    if r.status != 200
        || !r
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/event-stream"))
    {
        bail!(
            "not an event stream: {} {:?}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }
    let events = sse_data(&r.body);
    let Some((last, chunks)) = events.split_last() else {
        bail!("an empty stream");
    };
    if last != "[DONE]" {
        bail!("the stream ends with {last:?}, not [DONE]");
    }
    let (mut text, mut finish) = (String::new(), Vec::new());
    for e in chunks {
        let v: serde_json::Value = serde_json::from_str(e).context("chunk JSON")?;
        if v["object"] != "text_completion" {
            bail!("a chunk of object {}", v["object"]);
        }
        let c = &v["choices"][0];
        text.push_str(c["text"].as_str().unwrap_or_default());
        if let Some(f) = c["finish_reason"].as_str() {
            finish.push(f.to_string());
        }
    }
    match <[String; 1]>::try_from(finish) {
        Ok([f]) => Ok((text, f)),
        Err(f) => bail!("finish reasons {f:?}: one chunk must carry exactly one"),
    }
}

pub fn open_stream(
    addr: &str,
    path: &str,
    body: &serde_json::Value,
    events: usize,
    timeout: Duration,
) -> Result<TcpStream> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(timeout))?;
    let payload = body.to_string();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
        payload.len()
    )?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&seen).matches("data:").count() < events {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            bail!("stream ended after {}", String::from_utf8_lossy(&seen));
        }
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(stream)
}

/// The Prometheus samples of GET /metrics, by name with labels (`requests_total{outcome="x"}`).
pub fn metrics(addr: &str) -> Result<HashMap<String, f64>> {
    let r = request(addr, "GET", "/metrics", None, Duration::from_secs(10))?;
    if r.status != 200 {
        bail!("/metrics answered {}", r.status);
    }
    Ok(String::from_utf8_lossy(&r.body)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect())
}

/// Polls /metrics until `holds` is true of them, at most `timeout`; the last metrics in the
/// error otherwise. For what the server does after it has answered (a cancelled request is
/// noticed between engine steps), which no response can signal.
pub fn wait_for_metrics(
    addr: &str,
    timeout: Duration,
    holds: impl Fn(&HashMap<String, f64>) -> bool,
) -> Result<HashMap<String, f64>> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let m = metrics(addr)?;
        if holds(&m) {
            return Ok(m);
        }
        if std::time::Instant::now() >= deadline {
            bail!("not within {timeout:?}: {m:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
