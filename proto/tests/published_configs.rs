//! Google's published Gemma 2 and Gemma 3 `config.json` files (tests/configs, as the model repos
//! ship them) parse to the architecture their model cards describe, in both key styles:
//! transformers 4.x (`rope_theta`, `rope_local_base_freq`, `rope_scaling`,
//! `sliding_window_pattern`) and transformers 5 (`rope_parameters`, `layer_types`).
//!
//! The expected values are written out by hand from the model cards, not computed by the parser
//! under test; the transformers 5 form is made by a plain JSON rewrite here, and three files in
//! that form are committed as transformers 5 writes them.

use std::path::PathBuf;

use gemma_proto::{Architecture, LayerKind, ModelConfig};
use serde_json::{json, Value};

fn path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/configs")
        .join(name)
}

fn read_json(name: &str) -> Value {
    let text = std::fs::read_to_string(path(name)).expect("read");
    serde_json::from_str(&text).expect("json")
}

fn parse(v: &Value) -> ModelConfig {
    ModelConfig::from_json(&v.to_string()).unwrap_or_else(|e| panic!("{e}\n{v}"))
}

/// What a model card says, one row per published checkpoint.
struct Expected {
    file: &'static str,
    arch: Architecture,
    vocab: usize,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    query_pre_attn_scalar: f64,
    window: usize,
    rope_theta: f64,
    rope_local_theta: f64,
    rope_scaling: f64,
    /// Every how many layers one is global (2: Gemma 2 alternates; 6: Gemma 3's 5:1).
    global_every: usize,
    /// (attention, final) soft-caps.
    caps: (Option<f64>, Option<f64>),
    max_positions: usize,
    /// Billions of parameters of the language model, embedding counted once.
    billions: (f64, f64),
}

const GEMMA2_CAPS: (Option<f64>, Option<f64>) = (Some(50.0), Some(30.0));

fn published() -> Vec<Expected> {
    use Architecture::{Gemma2, Gemma3};
    let g2 =
        |file, hidden, intermediate, layers, heads, kv_heads, head_dim, qpas, billions| Expected {
            file,
            arch: Gemma2,
            vocab: 256_000,
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            head_dim,
            query_pre_attn_scalar: qpas,
            window: 4096,
            rope_theta: 10_000.0,
            rope_local_theta: 10_000.0,
            rope_scaling: 1.0,
            global_every: 2,
            caps: GEMMA2_CAPS,
            max_positions: 8192,
            billions,
        };
    #[allow(clippy::too_many_arguments)]
    let g3 = |file,
              vocab,
              hidden,
              intermediate,
              layers,
              heads,
              kv_heads,
              head_dim,
              qpas,
              window,
              scaling,
              max_positions,
              billions| Expected {
        file,
        arch: Gemma3,
        vocab,
        hidden,
        intermediate,
        layers,
        heads,
        kv_heads,
        head_dim,
        query_pre_attn_scalar: qpas,
        window,
        rope_theta: 1_000_000.0,
        rope_local_theta: 10_000.0,
        rope_scaling: scaling,
        global_every: 6,
        caps: (None, None),
        max_positions,
        billions,
    };
    vec![
        g2(
            "gemma-2-2b-it.json",
            2304,
            9216,
            26,
            8,
            4,
            256,
            256.0,
            (2.5, 2.7),
        ),
        g2(
            "gemma-2-9b-it.json",
            3584,
            14336,
            42,
            16,
            8,
            256,
            256.0,
            (9.1, 9.3),
        ),
        // 27B: head_dim 128, but queries scaled by 1/sqrt(hidden / heads = 144).
        g2(
            "gemma-2-27b-it.json",
            4608,
            36864,
            46,
            32,
            16,
            128,
            144.0,
            (27.1, 27.3),
        ),
        g3(
            "gemma-3-270m.json",
            262_144,
            640,
            2048,
            18,
            4,
            1,
            256,
            256.0,
            512,
            1.0,
            32_768,
            (0.26, 0.28),
        ),
        g3(
            "gemma-3-1b-it.json",
            262_144,
            1152,
            6912,
            26,
            4,
            1,
            256,
            256.0,
            512,
            1.0,
            32_768,
            (0.99, 1.01),
        ),
        // The multimodal checkpoints: text_config gives only what differs from HF's defaults
        // (4B: six keys; heads, KV heads, head_dim, vocab and the RoPE bases are defaults).
        g3(
            "gemma-3-4b-it.json",
            262_208,
            2560,
            10240,
            34,
            8,
            4,
            256,
            256.0,
            1024,
            8.0,
            131_072,
            (3.8, 3.9),
        ),
        g3(
            "gemma-3-12b-it.json",
            262_208,
            3840,
            15360,
            48,
            16,
            8,
            256,
            256.0,
            1024,
            8.0,
            131_072,
            (11.7, 11.8),
        ),
        g3(
            "gemma-3-27b-it.json",
            262_208,
            5376,
            21504,
            62,
            32,
            16,
            128,
            168.0,
            1024,
            8.0,
            131_072,
            (27.0, 27.1),
        ),
    ]
}

