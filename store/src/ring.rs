//! A watch history in memory (the memory engine's, and the etcd engine's window of etcd's): the events of the latest revisions, in two rings, one
//! of fixed-size records and one of their keys' and values' bytes end to end.
//!
//! Why bytes in a ring and not an allocation per event: the oldest event leaves when a new
//! one comes, and freeing an allocation made a hundred thousand writes ago touches memory
//! long gone from the CPU's caches (a put paid ~0.15 µs for it at 16 puts in flight);
//! dropping bytes from the front of a ring only moves an index, and appending writes
//! memory in order, which the CPU streams.
//!
//! Bounded twice: at most `max_events` events and `max_bytes` bytes of keys and values
//! (then the oldest revisions go, whole), so large values cannot make a history of a
//! hundred thousand events cost a hundred gigabytes.

use std::collections::VecDeque;

use crate::history::{self, Event, EventPage, KeyRange, PageLimits};
use crate::StoreError;

/// One event's fixed part; its key then its value are `key_len + value_len` bytes of
/// [`Ring::bytes`], from `start` (counted from the ring's creation).
#[derive(Debug, Clone, Copy)]
struct Record {
    revision: u64,
    /// `None` for a delete.
    version: Option<u64>,
    start: u64,
    key_len: u32,
    value_len: u32,
}

impl Record {
    fn len(&self) -> u64 {
        u64::from(self.key_len) + u64::from(self.value_len)
    }
}

/// Events one trim drops below the bound, at most (see [`Ring::trim`]).
const TRIM_RUN_EVENTS: usize = 64;

#[derive(Debug, Default)]
pub struct Ring {
    records: VecDeque<Record>,
    bytes: VecDeque<u8>,
    /// Where `bytes[0]` is, counted from the ring's creation.
    bytes_start: u64,
    /// Every revision up to this one is gone (0: none yet).
    compacted: u64,
    max_events: usize,
    max_bytes: usize,
}

impl Ring {
    pub fn new(max_events: usize, max_bytes: usize) -> Self {
        Self {
            max_events: max_events.max(1),
            max_bytes: max_bytes.max(1),
            ..Self::default()
        }
    }

    /// Appends a change at `revision` (`version` `None`: a delete). Call [`trim`](Self::trim)
    /// once the revision is complete.
    pub fn push(&mut self, key: &[u8], value: &[u8], version: Option<u64>, revision: u64) {
        self.records.push_back(Record {
            revision,
            version,
            start: self.bytes_start + self.bytes.len() as u64,
            // Keys and values are bounded far below 4 GiB by the contract's limits.
            key_len: u32::try_from(key.len()).unwrap_or(u32::MAX),
            value_len: u32::try_from(value.len()).unwrap_or(u32::MAX),
        });
        self.bytes.extend(key);
        self.bytes.extend(value);
    }

    /// Drops the oldest revisions, whole, until both bounds hold. Past the event bound it
    /// drops a run: down to [`TRIM_RUN_EVENTS`] (or a sixteenth of the bound, if less) below
    /// it, so that the history keeps between that many fewer events and `max_events`.
    ///
    /// Why runs: the oldest record was written `max_events` writes ago and has left the
    /// CPU's caches; dropping one per write paid that miss on every put (3% of the
    /// server's CPU at 16 puts in flight, 100k keys), where a run's records are read in
    /// order, which the CPU streams.
    pub fn trim(&mut self) {
        if self.records.len() <= self.max_events && self.bytes.len() <= self.max_bytes {
            return;
        }
        // Only a trim for the event bound drops a run; one for the byte bound drops what
        // takes the bytes back under it, as before.
        let keep_events = if self.records.len() > self.max_events {
            self.max_events - (self.max_events / 16).min(TRIM_RUN_EVENTS)
        } else {
            self.max_events
        };
        let mut dropped = 0u64;
        while self.records.len() > keep_events
            || self.bytes.len() as u64 - dropped > self.max_bytes as u64
        {
            let Some(oldest) = self.records.front().map(|r| r.revision) else {
                break;
            };
            while let Some(r) = self.records.front().filter(|r| r.revision == oldest) {
                dropped += r.len();
                self.records.pop_front();
            }
            self.compacted = oldest;
        }
        // `u8` has nothing to drop: this moves the ring's head.
        self.bytes.drain(..dropped as usize);
        self.bytes_start += dropped;
    }

    /// Starts the history after `revision`: what came before is gone (an engine whose
    /// history begins later than its data, as the etcd engine's at a gateway's start).
    pub fn forget_through(&mut self, revision: u64) {
        let first = self.records.partition_point(|r| r.revision <= revision);
        let dropped: u64 = self.records.drain(..first).map(|r| r.len()).sum();
        self.bytes.drain(..dropped as usize);
        self.bytes_start += dropped;
        self.compacted = self.compacted.max(revision);
    }

