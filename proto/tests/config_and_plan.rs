//! The four Gemma 1 / 1.1 configs parse as their model cards say, and shard plans are either
//! right or refused with a message that says what would work.

use std::path::PathBuf;

use gemma_proto::{Activation, ModelConfig, PlanError, PlanRequest, ShardPlan};

fn config(name: &str) -> ModelConfig {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/configs")
        .join(name);
    ModelConfig::from_file(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn json_with(
    name: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/configs")
        .join(name);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    edit(v.as_object_mut().expect("object"));
    v.to_string()
}

#[test]
fn gemma_1_configs_parse() {
    for name in ["gemma-7b.json", "gemma-1.1-7b-it.json"] {
        let c = config(name);
        assert_eq!(
            (
                c.hidden_size,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.head_dim
            ),
            (3072, 16, 16, 256),
            "{name}"
        );
        assert_eq!(
            (c.num_hidden_layers, c.intermediate_size, c.vocab_size),
            (28, 24576, 256000)
        );
        // head_dim is read: 16 x 256 = 4096 != 3072.
        assert_ne!(c.num_attention_heads * c.head_dim, c.hidden_size);
        assert_eq!(c.activation, Activation::GeluTanh, "{name}");
    }
    for name in ["gemma-2b.json", "gemma-1.1-2b-it.json"] {
        let c = config(name);
        assert_eq!(
            (
                c.hidden_size,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.head_dim
            ),
            (2048, 8, 1, 256),
            "{name}"
        );
        assert_eq!((c.num_hidden_layers, c.intermediate_size), (18, 16384));
        assert_eq!(c.activation, Activation::GeluTanh, "{name}");
        assert_eq!((c.bos_token_id, c.eos_token_id, c.pad_token_id), (2, 1, 0));
    }
    // 7B is about 8.5 billion parameters with its embedding.
    let p = config("gemma-7b.json").num_parameters();
    assert!((8_400_000_000..8_600_000_000).contains(&p), "{p}");
}

#[test]
fn activation_rules() {
    let erf = json_with("gemma-1.1-2b-it.json", |m| {
        m.insert("hidden_activation".into(), "gelu".into());
    });
    assert_eq!(
        ModelConfig::from_json(&erf).expect("gelu").activation,
        Activation::GeluErf
    );
    let bad = json_with("gemma-2b.json", |m| {
        m.insert("hidden_activation".into(), "relu".into());
    });
    let e = ModelConfig::from_json(&bad).expect_err("relu").to_string();
    assert!(
        e.contains("hidden_activation") && e.contains("relu") && e.contains("gelu_pytorch_tanh"),
        "{e}"
    );
}

#[test]
fn config_errors_name_the_field_and_what_is_allowed() {
    // Absent keys take HF's defaults (GemmaConfig: head_dim 256, vocab 256000), as transformers
    // does; the weights' shapes are checked against the result when a model loads.
    let sparse = json_with("gemma-7b.json", |m| {
        m.remove("head_dim");
        m.remove("vocab_size");
    });
    let c = ModelConfig::from_json(&sparse).expect("defaults");
    assert_eq!(c, config("gemma-7b.json"));

    let e = ModelConfig::from_json(r#"{"hidden_size": 64}"#)
        .expect_err("no model_type")
        .to_string();
    assert!(e.contains("model_type"), "{e}");

    let llama = json_with("gemma-7b.json", |m| {
        m.insert("model_type".into(), "llama".into());
    });
    let e = ModelConfig::from_json(&llama)
        .expect_err("llama")
        .to_string();
    assert!(
        e.contains("model_type") && e.contains("llama") && e.contains("gemma"),
        "{e}"
    );

    let bias = json_with("gemma-7b.json", |m| {
        m.insert("attention_bias".into(), true.into());
    });
    let e = ModelConfig::from_json(&bias).expect_err("bias").to_string();
    assert!(e.contains("attention_bias"), "{e}");

    let zero = json_with("gemma-7b.json", |m| {
        m.insert("num_hidden_layers".into(), 0.into());
    });
    let e = ModelConfig::from_json(&zero).expect_err("zero").to_string();
    assert!(
        e.contains("num_hidden_layers") && e.contains("positive"),
        "{e}"
    );

    let e = ModelConfig::from_json("{ not json")
        .expect_err("syntax")
        .to_string();
    assert!(e.contains("not a valid config.json"), "{e}");

    let missing = PathBuf::from("/nonexistent/config.json");
    let e = ModelConfig::from_file(&missing)
        .expect_err("missing")
        .to_string();
    assert!(e.contains("/nonexistent/config.json"), "{e}");
}

#[test]
fn plan_7b_tp4_pp2() {
    let c = config("gemma-1.1-7b-it.json");
    let plan = ShardPlan::new(&c, &PlanRequest::new(4, 2)).expect("plan");
    assert_eq!(plan.world_size(), 8);
    let s = plan.shard(1, 2).expect("shard");
    assert_eq!(s.index(), 6);
    assert_eq!(s.layers, 14..28);
    assert_eq!(s.q_heads, 8..12);
    assert_eq!(s.kv_heads, 8..12);
    assert_eq!(s.mlp_cols, 12288..18432);
    assert_eq!(s.vocab_rows, 128000..192000);
    assert!(s.is_last_stage() && !s.is_first_stage());
    // The ranks' slices tile each dimension exactly.
    let stage0: Vec<_> = (0..4).map(|r| plan.shard(0, r).expect("rank")).collect();
    assert_eq!(
        stage0.iter().map(|s| s.mlp_cols.len()).sum::<usize>(),
        24576
    );
    assert_eq!(
        stage0.iter().map(|s| s.vocab_rows.len()).sum::<usize>(),
        256000
    );
}

#[test]
fn plan_2b_replicates_the_one_kv_head() {
    let c = config("gemma-2b.json");
    for tp in [2, 4, 8] {
        let plan = ShardPlan::new(&c, &PlanRequest::new(tp, 1)).expect("plan");
        for s in &plan.shards {
            assert_eq!(s.kv_heads, 0..1, "tp={tp} rank {}", s.rank);
            assert_eq!(s.q_heads.len(), 8 / tp);
        }
    }
}

#[test]
fn uneven_and_explicit_layer_splits() {
    let c = config("gemma-2b.json"); // 18 layers
    let plan = ShardPlan::new(&c, &PlanRequest::new(1, 4)).expect("plan");
    let layers: Vec<_> = plan.shards.iter().map(|s| s.layers.clone()).collect();
    assert_eq!(layers, vec![0..5, 5..10, 10..14, 14..18]);
    let plan = ShardPlan::new(&c, &PlanRequest::new(2, 2).with_layers(vec![12, 6])).expect("plan");
    assert_eq!(plan.shard(1, 1).expect("shard").layers, 12..18);
}

#[test]
fn impossible_plans_say_what_would_work() {
    let c7 = config("gemma-7b.json");
    let e = ShardPlan::new(&c7, &PlanRequest::new(3, 1)).expect_err("tp=3");
    assert_eq!(
        e.to_string(),
        "tp=3 does not divide 16 attention heads; use 1, 2, 4, 8 or 16"
    );

    let mut gqa = c7.clone();
    gqa.num_key_value_heads = 8;
    gqa.num_attention_heads = 24; // 3 queries per KV head; tp=6 splits a group... but 6 % 8 and 8 % 6 fail
    let e = ShardPlan::new(&gqa, &PlanRequest::new(6, 1)).expect_err("tp=6");
    assert!(matches!(e, PlanError::KvHeadsIncompatible { .. }), "{e}");
    assert!(e.to_string().contains("use 1, 2, 4, 8 or 24"), "{e}");

    let e = ShardPlan::new(&c7, &PlanRequest::new(0, 1)).expect_err("tp=0");
    assert_eq!(e.to_string(), "tp=0 is not allowed; it must be at least 1");
    let e = ShardPlan::new(&c7, &PlanRequest::new(1, 29)).expect_err("pp=29");
    assert_eq!(
        e.to_string(),
        "pp=29 exceeds the model's 28 layers; use 1 to 28"
    );
    let e =
        ShardPlan::new(&c7, &PlanRequest::new(1, 2).with_layers(vec![10, 10])).expect_err("sum");
    assert!(
        e.to_string()
            .contains("sum to 20 but the model has 28 layers"),
        "{e}"
    );
    let e = ShardPlan::new(&c7, &PlanRequest::new(1, 2).with_layers(vec![28])).expect_err("len");
    assert!(e.to_string().contains("one count per stage"), "{e}");
    let e =
        ShardPlan::new(&c7, &PlanRequest::new(1, 2).with_layers(vec![0, 28])).expect_err("empty");
    assert!(e.to_string().contains("stage 0 no layers"), "{e}");
}