fn check(c: &ModelConfig, e: &Expected, style: &str) {
    let at = format!("{} ({style})", e.file);
    assert_eq!(c.architecture, e.arch, "{at}");
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers
        ),
        (e.vocab, e.hidden, e.intermediate, e.layers),
        "{at}"
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (e.heads, e.kv_heads, e.head_dim),
        "{at}"
    );
    assert_eq!(c.query_pre_attn_scalar, e.query_pre_attn_scalar, "{at}");
    assert_eq!(c.sliding_window, Some(e.window), "{at}");
    assert_eq!(
        (c.rope_theta, c.rope_local_theta, c.rope_scaling_factor),
        (e.rope_theta, e.rope_local_theta, e.rope_scaling),
        "{at}"
    );
    assert_eq!(
        (c.attn_logit_softcapping, c.final_logit_softcapping),
        e.caps,
        "{at}"
    );
    assert_eq!(c.max_position_embeddings, e.max_positions, "{at}");
    let kinds: Vec<LayerKind> = (0..e.layers)
        .map(|i| {
            if (i + 1) % e.global_every == 0 {
                LayerKind::Full
            } else {
                LayerKind::Sliding
            }
        })
        .collect();
    assert_eq!(c.layer_kinds, kinds, "{at}");
    assert_eq!(
        (c.bos_token_id, c.eos_token_id, c.pad_token_id),
        (2, 1, 0),
        "{at}"
    );
    let billions = c.num_parameters() as f64 / 1e9;
    assert!(
        (e.billions.0..=e.billions.1).contains(&billions),
        "{at}: {billions} billion parameters, the card says {:?}",
        e.billions
    );
}

/// What transformers 5 writes for a 4.x config: the RoPE keys become `rope_parameters` (one entry
/// per layer kind on Gemma 3) and the sliding pattern becomes `layer_types`.
fn to_transformers5(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(text) = v.get_mut("text_config") {
        *text = text_to_transformers5(text, true);
        return v;
    }
    let gemma3 = v["model_type"] == "gemma3_text";
    text_to_transformers5(&v, gemma3)
}

fn text_to_transformers5(v: &Value, gemma3: bool) -> Value {
    let mut m = v.as_object().expect("object").clone();
    let default_theta = if gemma3 { 1_000_000.0 } else { 10_000.0 };
    let theta = m
        .remove("rope_theta")
        .and_then(|t| t.as_f64())
        .unwrap_or(default_theta);
    let local = m
        .remove("rope_local_base_freq")
        .and_then(|t| t.as_f64())
        .unwrap_or(10_000.0);
    let scaling = m.remove("rope_scaling").filter(|s| !s.is_null());
    let pattern = [
        m.remove("sliding_window_pattern"),
        m.remove("_sliding_window_pattern"),
    ]
    .into_iter()
    .flatten()
    .find_map(|p| p.as_u64())
    .unwrap_or(if gemma3 { 6 } else { 2 });
    let layers = m
        .get("num_hidden_layers")
        .and_then(|n| n.as_u64())
        .unwrap_or(26);
    let types: Vec<&str> = (1..=layers)
        .map(|i| {
            if i % pattern == 0 {
                "full_attention"
            } else {
                "sliding_attention"
            }
        })
        .collect();
    m.entry("layer_types").or_insert(json!(types));
    let global = match scaling {
        Some(s) => json!({"rope_type": "linear", "factor": s["factor"], "rope_theta": theta}),
        None => json!({"rope_type": "default", "rope_theta": theta}),
    };
    let rope = if gemma3 {
        json!({
            "full_attention": global,
            "sliding_attention": {"rope_type": "default", "rope_theta": local},
        })
    } else {
        global
    };
    m.insert("rope_parameters".into(), rope);
    Value::Object(m)
}

