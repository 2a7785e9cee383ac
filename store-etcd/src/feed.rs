//! The history feed: one etcd watch over the store's whole prefix, from where the
//! gateway's history starts, applying each revision to the ring watchers read and
//! publishing it ([`capkv_store::Changes`]); revisions the gateway applied itself (its own
//! puts, when nothing before them was missing) are skipped. Records' and the secret's
//! changes advance the revision without entering the ring. A broken watch (a member killed, a network
//! failure) is made again from the next revision wanted, so nothing is skipped or applied
//! twice; a revision etcd has compacted away meanwhile becomes the start of the history
//! (watchers behind it get `compacted`).

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchResponse};

use crate::engine::{lock, to_capkv, version_of, Inner};

const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Runs until the engine's runtime stops. `next`: the first etcd revision wanted.
pub(crate) async fn run(inner: Arc<Inner>, mut next: i64) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(next)
            .with_progress_notify();
        let mut watch = inner.client().watch_client();
        let stream = tokio::time::timeout(
            inner.request_timeout,
            watch.watch(inner.keys.root.clone(), Some(opts)),
        )
        .await;
        let mut stream = match stream {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "etcd watch for the history failed; trying again");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            Err(_) => {
                tracing::warn!("etcd watch for the history did not start; trying again");
                continue;
            }
        };
        // Bounded by the stream: it ends or fails when the connection does.
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    backoff = BACKOFF_MIN;
                    if resp.compact_revision() > 0 {
                        let oldest = resp.compact_revision();
                        tracing::warn!(
                            from = to_capkv(next, inner.epoch),
                            oldest = to_capkv(oldest, inner.epoch),
                            "etcd compacted revisions the history had not read: watchers \
                             behind them will be told `compacted`"
                        );
                        lock(&inner.history)
                            .ring
                            .forget_through(to_capkv(oldest - 1, inner.epoch));
                        next = next.max(oldest);
                        break;
                    }
                    if resp.canceled() {
                        tracing::warn!(
                            reason = resp.cancel_reason(),
                            "etcd canceled the history watch"
                        );
                        break;
                    }
                    next = apply(&inner, &resp, next);
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "etcd history watch broke; watching again");
                    break;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Applies one watch response; returns the next revision wanted.
fn apply(inner: &Inner, resp: &WatchResponse, next: i64) -> i64 {
    let events = resp.events();
    let through = if events.is_empty() {
        // A progress notice: every event up to its header's revision has been sent.
        // (The answer to the watch's creation says nothing of what is still to come.)
        match resp.header() {
            Some(h) if !resp.created() => h.revision(),
            _ => return next,
        }
    } else {
        events
            .last()
            .and_then(|e| e.kv())
            .map_or(next - 1, |kv| kv.mod_revision())
    };
    if through < next {
        return next;
    }
    let mut h = lock(&inner.history);
    for e in events {
        let Some(kv) = e.kv() else { continue };
        let at = to_capkv(kv.mod_revision(), inner.epoch);
        // A watch made again may repeat what was applied, and this gateway's own puts are
        // applied when they commit (`put_done`).
        if at <= h.applied {
            continue;
        }
        let Some(key) = inner.keys.user(kv.key()) else {
            continue;
        };
        // etcd v3 has two kinds of event; etcd-client panics on any other, which only a
        // server speaking another protocol version could send.
        match e.event_type() {
            EventType::Put => h.ring.push(key, kv.value(), Some(version_of(kv)), at),
            EventType::Delete => h.ring.push(key, &[], None, at),
        }
    }
    h.ring.trim();
    let applied = to_capkv(through, inner.epoch);
    h.applied = h.applied.max(applied);
    drop(h);
    // After `applied` moved (see `seen`).
    inner.applied_through(applied);
    through + 1
}
