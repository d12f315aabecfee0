//! Hostile and malformed requests against a real coordinator: each gets a 4xx in OpenAI's error
//! JSON that names what was wrong, none harms the process or the requests after it.

use std::time::Duration;

use gemma_cluster_tests::http::{post_json, request_raw};
use gemma_cluster_tests::process::CoordinatorProcess;
use gemma_cluster_tests::tiny_servable_model;
use serde_json::{json, Value};

const C: &str = "/v1/completions";
const H: &str = "/v1/chat/completions";

/// One bad request: where it goes, its body, the status it must get and a word the error's
/// message or param must contain.
struct Case {
    name: &'static str,
    path: &'static str,
    body: Vec<u8>,
    status: u16,
    says: &'static str,
}

fn case(
    name: &'static str,
    path: &'static str,
    body: Value,
    status: u16,
    says: &'static str,
) -> Case {
    Case {
        name,
        path,
        body: body.to_string().into_bytes(),
        status,
        says,
    }
}

fn raw(
    name: &'static str,
    path: &'static str,
    body: &[u8],
    status: u16,
    says: &'static str,
) -> Case {
    Case {
        name,
        path,
        body: body.to_vec(),
        status,
        says,
    }
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

fn cases() -> Vec<Case> {
    let p = |extra: Value| {
        let mut b = json!({"prompt": "Hello"});
        for (k, v) in extra.as_object().expect("object") {
            b[k] = v.clone();
        }
        b
    };
    let m = |extra: Value| {
        let mut b = json!({"messages": user("Hello")});
        for (k, v) in extra.as_object().expect("object") {
            b[k] = v.clone();
        }
        b
    };
    let nested = format!(
        "{{\"prompt\": \"a\", \"x\": {}{}}}",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let mut long_prompt = String::new();
    for i in 0..9000 {
        long_prompt.push_str(&format!("w{i} "));
    }
    vec![
        raw("truncated JSON", C, br#"{"prompt": "a","#, 400, "JSON"),
        raw("not JSON at all", C, b"prompt=a", 400, "JSON"),
        raw("a JSON array", C, b"[1, 2]", 400, "JSON"),
        raw(
            "invalid UTF-8",
            C,
            b"{\"prompt\": \"\xff\xfe\"}",
            400,
            "JSON",
        ),
        raw("deeply nested JSON", C, nested.as_bytes(), 400, "JSON"),
        raw("empty body", C, b"", 400, "JSON"),
        case("prompt a number", C, json!({"prompt": 5}), 400, "prompt"),
        case(
            "max_tokens a string",
            C,
            p(json!({"max_tokens": "ten"})),
            400,
            "`max_tokens`",
        ),
        case(
            "temperature a string",
            C,
            p(json!({"temperature": "hot"})),
            400,
            "temperature",
        ),
        case(
            "stream a string",
            C,
            p(json!({"stream": "yes"})),
            400,
            "stream",
        ),
        case(
            "unknown model",
            C,
            p(json!({"model": "gpt-9"})),
            404,
            "gpt-9",
        ),
        case("no prompt", C, json!({"max_tokens": 3}), 400, "prompt"),
        case(
            "two prompts",
            C,
            json!({"prompt": ["a", "b"]}),
            400,
            "prompt",
        ),
        case("no messages", H, json!({"max_tokens": 3}), 400, "messages"),
        case(
            "empty messages",
            H,
            json!({"messages": []}),
            400,
            "messages",
        ),
        case(
            "messages a string",
            H,
            json!({"messages": "hi"}),
            400,
            "messages",
        ),
        case(
            "unknown role",
            H,
            json!({"messages": [{"role": "wizard", "content": "hi"}]}),
            400,
            "role",
        ),
        case(
            "roles out of order",
            H,
            json!({"messages": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]}),
            400,
            "messages",
        ),
        case(
            "content part of unknown type",
            H,
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            400,
            "messages",
        ),
        case(
            "content a number",
            H,
            json!({"messages": [{"role": "user", "content": 5}]}),
            400,
            "`messages[0].content`",
        ),
        case(
            "content null",
            H,
            json!({"messages": [{"role": "user", "content": null}]}),
            400,
            "messages",
        ),
        case(
            "max_tokens 0",
            C,
            p(json!({"max_tokens": 0})),
            400,
            "max_tokens",
        ),
        case(
            "max_tokens negative",
            C,
            p(json!({"max_tokens": -5})),
            400,
            "max_tokens",
        ),
        case(
            "max_tokens past the context",
            C,
            p(json!({"max_tokens": 1_000_000_000})),
            400,
            "max_tokens",
        ),
        case(
            "prompt past the context",
            C,
            json!({"prompt": long_prompt}),
            400,
            "prompt",
        ),
        case(
            "temperature below 0",
            C,
            p(json!({"temperature": -0.1})),
            400,
            "temperature",
        ),
        case(
            "temperature above 2",
            C,
            p(json!({"temperature": 2.5})),
            400,
            "temperature",
        ),
        case("top_p 0", C, p(json!({"top_p": 0.0})), 400, "top_p"),
        case("top_p above 1", C, p(json!({"top_p": 1.5})), 400, "top_p"),
        case("top_k below -1", C, p(json!({"top_k": -2})), 400, "top_k"),
        case("min_p above 1", C, p(json!({"min_p": 1.5})), 400, "min_p"),
        case("n 0", C, p(json!({"n": 0})), 400, "n"),
        case("n too large", C, p(json!({"n": 1000})), 400, "n"),
        case(
            "logprobs above 20",
            C,
            p(json!({"logprobs": 21})),
            400,
            "logprobs",
        ),
        case(
            "top_logprobs above 20",
            H,
            m(json!({"logprobs": true, "top_logprobs": 21})),
            400,
            "top_logprobs",
        ),
        case(
            "top_logprobs without logprobs",
            H,
            m(json!({"top_logprobs": 2})),
            400,
            "top_logprobs",
        ),
        case(
            "five stop strings",
            C,
            p(json!({"stop": ["a", "b", "c", "d", "e"]})),
            400,
            "stop",
        ),
        case(
            "an empty stop string",
            C,
            p(json!({"stop": [""]})),
            400,
            "stop",
        ),
        case(
            "frequency_penalty above 2",
            C,
            p(json!({"frequency_penalty": 3})),
            400,
            "frequency_penalty",
        ),
        case(
            "presence_penalty below -2",
            C,
            p(json!({"presence_penalty": -3})),
            400,
            "presence_penalty",
        ),
        case(
            "repetition_penalty 0",
            C,
            p(json!({"repetition_penalty": 0})),
            400,
            "repetition_penalty",
        ),
        case(
            "stream_options without stream",
            C,
            p(json!({"stream_options": {"include_usage": true}})),
            400,
            "stream_options",
        ),
        case(
            "continuous_usage_stats without include_usage",
            C,
            p(json!({"stream": true, "stream_options": {"continuous_usage_stats": true}})),
            400,
            "include_usage",
        ),
        case(
            "continuous_usage_stats not a boolean",
            H,
            json!({"messages": user("hi"), "stream": true,
                   "stream_options": {"include_usage": true, "continuous_usage_stats": "yes"}}),
            400,
            "`stream_options`: invalid type: string \"yes\", expected a boolean",
        ),
        case(
            "min_tokens negative",
            C,
            p(json!({"min_tokens": -1})),
            400,
            "min_tokens",
        ),
        case(
            "min_tokens past max_tokens",
            H,
            json!({"messages": user("hi"), "max_tokens": 4, "min_tokens": 5}),
            400,
            "max_tokens (4)",
        ),
        case(
            "min_tokens a string",
            C,
            p(json!({"min_tokens": "3"})),
            400,
            "min_tokens",
        ),
        case(
            "ignore_eos a number",
            C,
            p(json!({"ignore_eos": 1})),
            400,
            "ignore_eos",
        ),
        case("seed a string", C, p(json!({"seed": "x"})), 400, "seed"),
        case(
            "prompt as token ids",
            C,
            json!({"prompt": [2, 651, 6037]}),
            400,
            "token ids are not supported",
        ),
        case(
            "a streamed prompt past the context",
            C,
            json!({"prompt": "w ".repeat(9000), "stream": true}),
            400,
            "prompt",
        ),
        case(
            "streamed max_tokens past the context",
            C,
            p(json!({"max_tokens": 9000, "stream": true})),
            400,
            "context length",
        ),
        case(
            "streamed chat max_tokens past the context",
            H,
            m(json!({"max_tokens": 9000, "stream": true})),
            400,
            "context length",
        ),
        case(
            "a streamed conversation past the context",
            H,
            json!({"messages": user(&"w ".repeat(9000)), "stream": true}),
            400,
            "prompt",
        ),
        // The field audit (api/fields.rs): nothing is silently ignored.
        case(
            "a misspelled field",
            C,
            p(json!({"max_token": 5})),
            400,
            "did you mean `max_tokens`?",
        ),
        case(
            "a field of no API",
            H,
            m(json!({"xyzzy_flag": 1})),
            400,
            "xyzzy_flag",
        ),
        case(
            "tools",
            H,
            m(json!({"tools": [{"type": "function", "function": {"name": "f"}}]})),
            400,
            "tool calling is not supported",
        ),
        case("echo", C, p(json!({"echo": true})), 400, "echo"),
        case(
            "a regex that does not compile",
            C,
            p(json!({"structured_outputs": {"regex": "(unclosed"}})),
            400,
            "structured_outputs",
        ),
        case(
            "a schema no value meets",
            H,
            m(
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                     "schema": {"type": "integer", "minimum": 3, "maximum": 1}}}}),
            ),
            400,
            "response_format",
        ),
        case(
            "an unknown response format",
            H,
            m(json!({"response_format": {"type": "xml"}})),
            400,
            "xml",
        ),
        case(
            "messages on completions",
            C,
            p(json!({"messages": user("x")})),
            400,
            "/v1/chat/completions",
        ),
        case(
            "best_of above n",
            C,
            p(json!({"best_of": 3})),
            400,
            "best_of",
        ),
        case(
            "a stream option misspelled",
            C,
            p(json!({"stream": true, "stream_options": {"include_usge": true}})),
            400,
            "include_usge",
        ),
        case(
            "logit_bias out of range",
            C,
            p(json!({"logit_bias": {"5": 101}})),
            400,
            "-100 to 100",
        ),
        case(
            "logit_bias past the vocabulary",
            H,
            m(json!({"logit_bias": {"256000": 1}})),
            400,
            "logit_bias",
        ),
    ]
}

