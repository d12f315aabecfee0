//! Settings layer as documented: defaults < TOML file < GEMMA_* environment < flags; every
//! setting has a flag and a variable; unknown keys and variables are refused with a suggestion;
//! deploy/config.example.toml matches the declaration.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::Parser;
use gemma_coordinator::settings::{env_name, flag_name, Args, Settings, SETTING_NAMES};
use serde_json::{json, Value};

fn example_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/config.example.toml")
}

/// An environment of the given variables only, so that these tests never read or race on the
/// process's own (only `file_then_environment_then_flags` touches that).
fn env(vars: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
    vars.iter().map(|(k, v)| (k.into(), v.into())).collect()
}

fn parse(argv: &[&str]) -> Args {
    let mut all = vec!["gemma-coordinator"];
    all.extend_from_slice(argv);
    Args::try_parse_from(all).expect("command line")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

/// A settings field as JSON, so that every setting can be checked by name.
fn field(s: &Settings, name: &str) -> Value {
    serde_json::to_value(s).expect("json")[name].clone()
}

#[test]
fn file_then_environment_then_flags() {
    // The deploy example parses, and says what its comments say.
    let example = example_path();
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
    assert_eq!((s.tp, s.pp, s.kv_budget_mib), (2, 2, Some(1024)));
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

#[test]
fn each_layer_overrides_the_one_below_and_only_what_it_sets() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = write(
        dir.path(),
        "c.toml",
        "model = \"/m\"\nmax_running = 8\nmax_waiting = 9\nmax_batch_tokens = 10\n",
    );
    let flags = |extra: &[&str]| {
        let mut argv = vec!["--config", file.to_str().expect("utf-8 path")];
        argv.extend_from_slice(extra);
        parse(&argv)
    };
    let vars = env(&[("GEMMA_MAX_RUNNING", "4"), ("GEMMA_MAX_WAITING", "5")]);

    let s = Settings::load_with_env(&parse(&["--model", "/m"]), env(&[])).expect("defaults");
    assert_eq!(
        (s.max_running, s.max_waiting, s.max_batch_tokens),
        (64, 256, 512)
    );
    let s = Settings::load_with_env(&flags(&[]), env(&[])).expect("file");
    assert_eq!(
        (s.max_running, s.max_waiting, s.max_batch_tokens),
        (8, 9, 10)
    );
    let s = Settings::load_with_env(&flags(&[]), vars.clone()).expect("env");
    assert_eq!(
        (s.max_running, s.max_waiting, s.max_batch_tokens),
        (4, 5, 10)
    );
    let s = Settings::load_with_env(&flags(&["--max-running", "2"]), vars).expect("flags");
    assert_eq!(
        (s.max_running, s.max_waiting, s.max_batch_tokens),
        (2, 5, 10)
    );
    assert_eq!(s.tp, 1, "defaults under everything");
}

/// For every setting: a command-line value and the JSON of the setting it must give, different
/// from the default so that the flag visibly did something.
fn one_value_per_setting() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        ("model", "/models/other", json!("/models/other")),
        ("tp", "2", json!(2)),
        ("pp", "3", json!(3)),
        ("layers_per_stage", "4,2", json!([4, 2])),
        ("workers", "a:1,b:2", json!(["a:1", "b:2"])),
        ("listen", "0.0.0.0:1", json!("0.0.0.0:1")),
        ("dtype", "bf16", json!("bf16")),
        ("dequantize", "true", json!(true)),
        ("kv_budget_mib", "17", json!(17)),
        ("kv_memory_fraction", "0.25", json!(0.25)),
        ("block_size", "32", json!(32)),
        ("prefix_caching", "false", json!(false)),
        ("pipeline_overlap", "true", json!(true)),
        ("worker_bin", "/bin/w", json!("/bin/w")),
        ("served_model_name", "mine", json!("mine")),
        ("step_timeout_ms", "11", json!(11)),
        ("collective_timeout_ms", "12", json!(12)),
        ("lease_ms", "20", json!(20)),
        ("wedged_after_ms", "21", json!(21)),
        ("connect_timeout_ms", "13", json!(13)),
        ("load_timeout_s", "14", json!(14)),
        ("max_batch_tokens", "15", json!(15)),
        ("max_running", "16", json!(16)),
        ("max_waiting", "18", json!(18)),
        ("max_connections", "21", json!(21)),
        ("max_tokens_per_request", "22", json!(22)),
        ("rate_limit_per_second", "2.5", json!(2.5)),
        ("rate_limit_burst", "23", json!(23)),
        ("api_key", "k-19", json!("k-19")),
        ("api_key_file", "/etc/keys", json!("/etc/keys")),
        ("tls_cert", "/etc/c.pem", json!("/etc/c.pem")),
        ("tls_key", "/etc/k.pem", json!("/etc/k.pem")),
        ("tls_ca", "/etc/ca.pem", json!("/etc/ca.pem")),
    ]
}

