//! Reply backpressure: a connection whose peer does not read its replies stops being read.
//!
//! Why: capnp-rpc queues every reply in an unbounded write queue, and a call stops counting
//! as in flight when its handler returns, not when its reply has left. A client that
//! pipelines 2,000 gets of a 1 MiB value and never reads took the server past 2 GiB. The
//! fix follows gRPC's flow control and Redis's output-buffer limit:
//!
//! - the server counts each reply's bytes when it is built ([`ReplyBacklog::queued`]:
//!   capkv's engine counts every message exactly as it queues it, and on capnp-rpc's
//!   `RpcSystem` each handler its estimate) and the socket writer uncounts bytes as they leave
//!   ([`ReplyBacklog::written`]: capkv's engine's writer, or `transport::CoalescingWriter`
//!   under `RpcSystem`);
//! - the frame layer hands the RPC system its next message only while the connection's
//!   unsent bytes are within its bound, and, while the server-wide [`ReplyBudget`] is
//!   exhausted, only to connections with nothing unsent ([`ReplyBacklog::poll_room`]).
//!   A paused connection takes no new calls; calls already running finish and their
//!   replies queue (so one reply larger than the bound still goes out, alone);
//! - the server closes a connection that stays paused without its writer making progress
//!   for the slow-reader timeout ([`ReplyBacklog::stalled_for`]).
//!
//! A reply's count starts when its handler returns, so the bound can be overshot by the
//! calls already dispatched when it is crossed: at most the per-connection in-flight limit
//! of replies, and in practice one (each handler returns before the next message is read).
//! Counts are estimates from the reply's encoded size; headers and messages capkv does not
//! count (`Finish`, `Return` of a release) only make the writer uncount a little early.
//!
//! All of it lives on the connection's thread (`Cell`s, one `Waker`) except the
//! server-wide budget, an atomic.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio::time::{Duration, Instant};

/// Reply bytes produced but not yet written, over all connections, and the bound on them.
pub struct ReplyBudget {
    max_bytes: usize,
    unsent: AtomicUsize,
    /// Connections paused right now (per-connection bound or the budget).
    paused: AtomicUsize,
    /// Pauses so far, over all connections.
    pauses: std::sync::atomic::AtomicU64,
}

impl ReplyBudget {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            unsent: AtomicUsize::new(0),
            paused: AtomicUsize::new(0),
            pauses: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Times a connection was paused so far, over all connections.
    pub fn pauses(&self) -> u64 {
        self.pauses.load(Ordering::Relaxed)
    }

    /// Reply bytes waiting to be written, over all connections.
    pub fn unsent_bytes(&self) -> usize {
        self.unsent.load(Ordering::Relaxed)
    }

    /// Connections not being read because of their unsent replies.
    pub fn paused_connections(&self) -> usize {
        self.paused.load(Ordering::Relaxed)
    }

    fn exhausted(&self) -> bool {
        self.unsent_bytes() > self.max_bytes
    }
}

/// One connection's unsent reply bytes (see the module docs).
pub struct ReplyBacklog {
    budget: Arc<ReplyBudget>,
    unsent: Cell<usize>,
    /// The per-connection bound in force; the server sets it from its reloadable settings.
    max_bytes: Cell<usize>,
    /// The reader, parked while the connection is over its bound.
    reader: Cell<Option<Waker>>,
    /// The stall watcher, parked until the connection is paused.
    watcher: Cell<Option<Waker>>,
    /// When the connection was paused (`None` while it is read).
    paused_since: Cell<Option<Instant>>,
    /// When the writer last sent bytes while the connection was paused (a write before
    /// the pause does not matter: a stall is measured from the later of the two).
    last_write: Cell<Instant>,
    /// The RPC engine counts every message it queues itself ([`ReplyBacklog::count_at_send`]),
    /// so handlers need not estimate their replies.
    counted_at_send: Cell<bool>,
}

impl ReplyBacklog {
    pub fn new(budget: Arc<ReplyBudget>, max_bytes: usize) -> Self {
        Self {
            budget,
            unsent: Cell::new(0),
            max_bytes: Cell::new(max_bytes),
            reader: Cell::new(None),
            watcher: Cell::new(None),
            paused_since: Cell::new(None),
            last_write: Cell::new(Instant::now()),
            counted_at_send: Cell::new(false),
        }
    }

    /// From now on the bytes are counted where messages are queued for the writer (capkv's
    /// engine, exactly); handlers skip their estimate ([`ReplyBacklog::counted_at_send`]).
    pub fn count_at_send(&self) {
        self.counted_at_send.set(true);
    }

    /// Whether replies are counted as they are queued (handlers then count nothing).
    pub fn counted_at_send(&self) -> bool {
        self.counted_at_send.get()
    }

    /// Puts a (reloaded) per-connection bound in force; a raised bound resumes reading.
    pub fn set_max_bytes(&self, max_bytes: usize) {
        if self.max_bytes.replace(max_bytes) < max_bytes {
            self.wake_reader();
        }
    }

    pub fn unsent_bytes(&self) -> usize {
        self.unsent.get()
    }

