//! The audit of OpenAI's request bodies: every field of the Completions and Chat Completions
//! references, and the vLLM extensions this server takes, with what the server does with each.
//! A body's top-level fields are checked against this table before it is deserialized, so no
//! field is silently ignored: one that is refused, one that belongs to the other endpoint, a
//! value that would ask for something not served (`echo: true`, `tools`), and a name in neither
//! reference (a typo such as `max_token`, answered with the nearest name) are a 400 naming the
//! field. README's table is rendered from this one ([`markdown_table`]; a test holds them equal).
//!
//! A null counts as absent, as OpenAI's own SDKs send unset fields.

use std::fmt;

use serde_json::{Map, Value};

use crate::names::nearest;
use Use::{Refused, Served};

/// The two generating endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Completions,
    Chat,
}

impl Api {
    pub fn path(self) -> &'static str {
        match self {
            Api::Completions => "/v1/completions",
            Api::Chat => "/v1/chat/completions",
        }
    }

    fn other(self) -> Api {
        match self {
            Api::Completions => Api::Chat,
            Api::Chat => Api::Completions,
        }
    }
}

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.path())
    }
}

/// What the server does with a field on one endpoint.
#[derive(Debug, Clone, Copy)]
pub enum Use {
    /// Implemented: deserialized into the request and checked by the validator.
    Served,
    /// Accepted when `accepts` its value, and then changes nothing (an identifier, or the one
    /// value that asks for what the server does anyway); any other value is refused, naming
    /// `allowed`.
    Accepted {
        accepts: fn(&Value) -> bool,
        allowed: &'static str,
    },
    /// Refused whatever its value (null aside).
    Refused,
    /// Not a field of this endpoint (it is the other one's).
    Absent,
}

/// One field of the audit.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub name: &'static str,
    pub completions: Use,
    pub chat: Use,
    /// What the server does with it (README's last column; a refusal's reason).
    pub note: &'static str,
}

impl Field {
    pub fn on(&self, api: Api) -> Use {
        match api {
            Api::Completions => self.completions,
            Api::Chat => self.chat,
        }
    }
}

const fn both(name: &'static str, use_: Use, note: &'static str) -> Field {
    Field {
        name,
        completions: use_,
        chat: use_,
        note,
    }
}

const fn completions_only(name: &'static str, use_: Use, note: &'static str) -> Field {
    Field {
        name,
        completions: use_,
        chat: Use::Absent,
        note,
    }
}

const fn chat_only(name: &'static str, use_: Use, note: &'static str) -> Field {
    Field {
        name,
        completions: Use::Absent,
        chat: use_,
        note,
    }
}

const fn accepted(accepts: fn(&Value) -> bool, allowed: &'static str) -> Use {
    Use::Accepted { accepts, allowed }
}

fn is_string(v: &Value) -> bool {
    v.is_string()
}

fn is_bool(v: &Value) -> bool {
    v.is_boolean()
}

fn is_false(v: &Value) -> bool {
    v == &Value::Bool(false)
}

fn is_empty_string(v: &Value) -> bool {
    v.as_str() == Some("")
}

/// OpenAI's metadata: an object of string values.
fn is_string_map(v: &Value) -> bool {
    v.as_object()
        .is_some_and(|m| m.values().all(Value::is_string))
}

fn is_text_modality(v: &Value) -> bool {
    v.as_array()
        .is_some_and(|a| a.len() == 1 && a[0].as_str() == Some("text"))
}

/// With no tools or functions given (they are refused), "auto" and "none" both mean no call.
fn is_none_or_auto(v: &Value) -> bool {
    matches!(v.as_str(), Some("none" | "auto"))
}

fn is_auto_or_default(v: &Value) -> bool {
    matches!(v.as_str(), Some("auto" | "default"))
}

fn is_medium(v: &Value) -> bool {
    v.as_str() == Some("medium")
}

