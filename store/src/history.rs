//! Watch history: the events every write produces, kept for a window of revisions, read
//! by watchers in revision order; and [`Changes`], what a watcher waits on for the next
//! write.
//!
//! Every write that changes something produces its events at its one new revision: a put,
//! an increment or each item of a `putMany` a [`EventKind::Put`] with the new entry, a
//! delete of a key that existed a [`EventKind::Delete`]. Engines keep them in the same
//! atomic step as the write itself (the memory engine under its lock, RocksDB in the same
//! WriteBatch), so a watcher never sees an event of a write that did not happen, nor misses
//! one that did.
//!
//! History is a window: the events of every revision after the *compacted* revision are
//! kept, older ones are dropped as whole revisions. A read that asks for events after a
//! revision older than that gets [`StoreError::Compacted`] with the oldest revision a
//! watcher can still start from (as etcd's `compact_revision`), never a silent gap.
//!
//! [`page`] decides what one read returns, for every engine: whole revisions (a revision
//! is never split, so a watcher's position is one revision number), within its
//! [`PageLimits`] unless one revision alone goes past them, and at most [`SCAN_BUDGET_EVENTS`] events looked
//! at, so that a watcher of a quiet range behind a busy one costs bounded work per call.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::{Entry, StoreError};

/// Most history events one read looks at (matching or not) before it answers with what it
/// has: the bound on one call's work.
pub const SCAN_BUDGET_EVENTS: usize = 10_000;

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change to one key, at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// A put's new entry (`mod_revision` is the event's revision). A delete's key, with its
    /// revision as `mod_revision`, version 0 and no value.
    pub entry: Entry,
}

impl Event {
    pub fn revision(&self) -> u64 {
        self.entry.mod_revision
    }

    pub fn put(key: &[u8], value: &[u8], version: u64, revision: u64) -> Self {
        Self {
            kind: EventKind::Put,
            entry: Entry {
                key: key.to_vec(),
                value: value.to_vec(),
                version,
                mod_revision: revision,
            },
        }
    }

    pub fn delete(key: &[u8], revision: u64) -> Self {
        Self {
            kind: EventKind::Delete,
            entry: Entry {
                key: key.to_vec(),
                value: Vec::new(),
                version: 0,
                mod_revision: revision,
            },
        }
    }
}

/// The keys a watcher follows: `[start, end)`, `end` `None` = no upper bound.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyRange {
    pub start: Vec<u8>,
    pub end: Option<Vec<u8>>,
}

impl KeyRange {
    /// Every key that starts with `prefix` (every key for an empty one).
    pub fn prefix(prefix: &[u8]) -> Self {
        Self {
            start: prefix.to_vec(),
            end: prefix_end(prefix),
        }
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && self.end.as_deref().is_none_or(|end| key < end)
    }
}

/// The first key after every key that starts with `prefix`; `None` when there is none
/// (empty, or all 0xff).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// How much one read may return: about `events` events and `bytes` bytes of keys and
/// values (a page ends at the first revision boundary past either).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLimits {
    pub events: usize,
    pub bytes: usize,
}

impl PageLimits {
    /// At most `events` events, bytes unbounded.
    pub fn events(events: usize) -> Self {
        Self {
            events,
            bytes: usize::MAX,
        }
    }
}

/// What one read of the history returns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EventPage {
    /// The events in the range, in revision order (and in write order within a revision).
    pub events: Vec<Event>,
    /// The revision read through: every event of the range up to it is in this page or an
    /// earlier one. The next read starts after it.
    pub through: u64,
}

/// One read's page: `history` is the events of the revisions after `after`, in order,
/// each as its revision and, when its key is in the watcher's range, the event (engines
/// decode only those); `head` the store's revision as of the read (what the page reads
/// through when `history` runs out; never less than `after`, so a watcher of a future
/// revision stays there).
pub fn page<I>(history: I, after: u64, max: PageLimits, head: u64) -> Result<EventPage, StoreError>
where
    I: IntoIterator<Item = Result<(u64, Option<Event>), StoreError>>,
{
    let max_events = max.events.max(1);
    let mut bytes = 0usize;
    let mut page = EventPage {
        events: Vec::new(),
        through: head.max(after),
    };
    // The revision being read, which the page may not end inside.
    let mut current = None::<u64>;
    // `looked`: the events looked at before this one.
    for (looked, item) in history.into_iter().enumerate() {
        let (revision, event) = item?;
        if current != Some(revision) {
            // A revision boundary: where the page may end.
            if let Some(done) = current {
                if page.events.len() >= max_events
                    || bytes >= max.bytes
                    || looked >= SCAN_BUDGET_EVENTS
                {
                    page.through = done;
                    return Ok(page);
                }
            }
            current = Some(revision);
        }
        if let Some(e) = event {
            bytes += e.entry.key.len() + e.entry.value.len();
            page.events.push(e);
        }
    }
    Ok(page)
}

