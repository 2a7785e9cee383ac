//! Signals: the first SIGTERM or SIGINT starts a graceful drain; a second one while
//! draining exits at once with status 130, for an operator who cannot wait. SIGHUP reloads
//! the configuration (see [`crate::reload`]).

use tokio::signal::unix::{signal, SignalKind};

/// Exit status of a forced (second-signal) shutdown.
pub const FORCED_EXIT_CODE: i32 = 130;

/// Reloads `shared`'s configuration on every SIGHUP, for as long as the task runs. The
/// outcome is logged by the reload itself.
pub async fn reload_on_sighup(shared: std::sync::Arc<crate::chain::Shared>) -> std::io::Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    while hup.recv().await.is_some() {
        tracing::info!(signal = "SIGHUP", "configuration reload requested");
        // Reading a file: keep it off the acceptor's thread.
        let shared = std::sync::Arc::clone(&shared);
        let _ = tokio::task::spawn_blocking(move || shared.reload()).await;
    }
    Ok(())
}

/// SIGTERM and SIGINT, caught from the moment [`install`](Self::install) returns: a server
/// installs it before it binds, so a signal sent as soon as it says `listening` drains it
/// (installed lazily, at the first poll of the shutdown future, a SIGTERM right after
/// `listening` killed the process without a drain).
pub struct Shutdown {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Shutdown {
    /// Must be called inside a tokio runtime.
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves on the first SIGTERM or SIGINT, after arming the second-signal exit.
    pub async fn requested(mut self) {
        let name = tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        };
        tracing::info!(
            signal = name,
            "shutdown requested; a second signal exits at once"
        );
        let Self { mut term, mut int } = self;
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            tracing::warn!("second signal: exiting without draining");
            std::process::exit(FORCED_EXIT_CODE);
        });
    }
}