#[test]
fn every_setting_has_a_flag_and_a_variable() {
    let cases = one_value_per_setting();
    let covered: BTreeSet<&str> = cases.iter().map(|(name, ..)| *name).collect();
    let declared: BTreeSet<&str> = SETTING_NAMES.iter().copied().collect();
    assert_eq!(covered, declared, "one case per declared setting");

    let defaults = Settings::load_with_env(&parse(&["--model", "/m"]), env(&[])).expect("defaults");
    for (name, value, expected) in cases {
        assert_ne!(
            field(&defaults, name),
            expected,
            "{name}: pick a non-default value"
        );
        let flag = format!("--{}", flag_name(name));
        let mut argv = vec![flag.as_str(), value];
        if name != "model" {
            argv.extend(["--model", "/m"]);
        }
        let s = Settings::load_with_env(&parse(&argv), env(&[])).expect(name);
        assert_eq!(field(&s, name), expected, "{flag} {value}");

        let var = env_name(name);
        let mut vars = vec![(var.as_str(), value)];
        if name != "model" {
            vars.push(("GEMMA_MODEL", "/m"));
        }
        let s = Settings::load_with_env(&Args::default(), env(&vars)).expect(name);
        assert_eq!(field(&s, name), expected, "{var}={value}");
    }
}

#[test]
fn a_boolean_is_turned_off_from_the_command_line_too() {
    let dir = tempfile::tempdir().expect("tmp");
    let on = write(dir.path(), "on.toml", "model = \"/m\"\ndequantize = true\n");
    let on = on.to_str().expect("utf-8 path");
    let load = |argv: &[&str], vars: &[(&str, &str)]| {
        Settings::load_with_env(&parse(argv), env(vars))
            .expect("settings")
            .dequantize
    };
    assert!(load(&["--config", on], &[]), "the file turns it on");
    assert!(!load(&["--config", on, "--dequantize=false"], &[]));
    assert!(!load(&["--config", on, "--dequantize", "false"], &[]));
    assert!(!load(&["--config", on], &[("GEMMA_DEQUANTIZE", "false")]));
    assert!(!load(&["--config", on, "--dequantize=no"], &[]));
    assert!(
        load(&["--model", "/m", "--dequantize"], &[]),
        "a bare flag is on"
    );
    assert!(load(&["--model", "/m", "--dequantize", "--tp", "1"], &[]));
    assert!(load(&["--model", "/m"], &[("GEMMA_DEQUANTIZE", "true")]));
    assert!(!load(
        &["--model", "/m", "--dequantize=false"],
        &[("GEMMA_DEQUANTIZE", "1")]
    ));
    assert!(Args::try_parse_from(["gemma-coordinator", "--dequantize=maybe"]).is_err());
}

#[test]
fn an_unknown_file_key_is_refused_with_the_nearest_setting() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = write(
        dir.path(),
        "config.toml",
        "model = \"/m\"\nmax_runing = 4\n",
    );
    let args = Args {
        config: Some(file.clone()),
        ..Args::default()
    };
    let e = Settings::load_with_env(&args, env(&[])).expect_err("misspelled key");
    let text = e.to_string();
    let expected = format!(
        "unknown setting `max_runing` in {}; did you mean `max_running`? valid settings: model, tp, pp,",
        file.display()
    );
    assert!(text.contains(&expected), "{text}");
    assert!(text.contains("max_waiting"), "lists every setting: {text}");

    // `config` names the file; it is not a setting the file itself may hold.
    let file = write(dir.path(), "nested.toml", "config = \"/other.toml\"\n");
    let e = Settings::load_with_env(
        &Args {
            config: Some(file),
            ..Args::default()
        },
        env(&[]),
    )
    .expect_err("config in a config file");
    assert!(e.to_string().contains("unknown setting `config`"), "{e}");

    // Far from every setting: refused, without a guess.
    let file = write(dir.path(), "far.toml", "completely_unrelated = 1\n");
    let e = Settings::load_with_env(
        &Args {
            config: Some(file),
            ..Args::default()
        },
        env(&[]),
    )
    .expect_err("unknown key");
    let text = e.to_string();
    assert!(
        text.contains("unknown setting `completely_unrelated`"),
        "{text}"
    );
    assert!(!text.contains("did you mean"), "{text}");
}