/// Asks `c` each case; a line per case that did not get its status and a message naming what
/// it must name.
fn wrong_answers(addr: &str, cases: &[Case]) -> Vec<String> {
    let mut wrong = Vec::new();
    for k in cases {
        let r = request_raw(
            addr,
            "POST",
            k.path,
            Some(&k.body),
            &[],
            Duration::from_secs(60),
        );
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                wrong.push(format!("{}: no answer: {e}", k.name));
                continue;
            }
        };
        let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        let message = body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let param = body["error"]["param"].as_str().unwrap_or_default();
        let named = message.contains(k.says) || param == k.says;
        if r.status != k.status || body["error"]["type"].is_null() || !named {
            wrong.push(format!(
                "{}: got {} {}, want {} naming {:?}",
                k.name,
                r.status,
                String::from_utf8_lossy(&r.body),
                k.status,
                k.says
            ));
        }
    }
    wrong
}

#[test]
fn bad_requests_get_a_4xx_naming_the_problem_and_harm_nothing() {
    let (_tmp, dir) = tiny_servable_model();
    let c =
        CoordinatorProcess::start(&["--model", &dir.display().to_string()]).expect("coordinator");
    let cases = cases();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut wrong = wrong_answers(&c.addr, &cases);
    // A body past the limit: 413, whatever the server managed to read of it.
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(3 << 20));
    match request_raw(
        &c.addr,
        "POST",
        C,
        Some(big.as_bytes()),
        &[],
        Duration::from_secs(60),
    ) {
        Ok(r) if r.status == 413 => {}
        Ok(r) => wrong.push(format!("body over the limit: got {}", r.status)),
        Err(e) => wrong.push(format!("body over the limit: no answer: {e}")),
    }
    // Nothing above harmed the process: it still serves.
    let r = post_json(&c.addr, C, &json!({"prompt": "Hello", "max_tokens": 3})).expect("serves");
    assert_eq!(r.status, 200);
    // The fields accepted as changing nothing are accepted (nulls as absent).
    for (path, body) in [
        (
            C,
            json!({"prompt": "Hello", "max_tokens": 2, "user": "u-1", "echo": false,
                   "suffix": null, "best_of": 2, "n": 2, "logit_bias": {"17": 1.5}}),
        ),
        (
            H,
            json!({"messages": user("Hello"), "max_tokens": 2, "user": "u-1",
                   "metadata": {"k": "v"}, "store": false, "service_tier": "auto",
                   "modalities": ["text"], "tool_choice": "none", "parallel_tool_calls": false,
                   "response_format": {"type": "text"}, "safety_identifier": "s",
                   "prompt_cache_key": "p", "verbosity": "medium", "tools": null,
                   "stream": true, "stream_options": {"include_obfuscation": false}}),
        ),
    ] {
        let r = post_json(&c.addr, path, &body).expect("serves");
        assert_eq!(
            r.status,
            200,
            "{body}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    assert!(
        wrong.is_empty(),
        "{} of {} cases wrong:\n{}",
        wrong.len(),
        cases.len() + 1,
        wrong.join("\n")
    );
}

