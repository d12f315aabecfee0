//! Property tests of request validation, through the code path the HTTP handlers use: a body's
//! bytes -> `parse_body` (what `JsonBody` does once the body is read) -> `Validator::completion`
//! or `chat` -> `with_prompt` with a prompt of any length. Whatever the body, the outcome is a
//! 4xx refusal with a message, or a request that meets every documented bound; never a panic.
//! Deterministic: a fixed seed and no persistence files.

use std::num::NonZeroUsize;

use gemma_coordinator::api::request::{parse_body, ChatRequest, CompletionRequest};
use gemma_coordinator::api::validation::{
    ValidRequest, ValidationErrors, Validator, MAX_N, MAX_STOP, MAX_TOP_LOGPROBS,
};
use gemma_coordinator::api::ApiError;
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use serde_json::{json, Map, Value};

const MODEL: &str = "gemma-tiny";

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x5EED_0A11),
        ..Config::default()
    }
}

/// Text of every kind: empty, ASCII, any Unicode scalar (controls, emoji, RTL), stop-like.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z ]{1,8}",
        ".{0,12}",
        Just("\u{0}\u{feff}🦀\u{202e}".to_string()),
    ]
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-3i64..40).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        (-3.0f64..3.0).prop_map(Value::from),
        prop::num::f64::NORMAL.prop_map(Value::from),
        Just(json!(1e300)),
        Just(json!(-0.0)),
    ]
}

/// Any JSON value, a few levels deep.
fn any_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        number(),
        text().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            btree_map("[a-z_]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// What a client could send for `field`: mostly a valid value, now and then one at or past an
/// edge, or any value at all.
fn field_value(field: &'static str) -> BoxedStrategy<Value> {
    let number = |valid: std::ops::Range<f64>, edges: Vec<f64>| {
        prop_oneof![
            8 => valid.prop_map(Value::from),
            2 => prop::sample::select(edges).prop_map(Value::from),
            1 => (-3.0f64..3.0).prop_map(Value::from),
        ]
        .boxed()
    };
    let count = |valid: std::ops::RangeInclusive<i64>| {
        prop_oneof![8 => valid.prop_map(Value::from), 2 => (-3i64..25).prop_map(Value::from)]
            .boxed()
    };
    let plausible: BoxedStrategy<Value> = match field {
        "prompt" => prop_oneof![
            8 => text().prop_map(Value::from),
            1 => vec(text(), 0..3).prop_map(|v| json!(v)),
            1 => vec(0u32..300_000, 0..4).prop_map(|v| json!(v)),
        ]
        .boxed(),
        "messages" => prop_oneof![
            8 => vec(message(), 1..5).prop_map(Value::Array),
            1 => Just(json!([])),
        ]
        .boxed(),
        "model" => prop_oneof![8 => Just(json!(MODEL)), 1 => text().prop_map(Value::from)].boxed(),
        "temperature" => number(0.0..2.0, vec![0.0, 2.0, 2.01, -0.01]),
        "top_p" => number(0.01..1.0, vec![0.0, 1.0, 1.01]),
        "min_p" => number(0.0..1.0, vec![0.0, 1.0, 1.5]),
        "presence_penalty" | "frequency_penalty" => number(-2.0..2.0, vec![-2.0, 2.0, 2.5]),
        "repetition_penalty" => number(0.1..10.0, vec![0.0, 10.0, 10.5]),
        "max_tokens" | "max_completion_tokens" => prop_oneof![
            8 => (1i64..300).prop_map(Value::from),
            1 => (-2i64..400).prop_map(Value::from),
            1 => any::<i64>().prop_map(Value::from),
        ]
        .boxed(),
        "n" => count(1..=16),
        "top_k" => count(-1..=50),
        "top_logprobs" | "logprobs_count" => count(0..=20),
        "seed" => {
            prop_oneof![8 => any::<u64>().prop_map(Value::from), 1 => Just(json!(-1))].boxed()
        }
        "stop" => prop_oneof![
            4 => "[a-z]{1,4}".prop_map(Value::from),
            4 => vec("[a-z.!]{1,4}", 0..=4).prop_map(|v| json!(v)),
            2 => vec(text(), 0..6).prop_map(|v| json!(v)),
        ]
        .boxed(),
        "stream_options" => any::<Option<bool>>()
            .prop_map(|u| match u {
                Some(u) => json!({ "include_usage": u }),
                None => json!({}),
            })
            .boxed(),
        _ => any::<bool>().prop_map(Value::from).boxed(),
    };
    prop_oneof![12 => plausible, 1 => any_value()].boxed()
}

fn message() -> impl Strategy<Value = Value> {
    let role = prop_oneof![
        prop::sample::select(vec!["user", "assistant", "system", "developer", "tool", ""])
            .prop_map(Value::from),
        any_value(),
    ];
    let content = prop_oneof![8 => text().prop_map(Value::from), 1 => any_value()];
    (role, content).prop_map(|(role, content)| json!({"role": role, "content": content}))
}

/// A request body of the given fields, each present or not, plus now and then a stranger key.
fn body(fields: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    let present: Vec<BoxedStrategy<Option<(String, Value)>>> = fields
        .iter()
        .map(|&f| {
            let name = f.strip_suffix("_count").unwrap_or(f).to_string();
            // The prompt or messages are nearly always sent: without them nothing is accepted.
            let presence = if f == "prompt" || f == "messages" {
                0.95
            } else {
                0.3
            };
            proptest::option::weighted(presence, field_value(f))
                .prop_map(move |v| v.map(|v| (name.clone(), v)))
                .boxed()
        })
        .collect();
    let extra = btree_map("[a-z_]{1,10}", any_value(), 0..2);
    (present, extra).prop_map(|(present, extra)| {
        let mut object: Map<String, Value> = extra.into_iter().collect();
        object.extend(present.into_iter().flatten());
        Value::Object(object).to_string().into_bytes()
    })
}

const SHARED: &[&str] = &[
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "stop",
    "ignore_eos",
    "n",
    "stream",
    "stream_options",
];

fn completion_fields() -> &'static [&'static str] {
    static F: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    F.get_or_init(|| [SHARED, &["prompt", "logprobs_count"]].concat())
}

