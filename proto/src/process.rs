//! What every gemma-cluster binary does the same way: logs and shutdown signals.

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