/// The store's latest revision, for watchers to wait on. Engines call
/// [`publish`](Self::publish) after every write that changed something, once it is
/// visible to reads.
#[derive(Debug, Default)]
pub struct Changes {
    revision: AtomicU64,
    /// Watchers waiting now: a write wakes them only when there are some (a `Notify`
    /// takes a lock).
    waiting: AtomicUsize,
    notify: tokio::sync::Notify,
}

impl Changes {
    pub fn new(revision: u64) -> Self {
        Self {
            revision: AtomicU64::new(revision),
            ..Self::default()
        }
    }

    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::SeqCst)
    }

    /// `revision` is visible to reads: wakes the watchers waiting for it.
    pub fn publish(&self, revision: u64) {
        self.revision.fetch_max(revision, Ordering::SeqCst);
        // SeqCst with `wait_past`: either this load sees the waiter, or the waiter's
        // check (after its count) sees the new revision.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }

    /// Resolves once the revision is past `after` (at once if it is already).
    pub async fn wait_past(&self, after: u64) {
        if self.revision() > after {
            return;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        struct Counted<'a>(&'a AtomicUsize);
        impl Drop for Counted<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let _counted = Counted(&self.waiting);
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.revision() > after {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `revisions` as an engine hands them to `page`, for a watcher of `range`.
    fn history(
        revisions: &[(u64, &[u8])],
        range: &KeyRange,
    ) -> Vec<Result<(u64, Option<Event>), StoreError>> {
        revisions
            .iter()
            .map(|&(r, k)| Ok((r, range.contains(k).then(|| Event::put(k, b"v", 1, r)))))
            .collect()
    }

    #[test]
    fn pages_end_between_revisions_and_within_the_scan_budget() {
        let all = KeyRange::default();
        let revisions: &[(u64, &[u8])] = &[(1, b"a"), (2, b"b"), (2, b"c"), (3, b"d")];
        let h = history(revisions, &all);
        let p = page(h.clone(), 0, PageLimits::events(2), 3).unwrap();
        assert_eq!(
            (p.events.len(), p.through),
            (3, 2),
            "revision 2 is not split"
        );
        let p = page(h.clone(), 0, PageLimits::events(1), 3).unwrap();
        assert_eq!((p.events.len(), p.through), (1, 1));
        let p = page(h, 0, PageLimits::events(10), 3).unwrap();
        assert_eq!((p.events.len(), p.through), (4, 3));
        let only_d = KeyRange::prefix(b"d");
        let p = page(history(revisions, &only_d), 0, PageLimits::events(10), 7).unwrap();
        assert_eq!((p.events.len(), p.through), (1, 7), "read through the head");

        let quiet = KeyRange::prefix(b"z");
        let busy: Vec<_> = (1..=2 * SCAN_BUDGET_EVENTS as u64)
            .map(|r| {
                Ok((
                    r,
                    quiet.contains(b"a").then(|| Event::put(b"a", b"v", r, r)),
                ))
            })
            .collect();
        let p = page(
            busy,
            0,
            PageLimits::events(10),
            2 * SCAN_BUDGET_EVENTS as u64,
        )
        .unwrap();
        assert!(p.events.is_empty());
        assert_eq!(
            p.through, SCAN_BUDGET_EVENTS as u64,
            "bounded work, progress kept"
        );
        let p = page(Vec::new(), 9, PageLimits::events(10), 3).unwrap();
        assert_eq!(p.through, 9, "a future start stays where it is");
        let bytes = PageLimits {
            events: 100,
            bytes: 3,
        };
        let p = page(history(revisions, &all), 0, bytes, 3).unwrap();
        assert_eq!(
            (p.events.len(), p.through),
            (3, 2),
            "past 3 bytes in revision 2, which ends the page"
        );
    }

    #[test]
    fn prefixes_cover_exactly_their_keys() {
        let r = KeyRange::prefix(b"ab");
        assert!(r.contains(b"ab") && r.contains(b"ab\xff\xff") && !r.contains(b"ac"));
        assert!(!r.contains(b"aa"));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert!(KeyRange::prefix(b"").contains(b"anything"));
    }

    #[tokio::test]
    async fn a_waiting_watcher_wakes_on_the_next_revision() {
        let c = std::sync::Arc::new(Changes::new(5));
        c.wait_past(4).await;
        let waiter = tokio::spawn({
            let c = c.clone();
            async move { c.wait_past(5).await }
        });
        // Whether the waiter has registered yet or not, the publish reaches it.
        tokio::task::yield_now().await;
        c.publish(6);
        tokio::time::timeout(std::time::Duration::from_secs(60), waiter)
            .await
            .expect("woken")
            .expect("no panic");
        assert_eq!(c.waiting.load(Ordering::SeqCst), 0);
    }
}
