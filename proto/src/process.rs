//! What every gemma-cluster binary does the same way: logs, shutdown signals, and giving freed
//! memory back.

/// Logs to stderr (stdout carries the binaries' one-line address announcements), filtered by
/// RUST_LOG (default info), colored only on a terminal.
pub fn init_tracing() {
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

/// Resolves on SIGINT or SIGTERM (what Kubernetes sends before killing a pod).
pub async fn shutdown_signal() {
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

/// Serves until SIGINT or SIGTERM, then lets open connections finish for at most `grace`.
///
/// `serve` gets the future that tells the server to stop accepting and drain. Servers' own
/// graceful shutdown waits for every connection to close, and a peer that keeps its connection
/// open (an HTTP/2 channel, a keep-alive client) would hold the process past any orchestrator's
/// patience: past `grace` the drain is abandoned and the process goes on to exit.
pub async fn serve_with_drain_deadline<F, T, E>(
    serve: impl FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> F,
    grace: std::time::Duration,
) -> Result<(), E>
where
    F: std::future::Future<Output = Result<T, E>>,
{
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = serve(Box::pin(async move {
        let _ = stop_rx.await;
    }));
    tokio::pin!(server);
    tokio::select! {
        done = &mut server => return done.map(|_| ()),
        () = shutdown_signal() => {}
    }
    let _ = stop_tx.send(());
    match tokio::time::timeout(grace, server).await {
        Ok(done) => done.map(|_| ()),
        Err(_) => {
            tracing::warn!(
                ?grace,
                "connections still open after the drain deadline; exiting"
            );
            Ok(())
        }
    }
}

/// Gives the memory that this process has freed back to the kernel. glibc's allocator keeps
/// freed pages in its per-thread arenas at their high-water mark: a serving process whose batch
/// shapes (and so its activation and logits buffers) change step by step would otherwise stay
/// as large as its largest burst. Called when a process goes idle and after a re-assignment, never
/// between two steps of a busy cluster (it walks every arena).
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the kernel; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Above this size an allocation gets its own pages from the kernel and gives them back when
/// freed, and past this much free memory at the top of an arena, the arena shrinks.
const ALLOCATOR_RETENTION_BYTES: i32 = 4 << 20;

/// Bounds what glibc's allocator keeps of freed memory. By default it raises its mmap and trim
/// thresholds to the largest buffer freed so far (up to 32 and 64 MiB), so every thread's arena
/// keeps tens of MiB of freed activation and logits buffers resident, and a worker re-assigned
/// under load (new compute thread, new arena) grew by that much each time: the soak measured
/// +85 % over two heals even after `malloc_trim`, which does not shrink an arena's top. Fixed
/// thresholds keep the large buffers of a step (≥ 4 MiB: prefill activations, logits) out of the
/// arenas; a buffer that large costs a few hundred page faults per step, nothing beside its
/// compute. Call first thing in `main`, before any thread starts.
pub fn bound_allocator_retention() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, ALLOCATOR_RETENTION_BYTES);
        libc::mallopt(libc::M_TRIM_THRESHOLD, ALLOCATOR_RETENTION_BYTES);
    }
}
