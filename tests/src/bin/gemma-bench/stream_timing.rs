//! A streamed completion read event by event, each token's event stamped when it was read, with
//! the events that shared one read() counted.
//!
//! Under load the client threads share the cores with the server: a thread that wakes late finds
//! several tokens waiting, and one read() gives them one instant (gaps of zero that flatter the
//! inter-token latency). Two things keep that honest: the client threads ask for real-time
//! priority (`prefer_realtime`; granted with CAP_SYS_NICE) so a token's arrival wakes its reader
//! at once, and every event that arrived in the same read() as an earlier one is counted as
//! merged, so the table says how far its ITL can be trusted. Kernel receive timestamps
//! (SO_TIMESTAMPNS) do not help: TCP coalesces queued segments and stamps the whole with the
//! latest arrival. TPOT ((last - first) / (tokens - 1)) does not depend on read boundaries.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// One streamed request's timings, in ms from the moment the request was written.
pub struct StreamTimes {
    /// When each SSE event that carried a choice (a token's text, or the finish; not a chat's
    /// opening role chunk) was read.
    pub arrivals: Vec<f64>,
    /// `usage.completion_tokens` of the final chunk: what the server says it generated.
    pub completion_tokens: usize,
    /// `usage.prompt_tokens` and `usage.prompt_tokens_details.cached_tokens` of the final chunk.
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    /// The first choice's text (a completion's `text`, a chat's `delta.content`).
    pub text: String,
    /// Choice events that came in the same read() as an earlier one.
    pub merged: usize,
}

impl StreamTimes {
    /// Time to the first token.
    pub fn ttft(&self) -> Option<f64> {
        self.arrivals.first().copied()
    }

    /// The gaps between consecutive events: inter-token latencies.
    pub fn gaps(&self) -> impl Iterator<Item = f64> + '_ {
        self.arrivals.windows(2).map(|w| w[1] - w[0])
    }

    /// Time per output token after the first (vLLM's TPOT): immune to how events were grouped.
    pub fn tpot(&self) -> Option<f64> {
        let (first, last) = (self.arrivals.first()?, self.arrivals.last()?);
        (self.completion_tokens > 1).then(|| (last - first) / (self.completion_tokens - 1) as f64)
    }
}

/// Asks for SCHED_FIFO for the calling thread; false where the system does not allow it.
pub fn prefer_realtime() -> bool {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sched_setscheduler on the calling thread (0) with a valid parameter.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
}

/// POSTs `body` (a streaming request with `stream_options.include_usage`) to `path` and reads
/// the whole event stream.
pub fn stream(addr: &str, path: &str, body: &str) -> Result<StreamTimes> {
    let mut sock = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(Duration::from_secs(300)))?;
    let sent = Instant::now();
    write!(
        sock,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    read_events(sock, sent)
}

/// Reads a response (headers, chunked SSE) up to `[DONE]`; times from `sent`.
fn read_events(mut sock: impl Read, sent: Instant) -> Result<StreamTimes> {
    let mut times = StreamTimes {
        arrivals: Vec::new(),
        completion_tokens: 0,
        prompt_tokens: 0,
        cached_tokens: 0,
        text: String::new(),
        merged: 0,
    };
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = sock.read(&mut buf)?;
        if n == 0 {
            bail!("the stream closed before [DONE]");
        }
        let now = sent.elapsed().as_secs_f64() * 1000.0;
        pending.extend_from_slice(&buf[..n]);
        let mut in_this_read = 0;
        while let Some(end) = find_event_end(&pending) {
            let event: Vec<u8> = pending.drain(..end).collect();
            let Some(data) = sse_data(&event) else {
                continue;
            };
            if data == "[DONE]" {
                if times.completion_tokens == 0 {
                    bail!("the stream ended without usage; the request must ask for include_usage");
                }
                return Ok(times);
            }
            let chunk: serde_json::Value =
                serde_json::from_str(data).with_context(|| format!("SSE data {data:?}"))?;
            let usage = &chunk["usage"];
            if let Some(tokens) = usage["completion_tokens"].as_u64() {
                times.completion_tokens = tokens as usize;
                times.prompt_tokens = usage["prompt_tokens"].as_u64().unwrap_or(0) as usize;
                times.cached_tokens = usage["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0) as usize;
            }
            let choice = &chunk["choices"][0];
            let piece = choice["text"]
                .as_str()
                .or(choice["delta"]["content"].as_str());
            times.text.push_str(piece.unwrap_or_default());
            // A chat stream's opening chunk (the role, no token) is sent before any work.
            let opening = choice["delta"]["role"].is_string();
            if chunk["choices"].as_array().is_some_and(|c| !c.is_empty()) && !opening {
                if in_this_read > 0 {
                    times.merged += 1;
                }
                in_this_read += 1;
                times.arrivals.push(now);
            }
        }
    }
}

