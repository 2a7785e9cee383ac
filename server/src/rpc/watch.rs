//! `Watcher`: the changes to a range of keys, in revision order, pulled by the caller.
//!
//! A watcher is its range and its position (the revision it has read through); the events
//! themselves stay in the store's history (`capkv_store::history`), shared by every
//! watcher, so a watcher costs the same few bytes however far behind it is, and one that
//! falls behind the history's window gets `compacted` instead of buffering without bound.
//!
//! `next` reads a page after the position through the call chain like any read. When the
//! page is empty and the caller asked to wait, the wait happens after the chain, holding no
//! admission slot (a thousand idle watchers must not fill the in-flight limit), until the
//! store publishes a revision past the position, `waitMs` passes, the call's deadline comes
//! near, or the server starts draining; then it answers, possibly with an empty page. Calls on
//! one watcher take turns in the order they came, so pipelined `next` calls return
//! consecutive pages.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use capkv::kv_capnp::watcher;
use capkv::{ApiError, ErrorCode};
use capkv_store::{EventKind, EventPage, KeyRange, PageLimits};
use tokio::time::Instant;

use super::{store_error, write_entry};
use crate::chain::{CapSlot, Conn, Shared};
use crate::method::Method;
use crate::reply::count_reply;
use crate::validate;

/// Longest `waitMs` a `next` may ask for.
pub const MAX_WAIT_MS: u32 = 60_000;

pub struct WatcherImpl {
    shared: Arc<Shared>,
    conn: Rc<Conn>,
    range: KeyRange,
    /// The revision read through: the next page starts after it.
    position: Cell<u64>,
    /// The position as the watchers' lag counts it: never past the store's revision when
    /// set (a watcher from a future revision is behind by nothing, not by less than
    /// nothing: counted as it is, it took its lead off the others' lag).
    counted: Cell<u64>,
    /// Held by the `next` running, so that pipelined calls take turns in order (tokio's
    /// mutex is fair: first come, first served).
    turn: tokio::sync::Mutex<()>,
    _slot: CapSlot,
}

impl WatcherImpl {
    /// A watcher of `range` whose first page holds the events after revision `after`.
    pub(super) fn new(
        shared: Arc<Shared>,
        conn: Rc<Conn>,
        range: KeyRange,
        after: u64,
        slot: CapSlot,
    ) -> Self {
        let counted = Self::countable(&shared, after);
        shared.watch_stats.opened(counted);
        Self {
            shared,
            conn,
            range,
            position: Cell::new(after),
            counted: Cell::new(counted),
            turn: tokio::sync::Mutex::new(()),
            _slot: slot,
        }
    }

    /// The next page, moving the position past it.
    fn read(&self, max: PageLimits) -> Result<EventPage, ApiError> {
        let page = self
            .shared
            .store
            .events(&self.range, self.position.get(), max)
            .map_err(store_error)?;
        let counted = Self::countable(&self.shared, page.through);
        self.shared.watch_stats.moved(self.counted.get(), counted);
        self.counted.set(counted);
        self.position.set(page.through);
        metrics::counter!(crate::metrics::WATCH_EVENTS_TOTAL).increment(page.events.len() as u64);
        Ok(page)
    }
}

impl WatcherImpl {
    /// `position`, at most the store's revision now (see `counted`).
    fn countable(shared: &Shared, position: u64) -> u64 {
        shared
            .store
            .revision()
            .map_or(position, |head| position.min(head))
    }
}

impl Drop for WatcherImpl {
    fn drop(&mut self) {
        self.shared.watch_stats.closed(self.counted.get());
    }
}

impl watcher::Server for WatcherImpl {
    async fn next(
        self: Rc<Self>,
        params: watcher::NextParams,
        mut results: watcher::NextResults,
    ) -> Result<(), capnp::Error> {
        let _turn = self.turn.lock().await;
        let p = params.get()?;
        let this = &self;
        let first = self
            .shared
            .serve(
                &self.conn,
                Method::WatchNext,
                p.get_ctx(),
                |call| async move {
                    let max = validate::watch_page(&call.tunables.limits, p.get_max_events())?;
                    let wait_ms = p.get_wait_ms();
                    if wait_ms > MAX_WAIT_MS {
                        return Err(ApiError::new(
                            ErrorCode::InvalidArgument,
                            format!("waitMs {wait_ms} is above the limit of {MAX_WAIT_MS}"),
                        ));
                    }
                    let page = this.read(max)?;
                    Ok((
                        page,
                        max,
                        Duration::from_millis(u64::from(wait_ms)),
                        call.deadline,
                    ))
                },
            )
            .await;
        let r = match first {
            Ok((page, max, wait, deadline)) if page.events.is_empty() && !wait.is_zero() => {
                // Answer a little before the deadline, so that the caller gets its empty
                // page rather than a `deadlineExceeded`.
                let now = Instant::now();
                let margin =
                    (deadline.saturating_duration_since(now) / 10).min(Duration::from_millis(200));
                let until = (now + wait).min(deadline - margin);
                let deadline = tokio::time::sleep_until(until);
                tokio::pin!(deadline);
                // A drain answers at once: the caller's next `next` is refused, and it
                // watches again elsewhere from where this page leaves it.
                let drain = self.shared.draining();
                tokio::pin!(drain);
                let mut page = page;
                // The connection is not idle while its watcher waits.
                let _polling = self.conn.long_poll();
                // Writes outside the range wake it too: it reads, and waits on while the
                // page is empty. Bounded by `until`.
                loop {
                    let changed = self.shared.store.changes().wait_past(page.through);
                    tokio::select! {
                        () = changed => match self.read(max) {
                            Ok(p) if p.events.is_empty() => page = p,
                            other => break other,
                        },
                        () = &mut deadline => break Ok(page),
                        () = &mut drain => break Ok(page),
                    }
                }
            }
            other => other.map(|(page, ..)| page),
        };
        let mut out = results.get().init_result();
        match r {
            Ok(page) => {
                let mut ok = out.init_ok();
                ok.set_revision(page.through);
                let len = u32::try_from(page.events.len())
                    .map_err(|_| capnp::Error::failed("watch page too long".into()))?;
                let mut list = ok.init_events(len);
                for (i, e) in page.events.iter().enumerate() {
                    let mut b = list.reborrow().get(i as u32);
                    b.set_kind(match e.kind {
                        EventKind::Put => capkv::kv_capnp::EventKind::Put,
                        EventKind::Delete => capkv::kv_capnp::EventKind::Delete,
                    });
                    write_entry(b.init_entry(), &e.entry);
                }
            }
            Err(e) => {
                out.set_oldest_revision(e.oldest_revision);
                e.write(out.init_error());
            }
        }
        count_reply!(self.conn, results);
        Ok(())
    }
}
