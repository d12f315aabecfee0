//! The HTTP edge's load limits against a real coordinator serving the tiny model: open
//! connections (`max_connections`: 503 past it, served again once one closes), output per
//! request (`max_tokens_per_request`: 400 naming it, streamed or not), and the optional rate
//! limit per API key or client address (429 in OpenAI's error JSON with `Retry-After`; the
//! probes and metrics never limited).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use gemma_cluster_tests::http::{request_raw, request_with_headers, HttpResponse};
use gemma_cluster_tests::process::CoordinatorProcess;
use gemma_cluster_tests::tiny_servable_model;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

/// A kept-alive connection that has been served once, so the server holds it open.
fn held_connection(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    write!(s, "GET /health HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !seen.ends_with(b"\r\n\r\nok") {
        let n = s.read(&mut buf).expect("response");
        assert!(n > 0, "closed after {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(seen.starts_with(b"HTTP/1.1 200"));
    s
}

fn get(addr: &str, path: &str, key: Option<&str>) -> HttpResponse {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    request_with_headers(addr, "GET", path, None, &headers, WAIT).expect("answer")
}

fn error_message(r: &HttpResponse) -> String {
    let v: Value = r.json().expect("OpenAI error JSON");
    assert!(v["error"]["type"].is_string(), "{v}");
    v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn connections_past_max_connections_get_503_until_one_closes() {
    let (_tmp, dir) = tiny_servable_model();
    let c = CoordinatorProcess::start(&[
        "--model",
        &dir.display().to_string(),
        "--max-connections",
        "2",
    ])
    .expect("coordinator");
    let first = held_connection(&c.addr);
    let _second = held_connection(&c.addr);

    let asked = Instant::now();
    let r = request_raw(&c.addr, "GET", "/health", None, &[], WAIT).expect("an answer");
    let took = asked.elapsed();
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("retry-after"), Some("1"));
    let message = error_message(&r);
    assert!(
        message.contains("2 connections open") && message.contains("max_connections"),
        "{message}"
    );
    assert!(took < Duration::from_secs(2), "refused in {took:?}");
    // A request with a body is refused the same way, its body read and dropped.
    let body = json!({"prompt": "Hello", "max_tokens": 2}).to_string();
    let complete = || {
        request_raw(
            &c.addr,
            "POST",
            "/v1/completions",
            Some(body.as_bytes()),
            &[],
            WAIT,
        )
        .expect("an answer")
    };
    assert_eq!(complete().status, 503);

    // Closing a held connection gives its place back (noticed by the server asynchronously:
    // wait for it with a deadline). Each probe's own connection is given back the same way, so
    // the completion that follows may still find the place taken for a moment: it too is
    // retried until the deadline, and every answer before the 200 must be the 503.
    drop(first);
    let deadline = Instant::now() + WAIT;
    loop {
        let r = complete();
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
        assert!(Instant::now() < deadline, "no connection freed in {WAIT:?}");
        std::thread::yield_now();
    }
}

#[test]
fn max_tokens_past_max_tokens_per_request_is_refused_naming_the_limit() {
    let (_tmp, dir) = tiny_servable_model();
    let c = CoordinatorProcess::start(&[
        "--model",
        &dir.display().to_string(),
        "--max-tokens-per-request",
        "4",
    ])
    .expect("coordinator");
    let post = |body: Value| {
        let payload = body.to_string();
        request_raw(
            &c.addr,
            "POST",
            "/v1/completions",
            Some(payload.as_bytes()),
            &[],
            WAIT,
        )
        .expect("answer")
    };
    for stream in [false, true] {
        let r = post(json!({"prompt": "Hello", "max_tokens": 5, "stream": stream}));
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
        let message = error_message(&r);
        assert!(
            message.contains("must be 1 to 4") && message.contains("max_tokens_per_request, 4"),
            "{message}"
        );
        assert_eq!(r.json().expect("json")["error"]["param"], "max_tokens");
    }
    // At the limit, and without max_tokens (the default 16 shrinks to it), the request runs to
    // the limit.
    for max_tokens in [json!(4), Value::Null] {
        let r = post(json!({
            "prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": true, "temperature": 0
        }));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json().expect("json");
        assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");
    }
}

#[test]
fn a_key_past_its_rate_gets_429_with_retry_after_and_other_keys_and_probes_do_not() {
    let (tmp, dir) = tiny_servable_model();
    let keys = tmp.path().join("keys");
    std::fs::write(&keys, "k-a\nk-b\n").expect("keys");
    // One request per 100 s after a burst of 2: no refill during the test.
    let c = CoordinatorProcess::start(&[
        "--model",
        &dir.display().to_string(),
        "--api-key-file",
        &keys.display().to_string(),
        "--rate-limit-per-second",
        "0.01",
        "--rate-limit-burst",
        "2",
    ])
    .expect("coordinator");
    for _ in 0..2 {
        assert_eq!(get(&c.addr, "/v1/models", Some("k-a")).status, 200);
    }
    let r = get(&c.addr, "/v1/models", Some("k-a"));
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in whole seconds");
    assert!((1..=100).contains(&retry), "Retry-After {retry}");
    assert_eq!(r.json().expect("json")["error"]["type"], "rate_limit_error");
    let message = error_message(&r);
    assert!(
        message.contains("0.01 requests per second") && message.contains("per API key"),
        "{message}"
    );
    // Every /v1 route shares the key's bucket.
    let body = json!({"prompt": "Hello", "max_tokens": 1});
    let auth = [("Authorization", "Bearer k-a")];
    let r = request_with_headers(&c.addr, "POST", "/v1/completions", Some(&body), &auth, WAIT)
        .expect("answer");
    assert_eq!(r.status, 429);
    // Another key has its own bucket; a wrong key is refused by auth first.
    assert_eq!(get(&c.addr, "/v1/models", Some("k-b")).status, 200);
    assert_eq!(get(&c.addr, "/v1/models", Some("k-wrong")).status, 401);
    for _ in 0..5 {
        for open in ["/health", "/ready", "/metrics"] {
            assert_eq!(get(&c.addr, open, None).status, 200, "{open}");
        }
    }
}

#[test]
fn without_keys_the_rate_limit_is_per_client_address() {
    let (_tmp, dir) = tiny_servable_model();
    let c = CoordinatorProcess::start(&[
        "--model",
        &dir.display().to_string(),
        "--rate-limit-per-second",
        "0.01",
    ])
    .expect("coordinator");
    // The default burst: one second's worth, at least 1.
    let body = json!({"prompt": "Hello", "max_tokens": 1});
    let post = || {
        request_with_headers(&c.addr, "POST", "/v1/completions", Some(&body), &[], WAIT)
            .expect("answer")
    };
    assert_eq!(post().status, 200);
    let r = post();
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.header("retry-after").is_some());
    assert!(error_message(&r).contains("per client address"));
    for open in ["/health", "/ready", "/metrics"] {
        assert_eq!(get(&c.addr, open, None).status, 200, "{open}");
    }
}