/// The `data:` payload of one SSE event (the HTTP headers and chunk framing around it skipped).
fn sse_data(event: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(event).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("data: "))
        .map(str::trim_end)
}

/// The index just past the first "\n\n" (an SSE event's end) or "\r\n\r\n" (the HTTP headers'
/// end), whichever comes first.
fn find_event_end(bytes: &[u8]) -> Option<usize> {
    (0..bytes.len()).find_map(|i| {
        let rest = &bytes[i..];
        if rest.starts_with(b"\n\n") {
            Some(i + 2)
        } else if rest.starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    const GAP_MS: u64 = 50;

    #[test]
    fn events_end_at_a_blank_line_and_headers_at_crlf_crlf() {
        assert_eq!(find_event_end(b"HTTP/1.1 200 OK\r\n\r\nxx"), Some(19));
        assert_eq!(find_event_end(b"data: a\n\ndata: b\n\n"), Some(9));
        assert_eq!(find_event_end(b"data: a\n"), None);
    }

    /// Answers one request with chunked SSE: three token events `GAP_MS` apart, usage, [DONE].
    fn sse_server() -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut request = [0u8; 1024];
            let _ = s.read(&mut request).unwrap();
            s.set_nodelay(true).unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .unwrap();
            let mut send = |text: &str| {
                let chunk = format!("{:x}\r\n{text}\r\n", text.len());
                s.write_all(chunk.as_bytes()).unwrap();
            };
            for i in 0..3 {
                std::thread::sleep(Duration::from_millis(GAP_MS));
                send(&format!(
                    "data: {{\"choices\":[{{\"text\":\"t{i}\"}}]}}\n\n"
                ));
            }
            send("data: {\"choices\":[],\"usage\":{\"completion_tokens\":3}}\n\n");
            send("data: [DONE]\n\n");
        });
        (addr, server)
    }

    #[test]
    fn a_prompt_reader_sees_each_token_at_its_own_time() {
        let (addr, server) = sse_server();
        let times = stream(&addr.to_string(), "/", "{}").unwrap();
        server.join().unwrap();
        assert_eq!((times.completion_tokens, times.arrivals.len()), (3, 3));
        assert_eq!(times.merged, 0);
        let gaps: Vec<f64> = times.gaps().collect();
        assert!(
            gaps.iter().all(|&g| g >= GAP_MS as f64 - 1.0),
            "gaps {gaps:?} ms"
        );
        assert!(times.tpot().unwrap() >= GAP_MS as f64 - 1.0);
    }

    /// The failure the count exists for: a reader that wakes after all tokens arrived gets them
    /// in one read(); its gaps are zero, and the merge is reported instead of hidden.
    #[test]
    fn a_late_reader_reports_the_merged_events() {
        let (addr, server) = sse_server();
        let mut sock = TcpStream::connect(addr).unwrap();
        let sent = Instant::now();
        sock.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        server.join().unwrap();
        let times = read_events(sock, sent).unwrap();
        assert_eq!(times.arrivals.len(), 3);
        assert_eq!(times.merged, 2);
        assert!(times.gaps().all(|g| g == 0.0));
    }
}
