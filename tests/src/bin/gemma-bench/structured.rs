//! Structured output's rows: output tokens/s of JSON-Schema-constrained requests against the
//! same requests unconstrained, at 1 and 16 concurrent streams, on the real gemma-3-270m (one
//! coordinator, tp=1, both sides in the same run on the same process). Both sample with OpenAI's
//! defaults (temperature 1, a seed per request) and stop at 128 tokens (`ignore_eos`): the
//! schema (twelve {name, qty} items) is long enough that the constrained side rarely ends
//! first, so both sides decode about as many tokens per request; the figure is every output
//! token over the wall time of the whole load.

use std::time::Instant;

use anyhow::{anyhow, Result};

use super::stream_timing;
use super::{serde_json_string, split, start_coordinator, Row};

const MAX_TOKENS: usize = 128;
const REQUESTS_PER_STREAM: usize = 3;
const PROMPT: &str = "List twelve items for a picnic basket with their quantities, as JSON.";

pub fn rows(threads: usize) -> Result<Vec<Row>> {
    let Some(model) = super::real_model::model_path() else {
        eprintln!("structured output rows skipped: no gemma-3-270m (scripts/fetch-model.sh)");
        return Ok(Vec::new());
    };
    let (_coordinator, addr) = start_coordinator(&model, &["--tp", "1"])?;
    // Warm-up: builds the grammar engine's token trie and runs the workers once.
    load(&addr, 1, 1, Side::Schema)?;
    let mut rows = Vec::new();
    let row = |figure: String, value: f64, reference: &str, ref_value: f64| Row {
        figure,
        value,
        unit: "tok/s",
        reference: reference.into(),
        ref_value,
        threads: format!("{t} | {t}", t = split(threads, 1)),
    };
    for streams in [1, 16] {
        let free = load(&addr, streams, REQUESTS_PER_STREAM, Side::Free)?;
        let constrained = load(&addr, streams, REQUESTS_PER_STREAM, Side::Schema)?;
        let figure = format!("gemma-3-270m, {streams} stream(s): JSON Schema output");
        rows.push(row(
            figure,
            constrained,
            "the same requests unconstrained",
            free,
        ));
        if streams > 1 {
            // What any request that changes the logits on the last stage costs (there, a
            // copy of the slice), without a grammar: where the schema's cost comes from.
            let penalized = load(&addr, streams, REQUESTS_PER_STREAM, Side::Penalized)?;
            let figure = format!("gemma-3-270m, {streams} streams: frequency_penalty 0.01");
            rows.push(row(
                figure,
                penalized,
                "the same requests unconstrained",
                free,
            ));
        }
    }
    Ok(rows)
}

/// What one side's requests add to the same chat request.
#[derive(Clone, Copy)]
enum Side {
    Free,
    Schema,
    Penalized,
}

fn body(seed: usize, side: Side) -> String {
    let format = match side {
        Side::Schema => {
            r#","response_format":{"type":"json_schema","json_schema":{"name":"basket","strict":true,"schema":{"type":"array","minItems":12,"maxItems":12,"items":{"type":"object","properties":{"name":{"type":"string","maxLength":16},"qty":{"type":"integer","minimum":1,"maximum":99}},"required":["name","qty"]}}}}"#
        }
        Side::Penalized => r#","frequency_penalty":0.01"#,
        Side::Free => "",
    };
    format!(
        r#"{{"messages":[{{"role":"user","content":{}}}],"max_tokens":{MAX_TOKENS},"seed":{seed},"ignore_eos":true,"stream":true,"stream_options":{{"include_usage":true}}{format}}}"#,
        serde_json_string(PROMPT)
    )
}

/// `streams` clients, each sending `requests` back to back: output tokens per second of wall.
fn load(addr: &str, streams: usize, requests: usize, side: Side) -> Result<f64> {
    let started = Instant::now();
    let tokens: Vec<Result<usize>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..streams)
            .map(|c| {
                s.spawn(move || {
                    let mut tokens = 0;
                    for r in 0..requests {
                        let body = body(c * 100 + r, side);
                        let times = stream_timing::stream(addr, "/v1/chat/completions", &body)?;
                        tokens += times.completion_tokens;
                    }
                    Ok(tokens)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("client panicked"))))
            .collect()
    });
    let tokens: usize = tokens.into_iter().collect::<Result<Vec<_>>>()?.iter().sum();
    Ok(tokens as f64 / started.elapsed().as_secs_f64())
}