    /// A reply of `bytes` was built and waits for the writer.
    pub fn queued(&self, bytes: usize) {
        self.unsent.set(self.unsent.get() + bytes);
        self.budget.unsent.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The connection has ended: its unsent bytes leave the server-wide count now, not
    /// when the last holder (a writer still draining) lets go. Idempotent.
    pub fn close(&self) {
        let unsent = self.unsent.replace(0);
        self.budget.unsent.fetch_sub(unsent, Ordering::Relaxed);
        self.resume();
    }

    /// The writer sent `bytes` to the socket.
    pub fn written(&self, bytes: usize) {
        let n = bytes.min(self.unsent.get());
        if n > 0 {
            self.unsent.set(self.unsent.get() - n);
            self.budget.unsent.fetch_sub(n, Ordering::Relaxed);
        }
        // Only a paused connection needs the time (no clock read per write otherwise).
        if self.paused_since.get().is_some() {
            self.last_write.set(Instant::now());
            self.wake_reader();
        }
    }

    fn over(&self) -> bool {
        let unsent = self.unsent.get();
        unsent > self.max_bytes.get() || unsent > 0 && self.budget.exhausted()
    }

    /// `Ready` when the connection may take its next message; otherwise registers the
    /// reader to be woken when the writer makes progress.
    pub fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.over() {
            self.resume();
            return Poll::Ready(());
        }
        self.reader.set(Some(cx.waker().clone()));
        if self.paused_since.get().is_none() {
            self.paused_since.set(Some(Instant::now()));
            self.budget.paused.fetch_add(1, Ordering::Relaxed);
            self.budget.pauses.fetch_add(1, Ordering::Relaxed);
            if let Some(w) = self.watcher.take() {
                w.wake();
            }
        }
        Poll::Pending
    }

    fn resume(&self) {
        if self.paused_since.take().is_some() {
            self.budget.paused.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn wake_reader(&self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }

    /// How long the connection has been paused with its writer making no progress;
    /// `None` while it is read. Registers the caller to be woken when a pause begins.
    pub fn stalled_for(&self, cx: &mut Context<'_>) -> Option<Duration> {
        match self.paused_since.get() {
            None => {
                self.watcher.set(Some(cx.waker().clone()));
                None
            }
            Some(since) => Some(since.max(self.last_write.get()).elapsed()),
        }
    }

    /// Resolves once the connection has stayed paused without its writer making progress
    /// for `timeout()` (read again at each check, so a reload applies).
    pub async fn stalled(&self, timeout: impl Fn() -> Duration) {
        loop {
            let stalled = std::future::poll_fn(|cx| match self.stalled_for(cx) {
                None => Poll::Pending,
                Some(d) => Poll::Ready(d),
            })
            .await;
            let limit = timeout();
            if stalled >= limit {
                return;
            }
            tokio::time::sleep(limit - stalled).await;
        }
    }
}

impl Drop for ReplyBacklog {
    fn drop(&mut self) {
        // The connection is gone, and its queued replies with it.
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker_ref;

    fn cx() -> Context<'static> {
        Context::from_waker(noop_waker_ref())
    }

    #[test]
    fn over_the_bound_the_reader_waits_until_the_writer_drains() {
        let budget = Arc::new(ReplyBudget::new(1 << 30));
        let b = ReplyBacklog::new(Arc::clone(&budget), 100);
        assert!(b.poll_room(&mut cx()).is_ready());
        b.queued(150); // one reply larger than the bound is queued all the same
        assert!(b.poll_room(&mut cx()).is_pending());
        assert_eq!(budget.paused_connections(), 1);
        b.written(40);
        assert!(
            b.poll_room(&mut cx()).is_pending(),
            "110 unsent is still over"
        );
        b.written(10);
        assert!(b.poll_room(&mut cx()).is_ready(), "100 unsent is within");
        assert_eq!(budget.paused_connections(), 0);
        assert_eq!(budget.pauses(), 1);
        b.written(1_000); // headers and uncounted messages never go below zero
        assert_eq!((b.unsent_bytes(), budget.unsent_bytes()), (0, 0));
    }

    #[test]
    fn an_exhausted_budget_pauses_only_connections_with_unsent_replies() {
        let budget = Arc::new(ReplyBudget::new(100));
        let hog = ReplyBacklog::new(Arc::clone(&budget), 1_000);
        let idle = ReplyBacklog::new(Arc::clone(&budget), 1_000);
        hog.queued(150);
        assert!(hog.poll_room(&mut cx()).is_pending());
        assert!(idle.poll_room(&mut cx()).is_ready());
        idle.queued(10);
        assert!(idle.poll_room(&mut cx()).is_pending());
        hog.close(); // a closed connection gives its bytes back, once
        hog.close();
        hog.written(100);
        assert_eq!(budget.unsent_bytes(), 10);
        assert_eq!(budget.paused_connections(), 1, "only `idle` is paused now");
        assert!(idle.poll_room(&mut cx()).is_ready());
    }

    #[test]
    fn a_raised_bound_resumes_and_stalls_are_measured_from_the_last_write() {
        let budget = Arc::new(ReplyBudget::new(1 << 30));
        let b = ReplyBacklog::new(budget, 10);
        assert_eq!(b.stalled_for(&mut cx()), None);
        b.queued(20);
        assert!(b.poll_room(&mut cx()).is_pending());
        assert!(b.stalled_for(&mut cx()).is_some());
        b.set_max_bytes(50);
        assert!(b.poll_room(&mut cx()).is_ready());
        assert_eq!(b.stalled_for(&mut cx()), None);
    }
}
