//! Every parameter set samples on the compact path: the last stage applies logit bias and
//! penalties, races Gumbel noise keyed by (seed, position, token) for plain temperature
//! sampling, and sends candidates for top-k, top-p and min-p, so no vocabulary crosses the
//! network. Held here over real processes on the tiny model:
//! - the same seed gives the same tokens run after run, and for tp 1, 2, 4 and pp 2 (the noise
//!   belongs to the token, and the bias and a grammar's mask to the token id, not to the rank
//!   that holds it);
//! - what a last-stage rank sends per sequence for OpenAI's default parameters (temperature 1,
//!   top_p 1), with log-probabilities or without, is at most 1 KiB, measured on the encoded
//!   message of a real worker (tp = 2 of a 256000-token vocabulary).

use gemma_cluster_tests::http::post_json;
use gemma_cluster_tests::process::CoordinatorProcess;
use serde_json::{json, Value};

/// The parameter sets every plan must sample alike (each with its own seed).
fn cases() -> Vec<Value> {
    vec![
        // OpenAI's defaults: temperature 1, top_p 1.
        json!({"seed": 7}),
        json!({"seed": 8, "temperature": 0.8, "frequency_penalty": 0.5, "presence_penalty": 0.3,
               "repetition_penalty": 1.2}),
        json!({"seed": 9, "top_p": 0.9}),
        json!({"seed": 10, "min_p": 0.05, "temperature": 1.3}),
        json!({"seed": 11, "temperature": 0, "repetition_penalty": 1.3}),
        json!({"seed": 12, "top_k": 20, "top_p": 0.8, "presence_penalty": 1.0}),
        // logit_bias on ids of every rank's slice at tp=4 (64000 rows each), with each kind of
        // draw: Gumbel, greedy, top-k + top-p with penalties, min-p.
        json!({"seed": 13, "logit_bias": {"17": 3, "64003": 5, "128005": -100, "200007": 4}}),
        json!({"seed": 14, "temperature": 0, "logit_bias": {"200007": 100}}),
        json!({"seed": 15, "temperature": 0.9, "top_k": 20, "top_p": 0.9,
               "frequency_penalty": 0.4, "logit_bias": {"17": -100, "64003": 6, "128005": 6}}),
        json!({"seed": 16, "min_p": 0.05, "repetition_penalty": 1.2,
               "logit_bias": {"64003": 8, "200007": -2.5}}),
        // Structured output: each last-stage rank gets its slice of the grammar's mask; with
        // plain sampling, top-p, greedy and penalties. A grammar may end the output before 16.
        json!({"seed": 17, "structured_outputs": {"regex": "[a-z ]{16,400}"}}),
        json!({"seed": 18, "top_p": 0.9, "response_format": {"type": "json_schema",
               "json_schema": {"name": "n", "schema": {"type": "array",
               "items": {"type": "integer"}}}}}),
        json!({"seed": 19, "temperature": 0, "frequency_penalty": 0.5,
               "structured_outputs": {"choice": ["alpha", "beta gamma", "delta"]}}),
        json!({"seed": 20, "top_k": 5, "structured_outputs": {"json_object": true}}),
    ]
}

fn is_structured(case: &Value) -> bool {
    case.get("structured_outputs").is_some() || case.get("response_format").is_some()
}

/// The tokens (as the API reports them) and text of each case on a cluster of `plan`.
fn sample_all(dir: &str, plan: &[&str]) -> Vec<(Vec<Value>, Value)> {
    let mut args = vec!["--model", dir, "--kv-budget-mib", "16"];
    args.extend_from_slice(plan);
    let coord = CoordinatorProcess::start(&args).expect("coordinator");
    cases()
        .into_iter()
        .map(|case| {
            let mut body = json!({"prompt": "The capital of France is", "max_tokens": 16,
                                  "logprobs": 1, "ignore_eos": true});
            if let (Some(b), Some(c)) = (body.as_object_mut(), case.as_object()) {
                b.extend(c.clone());
            }
            let r = post_json(&coord.addr, "/v1/completions", &body).expect("request");
            let v = r.json().expect("json");
            assert_eq!(r.status, 200, "{body} -> {v}");
            let choice = &v["choices"][0];
            let tokens = choice["logprobs"]["tokens"]
                .as_array()
                .expect("tokens")
                .clone();
            match is_structured(&case) {
                false => assert_eq!(tokens.len(), 16, "{case}: ignore_eos runs to max_tokens"),
                true => assert!((1..=16).contains(&tokens.len()), "{case}: {v}"),
            }
            (tokens, choice["text"].clone())
        })
        .collect()
}