/// Every field of OpenAI's Completions and Chat Completions request references (OpenAI's order),
/// then the vLLM extensions taken. `stream_options` is checked by its own type: its
/// `include_usage`, vLLM's `continuous_usage_stats`, and OpenAI's `include_obfuscation`
/// (accepted, changes nothing: no obfuscation padding is sent); any other key is refused.
pub const FIELDS: &[Field] = &[
    both(
        "model",
        Served,
        "Optional; when given, the served model's name (`--served-model-name`), else 404.",
    ),
    completions_only(
        "prompt",
        Served,
        "One string, or a list of one string; token-id prompts and several prompts are refused.",
    ),
    chat_only(
        "messages",
        Served,
        "Rendered with the model's chat template; text content only.",
    ),
    chat_only(
        "audio",
        Refused,
        "Refused: audio output is not supported (the model writes text).",
    ),
    completions_only(
        "best_of",
        Served,
        "Accepted when equal to `n` (its default); larger is refused: no extra generations are \
         made to choose from.",
    ),
    completions_only(
        "echo",
        accepted(is_false, "false (the prompt is never echoed)"),
        "`false` only: the prompt is never echoed back.",
    ),
    both(
        "frequency_penalty",
        Served,
        "-2 to 2; OpenAI's definition over output tokens, applied on the last stage.",
    ),
    chat_only(
        "function_call",
        accepted(
            is_none_or_auto,
            "\"none\" or \"auto\" (functions are not supported)",
        ),
        "Deprecated by OpenAI. `\"none\"` or `\"auto\"` only (no functions, so no call); naming \
         a function is refused.",
    ),
    chat_only(
        "functions",
        Refused,
        "Refused: function calling is not supported.",
    ),
    both(
        "logit_bias",
        Served,
        "Token id (a string of digits) -> bias in [-100, 100], at most 300 entries: added to the \
         model's logit before the penalties, on the last stage; -100 bans the token.",
    ),
    both(
        "logprobs",
        Served,
        "Completions: 0 to 20 alternatives per token; chat: a flag (with `top_logprobs`). The \
         model's own log-probabilities: before logit_bias, penalties and temperature.",
    ),
    both(
        "max_completion_tokens",
        Served,
        "The chat API's name for `max_tokens` (/v1/completions takes it too); wins when both are \
         given.",
    ),
    both(
        "max_tokens",
        Served,
        "1 to the room left by the prompt in the context and KV pool, and to \
         `max_tokens_per_request`; default 16.",
    ),
    chat_only(
        "metadata",
        accepted(is_string_map, "an object of strings"),
        "Accepted (an object of strings); changes nothing: nothing is stored.",
    ),
    chat_only(
        "modalities",
        accepted(is_text_modality, "[\"text\"]"),
        "`[\"text\"]` only.",
    ),
    both("n", Served, "1 to 16; choice i samples with seed + i."),
    chat_only(
        "parallel_tool_calls",
        accepted(is_bool, "a boolean"),
        "Accepted (a boolean); changes nothing: no tools are served.",
    ),
    chat_only(
        "prediction",
        Refused,
        "Refused: predicted outputs are not supported.",
    ),
    both(
        "presence_penalty",
        Served,
        "-2 to 2; OpenAI's definition over output tokens, applied on the last stage.",
    ),
    chat_only(
        "prompt_cache_key",
        accepted(is_string, "a string"),
        "Accepted (a string); changes nothing.",
    ),
    chat_only(
        "reasoning_effort",
        Refused,
        "Refused: not a reasoning model.",
    ),
    both(
        "response_format",
        Served,
        "`text`, `json_object`, or `json_schema`: the output follows it exactly (llguidance; \
         `strict: true` as OpenAI's strict mode: objects allow only their listed properties); a \
         schema it cannot serve is a 400 naming why. JSON comes compact, on one line. On \
         /v1/completions too, as vLLM takes it.",
    ),
    chat_only(
        "safety_identifier",
        accepted(is_string, "a string"),
        "Accepted (a string); changes nothing.",
    ),
    both(
        "seed",
        Served,
        "Any u64: the same seed gives the same tokens on every plan; without one, a fresh seed.",
    ),
    chat_only(
        "service_tier",
        accepted(is_auto_or_default, "\"auto\" or \"default\""),
        "`\"auto\"` or `\"default\"` only: there is one tier.",
    ),
    both(
        "stop",
        Served,
        "At most 4 non-empty strings; the text ends before the first match.",
    ),
    chat_only(
        "store",
        accepted(is_false, "false (nothing is stored)"),
        "`false` only: nothing is stored.",
    ),
    both("stream", Served, "Server-sent events, `data: [DONE]` last."),
    both(
        "stream_options",
        Served,
        "`include_usage`; vLLM's `continuous_usage_stats`; `include_obfuscation` accepted, \
         changes nothing (no padding is sent); needs `stream: true`.",
    ),
    completions_only(
        "suffix",
        accepted(is_empty_string, "null or \"\" (insertion is not supported)"),
        "`null` or `\"\"` only: inserting text before a suffix is not supported.",
    ),
    both("temperature", Served, "0 (greedy) to 2."),
    chat_only(
        "tool_choice",
        accepted(
            is_none_or_auto,
            "\"none\" or \"auto\" (tools are not supported)",
        ),
        "`\"none\"` or `\"auto\"` only (no tools, so no call); `\"required\"` or a named tool is \
         refused.",
    ),
    chat_only("tools", Refused, "Refused: tool calling is not supported."),
    chat_only("top_logprobs", Served, "0 to 20, with `logprobs: true`."),
    both("top_p", Served, "Greater than 0, at most 1."),
    both(
        "user",
        accepted(is_string, "a string"),
        "Accepted (a string); changes nothing.",
    ),
    chat_only(
        "verbosity",
        accepted(is_medium, "\"medium\" (the default)"),
        "`\"medium\"` (the default) only: the model cannot be asked to be terser or wordier.",
    ),
    chat_only(
        "web_search_options",
        Refused,
        "Refused: web search is not supported.",
    ),
    // vLLM's extensions.
    both(
        "top_k",
        Served,
        "vLLM's: -1 or 0 (off), or a positive integer.",
    ),
    both("min_p", Served, "vLLM's: 0 to 1."),
    both(
        "repetition_penalty",
        Served,
        "vLLM's (HF's definition, over prompt and output): greater than 0, at most 10.",
    ),
    both(
        "ignore_eos",
        Served,
        "vLLM's: generate through <eos> and <end_of_turn>.",
    ),
    both(
        "min_tokens",
        Served,
        "vLLM's: no stop token or string ends the output before this many tokens.",
    ),
    both(
        "structured_outputs",
        Served,
        "vLLM's: exactly one of `json` (a JSON Schema), `regex`, `choice` (a list of strings), \
         `grammar` (Lark, llguidance's dialect), `json_object: true`; not with a \
         `response_format` other than `text`.",
    ),
    both(
        "guided_json",
        Refused,
        "Refused: vLLM's older spelling; send `structured_outputs: {\"json\": ...}`.",
    ),
    both(
        "guided_regex",
        Refused,
        "Refused: vLLM's older spelling; send `structured_outputs: {\"regex\": ...}`.",
    ),
    both(
        "guided_choice",
        Refused,
        "Refused: vLLM's older spelling; send `structured_outputs: {\"choice\": [...]}`.",
    ),
    both(
        "guided_grammar",
        Refused,
        "Refused: vLLM's older spelling; send `structured_outputs: {\"grammar\": ...}`.",
    ),
];

