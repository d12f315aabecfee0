//! Settings layer as documented: defaults < TOML file < GEMMA_* environment < flags.

use std::path::PathBuf;

use gemma_coordinator::settings::{Args, Settings};

#[test]
fn file_then_environment_then_flags() {
    // The deploy example parses, and says what its comments say.
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/config.example.toml");
    let s = Settings::load(&Args {
        config: Some(example),
        ..Args::default()
    })
    .expect("deploy/config.example.toml");
    assert_eq!((s.tp, s.pp, s.workers.len()), (2, 2, 4));
    assert_eq!(s.max_waiting, 256);

    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("cluster.toml");
    std::fs::write(
        &file,
        "model = \"/models/gemma-7b\"\ntp = 2\npp = 2\nlisten = \"0.0.0.0:9000\"\nkv_budget_mib = 1024\nworkers = [\"a:1\", \"b:2\", \"c:3\", \"d:4\"]\n",
    )
    .expect("write");
    let args = |tp: Option<usize>| Args {
        config: Some(file.clone()),
        tp,
        ..Args::default()
    };
    let s = Settings::load(&args(None)).expect("file");
    assert_eq!(s.model, PathBuf::from("/models/gemma-7b"));
    assert_eq!((s.tp, s.pp, s.kv_budget_mib), (2, 2, 1024));
    assert_eq!(s.listen, "0.0.0.0:9000");
    assert_eq!(s.workers.len(), 4);
    assert_eq!(s.block_size, 16, "defaults fill what the file leaves out");

    // The only test in this binary that touches the environment.
    std::env::set_var("GEMMA_TP", "4");
    std::env::set_var("GEMMA_WORKERS", "x:1,y:2");
    let s = Settings::load(&args(None)).expect("env");
    assert_eq!(s.tp, 4, "environment over file");
    assert_eq!(s.workers, vec!["x:1".to_string(), "y:2".to_string()]);
    let s = Settings::load(&args(Some(1))).expect("flags");
    assert_eq!(s.tp, 1, "flags over environment");
    std::env::remove_var("GEMMA_TP");
    std::env::remove_var("GEMMA_WORKERS");

    let e = Settings::load(&Args::default()).expect_err("no model");
    assert!(e.to_string().contains("--model"), "{e}");
}