#[test]
fn an_unknown_gemma_variable_is_refused_and_foreign_ones_are_ignored() {
    let args = parse(&["--model", "/m"]);
    let e = Settings::load_with_env(&args, env(&[("GEMMA_MAX_RUNING", "4")]))
        .expect_err("misspelled variable");
    let text = e.to_string();
    assert!(
        text.contains(
            "unknown setting `GEMMA_MAX_RUNING` in the environment; did you mean `GEMMA_MAX_RUNNING`? valid settings: GEMMA_MODEL, GEMMA_TP,"
        ),
        "{text}"
    );

    // The scripts' and tests' variables, and variables without the prefix, are not settings.
    let s = Settings::load_with_env(
        &args,
        env(&[
            ("GEMMA_CACHE", "/c"),
            ("GEMMA_TOKENIZER_DIR", "/t"),
            ("GEMMA_REAL_MODEL", "/r"),
            ("MAX_RUNING", "4"),
            ("PATH", "/bin"),
        ]),
    )
    .expect("foreign variables");
    assert_eq!(s.max_running, 64);

    // A variable's value is checked as its flag's is.
    let e = Settings::load_with_env(&args, env(&[("GEMMA_TP", "two")])).expect_err("bad value");
    let text = e.to_string();
    assert!(
        text.contains("GEMMA_TP: invalid value 'two' for '--tp <N>'"),
        "{text}"
    );
}

/// The settings of the example's commented `# key = value` lines, as a file of their own.
fn commented_settings(example: &str, dir: &Path) -> Args {
    let lines: Vec<&str> = example
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix('#')?.trim_start();
            let (key, _) = rest.split_once('=')?;
            let key = key.trim_end();
            let is_key = !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_');
            is_key.then_some(rest)
        })
        .collect();
    let file = write(dir, "commented.toml", &lines.join("\n"));
    Args::from_file(&file).expect("the commented lines are settings")
}

#[test]
fn the_example_file_lists_every_setting_with_its_default() {
    let text = std::fs::read_to_string(example_path()).expect("example");
    let dir = tempfile::tempdir().expect("tmp");
    // Both refuse a key the declaration lacks.
    let active = serde_json::to_value(Args::from_file(&example_path()).expect("active lines"))
        .expect("json");
    let commented = serde_json::to_value(commented_settings(&text, dir.path())).expect("json");

    for name in SETTING_NAMES {
        assert!(
            active.get(name).is_some() || commented.get(name).is_some(),
            "deploy/config.example.toml does not list `{name}`"
        );
    }
    let defaults = serde_json::to_value(Args::defaults()).expect("json");
    let defaults = defaults.as_object().expect("a table");
    assert!(defaults.len() >= 15, "{defaults:?}");
    for (name, default) in defaults {
        // The default is the commented line; a setting this deployment leaves alone may state
        // it uncommented instead.
        let listed = commented.get(name).or_else(|| active.get(name));
        assert_eq!(
            listed,
            Some(default),
            "deploy/config.example.toml: `{name}` is listed as {listed:?}, its default is {default}"
        );
    }
}

#[test]
fn help_names_each_flag_with_its_default_and_variable() {
    Args::command_with_defaults().debug_assert();
    let help = Args::command_with_defaults().render_help().to_string();
    for name in SETTING_NAMES {
        assert!(
            help.contains(&format!("--{} ", flag_name(name))),
            "--{name}: {help}"
        );
        assert!(
            help.contains(&format!("[env: {}]", env_name(name))),
            "{name}: {help}"
        );
    }
    assert!(
        help.contains("[default: 64] [env: GEMMA_MAX_RUNNING]"),
        "{help}"
    );
    assert!(
        help.contains("[default: 127.0.0.1:8080] [env: GEMMA_LISTEN]"),
        "{help}"
    );
}