    /// One read of this history ([`history::page`]) after `after`, through `head`: events
    /// of later revisions are not read (the memory-log engine's group in flight, not durable
    /// yet); [`StoreError::Compacted`] when a revision after `after` is gone.
    pub fn page(
        &self,
        range: &KeyRange,
        after: u64,
        max: PageLimits,
        head: u64,
    ) -> Result<EventPage, StoreError> {
        if after < self.compacted {
            return Err(StoreError::Compacted {
                oldest_revision: self.compacted + 1,
            });
        }
        let through_head = self
            .after(after, range)
            .take_while(|(revision, _)| *revision <= head);
        history::page(through_head.map(Ok), after, max, head)
    }

    /// The revision through which events are gone.
    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    /// The events after revision `after`, as `history::page` takes them: each with its
    /// revision, decoded only when its key is in `range`.
    pub fn after<'a>(
        &'a self,
        after: u64,
        range: &'a KeyRange,
    ) -> impl Iterator<Item = (u64, Option<Event>)> + 'a {
        let first = self.records.partition_point(|r| r.revision <= after);
        self.records.range(first..).map(move |r| {
            let at = (r.start - self.bytes_start) as usize;
            let key: Vec<u8> = self
                .bytes
                .range(at..at + r.key_len as usize)
                .copied()
                .collect();
            if !range.contains(&key) {
                return (r.revision, None);
            }
            let event = match r.version {
                Some(version) => {
                    let from = at + r.key_len as usize;
                    let value: Vec<u8> = self
                        .bytes
                        .range(from..from + r.value_len as usize)
                        .copied()
                        .collect();
                    Event::put(&key, &value, version, r.revision)
                }
                None => Event::delete(&key, r.revision),
            };
            (r.revision, Some(event))
        })
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> (usize, usize) {
        (self.records.len(), self.bytes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both bounds drop whole revisions; what stays reads back exactly, across the
    /// bytes ring's wrap-around.
    #[test]
    fn both_bounds_drop_whole_revisions_and_the_rest_reads_back() {
        let mut r = Ring::new(4, 20);
        let all = KeyRange::default();
        for rev in 1..=50u64 {
            let value = vec![rev as u8; (rev % 4) as usize];
            r.push(format!("k{rev}").as_bytes(), &value, Some(1), rev);
            if rev % 5 == 0 {
                r.push(b"gone", &[], None, rev);
            }
            r.trim();
            let (events, bytes) = r.len();
            assert!(
                events <= 4 && bytes <= 20,
                "bounds hold at {rev}: {events}, {bytes}"
            );
        }
        let kept: Vec<_> = r
            .after(r.compacted(), &all)
            .map(|(_, e)| e.unwrap())
            .collect();
        assert!(!kept.is_empty());
        assert_eq!(kept.last().unwrap().revision(), 50);
        for e in &kept {
            let rev = e.revision();
            if e.entry.key == b"gone" {
                assert_eq!(rev % 5, 0);
                continue;
            }
            assert_eq!(e.entry.key, format!("k{rev}").into_bytes());
            assert_eq!(e.entry.value, vec![rev as u8; (rev % 4) as usize]);
        }
        assert!(kept.first().unwrap().revision() > r.compacted());
        let only: Vec<_> = r
            .after(0, &KeyRange::prefix(b"gone"))
            .filter_map(|(_, e)| e)
            .collect();
        assert!(only.iter().all(|e| e.entry.key == b"gone"));
    }

    /// Past the event bound a trim drops a run of the oldest (64, or a sixteenth of the
    /// bound), so most writes trim nothing; the bound holds after every trim, and what
    /// stays is exactly the latest revisions.
    #[test]
    fn past_the_event_bound_a_trim_drops_a_run_and_the_bound_holds() {
        let max = 2_000;
        let mut r = Ring::new(max, usize::MAX);
        let mut trims = 0;
        for rev in 1..=10_000u64 {
            r.push(&rev.to_be_bytes(), b"v", Some(1), rev);
            let before = r.len().0;
            r.trim();
            let (events, _) = r.len();
            assert!(events <= max, "bound holds at {rev}: {events}");
            if events < before {
                trims += 1;
                assert_eq!(events, max - 64, "a run of 64 at {rev}");
            }
            assert_eq!(r.compacted(), rev - events as u64);
        }
        // (10,000 - 2,000) / 65 events dropped a trim, rounded up.
        assert_eq!(trims, 124);
        // A small bound drops a sixteenth of itself; under 16, what is past the bound.
        for (max, kept) in [(160, 150), (15, 15)] {
            let mut r = Ring::new(max, usize::MAX);
            for rev in 1..=(max as u64 + 1) {
                r.push(b"k", b"v", Some(1), rev);
                r.trim();
            }
            assert_eq!(r.len().0, kept, "bound {max}");
        }
        // A trim for the byte bound alone drops what takes the bytes back under it, no run.
        let mut r = Ring::new(160, 155 * 9);
        for rev in 1..=155u64 {
            r.push(&rev.to_be_bytes(), b"v", Some(1), rev);
            r.trim();
        }
        assert_eq!(r.len(), (155, 155 * 9));
        r.push(&156u64.to_be_bytes(), b"vvvvvvvvvv", Some(1), 156);
        r.trim();
        assert_eq!(r.len(), (154, 153 * 9 + 18));
        assert_eq!(r.compacted(), 2);
    }
}
