//! The coordinator's settings, each declared once (in the `declare_settings!` list below) and
//! layered: defaults < TOML file (`--config`) < environment (`GEMMA_*`) < command line.
//!
//! A setting `max_running` is the file key `max_running`, the flag `--max-running` and the
//! variable `GEMMA_MAX_RUNNING`. Every layer is an [`Args`]: the command line as clap parses it,
//! the file as the config crate reads it, and each variable parsed as its flag would be, so a
//! value means the same wherever it comes from. A file key or `GEMMA_*` variable that is not a
//! setting is refused with the nearest valid name, never ignored.

use std::ffi::{OsStr, OsString};
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};

use clap::{CommandFactory, FromArgMatches, Parser};
use serde::{Deserialize, Serialize};

use crate::names::nearest;

/// The Settings field type of a setting: its value type, or an `Option` of it when the setting
/// has neither a default nor is required.
macro_rules! setting_type {
    ($ty:ty, [$default:expr], []) => { $ty };
    ($ty:ty, [], [required]) => { $ty };
    ($ty:ty, [], [optional]) => { Option<$ty> };
}

/// A setting's entry in [`Args::defaults`].
macro_rules! setting_default {
    ([$default:expr]) => {
        Some($default)
    };
    ([]) => {
        None
    };
}

/// A setting's final value from the merged layer.
macro_rules! setting_value {
    ($layer:ident, $name:ident, [$default:expr], []) => {
        $layer.$name.unwrap_or_else(|| $default)
    };
    ($layer:ident, $name:ident, [], [optional]) => {
        $layer.$name
    };
    ($layer:ident, $name:ident, [], [required]) => {
        $layer
            .$name
            .ok_or_else(|| SettingsError::missing(stringify!($name)))?
    };
}