/// A KV pool smaller than the context (1 MiB per worker holds 170 blocks of 16 tokens of the
/// tiny model: 2720 tokens, against a context of 8192): a request that could never fit it is
/// refused by the validator with 400 naming the pool, streamed or not, before any stream begins
/// (the engine would otherwise fail it inside a 200 stream).
#[test]
fn requests_past_the_kv_pool_get_a_400_before_any_stream() {
    let (_tmp, dir) = tiny_servable_model();
    let c = CoordinatorProcess::start(&[
        "--model",
        &dir.display().to_string(),
        "--kv-budget-mib",
        "1",
    ])
    .expect("coordinator");
    let mut cases = Vec::new();
    for stream in [false, true] {
        let with = |mut body: Value| {
            body["stream"] = json!(stream);
            body
        };
        cases.extend([
            case(
                "prompt + max_tokens past the pool",
                C,
                with(json!({"prompt": "Hello", "max_tokens": 5000})),
                400,
                "KV cache, 2720 tokens",
            ),
            case(
                "a prompt past the pool",
                C,
                with(json!({"prompt": "w ".repeat(4000), "max_tokens": 1})),
                400,
                "KV cache, 2720 tokens",
            ),
            case(
                "chat max_tokens past the pool",
                H,
                with(json!({"messages": user("Hello"), "max_completion_tokens": 3000})),
                400,
                "KV cache, 2720 tokens",
            ),
            case(
                "max_tokens one past the room the prompt leaves in the pool",
                C,
                with(json!({"prompt": "Hello", "max_tokens": 2719})),
                400,
                "max_tokens",
            ),
        ]);
    }
    let wrong = wrong_answers(&c.addr, &cases);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // What does fit the pool is served, streamed too.
    let r = post_json(
        &c.addr,
        C,
        &json!({"prompt": "Hello", "max_tokens": 2, "stream": true}),
    )
    .expect("serves");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}
