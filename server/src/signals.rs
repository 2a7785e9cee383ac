//! Shutdown signals: the first SIGTERM or SIGINT starts a graceful drain; a second one
//! while draining exits at once with status 130, for an operator who cannot wait.

use tokio::signal::unix::{signal, SignalKind};

/// Exit status of a forced (second-signal) shutdown.
pub const FORCED_EXIT_CODE: i32 = 130;

/// Resolves on the first SIGTERM or SIGINT, after arming the second-signal exit.
pub async fn shutdown_requested() -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(
        signal = name,
        "shutdown requested; a second signal exits at once"
    );
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::warn!("second signal: exiting without draining");
        std::process::exit(FORCED_EXIT_CODE);
    });
    Ok(())
}
