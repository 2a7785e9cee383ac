//! The lease reaper: revokes leases past their deadline, so that their keys are deleted
//! within a fraction of a second of their TTL (see `capkv_store::lease`).
//!
//! One task per server (on the acceptor's runtime), waking at the earliest lease deadline
//! and at least every [`REAP_EVERY`] (a lease granted since its last look may end sooner),
//! sending the store one `ExpireLeases` write when any deadline has passed. The write goes
//! through the store's write path like any other, so its deletes are ordered, durable and
//! seen by watchers like a client's.

use std::sync::Arc;
use std::time::Duration;

use capkv_store::Store;
use tokio::time::Instant;

/// Longest the reaper sleeps: how late past its deadline a lease may be revoked, at most.
pub const REAP_EVERY: Duration = Duration::from_millis(250);

/// Runs until aborted (the server's shutdown).
pub async fn reap(store: Arc<dyn Store>) {
    loop {
        let (_, next) = store.lease_clock();
        let now = std::time::Instant::now();
        match next {
            Some(deadline) if deadline <= now => {
                let expired = store.apply(capkv_store::write::ExpireLeases, None).await;
                match expired {
                    Ok(n) => {
                        metrics::counter!(crate::metrics::LEASES_EXPIRED_TOTAL).increment(n);
                        tracing::debug!(leases = n, "leases expired");
                    }
                    Err(e) => {
                        // Retried at the next wake-up: a lease is revoked late, never lost.
                        tracing::warn!(error = %e, "expiring leases failed");
                        tokio::time::sleep(REAP_EVERY).await;
                    }
                }
            }
            Some(deadline) => {
                let wait = deadline.saturating_duration_since(now).min(REAP_EVERY);
                tokio::time::sleep_until(Instant::now() + wait).await;
            }
            None => tokio::time::sleep(REAP_EVERY).await,
        }
    }
}
