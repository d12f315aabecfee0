//! Sampling and log-probabilities over HTTP, against a real coordinator with two workers and the
//! plain reference model (`gemma_testkit::reference`, which shares no code with the worker):
//! - penalties change greedy outputs exactly as their definitions predict (HF's repetition
//!   penalty over prompt and output, then OpenAI's frequency and presence penalties over the
//!   output), and values out of range are refused with the allowed range;
//! - every reported log-probability, and every alternative in `top_logprobs` (order and value),
//!   equals an f64 log-softmax of the reference's logits for the same prefix, for completions and
//!   chat, greedy and sampled, every choice of `n > 1` along its own prefix. Log-probabilities are
//!   the raw model's (vLLM's default `raw_logprobs`): before penalties and temperature.
//!
//! The API reports tokens as text; the test finds each token's id among the ids of that text by
//! its log-probability, and refuses a step where that is ambiguous.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use gemma_cluster_tests::http::{post_json, sse_data};
use gemma_cluster_tests::process::CoordinatorProcess;
use gemma_coordinator::api::response::{ChatCompletions, Completions, Endpoint};
use gemma_coordinator::chat::{ChatMessage, ChatTemplate};
use gemma_coordinator::sampler::Sampled;
use gemma_coordinator::tokenizer::TextTokenizer;
use gemma_testkit::reference::NaiveGemma;
use gemma_testkit::{add_tokenizer, TinyGemma};
use serde_json::{json, Value};

/// Reported and reference log-probabilities agree to this (two f32 implementations).
const TOLERANCE: f64 = 1e-4;

struct Model {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    reference: NaiveGemma,
    tokenizer: TextTokenizer,
    /// Every id of each token text as the API reports it.
    ids_by_text: HashMap<String, Vec<u32>>,
    vocab_size: usize,
}

fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        let dir = tempfile::tempdir_in(gemma_testkit::process_scratch()).expect("tmp");
        let tiny = TinyGemma::mha_like_7b();
        tiny.write(dir.path()).expect("model");
        add_tokenizer(dir.path()).expect("tokenizer");
        let tokenizer = TextTokenizer::from_dir(dir.path(), 2, 1).expect("tokenizer");
        let mut ids_by_text: HashMap<String, Vec<u32>> = HashMap::new();
        for id in 0..tiny.vocab_size as u32 {
            ids_by_text
                .entry(tokenizer.token_text(id))
                .or_default()
                .push(id);
        }
        Model {
            path: dir.path().to_path_buf(),
            _dir: dir,
            reference: tiny.reference(),
            tokenizer,
            ids_by_text,
            vocab_size: tiny.vocab_size,
        }
    })
}

fn start(dir: &Path) -> CoordinatorProcess {
    let dir = dir.display().to_string();
    CoordinatorProcess::start(&["--model", &dir, "--tp", "2", "--kv-budget-mib", "16"])
        .expect("coordinator")
}

fn post(addr: &str, path: &str, body: Value) -> Value {
    let r = post_json(addr, path, &body).expect("request");
    let v = r.json().expect("json");
    assert_eq!(r.status, 200, "{body} -> {v}");
    v
}

/// Log-softmax in f64 of f32 logits.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let max = f64::from(max);
    let sum: f64 = logits.iter().map(|&l| (f64::from(l) - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&l| f64::from(l) - lse).collect()
}

/// The k most likely ids, most likely first (ties: lower id).
fn top_ids(values: &[f64], k: usize) -> Vec<u32> {
    let mut best: Vec<u32> = Vec::with_capacity(k + 1);
    for (id, &v) in values.iter().enumerate() {
        let at = best.partition_point(|&b| values[b as usize] >= v);
        if at < k {
            best.insert(at, id as u32);
            best.truncate(k);
        }
    }
    best
}

/// One generated token as the API reported it; `top` as reported (chat: in its order;
/// completions: its map, most likely first).
#[derive(Debug)]
struct Reported {
    text: String,
    logprob: f64,
    top: Vec<(String, f64)>,
}