/// The field of the audit called `name`.
pub fn field(name: &str) -> Option<&'static Field> {
    FIELDS.iter().find(|f| f.name == name)
}

/// Why a body's field is refused before its values are looked at.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FieldError {
    #[error("`{name}` is not a field of {api} requests{}", did_you_mean(*nearest))]
    Unknown {
        name: String,
        api: Api,
        nearest: Option<&'static str>,
    },
    #[error("`{name}` is a field of {} requests; {api} does not take it", api.other())]
    OtherApi { name: &'static str, api: Api },
    #[error("`{name}` is not supported: {note}")]
    Refused {
        name: &'static str,
        note: &'static str,
    },
    #[error("`{name}` is {value}; allowed: {allowed}")]
    Value {
        name: &'static str,
        value: String,
        allowed: &'static str,
    },
}

fn did_you_mean(nearest: Option<&str>) -> String {
    match nearest {
        Some(n) => format!("; did you mean `{n}`?"),
        None => String::new(),
    }
}

impl FieldError {
    /// The field at fault, as OpenAI's error `param` names it.
    pub fn param(&self) -> &str {
        match self {
            FieldError::Unknown { name, .. } => name.as_str(),
            FieldError::OtherApi { name, .. }
            | FieldError::Refused { name, .. }
            | FieldError::Value { name, .. } => name,
        }
    }
}

/// A value as a refusal quotes it: compact JSON, cut at 80 characters.
fn quote(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(80) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text,
    }
}

/// Every field of `body` that `api` refuses, in the body's order; empty when all may go on to
/// deserialization and validation.
pub fn check(api: Api, body: &Map<String, Value>) -> Vec<FieldError> {
    body.iter()
        .filter(|(_, value)| !value.is_null())
        .filter_map(|(name, value)| check_one(api, name, value))
        .collect()
}

