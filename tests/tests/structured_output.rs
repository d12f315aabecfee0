//! Structured output on the real gemma-3-270m (scripts/fetch-model.sh) served by a tp=2 cluster,
//! so each last-stage rank applies its slice of the grammar's mask:
//! - 20 JSON Schemas x 3 seeds at temperature 1 (OpenAI's `response_format`, strict, chat):
//!   every output finishes by itself, parses, and is valid under its schema by an independent
//!   validator (the `jsonschema` crate, formats checked too), streamed or not. Numbers carry the
//!   bounds a real schema would (a range; `multipleOf` for decimals), and nesting is finite: a
//!   270M model at temperature 1 will otherwise happily write a 250-digit number or a tree 40
//!   levels deep, valid JSON that never finishes in 256 tokens;
//! - vLLM's `structured_outputs`: a regex, a choice list and a Lark grammar on /v1/completions;
//! - schemas and grammars llguidance cannot serve, and malformed formats, are a 400 naming the
//!   field and why; the cluster serves on after them.

use std::thread;
use std::time::Duration;

use gemma_cluster_tests::http::{post_json, request, streamed_completion};
use gemma_cluster_tests::process::CoordinatorProcess;
use gemma_testkit::real_model_dir;
use serde_json::{json, Value};

const SEEDS: [u64; 3] = [1, 2, 3];
const MAX_TOKENS: u64 = 256;
const LONG: Duration = Duration::from_secs(600);

fn cluster() -> CoordinatorProcess {
    let dir = real_model_dir();
    CoordinatorProcess::start(&[
        "--model",
        &dir.display().to_string(),
        "--tp",
        "2",
        "--kv-budget-mib",
        "1024",
    ])
    .expect("a tp=2 cluster on gemma-3-270m")
}

/// (what to ask for, the schema the answer must follow).
fn schemas() -> Vec<(&'static str, Value)> {
    let coordinate =
        json!({"type": "number", "minimum": -1000, "maximum": 1000, "multipleOf": 0.5});
    let point = json!({"type": "object", "properties": {"x": coordinate, "y": coordinate},
                       "required": ["x", "y"],
                       "additionalProperties": false});
    vec![
        (
            "Describe a person named Ada who is 36.",
            json!({"type": "object", "properties": {"name": {"type": "string"},
                   "age": {"type": "integer", "minimum": 0, "maximum": 150}},
                   "required": ["name", "age"], "additionalProperties": false}),
        ),
        (
            "Describe a famous novel.",
            json!({"type": "object", "properties": {"title": {"type": "string"},
                   "author": {"type": "string"},
                   "year": {"type": "integer", "minimum": 0, "maximum": 2100},
                   "genres": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
                   "required": ["title", "author", "year", "genres"]}),
        ),
        (
            "What color is the sky?",
            json!({"type": "string", "enum": ["red", "green", "blue"]}),
        ),
        (
            "Report the weather in Paris.",
            json!({"type": "object", "properties": {"city": {"type": "string"},
                   "temperature_c": {"type": "number", "minimum": -90, "maximum": 60,
                                     "multipleOf": 0.1},
                   "conditions": {"enum": ["sunny", "cloudy", "rain", "snow"]}},
                   "required": ["city", "temperature_c", "conditions"],
                   "additionalProperties": false}),
        ),
        (
            "Is water wet? Say how sure you are.",
            json!({"type": "object", "properties": {"answer": {"type": "boolean"},
                   "confidence": {"type": "number", "minimum": 0, "maximum": 1,
                                  "multipleOf": 0.01}},
                   "required": ["answer", "confidence"]}),
        ),
        (
            "List a few prime numbers.",
            json!({"type": "array", "items": {"type": "integer", "minimum": 2, "maximum": 1000},
                   "minItems": 1,
                   "maxItems": 5}),
        ),
        (
            "Give the address of a bakery.",
            json!({"type": "object", "properties": {"name": {"type": "string"},
                   "address": {"type": "object", "properties": {"street": {"type": "string"},
                   "city": {"type": "string"},
                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                   "required": ["street", "city", "zip"]}}, "required": ["name", "address"]}),
        ),
        (
            "Describe a product for sale.",
            json!({"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999999},
                   "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 100000,
                             "multipleOf": 0.01},
                   "in_stock": {"type": "boolean"}},
                   "required": ["id", "price", "in_stock"]}),
        ),
        (
            "Give a line segment.",
            json!({"$defs": {"point": point}, "type": "object",
                   "properties": {"start": {"$ref": "#/$defs/point"},
                   "end": {"$ref": "#/$defs/point"}}, "required": ["start", "end"]}),
        ),
        (
            "Give an identifier.",
            json!({"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999999},
                            {"type": "string", "maxLength": 10}]}),
        ),
        (
            "Say whether the system is healthy.",
            json!({"type": "object", "properties": {"version": {"const": 2},
                   "ok": {"type": "boolean"}}, "required": ["version", "ok"]}),
        ),
        (
            "Give a name and maybe a count.",
            json!({"type": "object", "properties": {"a": {"type": "string"},
                   "b": {"type": "integer", "minimum": 0, "maximum": 100}},
                   "required": ["a"]}),
        ),
        (
            "When did the first moon landing happen?",
            json!({"type": "object", "properties": {
                   "event": {"type": "string", "maxLength": 60},
                   "date": {"type": "string", "format": "date"}},
                   "required": ["event", "date"]}),
        ),
        (
            "Give a contact email.",
            json!({"type": "object", "properties": {"email": {"type": "string",
                   "format": "email", "maxLength": 40}}, "required": ["email"]}),
        ),
        (
            "Give a flight code.",
            json!({"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}),
        ),
        (
            "List a shopping basket.",
            json!({"type": "array", "maxItems": 3, "items": {"type": "object",
                   "properties": {"name": {"type": "string", "maxLength": 20},
                   "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
                   "required": ["name", "qty"]}}),
        ),
        (
            "Pick a two-digit number.",
            json!({"type": "integer", "minimum": 10, "maximum": 99}),
        ),
        (
            "Does the user have a nickname?",
            json!({"type": "object", "properties": {"nickname": {"type": ["string", "null"]}},
                   "required": ["nickname"]}),
        ),
        (
            "Count words by letter.",
            json!({"type": "object",
                   "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 999},
                   "maxProperties": 4}),
        ),
        (
            "Give a small tree of numbers.",
            json!({"$defs": {"leaf": {"type": "object", "properties": {
                   "value": {"type": "integer", "minimum": 0, "maximum": 99}},
                   "required": ["value"]}}, "type": "object", "properties": {
                   "value": {"type": "integer", "minimum": 0, "maximum": 99},
                   "children": {"type": "array", "items": {"$ref": "#/$defs/leaf"},
                                "maxItems": 3}}, "required": ["value", "children"]}),
        ),
    ]
}

fn chat_body(ask: &str, schema: &Value, seed: u64) -> Value {
    json!({
        "messages": [{"role": "user", "content": format!("{ask} Answer in JSON.")}],
        "max_tokens": MAX_TOKENS,
        "temperature": 1,
        "seed": seed,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "answer", "schema": schema, "strict": true}},
    })
}

