//! gemma-coordinator: computes the shard plan, starts (or connects to) the workers, waits until
//! every shard is loaded, then serves the OpenAI-compatible API.
//!
//! Once serving it prints `gemma-coordinator listening on http://ADDR` on stdout.

use std::future::IntoFuture;
use std::io::Write;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use gemma_coordinator::api::auth::ApiKeys;
use gemma_coordinator::api::limits::{ClientAddr, ConnectionLimit, RateLimiter};
use gemma_coordinator::api::{router, AppState};
use gemma_coordinator::chat::ChatTemplate;
use gemma_coordinator::cluster::{Cluster, LocalWorkers, Prepared, Prober};
use gemma_coordinator::engine::{self, EngineConfig};
use gemma_coordinator::metrics::Metrics;
use gemma_coordinator::settings::{Args, Settings};
use gemma_coordinator::structured::LazyGrammars;
use gemma_coordinator::tokenizer::TextTokenizer;

fn main() -> Result<()> {
    gemma_proto::process::bound_allocator_retention();
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
    // Local workers are started (and respawned) by a thread of their own, which lives as long
    // as they should: their parent-death signal is tied to it.
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

/// How long the workers get to acknowledge `Release` at shutdown.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(1);

async fn serve(
    settings: Settings,
    prepared: Prepared,
    local: Option<LocalWorkers>,
    tokenizer: Arc<TextTokenizer>,
    chat: Option<ChatTemplate>,
    guards: Guards,
) -> Result<()> {
    let max_context = prepared.config.max_position_embeddings;
    let vocab_size = prepared.config.vocab_size;
    // With overlap, as many steps in flight as there are stages: each stage works on its own.
    let pipeline_depth = match settings.pipeline_overlap {
        true => prepared.plan.pp,
        false => 1,
    };
    let cluster = Cluster::connect(prepared, &settings, local).await?;
    let roster = cluster.roster();
    // Every worker, every second, also while idle: the lease stays renewed and a lost worker is
    // noticed before a request needs it.
    tokio::spawn(Prober::new(roster.clone(), cluster.status().clone()).run());
    let engine = engine::spawn(
        cluster,
        tokenizer.clone(),
        EngineConfig {
            max_batch_tokens: settings.max_batch_tokens,
            max_running: settings.max_running,
            max_waiting: settings.max_waiting,
            max_context,
            prefix_caching: settings.prefix_caching,
            pipeline_depth,
            wedged_after: Duration::from_millis(settings.wedged_after_ms),
        },
        Arc::new(Metrics::new()),
    );
    let state = Arc::new(AppState {
        engine,
        grammars: LazyGrammars::new(tokenizer.clone(), vocab_size),
        tokenizer,
        chat,
        model_name: settings.model_name(),
        max_context,
        api_keys: guards.api_keys,
        max_tokens_per_request: settings
            .max_tokens_per_request
            .unwrap_or(NonZeroUsize::new(max_context).unwrap_or(NonZeroUsize::MIN)),
        rate_limiter: guards.rate_limiter,
        vocab_size,
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
    let served = gemma_proto::process::serve_with_drain_deadline(
        |stop| {
            let app = router(state).into_make_service_with_connect_info::<ClientAddr>();
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .into_future()
        },
        Duration::from_secs(5),
    )
    .await
    .context("serving HTTP");
    // A successor (a rolling update) can assign the workers at once instead of waiting for
    // this coordinator's lease to run out.
    roster.release_all(RELEASE_TIMEOUT).await;
    served
}