fn check_one(api: Api, name: &str, value: &Value) -> Option<FieldError> {
    let Some(field) = field(name) else {
        let known = FIELDS
            .iter()
            .filter(|f| !matches!(f.on(api), Use::Absent))
            .map(|f| f.name);
        return Some(FieldError::Unknown {
            name: name.to_string(),
            api,
            nearest: nearest(name, known),
        });
    };
    match field.on(api) {
        Use::Served => None,
        Use::Accepted { accepts, .. } if accepts(value) => None,
        Use::Accepted { allowed, .. } => Some(FieldError::Value {
            name: field.name,
            value: quote(value),
            allowed,
        }),
        Use::Refused => Some(FieldError::Refused {
            name: field.name,
            note: field.note.trim_start_matches("Refused: "),
        }),
        Use::Absent => Some(FieldError::OtherApi {
            name: field.name,
            api,
        }),
    }
}

/// README's table of fields: `| field | completions | chat | what we do |`, one row per field.
pub fn markdown_table() -> String {
    let cell = |u: Use| match u {
        Use::Served => "yes",
        Use::Accepted { .. } => "accepted",
        Use::Refused => "refused",
        Use::Absent => "-",
    };
    let mut table =
        String::from("| field | completions | chat | what we do |\n|---|---|---|---|\n");
    for f in FIELDS {
        table.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            f.name,
            cell(f.completions),
            cell(f.chat),
            f.note
        ));
    }
    table
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use serde_json::json;

    use super::*;
    use crate::api::request::{parse_body, ChatRequest, CompletionRequest};

    fn refusal(api: Api, body: Value) -> Vec<FieldError> {
        check(api, body.as_object().expect("an object"))
    }

    /// A value for each field that the table accepts on `api` where it has the field, and, for
    /// fields accepted only with some values, one that it refuses. Every field of the table must
    /// be here, so a new row comes with its example.
    fn examples(name: &str, api: Api) -> (Value, Option<Value>) {
        match name {
            "model" => (json!("gemma-tiny"), None),
            "prompt" => (json!("Hi"), None),
            "messages" => (json!([{"role": "user", "content": "Hi"}]), None),
            "audio" => (json!({"voice": "alloy", "format": "wav"}), None),
            "best_of" => (json!(1), None),
            "echo" => (json!(false), Some(json!(true))),
            "frequency_penalty" | "presence_penalty" | "repetition_penalty" => (json!(1), None),
            "function_call" => (json!("none"), Some(json!({"name": "f"}))),
            "functions" => (json!([{"name": "f"}]), None),
            "logit_bias" => (json!({"5": -100}), None),
            "logprobs" if api == Api::Chat => (json!(true), None),
            "logprobs" => (json!(2), None),
            "max_completion_tokens" | "max_tokens" | "n" | "top_logprobs" => (json!(1), None),
            "metadata" => (json!({"k": "v"}), Some(json!({"k": 1}))),
            "modalities" => (json!(["text"]), Some(json!(["text", "audio"]))),
            "parallel_tool_calls" => (json!(false), Some(json!("yes"))),
            "prediction" => (json!({"type": "content", "content": "x"}), None),
            "prompt_cache_key" | "safety_identifier" | "user" => {
                (json!("client-7"), Some(json!(7)))
            }
            "reasoning_effort" => (json!("low"), None),
            "response_format" => (json!({"type": "json_object"}), None),
            "structured_outputs" => (json!({"regex": "[0-9]+"}), None),
            "guided_json" | "guided_regex" | "guided_choice" | "guided_grammar" => {
                (json!("x"), None)
            }
            "seed" => (json!(3), None),
            "service_tier" => (json!("auto"), Some(json!("flex"))),
            "stop" => (json!("\n"), None),
            "store" => (json!(false), Some(json!(true))),
            "stream" | "ignore_eos" => (json!(true), None),
            "stream_options" => (json!({"include_usage": true}), None),
            "suffix" => (json!(""), Some(json!("end"))),
            "temperature" | "top_p" | "min_p" => (json!(0.5), None),
            "tool_choice" => (json!("auto"), Some(json!("required"))),
            "tools" => (
                json!([{"type": "function", "function": {"name": "f"}}]),
                None,
            ),
            "verbosity" => (json!("medium"), Some(json!("low"))),
            "web_search_options" => (json!({}), None),
            "top_k" | "min_tokens" => (json!(2), None),
            other => panic!("no example for `{other}`: add one"),
        }
    }

    /// A body of one field through the handlers' parser: the refusal's param and message, or
    /// None when accepted.
    fn parse(api: Api, name: &str, value: &Value) -> Option<(Option<String>, String)> {
        let bytes = json!({ name: value }).to_string().into_bytes();
        let outcome = match api {
            Api::Completions => parse_body::<CompletionRequest>(&bytes).map(drop),
            Api::Chat => parse_body::<ChatRequest>(&bytes).map(drop),
        };
        outcome.err().map(|e| {
            assert_eq!(e.status(), StatusCode::BAD_REQUEST);
            let body = e.body();
            (body.error.param, body.error.message)
        })
    }

    /// Every row of the table does what it says on both endpoints, through the parser the
    /// handlers use: served and accepted values pass, refused fields, refused values and the
    /// other endpoint's fields are a 400 naming the field (and what is allowed), a null is
    /// always absent, and a served field is really read (a value of the wrong type is refused).
    #[test]
    fn every_field_does_what_the_table_says() {
        for f in FIELDS {
            for api in [Api::Completions, Api::Chat] {
                let (good, bad) = examples(f.name, api);
                let at = format!("{} on {api}", f.name);
                let got = parse(api, f.name, &good);
                match f.on(api) {
                    Use::Served | Use::Accepted { .. } => assert_eq!(got, None, "{at}"),
                    Use::Refused | Use::Absent => {
                        let (param, message) = got.unwrap_or_else(|| panic!("{at}: accepted"));
                        assert_eq!(param.as_deref(), Some(f.name), "{at}");
                        assert!(message.contains(f.name), "{at}: {message}");
                    }
                }
                assert_eq!(parse(api, f.name, &Value::Null), None, "{at}: null");
                match (f.on(api), &bad) {
                    (Use::Accepted { allowed, .. }, Some(bad)) => {
                        let (param, message) =
                            parse(api, f.name, bad).unwrap_or_else(|| panic!("{at}: {bad}"));
                        assert_eq!(param.as_deref(), Some(f.name), "{at}");
                        assert!(message.contains(allowed), "{at}: {message}");
                    }
                    (Use::Served, _) => {
                        let (_, message) = parse(api, f.name, &json!({"x": [[]]}))
                            .unwrap_or_else(|| panic!("{at}: never read"));
                        assert!(message.contains(f.name), "{at}: {message}");
                    }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn the_table_names_each_field_once_and_every_field_is_somewhere() {
        let mut names: Vec<_> = FIELDS.iter().map(|f| f.name).collect();
        names.sort_unstable();
        let count = names.len();
        names.dedup();
        assert_eq!(names.len(), count, "a field appears twice");
        assert!(FIELDS
            .iter()
            .all(|f| !matches!((f.completions, f.chat), (Use::Absent, Use::Absent))));
    }

    #[test]
    fn a_typo_is_refused_with_the_nearest_field() {
        let e = refusal(Api::Completions, json!({"max_token": 5, "prompt": "x"}));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].param(), "max_token");
        assert!(
            e[0].to_string().contains("did you mean `max_tokens`?"),
            "{}",
            e[0]
        );
        let e = refusal(Api::Chat, json!({"temprature": 0.5, "xyzzy_flag": "red"}));
        assert_eq!(e.len(), 2);
        assert!(e[0].to_string().contains("`temperature`"), "{}", e[0]);
        assert_eq!(
            e[1].to_string(),
            "`xyzzy_flag` is not a field of /v1/chat/completions requests"
        );
    }

    #[test]
    fn refusals_say_why_and_what_is_allowed() {
        let e = refusal(Api::Chat, json!({"tools": []}));
        assert_eq!(
            e[0].to_string(),
            "`tools` is not supported: tool calling is not supported."
        );
        let e = refusal(Api::Completions, json!({"guided_json": {}}));
        assert_eq!(
            e[0].to_string(),
            "`guided_json` is not supported: vLLM's older spelling; send `structured_outputs: \
             {\"json\": ...}`."
        );
        let e = refusal(Api::Completions, json!({"messages": []}));
        assert_eq!(
            e[0].to_string(),
            "`messages` is a field of /v1/chat/completions requests; /v1/completions does not \
             take it"
        );
        let long = "x".repeat(500);
        let e = refusal(Api::Completions, json!({ "suffix": long }));
        assert!(e[0].to_string().len() < 200, "{}", e[0]);
    }

    /// README's table is this one: regenerate it from `markdown_table()` when a row changes.
    #[test]
    fn readme_has_the_table() {
        if std::env::var_os("PRINT_FIELD_TABLE").is_some() {
            print!("{}", markdown_table());
        }
        let readme = include_str!("../../../README.md");
        let table = markdown_table();
        assert!(
            readme.contains(&table),
            "README.md's field table differs from the code's; put this one there:\n{table}"
        );
    }
}