/// Parses and validates one output; the reason when it fails.
fn check(schema: &Value, text: &str) -> Result<Value, String> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("does not parse ({e}): {text:?}"))?;
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(schema)
        .map_err(|e| format!("the validator refused the schema: {e}"))?;
    validator
        .validate(&value)
        .map_err(|e| format!("invalid ({e}): {text}"))?;
    Ok(value)
}

#[test]
fn twenty_schemas_at_temperature_1_always_give_valid_json() {
    let c = cluster();
    let addr = c.addr.clone();
    // All at once, so the engine batches them and each step carries many masks.
    let runs: Vec<_> = schemas()
        .into_iter()
        .flat_map(|(ask, schema)| SEEDS.map(|seed| (ask, schema.clone(), seed)))
        .map(|(ask, schema, seed)| {
            let addr = addr.clone();
            thread::spawn(move || {
                let body = chat_body(ask, &schema, seed);
                // Sixty requests share a debug build's steps: minutes, not post_json's 60 s.
                let r = request(&addr, "POST", "/v1/chat/completions", Some(&body), LONG)
                    .expect("request");
                (ask, schema, seed, r.status, r.json().expect("json"))
            })
        })
        .collect();
    let (mut failures, mut cut) = (Vec::new(), Vec::new());
    for run in runs {
        let (ask, schema, seed, status, v) = run.join().expect("client thread");
        let choice = &v["choices"][0];
        let text = choice["message"]["content"].as_str().unwrap_or_default();
        let outcome = match (status, choice["finish_reason"].as_str()) {
            (200, Some("stop")) => check(&schema, text).map(drop),
            (200, Some("length")) => {
                cut.push(format!("{ask} (seed {seed}): {text}"));
                Ok(())
            }
            _ => Err(format!("{status}: {v}")),
        };
        if let Err(why) = outcome {
            failures.push(format!("{ask} (seed {seed}): {why}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // A schema string without maxLength lets a 270M model at temperature 1 run on past
    // max_tokens now and then (the grammar cannot end a string by itself); every output that
    // finished must validate, and nearly all must finish.
    assert!(
        cut.len() <= MAX_CUT,
        "{} of 60 cut at max_tokens:\n{}",
        cut.len(),
        cut.join("\n")
    );
}

/// Outputs of the sixty that may stop at max_tokens inside an unbounded string.
const MAX_CUT: usize = 3;

#[test]
fn streamed_json_and_json_object_mode_are_valid_too() {
    let c = cluster();
    let (_, schema) = schemas().swap_remove(3);
    let body = json!({"prompt": "The weather in Paris today, as JSON:", "seed": 5,
                      "max_tokens": MAX_TOKENS,
                      "response_format": {"type": "json_schema",
                                          "json_schema": {"name": "w", "schema": schema}}});
    let (text, finish) = streamed_completion(&c.addr, body, LONG).expect("stream");
    assert_eq!(finish, "stop", "{text:?}");
    check(&schema, &text).expect("the streamed text");
    // json_object: any JSON object, on /v1/completions as vLLM takes it.
    let r = post_json(
        &c.addr,
        "/v1/completions",
        // Greedy with a repetition penalty: json_object bounds nothing, and this model left to
        // itself repeats a key or runs a string on to max_tokens. The mask with a penalty.
        &json!({"prompt": "A JSON object describing a cat:", "max_tokens": MAX_TOKENS,
                "temperature": 0, "repetition_penalty": 1.3,
                "response_format": {"type": "json_object"}}),
    )
    .expect("request");
    let v = r.json().expect("json");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let text = v["choices"][0]["text"].as_str().expect("text");
    check(&json!({"type": "object"}), text).expect("an object");
}

#[test]
fn regex_choice_and_lark_follow_their_grammar() {
    let c = cluster();
    let complete = |so: Value, seed: u64| {
        let body = json!({"prompt": "Answer:", "max_tokens": 64, "seed": seed,
                          "structured_outputs": so});
        let r = post_json(&c.addr, "/v1/completions", &body).expect("request");
        let v = r.json().expect("json");
        assert_eq!(r.status, 200, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        v["choices"][0]["text"].as_str().expect("text").to_string()
    };
    for seed in SEEDS {
        let code = complete(json!({"regex": "[A-Z]{2}-[0-9]{4}"}), seed);
        let (letters, digits) = code.split_once('-').expect("a dash");
        assert!(
            letters.len() == 2 && letters.chars().all(|ch| ch.is_ascii_uppercase()),
            "{code:?}"
        );
        assert!(
            digits.len() == 4 && digits.chars().all(|ch| ch.is_ascii_digit()),
            "{code:?}"
        );
        let pick = complete(json!({"choice": ["yes", "no", "not sure"]}), seed);
        assert!(
            ["yes", "no", "not sure"].contains(&pick.as_str()),
            "{pick:?}"
        );
        let lark = "start: \"(\" NUMBER (\" + \" NUMBER)* \")\"\nNUMBER: /[1-9][0-9]?/";
        let sum = complete(json!({"grammar": lark}), seed);
        let inner = sum
            .strip_prefix('(')
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{sum:?}"));
        for n in inner.split(" + ") {
            assert!(n.parse::<u8>().is_ok_and(|n| n >= 1), "{sum:?}");
        }
    }
}

#[test]
fn formats_that_cannot_be_served_are_refused_naming_why() {
    let c = cluster();
    let refused = |path: &str, body: Value, param: &str, says: &str| {
        let r = post_json(&c.addr, path, &body).expect("request");
        let v = r.json().expect("json");
        assert_eq!(r.status, 400, "{body} -> {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{body}: {message}");
    };
    let chat = |schema: Value| {
        json!({"messages": [{"role": "user", "content": "hi"}],
               "response_format": {"type": "json_schema",
                                   "json_schema": {"name": "x", "schema": schema}}})
    };
    // Schema features llguidance does not serve, and schemas no value satisfies.
    refused(
        "/v1/chat/completions",
        chat(json!({"$ref": "https://example.com/schema.json"})),
        "response_format",
        "example.com",
    );
    refused(
        "/v1/chat/completions",
        chat(json!({"type": "string", "pattern": "(?=a)b"})),
        "response_format",
        "",
    );
    refused(
        "/v1/chat/completions",
        chat(json!({"type": "integer", "minimum": 5, "maximum": 1})),
        "response_format",
        "",
    );
    // Malformed grammars and formats.
    refused(
        "/v1/completions",
        json!({"prompt": "x", "structured_outputs": {"regex": "[a-"}}),
        "structured_outputs",
        "",
    );
    refused(
        "/v1/completions",
        json!({"prompt": "x", "structured_outputs": {"grammar": "start: undefined_rule"}}),
        "structured_outputs",
        "undefined_rule",
    );
    refused(
        "/v1/completions",
        json!({"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["a"]}}),
        "structured_outputs",
        "exactly one of",
    );
    refused(
        "/v1/completions",
        json!({"prompt": "x", "structured_outputs": {"choice": []}}),
        "structured_outputs",
        "at least one",
    );
    refused(
        "/v1/completions",
        json!({"prompt": "x", "structured_outputs": {"json": "{not json"}}),
        "structured_outputs",
        "does not hold JSON",
    );
    refused(
        "/v1/completions",
        json!({"prompt": "x", "structured_outputs": {"whitespace_pattern": " "}}),
        "structured_outputs",
        "whitespace_pattern",
    );
    refused(
        "/v1/completions",
        json!({"prompt": "x", "response_format": {"type": "json_object"},
               "structured_outputs": {"regex": "a"}}),
        "structured_outputs",
        "one of them",
    );
    refused(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}],
               "response_format": {"type": "yaml"}}),
        "response_format",
        "yaml",
    );
    // Still serving.
    let r = post_json(
        &c.addr,
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 4, "structured_outputs": {"regex": "[0-9]+"}}),
    )
    .expect("request");
    assert_eq!(r.status, 200);
}
