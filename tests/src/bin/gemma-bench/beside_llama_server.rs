//! Serving the real gemma-3-270m beside llama.cpp's own server under the same streaming load:
//! the cluster at tp=1 against `llama-server`, and at tp=2 and pp=2 against llama.cpp's
//! two-process form (`llama-server --rpc` over two `ggml-rpc-server`s of one thread each, every
//! layer offloaded to them). At 1, 4, 16 and 64 concurrent streams (BENCH_STREAMS overrides,
//! e.g. "1,16"), greedy and with an OpenAI client's default sampling (temperature 1, top_p 1,
//! a seed per request; each server's other defaults apply).
//!
//! Each client sends `rounds` streamed `/v1/completions` requests back to back (a short distinct
//! prompt, 128 tokens with `ignore_eos`, so both sides generate exactly as many tokens). The
//! figure is every generated token (the servers' own `usage`) over the wall time; TTFT and ITL
//! percentiles go to the latency table. Every side runs alone on the same cores with the same
//! compute threads in all; llama-server has a slot per stream (`--parallel 64`, 512 tokens
//! each) and continuous batching, as this server has 64 running sequences.

use anyhow::Result;

use super::llama_cpp::LlamaCpp;
use super::{load_level_with, split, start_coordinator, LatencyRow, Level, Row};

const MAX_TOKENS: usize = 128;
const SLOTS: usize = 64;
const SLOT_CONTEXT: usize = 512;

/// Sampling of one side of a row.
#[derive(Clone, Copy)]
enum Sampling {
    Greedy,
    Default,
}

impl Sampling {
    fn name(self) -> &'static str {
        match self {
            Sampling::Greedy => "greedy",
            Sampling::Default => "temperature 1",
        }
    }

    fn body(self, client: usize, round: usize) -> String {
        let prompt = format!(
            "Client {client} request {round}: tell me a long story about a lighthouse keeper."
        );
        let sampling = match self {
            Sampling::Greedy => r#""temperature":0"#.to_string(),
            Sampling::Default => format!(
                r#""temperature":1,"top_p":1,"seed":{}"#,
                client * 1000 + round
            ),
        };
        format!(
            r#"{{"prompt":{},"max_tokens":{MAX_TOKENS},"ignore_eos":true,{sampling},"stream":true,"stream_options":{{"include_usage":true}}}}"#,
            super::serde_json_string(&prompt)
        )
    }
}

fn streams() -> Vec<usize> {
    std::env::var("BENCH_STREAMS")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty() && v.iter().all(|&c| (1..=SLOTS).contains(&c)))
        .unwrap_or_else(|| vec![1, 4, 16, 64])
}

/// Requests per client: enough that the load holds past the ramp-up at every level.
fn rounds(streams: usize) -> usize {
    if streams <= 4 {
        4
    } else {
        2
    }
}

/// Every level of one side: (streams, sampling) -> Level.
type Measured = Vec<(usize, Sampling, Level)>;

fn measure(addr: &str) -> Result<Measured> {
    // Warm-up: the first request of a fresh server pays for its lazy set-up.
    load_level_with(addr, 1, 1, &|c, r| Sampling::Greedy.body(c, r))?;
    let mut out = Vec::new();
    for c in streams() {
        for sampling in [Sampling::Greedy, Sampling::Default] {
            let level = load_level_with(addr, c, rounds(c), &|i, r| sampling.body(i, r))?;
            eprintln!(
                "  {c} streams, {}: {:.1} tok/s, TTFT p50 {:.0} ms",
                sampling.name(),
                level.tokens_per_s,
                level.ttft_p50
            );
            out.push((c, sampling, level));
        }
    }
    Ok(out)
}

pub fn rows(threads: usize) -> Result<(Vec<Row>, Vec<LatencyRow>)> {
    let Some(model) = super::real_model::model_path() else {
        eprintln!("llama-server rows skipped: no gemma-3-270m (scripts/fetch-model.sh)");
        return Ok((Vec::new(), Vec::new()));
    };
    let gguf = gemma_proto::ModelFiles::locate(&model)?.weights;
    let llama = LlamaCpp::find();
    let reference = |rpc: bool| -> Option<Measured> {
        let llama = match &llama {
            Ok(l) => l,
            Err(why) => {
                eprintln!("llama-server rows: reference skipped: {why:#}");
                return None;
            }
        };
        let run = || -> Result<Measured> {
            if rpc {
                let pair = llama.rpc_pair((threads / 2).max(1))?;
                let (_server, addr) = llama.server(&gguf, 1, SLOTS, SLOT_CONTEXT, Some(&pair))?;
                eprintln!("llama.cpp RPC pair:");
                measure(&addr)
            } else {
                let (_server, addr) = llama.server(&gguf, threads, SLOTS, SLOT_CONTEXT, None)?;
                eprintln!("llama-server:");
                measure(&addr)
            }
        };
        run()
            .map_err(|e| eprintln!("llama-server rows: reference failed: {e:#}"))
            .ok()
    };
    let server = reference(false);
    let rpc = reference(true);
    let mut rows = Vec::new();
    let mut latency = Vec::new();
    for (plan, args, world) in [
        ("tp=1", ["--tp", "1", "--pp", "1"], 1),
        ("tp=2", ["--tp", "2", "--pp", "1"], 2),
        ("pp=2", ["--tp", "1", "--pp", "2"], 2),
    ] {
        let (_coordinator, addr) = start_coordinator(&model, &args)?;
        eprintln!("cluster {plan}:");
        let ours = measure(&addr)?;
        let (theirs, name) = match world {
            1 => (server.as_ref(), "llama-server"),
            _ => (rpc.as_ref(), "llama.cpp RPC pair"),
        };
        for (i, (c, sampling, level)) in ours.iter().enumerate() {
            let reference = theirs.and_then(|t| t.get(i)).map(|(_, _, l)| l);
            let what = format!("{plan}, {c} streams, {}", sampling.name());
            rows.push(Row {
                figure: format!("gemma-3-270m serve {what}"),
                value: level.tokens_per_s,
                unit: "tok/s",
                reference: name.into(),
                ref_value: reference.map_or(f64::NAN, |l| l.tokens_per_s),
                threads: format!("{} | {}", split(threads, world), split(threads, world)),
            });
            latency.push(LatencyRow {
                what,
                ours: level.clone(),
                reference: reference.cloned(),
                reference_name: name,
            });
        }
    }
    Ok((rows, latency))
}