#[test]
fn the_same_seed_samples_the_same_tokens_on_every_plan() {
    let (_tmp, dir) = gemma_cluster_tests::tiny_servable_model();
    let dir = dir.display().to_string();
    let tp1 = sample_all(&dir, &["--tp", "1"]);
    assert_eq!(tp1, sample_all(&dir, &["--tp", "1"]), "run after run");
    // Sampling varies with the seed: not every case is one fixed token.
    let distinct: std::collections::HashSet<String> =
        tp1.iter().map(|(t, _)| format!("{t:?}")).collect();
    assert!(distinct.len() > 3, "{tp1:?}");
    for plan in [
        &["--tp", "2"][..],
        &["--tp", "4"][..],
        &["--tp", "1", "--pp", "2"][..],
    ] {
        assert_eq!(tp1, sample_all(&dir, plan), "plan {plan:?}");
    }
}

/// What one last-stage rank sends per sequence for OpenAI's default parameters, on the encoded
/// message the worker builds (`last_stage_output`), with a 256000-token vocabulary split over
/// tp = 2: at most 1 KiB, with or without log-probabilities; the ranks' answers joined sample
/// what the whole vocabulary samples.
#[test]
fn default_parameters_send_at_most_a_kibibyte_per_rank_per_sequence() {
    use gemma_coordinator::sampler::{Draw, Sampler, SamplingParams};
    use gemma_proto::candidates::join_ranks;
    use gemma_proto::{KvBlockManager, PlanRequest, SeqLogits, SeqStep, StepBatch};
    use gemma_testkit::{LocalCluster, TinyGemma};
    use gemma_worker::server::last_stage_output;
    use gemma_worker::{ModelFolder, ShardOptions};
    use prost::Message;

    let tmp = tempfile::tempdir().expect("tmp");
    TinyGemma::mqa_like_2b().write(tmp.path()).expect("model");
    let folder = ModelFolder::open(tmp.path()).expect("folder");
    let vocab = folder.config.vocab_size;
    assert_eq!(vocab, 256_000);
    let local = LocalCluster::load(&folder, &PlanRequest::new(1, 1), &ShardOptions::default())
        .expect("load");
    let kv = KvBlockManager::new(64, 16);
    let prompt = [2u32, 651, 6037, 576, 6081];
    for top_logprobs in [None, Some(5)] {
        let params = SamplingParams {
            seed: 3,
            ..SamplingParams::default()
        };
        let sampler = match top_logprobs {
            Some(k) => Sampler::with_logprobs(params, &prompt, k),
            None => Sampler::new(params, &prompt),
        };
        // Eight sequences of one step, each asking what the sampler asks.
        let allocs: Vec<_> = (0..8)
            .map(|_| kv.allocate(prompt.len()).expect("kv"))
            .collect();
        let ask = sampler.ask();
        let batch = StepBatch {
            seqs: allocs
                .iter()
                .enumerate()
                .map(|(i, a)| SeqStep {
                    seq_id: i as u64,
                    tokens: prompt.to_vec(),
                    start_pos: 0,
                    block_table: a.block_table().to_vec(),
                    top_candidates: ask.top_candidates,
                    log_probs: ask.log_probs,
                    sampling: ask.sampling.clone(),
                })
                .collect(),
        };
        // [seqs, vocab] -> each rank's [rows, seqs] slice, as its last stage holds it.
        let logits = local.step(&batch).expect("step");
        let half = vocab / 2;
        let mut ranks = Vec::new();
        for r in 0..2 {
            let slice = logits
                .narrow(1, r * half, half)
                .and_then(|t| t.t())
                .and_then(|t| t.contiguous())
                .expect("slice");
            let out = last_stage_output(&batch, &slice, (r * half) as u32).expect("output");
            for seq in &out.seqs {
                let bytes = seq.encoded_len();
                assert!(
                    bytes <= 1024,
                    "{top_logprobs:?}: {bytes} bytes per sequence"
                );
            }
            println!(
                "top_logprobs {top_logprobs:?}: rank {r} sends {} bytes per sequence",
                out.seqs[0].encoded_len()
            );
            let rows = r * half..(r + 1) * half;
            ranks.push(out.into_logits(&batch, &rows).expect("decoded"));
        }
        let joined = join_ranks(ranks, &batch).expect("joined");
        let whole = logits.to_vec2::<f32>().expect("logits");
        for (answer, row) in joined.into_iter().zip(whole) {
            let mut reference = match top_logprobs {
                Some(k) => Sampler::with_logprobs(sampler_params(), &prompt, k),
                None => Sampler::new(sampler_params(), &prompt),
            };
            let want = reference.sample(SeqLogits::Full(row)).expect("sampled");
            let mut twin = match top_logprobs {
                Some(k) => Sampler::with_logprobs(sampler_params(), &prompt, k),
                None => Sampler::new(sampler_params(), &prompt),
            };
            match twin.draw(answer).expect("drawn") {
                Draw::Token(got) => {
                    assert_eq!(got.token, want.token);
                    assert_eq!(got.top_logprobs.len(), want.top_logprobs.len());
                }
                Draw::Retry => panic!("plain temperature sampling never asks again"),
            }
        }
    }

    fn sampler_params() -> SamplingParams {
        SamplingParams {
            seed: 3,
            ..SamplingParams::default()
        }
    }
}