fn number(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn completion_tokens(choice: &Value) -> Vec<Reported> {
    let lp = &choice["logprobs"];
    let texts = lp["tokens"].as_array().expect("tokens");
    let values = lp["token_logprobs"].as_array().expect("token_logprobs");
    let tops = lp["top_logprobs"].as_array().expect("top_logprobs");
    assert_eq!(texts.len(), values.len());
    assert_eq!(texts.len(), tops.len());
    texts
        .iter()
        .zip(values)
        .zip(tops)
        .map(|((t, v), top)| {
            let mut top: Vec<(String, f64)> = top
                .as_object()
                .expect("top_logprobs entry is a map")
                .iter()
                .map(|(k, v)| (k.clone(), number(v)))
                .collect();
            top.sort_by(|a, b| b.1.total_cmp(&a.1));
            Reported {
                text: t.as_str().expect("token text").to_string(),
                logprob: number(v),
                top,
            }
        })
        .collect()
}

fn chat_tokens(choice: &Value) -> Vec<Reported> {
    let entry = |e: &Value| {
        let text = e["token"].as_str().expect("token").to_string();
        let bytes: Vec<u8> = e["bytes"]
            .as_array()
            .expect("bytes")
            .iter()
            .map(|b| b.as_u64().expect("byte") as u8)
            .collect();
        // A byte-fallback token reads U+FFFD alone: its bytes are its one byte (0x80 or above:
        // a piece of a longer character).
        if text == "\u{FFFD}" && bytes.len() == 1 {
            assert!(bytes[0] >= 0x80, "{bytes:?}");
        } else {
            assert_eq!(bytes, text.as_bytes(), "bytes of {text:?}");
        }
        (text, number(&e["logprob"]))
    };
    choice["logprobs"]["content"]
        .as_array()
        .expect("content")
        .iter()
        .map(|e| {
            let (text, logprob) = entry(e);
            Reported {
                text,
                logprob,
                top: e["top_logprobs"]
                    .as_array()
                    .expect("top_logprobs")
                    .iter()
                    .map(entry)
                    .collect(),
            }
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Completions,
    Chat,
}

/// One step of a choice, seen by the reference.
struct Step {
    /// The id of the reported token.
    id: u32,
    /// The reference's raw logits before it.
    logits: Vec<f32>,
}

/// Walks the reference along one reported choice: at each step the reported token must be an
/// id of that text whose reference log-probability is the reported one, and the alternatives
/// the reference's `k` most likely tokens with their log-probabilities, most likely first. A
/// completion's map keeps one value per text: the most likely token's.
fn check_choice(
    m: &Model,
    api: Api,
    prompt: &[u32],
    reported: &[Reported],
    k: usize,
    what: &str,
) -> Vec<Step> {
    let mut session = m.reference.session();
    for &t in prompt {
        session.feed(t);
    }
    let mut steps = Vec::with_capacity(reported.len());
    for (i, r) in reported.iter().enumerate() {
        let logits = session.logits();
        let lp = log_softmax(&logits);
        let at = format!("{what}, token {i} {:?}", r.text);
        let candidates = m
            .ids_by_text
            .get(&r.text)
            .unwrap_or_else(|| panic!("{at}: no token has this text"));
        let matching: Vec<u32> = candidates
            .iter()
            .copied()
            .filter(|&id| (lp[id as usize] - r.logprob).abs() < TOLERANCE)
            .collect();
        assert!(
            matching.len() == 1,
            "{at}: reported logprob {} matches ids {matching:?} of this text (of {candidates:?}, \
             reference {:?})",
            r.logprob,
            candidates
                .iter()
                .map(|&id| lp[id as usize])
                .collect::<Vec<_>>()
        );
        let id = matching[0];
        assert!(r.logprob <= 0.0, "{at}");
        // The alternatives: the reference's k most likely, in order (a completion's map: the
        // first of each text).
        let mut want: Vec<(String, f64)> = Vec::with_capacity(k);
        for t in top_ids(&lp, k) {
            let text = m.tokenizer.token_text(t);
            if api == Api::Chat || !want.iter().any(|(w, _)| *w == text) {
                want.push((text, lp[t as usize]));
            }
        }
        assert_eq!(
            r.top.iter().map(|t| &t.0).collect::<Vec<_>>(),
            want.iter().map(|t| &t.0).collect::<Vec<_>>(),
            "{at}: alternatives"
        );
        for ((text, got), (_, want)) in r.top.iter().zip(&want) {
            assert!(
                (got - want).abs() < TOLERANCE,
                "{at}: alternative {text:?}: {got} != {want}"
            );
        }
        // Ordered, and a distribution's head: at most 1 in all.
        assert!(
            r.top.windows(2).all(|w| w[0].1 >= w[1].1),
            "{at}: {:?}",
            r.top
        );
        let mass: f64 = r.top.iter().map(|t| t.1.exp()).sum();
        assert!(mass <= 1.0 + 1e-6, "{at}: alternatives hold {mass}");
        if let Some(best) = r.top.first() {
            assert!(r.logprob <= best.1 + TOLERANCE, "{at}: above the best");
        }
        session.feed(id);
        steps.push(Step { id, logits });
    }
    steps
}

/// The greedy choice of the raw logits at every step, clear of a near tie that the two
/// implementations' rounding could flip.
fn assert_greedy(steps: &[Step], what: &str) {
    for (i, s) in steps.iter().enumerate() {
        let lp = log_softmax(&s.logits);
        let best = top_ids(&lp, 2);
        assert_eq!(s.id, best[0], "{what}: token {i} is not the greedy one");
        let lead = lp[best[0] as usize] - lp[best[1] as usize];
        assert!(
            lead > 10.0 * TOLERANCE,
            "{what}: token {i} leads by {lead} only"
        );
    }
}

fn completion_prompt(m: &Model, text: &str, v: &Value) -> Vec<u32> {
    let ids = m.tokenizer.encode_prompt(text).expect("encode");
    assert_eq!(v["usage"]["prompt_tokens"], ids.len(), "prompt tokens");
    ids
}

#[test]
fn completion_logprobs_equal_the_reference_log_softmax() {
    let m = model();
    let c = start(&m.path);
    let text = "Once upon a time";

    // Greedy (the last stage sends candidates and log-sum-exps).
    let v = post(
        &c.addr,
        "/v1/completions",
        json!({"prompt": text, "max_tokens": 10, "temperature": 0, "logprobs": 5}),
    );
    let prompt = completion_prompt(m, text, &v);
    let choice = &v["choices"][0];
    let steps = check_choice(
        m,
        Api::Completions,
        &prompt,
        &completion_tokens(choice),
        5,
        "greedy",
    );
    assert_eq!(steps.len(), 10, "{v}");
    assert_greedy(&steps, "greedy");

    // Sampled with top-k, three choices, each along its own prefix.
    let v = post(
        &c.addr,
        "/v1/completions",
        json!({"prompt": text, "max_tokens": 8, "temperature": 1.0, "top_k": 40, "seed": 7,
               "n": 3, "logprobs": 3}),
    );
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3);
    let mut ids = Vec::new();
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        let steps = check_choice(
            m,
            Api::Completions,
            &prompt,
            &completion_tokens(choice),
            3,
            &format!("choice {i}"),
        );
        for s in &steps {
            let rank = top_ids(&log_softmax(&s.logits), 40);
            assert!(
                rank.contains(&s.id),
                "choice {i}: {} is outside the top 40",
                s.id
            );
        }
        ids.push(steps.iter().map(|s| s.id).collect::<Vec<_>>());
    }
    assert!(
        ids[0] != ids[1] && ids[1] != ids[2],
        "choices sample with their own seeds: {ids:?}"
    );

    // Sampled at temperature 1.7 from every logit: the log-probabilities are still the raw
    // model's, not those of the tempered distribution that was sampled.
    let v = post(
        &c.addr,
        "/v1/completions",
        json!({"prompt": text, "max_tokens": 8, "temperature": 1.7, "seed": 3, "logprobs": 2}),
    );
    let steps = check_choice(
        m,
        Api::Completions,
        &prompt,
        &completion_tokens(&v["choices"][0]),
        2,
        "T 1.7",
    );
    let tempered_gap = steps
        .iter()
        .map(|s| {
            let raw = log_softmax(&s.logits);
            let scaled: Vec<f32> = s.logits.iter().map(|l| l / 1.7).collect();
            (raw[s.id as usize] - log_softmax(&scaled)[s.id as usize]).abs()
        })
        .fold(0.0, f64::max);
    assert!(
        tempered_gap > 100.0 * TOLERANCE,
        "the check must tell raw from tempered log-probabilities ({tempered_gap})"
    );
}

#[derive(Debug, Clone, Copy, Default)]
struct Penalties {
    repetition: f32,
    frequency: f32,
    presence: f32,
}

/// Which tokens the penalties count: `DEFINED` is HF's and OpenAI's (and vLLM's) definition;
/// the others are what a wrong implementation might count, so the test can tell them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counting {
    repetition_counts_prompt: bool,
    openai_counts_prompt: bool,
}

