//! Settings, layered: defaults < TOML file (--config) < environment (GEMMA_*) < command line.

use std::path::PathBuf;

use clap::Parser;
use serde::Deserialize;

/// Command-line flags; every one overrides the file and the environment.
#[derive(Parser, Debug, Default)]
#[command(name = "gemma-coordinator", version, about)]
pub struct Args {
    /// HuggingFace model folder (config.json, tokenizer.json, safetensors).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Tensor-parallel ranks per stage.
    #[arg(long)]
    pub tp: Option<usize>,
    /// Pipeline stages.
    #[arg(long)]
    pub pp: Option<usize>,
    /// Explicit layer count per stage, e.g. 12,6.
    #[arg(long, value_delimiter = ',')]
    pub layers_per_stage: Option<Vec<usize>>,
    /// External workers host:port, stage-major rank order; without it, tp x pp local workers
    /// are started and stopped with the coordinator.
    #[arg(long, value_delimiter = ',')]
    pub workers: Option<Vec<String>>,
    /// HTTP address (port 0: any free port).
    #[arg(long)]
    pub listen: Option<String>,
    /// TOML settings file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Compute dtype of the workers: f32, bf16 or f16.
    #[arg(long)]
    pub dtype: Option<String>,
    /// KV cache memory per worker, MiB.
    #[arg(long)]
    pub kv_budget_mib: Option<u64>,
    /// The gemma-worker binary for local workers (default: next to this binary).
    #[arg(long)]
    pub worker_bin: Option<PathBuf>,
    /// Most tokens in one step; prefill chunks are cut to fit (default 512).
    #[arg(long)]
    pub max_batch_tokens: Option<usize>,
    /// GGUF models: dequantize the weights at load (more memory, f32 kernels) instead of
    /// keeping them in their quantized blocks.
    #[arg(long)]
    pub dequantize: bool,
    /// Most sequences running at once (default 64).
    #[arg(long)]
    pub max_running: Option<usize>,
    /// Most requests waiting for admission before 429 (default 256).
    #[arg(long)]
    pub max_waiting: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub model: PathBuf,
    pub tp: usize,
    pub pp: usize,
    pub layers_per_stage: Option<Vec<usize>>,
    pub workers: Vec<String>,
    pub listen: String,
    pub dtype: String,
    /// GGUF models: dequantize at load instead of keeping quantized blocks.
    pub dequantize: bool,
    pub kv_budget_mib: u64,
    pub block_size: usize,
    pub worker_bin: Option<PathBuf>,
    /// The model name the API reports; default: the model folder's name.
    pub served_model_name: Option<String>,
    /// Deadline of one step across the cluster.
    pub step_timeout_ms: u64,
    /// Deadline of a data-plane wait between workers.
    pub collective_timeout_ms: u64,
    /// Deadline of reaching a worker.
    pub connect_timeout_ms: u64,
    /// Deadline of loading every shard.
    pub load_timeout_s: u64,
    /// Most tokens in one step (prefill chunks are cut to fit).
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    pub max_running: usize,
    /// Most requests waiting for admission; past it, 429 with Retry-After.
    pub max_waiting: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("settings: {0}")]
    Config(#[from] config::ConfigError),
    #[error(
        "settings: no model; pass --model DIR (or `model` in the config file, or GEMMA_MODEL)"
    )]
    NoModel,
}

impl Settings {
    pub fn load(args: &Args) -> Result<Self, SettingsError> {
        use config::{Config, Environment, File, FileFormat};
        let mut b = Config::builder()
            .set_default("model", "")?
            .set_default("tp", 1)?
            .set_default("pp", 1)?
            .set_default("workers", Vec::<String>::new())?
            .set_default("listen", "127.0.0.1:8080")?
            .set_default("dtype", "f32")?
            .set_default("dequantize", false)?
            .set_default("kv_budget_mib", 256)?
            .set_default("block_size", gemma_proto::DEFAULT_BLOCK_SIZE as u64)?
            .set_default("step_timeout_ms", 60_000)?
            .set_default("collective_timeout_ms", 30_000)?
            .set_default("connect_timeout_ms", 5_000)?
            .set_default("load_timeout_s", 1800)?
            .set_default("max_batch_tokens", 512)?
            .set_default("max_running", 64)?
            .set_default("max_waiting", 256)?;
        if let Some(path) = &args.config {
            b = b.add_source(File::from(path.as_path()).format(FileFormat::Toml));
        }
        b = b.add_source(
            Environment::with_prefix("GEMMA")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("workers")
                .with_list_parse_key("layers_per_stage"),
        );
        let s = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        b = b
            .set_override_option("model", s(&args.model))?
            .set_override_option("tp", args.tp.map(|v| v as u64))?
            .set_override_option("pp", args.pp.map(|v| v as u64))?
            .set_override_option(
                "layers_per_stage",
                args.layers_per_stage
                    .clone()
                    .map(|v| v.into_iter().map(|x| x as u64).collect::<Vec<_>>()),
            )?
            .set_override_option("workers", args.workers.clone())?
            .set_override_option("listen", args.listen.clone())?
            .set_override_option("dtype", args.dtype.clone())?
            .set_override_option("dequantize", args.dequantize.then_some(true))?
            .set_override_option("kv_budget_mib", args.kv_budget_mib)?
            .set_override_option("worker_bin", s(&args.worker_bin))?
            .set_override_option("max_batch_tokens", args.max_batch_tokens.map(|v| v as u64))?
            .set_override_option("max_running", args.max_running.map(|v| v as u64))?
            .set_override_option("max_waiting", args.max_waiting.map(|v| v as u64))?;
        let settings: Settings = b.build()?.try_deserialize()?;
        if settings.model.as_os_str().is_empty() {
            return Err(SettingsError::NoModel);
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