/// Declares every setting once: its doc (the flag's help), extra clap attributes, name, value
/// type, and either `= default`, `, required` or `, optional` (no default; `None` when unset).
/// Generates [`Args`] (one layer: every setting optional), [`Settings`] (the merged result) and
/// [`SETTING_NAMES`].
macro_rules! declare_settings {
    ($(
        $(#[doc = $doc:literal])*
        $(#[arg($($arg:tt)*)])*
        $name:ident: $ty:ty $(= $default:expr)? $(, $kind:ident)?;
    )*) => {
        /// One layer of settings (command line, file or environment): what it leaves unset comes
        /// from the layer below.
        #[derive(Parser, Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
        #[command(name = "gemma-coordinator", version, about, after_help = AFTER_HELP)]
        #[serde(default)]
        pub struct Args {
            /// TOML settings file (keys as in deploy/config.example.toml).
            #[arg(long, value_name = "FILE")]
            #[serde(skip)]
            pub config: Option<PathBuf>,
            $(
                $(#[doc = $doc])*
                #[arg(long)]
                $(#[arg($($arg)*)])*
                #[serde(skip_serializing_if = "Option::is_none")]
                pub $name: Option<$ty>,
            )*
        }

        /// The coordinator's settings, every layer applied.
        #[derive(Debug, Clone, Serialize)]
        pub struct Settings {
            $(
                $(#[doc = $doc])*
                pub $name: setting_type!($ty, [$($default)?], [$($kind)?]),
            )*
        }

        /// Every setting's name: its file key; its flag and variable follow from it.
        pub const SETTING_NAMES: &[&str] = &[$(stringify!($name)),*];

        impl Args {
            /// The layer under all others: every setting's default (`None` for the model and
            /// the settings without one).
            pub fn defaults() -> Self {
                Self {
                    config: None,
                    $($name: setting_default!([$($default)?]),)*
                }
            }

            /// This layer over `lower`: what this one leaves unset comes from `lower`.
            pub fn over(self, lower: Self) -> Self {
                Self {
                    config: self.config.or(lower.config),
                    $($name: self.$name.or(lower.$name),)*
                }
            }
        }

        impl Settings {
            fn resolve(layer: Args) -> Result<Self, SettingsError> {
                Ok(Self {
                    $($name: setting_value!(layer, $name, [$($default)?], [$($kind)?]),)*
                })
            }
        }
    };
}

declare_settings! {
    /// The model: a HuggingFace folder (config.json, tokenizer.json, safetensors), a .gguf file,
    /// or a folder holding one.
    #[arg(value_name = "PATH")]
    model: PathBuf, required;
    /// Tensor-parallel ranks per stage.
    #[arg(value_name = "N")]
    tp: usize = 1;
    /// Pipeline stages.
    #[arg(value_name = "N")]
    pp: usize = 1;
    /// Explicit layer count per stage, e.g. 12,6 (default: as even as the plan allows).
    #[arg(value_name = "N,N", value_delimiter = ',')]
    layers_per_stage: Vec<usize>, optional;
    /// External workers host:port, stage-major rank order; without them, tp x pp local workers
    /// are started and stopped with the coordinator.
    #[arg(value_name = "HOST:PORT,...", value_delimiter = ',')]
    workers: Vec<String> = Vec::new();
    /// HTTP address (port 0: any free port).
    #[arg(value_name = "ADDR")]
    listen: String = "127.0.0.1:8080".to_string();
    /// Compute dtype of the workers: f32, bf16 or f16.
    dtype: String = "f32".to_string();
    /// GGUF models: dequantize the weights at load (more memory, f32 kernels) instead of
    /// keeping them in their quantized blocks. `--dequantize` alone means true.
    #[arg(
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new(),
    )]
    dequantize: bool = false;
    /// KV cache memory per worker, MiB; overrides kv_memory_fraction. Default: sized from each
    /// worker's host (kv_memory_fraction).
    #[arg(value_name = "MIB")]
    kv_budget_mib: u64, optional;
    /// Without kv_budget_mib: the part of the memory available on a worker's host (MemAvailable,
    /// or its cgroup's room if less) that the cluster's workers there fill with their weights
    /// and KV caches, split equally between them; each pool holds at most max_running sequences
    /// of the model's whole context. As vLLM's gpu_memory_utilization.
    #[arg(value_name = "FRACTION")]
    kv_memory_fraction: f64 = 0.5;
    /// Tokens per KV cache block.
    #[arg(value_name = "N")]
    block_size: usize = gemma_proto::DEFAULT_BLOCK_SIZE;
    /// Reuse the KV blocks of cached prompt prefixes (kept until their space is needed), so a
    /// request prefills only what the cache lacks; output is the same either way.
    /// `--prefix-caching=false` turns it off.
    #[arg(
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new(),
    )]
    prefix_caching: bool = true;
    /// With pp > 1, keep one step in flight per pipeline stage, each carrying its own
    /// sequences, so that every stage works at once instead of waiting for the others; output
    /// is the same either way. Off by default: on two shared cores it measured slower (smaller
    /// batches, and no idle core to overlap on); `--pipeline-overlap` turns it on.
    #[arg(
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new(),
    )]
    pipeline_overlap: bool = false;
    /// The gemma-worker binary for local workers (default: next to this binary).
    #[arg(value_name = "PATH")]
    worker_bin: PathBuf, optional;
    /// The model name the API reports (default: the model's folder or file name).
    #[arg(value_name = "NAME")]
    served_model_name: String, optional;
    /// Deadline of one step across the cluster, ms. Default: derived from the recent step times
    /// (8x what a step of its size took lately, at least 3 s; 60 s before any step was timed).
    #[arg(value_name = "MS")]
    step_timeout_ms: u64, optional;
    /// Deadline of a data-plane wait between workers, ms.
    #[arg(value_name = "MS")]
    collective_timeout_ms: u64 = 30_000;
    /// A worker releases its shard by itself once this coordinator has been silent this long
    /// (no probe, step or assignment), so a successor can take it over.
    #[arg(value_name = "MS")]
    lease_ms: u64 = 30_000;
    /// /health answers 503 (wedged) once the engine loop is this late past what its step or its
    /// idle wait may take, ms; a cluster that is down and healing is not wedged.
    #[arg(value_name = "MS")]
    wedged_after_ms: u64 = 30_000;
    /// Deadline of reaching a worker, ms.
    #[arg(value_name = "MS")]
    connect_timeout_ms: u64 = 5_000;
    /// Deadline of loading every shard, s.
    #[arg(value_name = "S")]
    load_timeout_s: u64 = 1800;
    /// Most tokens in one step; prefill chunks are cut to fit.
    #[arg(value_name = "N")]
    max_batch_tokens: usize = 512;
    /// Most sequences running at once.
    #[arg(value_name = "N")]
    max_running: usize = 64;
    /// Most requests waiting for admission; past it, 429 with Retry-After.
    #[arg(value_name = "N")]
    max_waiting: usize = 256;
    /// Most HTTP connections open at once; a connection past it is answered 503 and closed.
    #[arg(value_name = "N")]
    max_connections: NonZeroUsize = crate::api::limits::DEFAULT_MAX_CONNECTIONS;
    /// Most tokens one request may ask to generate (max_tokens, per choice); a larger max_tokens
    /// is refused with 400 (default: the model's context length).
    #[arg(value_name = "N")]
    max_tokens_per_request: NonZeroUsize, optional;
    /// Requests per second each API key (without keys: each client address) may send to the /v1
    /// routes; past it, 429 with Retry-After. Unset: no rate limit.
    #[arg(value_name = "N")]
    rate_limit_per_second: f64, optional;
    /// Requests a key may send at once before the rate applies (the bucket's size; default: one
    /// second's worth, at least 1).
    #[arg(value_name = "N")]
    rate_limit_burst: NonZeroU32, optional;
    /// An API key: every /v1 request must send `Authorization: Bearer KEY` (/health, /ready and
    /// /metrics stay open). Prefer GEMMA_API_KEY or api_key_file to a flag other users can see.
    #[arg(value_name = "KEY")]
    api_key: String, optional;
    /// A file of API keys, one per line (blank lines and # comments skipped), accepted as well.
    #[arg(value_name = "PATH")]
    api_key_file: PathBuf, optional;
    /// This coordinator's certificate (PEM, leaf first). With tls_key and tls_ca: mutual TLS to
    /// the workers, which must present certificates from the same CA naming their hosts.
    #[arg(value_name = "PEM")]
    tls_cert: PathBuf, optional;
    /// The private key of tls_cert (PEM).
    #[arg(value_name = "PEM")]
    tls_key: PathBuf, optional;
    /// The CA that signs every certificate of the cluster (PEM).
    #[arg(value_name = "PEM")]
    tls_ca: PathBuf, optional;
}

