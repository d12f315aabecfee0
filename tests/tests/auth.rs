//! API keys against a real coordinator: without a valid `Authorization: Bearer` key every /v1
//! route answers 401 in OpenAI's error shape; with one from the environment or the key file it
//! serves; /health, /ready and /metrics stay open; unusable key settings stop the coordinator
//! before any worker starts.

use std::time::Duration;

use gemma_cluster_tests::http::{request_with_headers, HttpResponse};
use gemma_cluster_tests::process::CoordinatorProcess;
use gemma_cluster_tests::tiny_servable_model;
use serde_json::json;

fn call(addr: &str, method: &str, path: &str, key: Option<&str>) -> HttpResponse {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    let body = json!({"prompt": "Hello", "max_tokens": 2, "temperature": 0});
    let body = (method == "POST").then_some(&body);
    request_with_headers(addr, method, path, body, &headers, Duration::from_secs(60))
        .expect("request")
}

fn assert_refused(r: &HttpResponse, says: &str) {
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let v = r.json().expect("OpenAI error JSON");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(says), "{message}");
}

#[test]
fn keys_guard_the_api_and_leave_the_probes_open() {
    let (tmp, dir) = tiny_servable_model();
    let keys = tmp.path().join("keys");
    std::fs::write(&keys, "# team A\nk-file-a\n\nk-file-b\n").expect("keys");
    let c = CoordinatorProcess::start_with_env(
        &[
            "--model",
            &dir.display().to_string(),
            "--api-key-file",
            &keys.display().to_string(),
        ],
        &[("GEMMA_API_KEY", "k-env")],
    )
    .expect("coordinator");

    for (method, path) in [
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
    ] {
        assert_refused(
            &call(&c.addr, method, path, None),
            "didn't provide an API key",
        );
        for wrong in ["k-fil", "k-file-ab", "K-ENV", "team A"] {
            assert_refused(
                &call(&c.addr, method, path, Some(wrong)),
                "Incorrect API key",
            );
        }
    }
    for key in ["k-env", "k-file-a", "k-file-b"] {
        let r = call(&c.addr, "POST", "/v1/completions", Some(key));
        assert_eq!(r.status, 200, "{key}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(call(&c.addr, "GET", "/v1/models", Some(key)).status, 200);
    }
    for open in ["/health", "/ready", "/metrics"] {
        assert_eq!(call(&c.addr, "GET", open, None).status, 200, "{open}");
    }
}

#[test]
fn unusable_key_settings_stop_the_coordinator_before_workers_start() {
    let (tmp, dir) = tiny_servable_model();
    let empty = tmp.path().join("keys");
    std::fs::write(&empty, "# nothing yet\n").expect("keys");
    let model = dir.display().to_string();
    for (args, says) in [
        (
            vec![
                "--model",
                &model,
                "--api-key-file",
                &empty.to_str().expect("utf-8"),
            ],
            "holds no key",
        ),
        (
            vec!["--model", &model, "--api-key-file", "/nonexistent/keys"],
            "cannot read the API key file /nonexistent/keys",
        ),
        (vec!["--model", &model, "--api-key", ""], "api_key is empty"),
    ] {
        let e = CoordinatorProcess::start(&args)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains(says), "{args:?}: {e}");
        assert!(
            !e.contains("started local worker"),
            "no worker started: {e}"
        );
    }
}