fn chat_fields() -> &'static [&'static str] {
    static F: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    F.get_or_init(|| [SHARED, &["messages", "logprobs", "top_logprobs"]].concat())
}

/// The limits a server may run with: context, KV pool (smaller or larger than the context) and
/// max_tokens_per_request.
fn server() -> impl Strategy<Value = (usize, usize, usize)> {
    (1usize..300, 1usize..400, 1usize..400)
}

fn validator(
    (max_context, kv_capacity, limit): (usize, usize, usize),
    chat: bool,
) -> Validator<'static> {
    Validator {
        model_name: MODEL,
        max_context,
        kv_capacity,
        max_tokens_limit: NonZeroUsize::new(limit).expect("limit from 1"),
        has_chat_template: chat,
        vocab_size: 1000,
    }
}

/// A refusal: a client error with a message, and a param when validation refused it.
fn check_refusal(e: &ApiError) -> Result<(), TestCaseError> {
    prop_assert!(e.status().is_client_error(), "status {}", e.status());
    let body = e.body();
    prop_assert!(!body.error.message.is_empty());
    Ok(())
}

fn check_validation_refusal(e: ValidationErrors) -> Result<(), TestCaseError> {
    for one in e.iter() {
        prop_assert!(!one.param().is_empty() && !one.to_string().is_empty());
    }
    check_refusal(&ApiError::from(e))
}