#[test]
fn published_gemma_2_and_3_configs_parse_as_their_cards_say() {
    for e in published() {
        check(&parse(&read_json(e.file)), &e, "transformers 4");
    }
}

#[test]
fn transformers_5_key_style_parses_to_the_same_model() {
    for e in published() {
        let old = read_json(e.file);
        let new = to_transformers5(&old);
        for legacy in ["rope_theta", "rope_local_base_freq", "rope_scaling"] {
            let text = new.get("text_config").unwrap_or(&new);
            assert!(text.get(legacy).is_none(), "{}: {legacy} left", e.file);
        }
        let parsed = parse(&new);
        check(&parsed, &e, "transformers 5");
        assert_eq!(parsed, parse(&old), "{}", e.file);
    }
    // As transformers 5 itself writes them.
    for (new, old) in [
        ("gemma-2-2b-it.transformers5.json", "gemma-2-2b-it.json"),
        ("gemma-3-270m.transformers5.json", "gemma-3-270m.json"),
        ("gemma-3-27b-it.transformers5.json", "gemma-3-27b-it.json"),
    ] {
        assert_eq!(
            parse(&read_json(new)),
            parse(&read_json(old)),
            "{new} vs {old}"
        );
    }
}

#[test]
fn rope_settings_that_cannot_be_served_are_refused() {
    let base = to_transformers5(&read_json("gemma-3-270m.json"));
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut v = base.clone();
        edit(&mut v);
        ModelConfig::from_json(&v.to_string())
            .expect_err("refused")
            .to_string()
    };
    // Both styles present and disagreeing: which one the checkpoint means is unknowable.
    let e = with(&|v| v["rope_theta"] = json!(500_000.0));
    assert!(
        e.contains("rope_theta") && e.contains("500000") && e.contains("1000000"),
        "{e}"
    );
    // Scaling the local layers: no published Gemma does, the model does not implement it.
    let e = with(&|v| {
        v["rope_parameters"]["sliding_attention"] =
            json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 10_000.0})
    });
    assert!(
        e.contains("rope_parameters.sliding_attention") && e.contains("no scaling"),
        "{e}"
    );
    let e = with(&|v| {
        v["rope_parameters"]["full_attention"] =
            json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6})
    });
    assert!(e.contains("yarn") && e.contains("linear"), "{e}");
    let e = with(&|v| v["rope_parameters"]["full_attention"]["rope_type"] = json!("linear"));
    assert!(e.contains("factor"), "{e}");
    // EmbeddingGemma: bidirectional, not a causal language model.
    let e = with(&|v| v["use_bidirectional_attention"] = json!(true));
    assert!(e.contains("use_bidirectional_attention"), "{e}");

    // Gemma 2 has one RoPE and no scaling.
    let g2 = to_transformers5(&read_json("gemma-2-2b-it.json"));
    let mut scaled = g2.clone();
    scaled["rope_parameters"] = json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4});
    let e = ModelConfig::from_json(&scaled.to_string())
        .expect_err("gemma 2 scaling")
        .to_string();
    assert!(e.contains("rope_parameters"), "{e}");
    let mut legacy = read_json("gemma-2-2b-it.json");
    legacy["rope_scaling"] = json!({"rope_type": "linear", "factor": 2.0});
    let e = ModelConfig::from_json(&legacy.to_string())
        .expect_err("gemma 2 legacy scaling")
        .to_string();
    assert!(e.contains("rope_scaling") && e.contains("Gemma 3"), "{e}");
}

#[test]
fn multimodal_token_ids_come_from_the_top_level() {
    let mut v = read_json("gemma-3-4b-it.json");
    v["eos_token_id"] = json!([106, 1]);
    assert_eq!(parse(&v).eos_token_id, 106);
}