const AFTER_HELP: &str = "Every setting can also come from a TOML file (--config FILE, key \
max_running) or the environment (GEMMA_MAX_RUNNING); flags win over the environment, which wins \
over the file. Unknown keys and GEMMA_* variables are refused.";

/// The prefix of every setting's environment variable.
const ENV_PREFIX: &str = "GEMMA_";

/// `GEMMA_*` variables that are not settings: the fetch scripts' cache and the tests' model and
/// tokenizer locations. A coordinator started from those scripts or tests sees them; it ignores
/// them rather than refusing them.
pub const FOREIGN_ENV: &[&str] = &["GEMMA_CACHE", "GEMMA_REAL_MODEL", "GEMMA_TOKENIZER_DIR"];

/// A setting's command-line flag, without the leading dashes.
pub fn flag_name(setting: &str) -> String {
    setting.replace('_', "-")
}

/// A setting's environment variable.
pub fn env_name(setting: &str) -> String {
    format!("{ENV_PREFIX}{}", setting.to_ascii_uppercase())
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("settings: {0}")]
    File(#[from] config::ConfigError),
    #[error(
        "settings: unknown setting `{name}` in {origin}; {}valid settings: {valid}",
        did_you_mean(.nearest)
    )]
    Unknown {
        name: String,
        /// The file's path, or "the environment".
        origin: String,
        nearest: Option<String>,
        /// The names this origin accepts, comma-separated, and what else is worth knowing.
        valid: String,
    },
    #[error("settings: {var}: {reason}")]
    Environment { var: String, reason: String },
    #[error("settings: no {name}; pass --{flag} (or `{name}` in the config file, or {env})")]
    Missing {
        name: &'static str,
        flag: String,
        env: String,
    },
}

impl SettingsError {
    fn missing(name: &'static str) -> Self {
        Self::Missing {
            name,
            flag: flag_name(name),
            env: env_name(name),
        }
    }
}

fn did_you_mean(nearest: &Option<String>) -> String {
    match nearest {
        Some(n) => format!("did you mean `{n}`? "),
        None => String::new(),
    }
}

impl Args {
    /// The process's command line (clap exits on a bad flag, `--help` and `--version`).
    pub fn from_command_line() -> Self {
        let matches = Self::command_with_defaults().get_matches();
        Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }

    /// The clap command, each setting's help followed by its default and its variable, both
    /// taken from the declaration so that `--help` cannot drift from it.
    pub fn command_with_defaults() -> clap::Command {
        let defaults = serde_json::to_value(Self::defaults()).unwrap_or_default();
        let mut command = Self::command();
        for name in SETTING_NAMES {
            let default = match defaults.get(name).map(help_text) {
                Some(text) if !text.is_empty() => format!("[default: {text}] "),
                _ => String::new(),
            };
            command = command.mut_arg(name, |arg| {
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                arg.help(format!("{help} {default}[env: {}]", env_name(name)))
            });
        }
        command
    }

