//! gemma-coordinator: computes the shard plan, starts (or connects to) the workers, waits until
//! every shard is loaded, then serves the OpenAI-compatible API.
//!
//! Once serving it prints `gemma-coordinator listening on http://ADDR` on stdout.

use std::future::IntoFuture;
use std::io::Write;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use gemma_coordinator::api::auth::ApiKeys;
use gemma_coordinator::api::limits::{ClientAddr, ConnectionLimit, RateLimiter};
use gemma_coordinator::api::{router, AppState};
use gemma_coordinator::chat::ChatTemplate;
use gemma_coordinator::cluster::{Cluster, HealthProbe, Prepared};
use gemma_coordinator::engine::{self, EngineConfig};
use gemma_coordinator::metrics::Metrics;
use gemma_coordinator::settings::{Args, Settings};
use gemma_coordinator::tokenizer::TextTokenizer;

fn main() -> Result<()> {
    let args = Args::from_command_line();
    gemma_proto::process::init_tracing();
    let settings = Settings::load(&args)?;
    // Everything that can be refused is refused before a worker starts.
    let api_keys = ApiKeys::load(
        settings.api_key.as_deref(),
        settings.api_key_file.as_deref(),
    )?;
    let rate_limiter =
        RateLimiter::from_settings(settings.rate_limit_per_second, settings.rate_limit_burst)?;
    let prepared = Prepared::new(&settings)?;
    let tokenizer = Arc::new(TextTokenizer::from_dir(
        &prepared.tokenizer_dir,
        prepared.config.bos_token_id,
        prepared.config.eos_token_id,
    )?);
    let chat = ChatTemplate::from_dir(&prepared.tokenizer_dir)?;
    // Spawned from the main thread, which lives as long as the process: the workers' parent-death
    // signal is tied to the spawning thread.
    let local = prepared.spawn_local_workers(&settings)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let guards = Guards {
        api_keys,
        rate_limiter,
    };
    rt.block_on(serve(settings, prepared, local, tokenizer, chat, guards))
}

/// What the API checks besides each request's fields: who may call it and how often.
struct Guards {
    api_keys: Option<ApiKeys>,
    rate_limiter: Option<RateLimiter>,
}

async fn serve(
    settings: Settings,
    prepared: Prepared,
    local: Option<gemma_coordinator::cluster::LocalWorkers>,
    tokenizer: Arc<TextTokenizer>,
    chat: Option<ChatTemplate>,
    guards: Guards,
) -> Result<()> {
    let max_context = prepared.config.max_position_embeddings;
    let cluster = Cluster::connect(prepared, &settings, local).await?;
    let probe = cluster.health_probe();
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel();
    let engine = engine::spawn(
        cluster,
        tokenizer.clone(),
        EngineConfig {
            max_batch_tokens: settings.max_batch_tokens,
            max_running: settings.max_running,
            max_waiting: settings.max_waiting,
            max_context,
        },
        Arc::new(Metrics::new()),
        Some(failed_tx),
    );
    let unready = Arc::new(Mutex::new(None));
    tokio::spawn(watch_readiness(probe, failed_rx, unready.clone()));
    let state = Arc::new(AppState {
        engine,
        tokenizer,
        chat,
        model_name: settings.model_name(),
        max_context,
        unready,
        api_keys: guards.api_keys,
        max_tokens_per_request: settings
            .max_tokens_per_request
            .unwrap_or(NonZeroUsize::new(max_context).unwrap_or(NonZeroUsize::MIN)),
        rate_limiter: guards.rate_limiter,
    });
    let listener = tokio::net::TcpListener::bind(&settings.listen)
        .await
        .with_context(|| format!("binding {}", settings.listen))?;
    let addr = listener.local_addr()?;
    let listener = ConnectionLimit::new(listener, settings.max_connections);
    tracing::info!(%addr, model = %state.model_name, "serving");
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "gemma-coordinator listening on http://{addr}")?;
        out.flush()?;
    }
    // In-flight generations get a few seconds to finish; Kubernetes' default grace is 30 s, and
    // the workers still have to be stopped after this.
    gemma_proto::process::serve_with_drain_deadline(
        |stop| {
            let app = router(state).into_make_service_with_connect_info::<ClientAddr>();
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .into_future()
        },
        Duration::from_secs(5),
    )
    .await
    .context("serving HTTP")
}

/// Keeps /ready's answer current: probes every worker every 2 s; a failed step marks the cluster
/// unready for good (its data plane is torn down).
async fn watch_readiness(
    probe: HealthProbe,
    mut failed: tokio::sync::oneshot::Receiver<String>,
    unready: Arc<Mutex<Option<String>>>,
) {
    let set = |v: Option<String>| {
        *unready.lock().unwrap_or_else(|e| e.into_inner()) = v;
    };
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut engine_running = true;
    loop {
        tokio::select! {
            reason = &mut failed, if engine_running => {
                match reason {
                    Ok(reason) => {
                        set(Some(format!("a cluster step failed: {reason}")));
                        return;
                    }
                    // The engine stopped without failing: keep probing the workers.
                    Err(_) => engine_running = false,
                }
            }
            _ = tick.tick() => {
                let status = probe.check(Duration::from_secs(1)).await;
                if let Err(reason) = &status {
                    tracing::warn!(%reason, "cluster not ready");
                }
                set(status.err());
            }
        }
    }
}