const DEFINED: Counting = Counting {
    repetition_counts_prompt: true,
    openai_counts_prompt: false,
};

/// Greedy decoding of the reference with the penalties applied, in f64, as defined: OpenAI's
/// logit bias added first (vLLM's order; -100 a ban), then HF's repetition penalty (each
/// distinct token once: a positive logit divided by it, a negative one multiplied), then
/// OpenAI's logit - frequency * count - presence * (count > 0). Stops at a stop token. Returns
/// the tokens and the smallest lead of the chosen token over the next.
fn penalized_greedy(
    m: &Model,
    prompt: &[u32],
    p: Penalties,
    counting: Counting,
    max_tokens: usize,
    bias: &[(u32, f64)],
) -> (Vec<u32>, f64) {
    let mut session = m.reference.session();
    for &t in prompt {
        session.feed(t);
    }
    let mut out: Vec<u32> = Vec::new();
    let mut min_lead = f64::INFINITY;
    while out.len() < max_tokens {
        let mut logits: Vec<f64> = session.logits().into_iter().map(f64::from).collect();
        for &(t, b) in bias {
            logits[t as usize] = match b <= -100.0 {
                true => f64::NEG_INFINITY,
                false => logits[t as usize] + b,
            };
        }
        let mut seen: Vec<u32> = out.clone();
        if counting.repetition_counts_prompt {
            seen.extend_from_slice(prompt);
        }
        seen.sort_unstable();
        seen.dedup();
        let r = f64::from(p.repetition);
        for &t in &seen {
            let l = &mut logits[t as usize];
            *l = if *l > 0.0 { *l / r } else { *l * r };
        }
        let mut counts: HashMap<u32, u32> = HashMap::new();
        let counted = if counting.openai_counts_prompt {
            prompt.iter().chain(&out)
        } else {
            [].iter().chain(&out)
        };
        for &t in counted {
            *counts.entry(t).or_default() += 1;
        }
        for (&t, &c) in &counts {
            logits[t as usize] -= f64::from(p.frequency) * f64::from(c) + f64::from(p.presence);
        }
        let best = top_ids(&logits, 2);
        min_lead = min_lead.min(logits[best[0] as usize] - logits[best[1] as usize]);
        if m.tokenizer.stop_ids().contains(&best[0]) {
            break;
        }
        out.push(best[0]);
        session.feed(best[0]);
    }
    (out, min_lead)
}