    /// The settings in a TOML file. A key that is not a setting is refused, naming the nearest.
    pub fn from_file(path: &Path) -> Result<Self, SettingsError> {
        use config::{Config, File, FileFormat, Source};
        let file = Config::builder()
            .add_source(File::from(path).format(FileFormat::Toml))
            .build()?;
        let names: Vec<String> = SETTING_NAMES.iter().map(|s| s.to_string()).collect();
        for key in file.collect()?.keys() {
            if !SETTING_NAMES.contains(&key.as_str()) {
                return Err(unknown(key, &path.display().to_string(), &names, ""));
            }
        }
        Ok(file.try_deserialize()?)
    }

    /// The settings in `GEMMA_*` variables, each parsed as its flag would be (`GEMMA_WORKERS=a:1,b:2`
    /// is `--workers=a:1,b:2`). A `GEMMA_*` variable that is neither a setting nor in
    /// [`FOREIGN_ENV`] is refused, naming the nearest; other variables are not looked at.
    pub fn from_env(
        vars: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Result<Self, SettingsError> {
        let mut layer = Args::default();
        for (var, value) in vars {
            let Some(var) = var.to_str() else { continue };
            let Some(suffix) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if FOREIGN_ENV.contains(&var) {
                continue;
            }
            let name = suffix.to_ascii_lowercase();
            if !SETTING_NAMES.contains(&name.as_str()) {
                let names: Vec<String> = SETTING_NAMES.iter().map(|s| env_name(s)).collect();
                let note = format!(
                    "; {} are not settings and are ignored",
                    FOREIGN_ENV.join(", ")
                );
                return Err(unknown(var, "the environment", &names, &note));
            }
            layer = Self::from_one_variable(var, &name, &value)?.over(layer);
        }
        Ok(layer)
    }

    fn from_one_variable(var: &str, name: &str, value: &OsStr) -> Result<Self, SettingsError> {
        let mut arg = OsString::from(format!("--{}=", flag_name(name)));
        arg.push(value);
        Self::try_parse_from([OsString::from("gemma-coordinator"), arg]).map_err(|e| {
            // clap's first line says what is wrong with the value; its usage lines are about flags.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            SettingsError::Environment {
                var: var.to_string(),
                reason: first.trim_start_matches("error: ").to_string(),
            }
        })
    }
}

/// A default as a flag would spell it: `127.0.0.1:8080`, `a:1,b:2`, `64`.
fn help_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(items) => {
            items.iter().map(help_text).collect::<Vec<_>>().join(",")
        }
        other => other.to_string(),
    }
}

/// The refusal of `name`, which `origin` gave but is not one of `valid`; `note` follows the list.
fn unknown(name: &str, origin: &str, valid: &[String], note: &str) -> SettingsError {
    SettingsError::Unknown {
        name: name.to_string(),
        origin: origin.to_string(),
        nearest: nearest(name, valid.iter().map(String::as_str)).map(str::to_string),
        valid: format!("{}{note}", valid.join(", ")),
    }
}

impl Settings {
    /// The command line `args` over the process's `GEMMA_*` environment over the `--config`
    /// file over the defaults.
    pub fn load(args: &Args) -> Result<Self, SettingsError> {
        Self::load_with_env(args, std::env::vars_os())
    }

    /// [`Self::load`] with the given environment instead of the process's.
    pub fn load_with_env(
        args: &Args,
        env: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Result<Self, SettingsError> {
        let file = match &args.config {
            Some(path) => Args::from_file(path)?,
            None => Args::default(),
        };
        let env = Args::from_env(env)?;
        let settings = Self::resolve(args.clone().over(env).over(file).over(Args::defaults()))?;
        if settings.model.as_os_str().is_empty() {
            return Err(SettingsError::missing("model"));
        }
        Ok(settings)
    }

    pub fn model_name(&self) -> String {
        self.served_model_name.clone().unwrap_or_else(|| {
            // A .gguf file is named without its extension.
            let name = match self.model.extension().is_some_and(|e| e == "gguf") {
                true => self.model.file_stem(),
                false => self.model.file_name(),
            };
            name.map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "gemma".to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_far_name_gets_no_suggestion() {
        let valid: Vec<String> = SETTING_NAMES.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            nearest("max_runing", valid.iter().map(String::as_str)),
            Some("max_running")
        );
        assert_eq!(
            nearest("Block_Sise", valid.iter().map(String::as_str)),
            Some("block_size")
        );
        assert_eq!(
            nearest("completely_unrelated", valid.iter().map(String::as_str)),
            None
        );
    }
}