/// Every bound the API documents, on an accepted request.
fn check_accepted(
    r: &ValidRequest,
    (max_context, kv_capacity, limit): (usize, usize, usize),
) -> Result<(), TestCaseError> {
    let s = &r.spec;
    let p = &s.params;
    prop_assert!(s.max_tokens >= 1 && s.max_tokens <= limit);
    prop_assert!(s.prompt.len() + s.max_tokens <= max_context.min(kv_capacity));
    prop_assert!((1..=MAX_N as usize).contains(&r.n));
    prop_assert!((0.0..=2.0).contains(&p.temperature));
    prop_assert!(p.top_p > 0.0 && p.top_p <= 1.0);
    prop_assert!((0.0..=1.0).contains(&p.min_p));
    prop_assert!((-2.0..=2.0).contains(&p.frequency_penalty));
    prop_assert!((-2.0..=2.0).contains(&p.presence_penalty));
    prop_assert!(p.repetition_penalty > 0.0 && p.repetition_penalty <= 10.0);
    prop_assert!(s.stop.len() <= MAX_STOP && s.stop.iter().all(|x| !x.is_empty()));
    prop_assert!(s.logprobs.is_none_or(|k| k <= MAX_TOP_LOGPROBS as usize));
    prop_assert!(!r.include_usage || r.stream);
    Ok(())
}

proptest! {
    #![proptest_config(config(2500))]

    #[test]
    fn any_bytes_are_parsed_or_refused_with_a_4xx(bytes in prop_oneof![
        vec(any::<u8>(), 0..64),
        body(completion_fields()).prop_flat_map(|b| {
            let len = b.len();
            (Just(b), 0..=len).prop_map(|(b, cut)| b[..cut].to_vec())
        }),
    ]) {
        for outcome in [
            parse_body::<CompletionRequest>(&bytes).map(drop),
            parse_body::<ChatRequest>(&bytes).map(drop),
        ] {
            if let Err(e) = outcome {
                check_refusal(&e)?;
            }
        }
    }

    #[test]
    fn completions_are_refused_with_a_4xx_or_meet_every_bound(
        bytes in body(completion_fields()),
        limits in server(),
        prompt_len in 0usize..450,
    ) {
        let v = validator(limits, true);
        let req = match parse_body::<CompletionRequest>(&bytes) {
            Ok(req) => req,
            Err(e) => return check_refusal(&e),
        };
        let fields = match v.completion(req) {
            Ok((_, fields)) => fields,
            Err(e) => return check_validation_refusal(e),
        };
        match v.with_prompt(fields, vec![7; prompt_len], None) {
            Ok(r) => check_accepted(&r, limits)?,
            Err(e) => check_validation_refusal(e)?,
        }
    }

    #[test]
    fn chats_are_refused_with_a_4xx_or_meet_every_bound(
        bytes in body(chat_fields()),
        limits in server(),
        has_template in any::<bool>(),
        prompt_len in 0usize..450,
    ) {
        let v = validator(limits, has_template);
        let req = match parse_body::<ChatRequest>(&bytes) {
            Ok(req) => req,
            Err(e) => return check_refusal(&e),
        };
        let fields = match v.chat(req) {
            Ok((messages, fields)) => {
                prop_assert!(!messages.is_empty() && has_template);
                fields
            }
            Err(e) => return check_validation_refusal(e),
        };
        match v.with_prompt(fields, vec![7; prompt_len], None) {
            Ok(r) => check_accepted(&r, limits)?,
            Err(e) => check_validation_refusal(e)?,
        }
    }
}

/// The generators reach both outcomes: a property that only ever saw refusals would prove
/// little about accepted requests.
#[test]
fn the_generated_bodies_are_often_accepted_and_often_refused() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::new(config(1));
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..1000 {
        let bytes = body(completion_fields())
            .new_tree(&mut runner)
            .expect("a body")
            .current();
        let v = validator((300, 300, 300), true);
        let outcome = parse_body::<CompletionRequest>(&bytes)
            .ok()
            .and_then(|req| v.completion(req).ok())
            .and_then(|(_, fields)| v.with_prompt(fields, vec![7; 10], None).ok());
        match outcome {
            Some(_) => accepted += 1,
            None => refused += 1,
        }
    }
    assert!(
        accepted >= 50 && refused >= 50,
        "{accepted} accepted, {refused} refused"
    );
}