/// Prompt lengths of the long-prompt rows (TTFT: prefill tokens/s; then decode after them).
const LONG_PROMPTS: [usize; 3] = [512, 2048, 8192];
const LONG_PROMPT_REPEATS: usize = 3;
const AFTER_PROMPT_TOKENS: usize = 32;

/// One request at a time, tp=1 against llama-server (one slot): a prompt of about `n` tokens of
/// real text (this repository's README and ARCHITECTURE, led by the run's number so no cache
/// holds any of it), 32 greedy tokens. Prefill tokens/s = the server's own prompt token count /
/// TTFT; decode tokens/s = 1 / TPOT. Median of `LONG_PROMPT_REPEATS`.
pub fn long_prompt_rows(threads: usize) -> Result<Vec<Row>> {
    let Some(model) = super::real_model::model_path() else {
        return Ok(Vec::new());
    };
    let texts = long_texts(&model)?;
    let gguf = gemma_proto::ModelFiles::locate(&model)?.weights;
    let context = LONG_PROMPTS[LONG_PROMPTS.len() - 1] + 256;
    let reference = LlamaCpp::find().and_then(|llama| {
        let (_server, addr) = llama.server(&gguf, threads, 1, context, None)?;
        eprintln!("llama-server, long prompts:");
        one_at_a_time(&addr, &texts)
    });
    let reference = reference
        .map_err(|e| eprintln!("long-prompt rows: llama-server skipped: {e:#}"))
        .ok();
    let (_coordinator, addr) = start_coordinator(&model, &["--tp", "1"])?;
    eprintln!("cluster tp=1, long prompts:");
    let ours = one_at_a_time(&addr, &texts)?;
    let mut rows = Vec::new();
    for (i, (n, (prefill, decode))) in LONG_PROMPTS.iter().zip(&ours).enumerate() {
        let theirs = reference.as_ref().and_then(|r| r.get(i)).copied();
        for (what, value, ref_value) in [
            ("prefill (TTFT)", *prefill, theirs.map_or(f64::NAN, |t| t.0)),
            ("decode after it", *decode, theirs.map_or(f64::NAN, |t| t.1)),
        ] {
            rows.push(Row {
                figure: format!("gemma-3-270m {n}-token prompt, {what}"),
                value,
                unit: "tok/s",
                reference: "llama-server".into(),
                ref_value,
                threads: format!("{t} | {t}", t = split(threads, 1)),
            });
        }
    }
    Ok(rows)
}

/// Texts of about each of `LONG_PROMPTS` tokens (this tokenizer's count, less a few for the
/// run's number in front).
fn long_texts(model: &std::path::Path) -> Result<Vec<String>> {
    let tokenizer = gemma_coordinator::tokenizer::TextTokenizer::from_dir(model, 2, 1)?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut text = String::new();
    while text.len() < 200_000 {
        for doc in ["README.md", "docs/ARCHITECTURE.md"] {
            text.push_str(&std::fs::read_to_string(root.join(doc))?);
        }
    }
    let ids = tokenizer.encode_text(&text)?;
    LONG_PROMPTS
        .iter()
        .map(|&n| Ok(tokenizer.decode(&ids[..n - 8])?))
        .collect()
}

/// (prefill tok/s, decode tok/s) per text, median of the repeats, after one warm-up request.
fn one_at_a_time(addr: &str, texts: &[String]) -> Result<Vec<(f64, f64)>> {
    let body = |run: usize, text: &str| {
        let prompt = format!("Run {run}.\n{text}");
        format!(
            r#"{{"prompt":{},"max_tokens":{AFTER_PROMPT_TOKENS},"ignore_eos":true,"temperature":0,"stream":true,"stream_options":{{"include_usage":true}}}}"#,
            super::serde_json_string(&prompt)
        )
    };
    super::stream_timing::stream(addr, "/v1/completions", &body(0, &texts[0]))?;
    let mut out = Vec::new();
    for (t, text) in texts.iter().enumerate() {
        let (mut prefill, mut decode) = (Vec::new(), Vec::new());
        for r in 0..LONG_PROMPT_REPEATS {
            let run = 1 + t * LONG_PROMPT_REPEATS + r;
            let times = super::stream_timing::stream(addr, "/v1/completions", &body(run, text))?;
            let ttft = times
                .ttft()
                .ok_or_else(|| anyhow::anyhow!("no token arrived"))?;
            let tpot = times
                .tpot()
                .ok_or_else(|| anyhow::anyhow!("one token arrived"))?;
            prefill.push(times.prompt_tokens as f64 / ttft * 1000.0);
            decode.push(1000.0 / tpot);
        }
        let (p, d) = (super::median(&mut prefill), super::median(&mut decode));
        eprintln!("  prompt {t}: prefill {p:.1} tok/s, decode {d:.1} tok/s");
        out.push((p, d));
    }
    Ok(out)
}