/// A prompt that ends in a token the model, unpenalized, repeats at once: so a penalty that
/// counts the prompt (or wrongly does not) changes the very first token.
const ECHO_PROMPT: &str = "The quick brown fox pelican";
const PENALIZED_TOKENS: usize = 12;

/// The ids of a greedy completion of `ECHO_PROMPT` with `penalties` over HTTP, found by text and
/// raw log-probability (so the reported log-probabilities are the model's, before penalties).
fn http_penalized(addr: &str, m: &Model, prompt: &[u32], penalties: Value) -> Vec<u32> {
    let mut body = json!({"prompt": ECHO_PROMPT, "max_tokens": PENALIZED_TOKENS,
                          "temperature": 0, "logprobs": 0});
    if let (Some(b), Some(p)) = (body.as_object_mut(), penalties.as_object()) {
        b.extend(p.clone());
    }
    let v = post(addr, "/v1/completions", body);
    assert_eq!(completion_prompt(m, ECHO_PROMPT, &v), prompt);
    let what = format!("penalties {penalties}");
    check_choice(
        m,
        Api::Completions,
        prompt,
        &completion_tokens(&v["choices"][0]),
        0,
        &what,
    )
    .iter()
    .map(|s| s.id)
    .collect()
}

#[test]
fn penalties_over_http_pick_what_their_definitions_predict() {
    let m = model();
    let prompt = m.tokenizer.encode_prompt(ECHO_PROMPT).expect("encode");
    let off = Penalties {
        repetition: 1.0,
        ..Penalties::default()
    };
    let predict = |p: Penalties, counting: Counting| {
        penalized_greedy(m, &prompt, p, counting, PENALIZED_TOKENS, &[])
    };
    let (plain, _) = predict(off, DEFINED);
    let echo = *prompt.last().expect("prompt");
    assert_eq!(
        plain[0], echo,
        "the model repeats the prompt's last token: {plain:?}"
    );
    // A wrong reading of each definition: the repetition penalty over the output only, and
    // OpenAI's penalties counting the prompt too.
    let wrong = Counting {
        repetition_counts_prompt: false,
        openai_counts_prompt: true,
    };
    let frequency = Penalties {
        frequency: 0.3,
        ..off
    };
    let presence = Penalties {
        presence: 0.3,
        ..off
    };
    let repetition = Penalties {
        repetition: 3.0,
        ..off
    };
    let all = Penalties {
        repetition: 1.3,
        frequency: 0.2,
        presence: 0.1,
    };
    let cases = [
        (json!({"frequency_penalty": 0.3}), frequency),
        (json!({"presence_penalty": 0.3}), presence),
        (json!({"repetition_penalty": 3.0}), repetition),
        (
            json!({"repetition_penalty": 1.3, "frequency_penalty": 0.2, "presence_penalty": 0.1}),
            all,
        ),
    ];
    let expected: Vec<Vec<u32>> = cases
        .iter()
        .map(|(body, p)| {
            let (tokens, lead) = predict(*p, DEFINED);
            // Two implementations' f32 logits differ by ~1e-5: the choices must be clear.
            assert!(
                lead > 1e-3,
                "{body}: a near tie ({lead}); choose another prompt"
            );
            assert_eq!(tokens.len(), PENALIZED_TOKENS, "{body}: no stop token");
            assert_ne!(tokens, plain, "{body} must change the greedy output");
            tokens
        })
        .collect();
    // The cases tell the definitions from their wrong readings.
    assert_ne!(
        expected[0],
        predict(frequency, wrong).0,
        "frequency: prompt counted"
    );
    assert_ne!(
        expected[1],
        predict(presence, wrong).0,
        "presence: prompt counted"
    );
    assert_ne!(
        expected[2],
        predict(repetition, wrong).0,
        "repetition: output only"
    );
    assert_ne!(
        expected[0], expected[1],
        "frequency counts repeats, presence does not"
    );

    let c = start(&m.path);
    for ((body, _), want) in cases.iter().zip(&expected) {
        let got = http_penalized(&c.addr, m, &prompt, body.clone());
        assert_eq!(&got, want, "{body}");
    }

    // Out of range: 400, naming the parameter and what is allowed; every broken rule is listed.
    for (path, body, param, allowed) in [
        (
            "/v1/completions",
            json!({"prompt": "x", "frequency_penalty": 2.5}),
            "frequency_penalty",
            "frequency_penalty is 2.5; allowed: -2 to 2",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "presence_penalty": -2.25}),
            "presence_penalty",
            "presence_penalty is -2.25; allowed: -2 to 2",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "repetition_penalty": 0}),
            "repetition_penalty",
            "repetition_penalty is 0; allowed: greater than 0, at most 10 (1 = off)",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "repetition_penalty": 10.5}),
            "repetition_penalty",
            "repetition_penalty is 10.5; allowed: greater than 0, at most 10",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "presence_penalty": 3,
                "repetition_penalty": -1}),
            "presence_penalty",
            "presence_penalty is 3; allowed: -2 to 2; and repetition_penalty is -1; allowed: \
          greater than 0, at most 10 (1 = off)",
        ),
    ] {
        let r = post_json(&c.addr, path, &body).expect("request");
        let v = r.json().expect("json");
        assert_eq!(r.status, 400, "{body} -> {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        let message = v["error"]["message"].as_str().expect("message");
        assert!(message.contains(allowed), "{body}: {message}");
    }
    // The ends of each range are allowed.
    for body in [
        json!({"frequency_penalty": -2.0, "presence_penalty": 2.0}),
        json!({"frequency_penalty": 2.0, "presence_penalty": -2.0, "repetition_penalty": 10.0}),
    ] {
        let mut b = json!({"prompt": "x", "max_tokens": 1});
        if let (Some(b), Some(p)) = (b.as_object_mut(), body.as_object()) {
            b.extend(p.clone());
        }
        post(&c.addr, "/v1/completions", b);
    }
}

