//! gemma-coordinator: computes the shard plan, starts (or connects to) the workers, waits until
//! every shard is loaded, then serves the OpenAI-compatible API.
//!
//! Once serving it prints `gemma-coordinator listening on http://ADDR` on stdout.

use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use gemma_coordinator::api::{router, AppState};
use gemma_coordinator::chat::ChatTemplate;
use gemma_coordinator::cluster::{Cluster, Prepared};
use gemma_coordinator::engine::{self, EngineConfig};
use gemma_coordinator::settings::{Args, Settings};
use gemma_coordinator::tokenizer::TextTokenizer;

fn main() -> Result<()> {
    let args = Args::parse();
    init_tracing();
    let settings = Settings::load(&args)?;
    // Everything that can be refused is refused before a worker starts.
    let prepared = Prepared::new(&settings)?;
    let tokenizer = Arc::new(TextTokenizer::from_dir(
        &prepared.model_dir,
        prepared.config.bos_token_id,
        prepared.config.eos_token_id,
    )?);
    let chat = ChatTemplate::from_dir(&prepared.model_dir)?;
    // Spawned from the main thread, which lives as long as the process: the workers' parent-death
    // signal is tied to the spawning thread.
    let local = prepared.spawn_local_workers(&settings)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(settings, prepared, local, tokenizer, chat))
}

async fn serve(
    settings: Settings,
    prepared: Prepared,
    local: Option<gemma_coordinator::cluster::LocalWorkers>,
    tokenizer: Arc<TextTokenizer>,
    chat: Option<ChatTemplate>,
) -> Result<()> {
    let max_context = prepared.config.max_position_embeddings;
    let cluster = Cluster::connect(prepared, &settings, local).await?;
    let engine = engine::spawn(
        cluster,
        tokenizer.clone(),
        EngineConfig {
            max_batch_tokens: settings.max_batch_tokens,
            max_running: settings.max_running,
            max_context,
        },
    );
    let state = Arc::new(AppState {
        engine,
        tokenizer,
        chat,
        model_name: settings.model_name(),
        max_context,
    });
    let listener = tokio::net::TcpListener::bind(&settings.listen)
        .await
        .with_context(|| format!("binding {}", settings.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, model = %state.model_name, "serving");
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "gemma-coordinator listening on http://{addr}")?;
        out.flush()?;
    }
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving HTTP")
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}

fn init_tracing() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