/// A request's `logit_bias` object: token ids as strings.
fn bias_json(bias: &[(u32, f64)]) -> Value {
    Value::Object(
        bias.iter()
            .map(|&(t, b)| (t.to_string(), json!(b)))
            .collect(),
    )
}

/// logit_bias over HTTP (tp=2: the bias ids fall in both ranks' slices), held to the reference
/// with the bias applied as defined (added to the model's logit before the penalties; -100 a
/// ban): +100 makes greedy take an unlikely token, -100 takes the greedy one away, a bias with
/// penalties picks what both predict together; the log-probabilities stay the model's
/// (`check_choice`), and a bias on a stop token still waits for min_tokens.
#[test]
fn logit_bias_over_http_picks_what_its_definition_predicts() {
    let m = model();
    let prompt = m.tokenizer.encode_prompt(ECHO_PROMPT).expect("encode");
    let off = Penalties {
        repetition: 1.0,
        ..Penalties::default()
    };
    let predict = |p: Penalties, bias: &[(u32, f64)]| {
        penalized_greedy(m, &prompt, p, DEFINED, PENALIZED_TOKENS, bias)
    };
    let (plain, _) = predict(off, &[]);
    let echo = plain[0];
    // An unlikely first token: after the reference's 100 most likely, in the upper half of the
    // vocabulary (rank 1's slice at tp=2).
    let mut session = m.reference.session();
    for &t in &prompt {
        session.feed(t);
    }
    let first = log_softmax(&session.logits());
    let half = m.vocab_size / 2;
    let unlikely = top_ids(&first, 400)
        .into_iter()
        .skip(100)
        .find(|&t| t as usize >= half && !m.tokenizer.stop_ids().contains(&t))
        .expect("an unlikely token in the upper half");
    let penalties = Penalties {
        repetition: 1.3,
        frequency: 0.2,
        presence: 0.1,
    };
    let cases: Vec<(Vec<(u32, f64)>, Penalties)> = vec![
        (vec![(unlikely, 100.0)], off),
        (vec![(echo, -100.0)], off),
        (vec![(echo, -100.0), (unlikely, 100.0)], off),
        (vec![(echo, -1.5), (unlikely, 6.0)], penalties),
    ];
    let c = start(&m.path);
    for (bias, p) in &cases {
        let (want, lead) = predict(*p, bias);
        assert!(lead > 1e-3, "{bias:?}: a near tie ({lead})");
        assert_ne!(want, plain, "{bias:?} must change the greedy output");
        assert_ne!(want, predict(*p, &[]).0, "{bias:?} must matter with {p:?}");
        let mut body = json!({"logit_bias": bias_json(bias)});
        if p.repetition != 1.0 {
            body["repetition_penalty"] = json!(p.repetition);
            body["frequency_penalty"] = json!(p.frequency);
            body["presence_penalty"] = json!(p.presence);
        }
        let got = http_penalized(&c.addr, m, &prompt, body.clone());
        assert_eq!(got, want, "{body}");
    }
    assert!(predict(off, &[(unlikely, 100.0)])
        .0
        .iter()
        .all(|&t| t == unlikely));
    assert!(!predict(off, &[(echo, -100.0)]).0.contains(&echo));

    // At temperature 1, over 3 x 16 choices of up to 8 tokens (each token checked against the
    // reference):
    let draws = |bias: Option<Value>, seed: u64| {
        let mut body = json!({"prompt": ECHO_PROMPT, "max_tokens": 8, "temperature": 1.0,
                              "seed": seed, "n": 16, "logprobs": 0});
        if let Some(bias) = bias {
            body["logit_bias"] = bias;
        }
        let v = post(&c.addr, "/v1/completions", body);
        let choices = v["choices"].as_array().expect("choices").clone();
        choices
            .iter()
            .flat_map(|choice| {
                let reported = completion_tokens(choice);
                check_choice(m, Api::Completions, &prompt, &reported, 0, "sampled")
                    .into_iter()
                    .map(|s| s.id)
            })
            .collect::<Vec<u32>>()
    };
    // The token drawn most often without a ban is never drawn with one.
    let seeds = [1, 2, 3];
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for seed in seeds {
        for t in draws(None, seed) {
            *counts.entry(t).or_default() += 1;
        }
    }
    let (&likely, &free) = counts
        .iter()
        .max_by_key(|&(&t, &n)| (n, std::cmp::Reverse(t)))
        .expect("draws");
    assert!(
        free >= 5,
        "the most likely token was drawn {free} times only"
    );
    let mut drawn = 0;
    for seed in seeds {
        let banned = draws(Some(bias_json(&[(likely, -100.0)])), seed);
        assert!(
            !banned.contains(&likely),
            "seed {seed}: a banned token was drawn"
        );
        drawn += banned.len();
    }
    assert!(drawn > 200, "{drawn} draws");

    // min_tokens' ban wins over a bias: <eos> at +100 ends the output right after min_tokens.
    let eos = m.tokenizer.stop_ids()[0];
    for (min_tokens, want) in [(0, 0), (3, 3)] {
        let body = json!({"prompt": ECHO_PROMPT, "max_tokens": 8, "temperature": 0,
                          "min_tokens": min_tokens, "logit_bias": bias_json(&[(eos, 100.0)])});
        let v = post(&c.addr, "/v1/completions", body);
        assert_eq!(v["usage"]["completion_tokens"], want, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    }

    // Refusals name logit_bias and say what is allowed.
    for (bias, allowed) in [
        (json!({"x": 1}), "allowed: token ids 0 to"),
        (json!({"5": 150}), "allowed: -100 to 100"),
        (json!({ m.vocab_size.to_string(): 1 }), "is not a token id"),
    ] {
        let body = json!({"prompt": "x", "logit_bias": bias});
        let r = post_json(&c.addr, "/v1/completions", &body).expect("request");
        let v = r.json().expect("json");
        assert_eq!(r.status, 400, "{body} -> {v}");
        assert_eq!(v["error"]["param"], "logit_bias", "{v}");
        let message = v["error"]["message"].as_str().expect("message");
        assert!(message.contains(allowed), "{body}: {message}");
    }
}

/// Whether `id` is in the top-p nucleus of `logits` at temperature `t`: the tokens more likely
/// than it hold less than `top_p` (up to rounding).
fn in_nucleus(logits: &[f32], id: u32, t: f64, top_p: f64) -> bool {
    let tempered: Vec<f32> = logits.iter().map(|&l| (f64::from(l) / t) as f32).collect();
    let lp = log_softmax(&tempered);
    let own = lp[id as usize];
    let before: f64 = lp.iter().filter(|&&v| v > own).map(|v| v.exp()).sum();
    before < top_p + 1e-6
}

#[test]
fn chat_logprobs_equal_the_reference_log_softmax_for_every_choice() {
    let m = model();
    let c = start(&m.path);
    let content = "Name three colours.";
    let messages = json!([{"role": "user", "content": content}]);
    let rendered = ChatTemplate::from_dir(&m.path)
        .expect("template")
        .expect("the tokenizer has one")
        .render(&[ChatMessage {
            role: "user".into(),
            content: content.into(),
        }])
        .expect("render");
    let prompt = m.tokenizer.encode_prompt(&rendered).expect("encode");

    // Greedy.
    let v = post(
        &c.addr,
        "/v1/chat/completions",
        json!({"messages": messages, "max_tokens": 8, "temperature": 0, "logprobs": true,
               "top_logprobs": 5}),
    );
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    let steps = check_choice(
        m,
        Api::Chat,
        &prompt,
        &chat_tokens(&v["choices"][0]),
        5,
        "greedy",
    );
    assert_eq!(steps.len(), 8, "{v}");
    assert_greedy(&steps, "greedy chat");

    // Two sampled choices from every logit with top-p, streamed and not: each along its own
    // prefix, inside its nucleus, and the same tokens both ways (choice i samples with seed + i).
    let body = json!({"messages": messages, "max_tokens": 8, "temperature": 0.9, "top_p": 0.95,
                      "seed": 21, "n": 2, "logprobs": true, "top_logprobs": 4});
    let whole = post(&c.addr, "/v1/chat/completions", body.clone());
    let mut streamed_body = body;
    streamed_body["stream"] = json!(true);
    let r = post_json(&c.addr, "/v1/chat/completions", &streamed_body).expect("stream");
    assert_eq!(r.status, 200);
    let events = sse_data(&r.body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut streamed: Vec<Vec<Value>> = vec![Vec::new(); 2];
    for e in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(e).expect("chunk");
        for choice in chunk["choices"].as_array().expect("choices") {
            let i = choice["index"].as_u64().expect("index") as usize;
            if let Some(content) = choice["logprobs"]["content"].as_array() {
                streamed[i].extend(content.iter().cloned());
            }
        }
    }
    let mut ids = Vec::new();
    for i in 0..2 {
        let what = format!("choice {i}");
        let choice = &whole["choices"][i];
        assert_eq!(choice["index"], i);
        let steps = check_choice(m, Api::Chat, &prompt, &chat_tokens(choice), 4, &what);
        for s in &steps {
            assert!(
                in_nucleus(&s.logits, s.id, 0.9, 0.95),
                "{what}: {} outside top-p",
                s.id
            );
        }
        let as_streamed = json!({"logprobs": {"content": streamed[i]}});
        let streamed_steps =
            check_choice(m, Api::Chat, &prompt, &chat_tokens(&as_streamed), 4, &what);
        let own: Vec<u32> = steps.iter().map(|s| s.id).collect();
        assert_eq!(
            streamed_steps.iter().map(|s| s.id).collect::<Vec<_>>(),
            own,
            "{what}: streamed and whole answers sample the same tokens"
        );
        ids.push(own);
    }
    assert_ne!(ids[0], ids[1], "the choices sample with their own seeds");
}

/// Byte-fallback tokens (`<0x80>` to `<0xFF>`) all read U+FFFD alone: chat reports each one's
/// own byte, as OpenAI's `bytes` are meant to be joined, and a completion's map of alternatives,
/// one value per text, keeps the most likely token's.
#[test]
fn byte_tokens_report_their_byte_and_the_most_likely_alternative() {
    let dir = gemma_testkit::tokenizer_dir();
    let tok = TextTokenizer::from_dir(&dir, 2, 1).expect("tokenizer");
    // The ids read straight from tokenizer.json's vocabulary.
    let file = std::fs::read_to_string(dir.join("tokenizer.json")).expect("tokenizer.json");
    let vocab: Value = serde_json::from_str(&file).expect("json");
    let id = |piece: &str| {
        vocab["model"]["vocab"][piece]
            .as_u64()
            .unwrap_or_else(|| panic!("{piece} is not in the vocabulary")) as u32
    };
    let (e2, b80, ff, hello) = (id("<0xE2>"), id("<0x80>"), id("<0xFF>"), id("Hello"));
    let sampled = Sampled {
        token: e2,
        logprob: -0.5,
        top_logprobs: vec![(e2, -0.5), (b80, -1.25), (hello, -2.0), (ff, -3.0)],
    };
    let chat = serde_json::to_value(ChatCompletions::logprobs(
        &tok,
        std::slice::from_ref(&sampled),
        0,
    ))
    .expect("json");
    let entry = &chat["content"][0];
    assert_eq!(entry["token"], "\u{FFFD}");
    assert_eq!(entry["bytes"], json!([0xE2]));
    let top: Vec<(Value, Value)> = entry["top_logprobs"]
        .as_array()
        .expect("top")
        .iter()
        .map(|t| (t["token"].clone(), t["bytes"].clone()))
        .collect();
    assert_eq!(
        top,
        [
            (json!("\u{FFFD}"), json!([0xE2])),
            (json!("\u{FFFD}"), json!([0x80])),
            (json!("Hello"), json!(b"Hello".to_vec())),
            (json!("\u{FFFD}"), json!([0xFF])),
        ]
    );
    let completion =
        serde_json::to_value(Completions::logprobs(&tok, &[sampled], 0)).expect("json");
    assert_eq!(
        completion["top_logprobs"][0],
        json!({"\u{FFFD}": -0.5, "Hello": -2.0}),
        "one value per text: the most likely token's"
    );
}
