//! The behaviour every engine must show, written once.
//!
//! Each case is a `pub fn(&dyn Store)` that panics on a violation. An engine's test file
//! runs all of them with [`conformance_tests!`](crate::conformance_tests), one `#[test]`
//! per case, given an expression that builds a fresh, empty store:
//!
//! ```ignore
//! capkv_store::conformance_tests!(capkv_store::MemoryStore::new());
//! ```
//!
//! An engine whose leases expire on another clock (etcd's) runs
//! `conformance_tests!(shared: ...)`: every case but `leases_expire_by_the_reaper`.
//!
//! Panicking asserts are the point here: this module is test code shipped in the library
//! so that every engine crate can reuse it.

use std::sync::Arc;

use crate::{
    history::PageLimits, write, Condition, Event, EventKind, IdempotencyKey, KeyRange, PutItem,
    ScanRequest, Store, StoreError, WriteOp,
};

fn far_future() -> u64 {
    u64::MAX / 2
}

fn idem(session: &str, key: &str, expires_at_unix_ms: u64) -> Option<IdempotencyKey> {
    Some(IdempotencyKey {
        session: session.as_bytes().to_vec(),
        key: key.as_bytes().to_vec(),
        expires_at_unix_ms,
    })
}

fn inc(key: &[u8], delta: i64) -> WriteOp {
    WriteOp::from(write::Increment {
        key: key.to_vec(),
        delta,
    })
}

fn scan_all(s: &dyn Store, start: &[u8], end: Option<&[u8]>) -> Vec<Vec<u8>> {
    let page = s
        .scan(&ScanRequest {
            start: start.to_vec(),
            end: end.map(<[u8]>::to_vec),
            limit: 1_000_000,
            max_bytes: usize::MAX,
            keys_only: true,
            revision: None,
        })
        .unwrap();
    assert!(!page.more);
    page.entries.into_iter().map(|e| e.key).collect()
}

pub fn get_missing_is_none(s: &dyn Store) {
    assert_eq!(s.get(b"nope").unwrap(), None);
    assert_eq!(s.revision().unwrap(), 0);
}

pub fn put_then_get(s: &dyn Store) {
    let out = s.put(b"k", b"v1", Condition::None).wait().unwrap();
    assert_eq!(out.version, 1);
    assert_eq!(out.revision, 1);
    let e = s.get(b"k").unwrap().unwrap();
    assert_eq!(
        (e.key.as_slice(), e.value.as_slice()),
        (&b"k"[..], &b"v1"[..])
    );
    assert_eq!((e.version, e.mod_revision), (1, 1));
}

/// `get_into` reads what `get` reads, into a buffer it clears first.
pub fn get_into_reads_what_get_reads(s: &dyn Store) {
    let mut value = b"left over".to_vec();
    assert_eq!(s.get_into(b"k", &mut value).unwrap(), None);
    assert!(value.is_empty());
    s.put(b"k", b"v1", Condition::None).wait().unwrap();
    s.put(b"k", b"longer value", Condition::None)
        .wait()
        .unwrap();
    s.put(b"other", b"x", Condition::None).wait().unwrap();
    let e = s.get(b"k").unwrap().unwrap();
    let found = s.get_into(b"k", &mut value).unwrap().unwrap();
    assert_eq!(value, e.value);
    assert_eq!(
        (found.version, found.mod_revision),
        (e.version, e.mod_revision)
    );
    assert_eq!((found.version, found.mod_revision), (2, 2));
}

pub fn versions_and_revisions_advance(s: &dyn Store) {
    s.put(b"a", b"1", Condition::None).wait().unwrap();
    s.put(b"b", b"1", Condition::None).wait().unwrap();
    let out = s.put(b"a", b"2", Condition::None).wait().unwrap();
    assert_eq!((out.version, out.revision), (2, 3));
    let d = s.delete(b"a", Condition::None).wait().unwrap();
    assert_eq!((d.existed, d.revision), (true, 4));
    let out = s.put(b"a", b"3", Condition::None).wait().unwrap();
    assert_eq!(
        (out.version, out.revision),
        (1, 5),
        "a recreated key starts at version 1"
    );
    assert_eq!(s.revision().unwrap(), 5);
}

pub fn binary_keys_and_values(s: &dyn Store) {
    let key = [0u8, 0xff, 0x80, b'\n'];
    let value = [0xffu8, 0, 0, 0xfe];
    s.put(&key, &value, Condition::None).wait().unwrap();
    assert_eq!(s.get(&key).unwrap().unwrap().value, value);
    s.put(b"", b"", Condition::None).wait().unwrap();
    assert_eq!(s.get(b"").unwrap().unwrap().value, b"");
}

pub fn delete_missing_changes_nothing(s: &dyn Store) {
    s.put(b"x", b"1", Condition::None).wait().unwrap();
    let d = s.delete(b"y", Condition::None).wait().unwrap();
    assert_eq!((d.existed, d.revision), (false, 1));
    assert_eq!(s.revision().unwrap(), 1);
}

pub fn conditions(s: &dyn Store) {
    s.put(b"c", b"1", Condition::IfAbsent).wait().unwrap();
    assert_eq!(
        s.put(b"c", b"2", Condition::IfAbsent).wait(),
        Err(StoreError::ConditionFailed {
            index: 0,
            current_version: Some(1)
        })
    );
    assert!(matches!(
        s.put(b"c", b"2", Condition::IfVersion(7)).wait(),
        Err(StoreError::ConditionFailed { .. })
    ));
    assert_eq!(
        s.put(b"c", b"2", Condition::IfVersion(1))
            .wait()
            .unwrap()
            .version,
        2
    );
    assert!(matches!(
        s.delete(b"c", Condition::IfVersion(1)).wait(),
        Err(StoreError::ConditionFailed { .. })
    ));
    assert_eq!(
        s.get(b"c").unwrap().unwrap().value,
        b"2",
        "failed condition wrote nothing"
    );
    assert!(
        s.delete(b"c", Condition::IfVersion(2))
            .wait()
            .unwrap()
            .existed
    );
    s.put(b"c", b"3", Condition::IfVersion(0)).wait().unwrap();
    assert!(matches!(
        s.delete(b"missing", Condition::IfVersion(1)).wait(),
        Err(StoreError::ConditionFailed {
            index: 0,
            current_version: None
        })
    ));
    // Failed conditions never advance the revision: 4 successful writes above.
    assert_eq!(s.revision().unwrap(), 4);
}

pub fn scan_is_ordered_and_bounded(s: &dyn Store) {
    for k in [&b"b"[..], b"a", b"ab", b"c", b"\xff", b"a\x00"] {
        s.put(k, b"v", Condition::None).wait().unwrap();
    }
    assert_eq!(
        scan_all(s, b"", None),
        vec![
            b"a".to_vec(),
            b"a\x00".to_vec(),
            b"ab".to_vec(),
            b"b".to_vec(),
            b"c".to_vec(),
            b"\xff".to_vec()
        ]
    );
    assert_eq!(
        scan_all(s, b"a\x00", Some(b"c")),
        vec![b"a\x00".to_vec(), b"ab".to_vec(), b"b".to_vec()]
    );
    assert!(
        scan_all(s, b"c", Some(b"b")).is_empty(),
        "inverted range is empty"
    );
}

pub fn scan_pages_by_limit_and_bytes(s: &dyn Store) {
    for i in 0..10u8 {
        s.put(&[b'k', i], &[i; 100], Condition::None)
            .wait()
            .unwrap();
    }
    let mut req = ScanRequest {
        start: b"k".to_vec(),
        end: None,
        limit: 4,
        max_bytes: usize::MAX,
        keys_only: false,
        revision: None,
    };
    let p = s.scan(&req).unwrap();
    assert_eq!(p.entries.len(), 4);
    assert!(p.more);
    assert_eq!(p.entries[3].value, vec![3u8; 100]);
    req.max_bytes = 250;
    req.limit = 100;
    let p = s.scan(&req).unwrap();
    assert_eq!(
        p.entries.len(),
        3,
        "stops at the entry that reaches max_bytes"
    );
    assert!(p.more);
    req.max_bytes = 1;
    assert_eq!(
        s.scan(&req).unwrap().entries.len(),
        1,
        "always makes progress"
    );
    req.start = vec![b'k', 9];
    let p = s.scan(&req).unwrap();
    assert_eq!(p.entries.len(), 1);
    assert!(!p.more);
    req.keys_only = true;
    assert!(s.scan(&req).unwrap().entries[0].value.is_empty());
}

pub fn batches_are_atomic_with_one_revision(s: &dyn Store) {
    s.put(b"a", b"0", Condition::None).wait().unwrap();
    let item = |key: &'static [u8], value: &'static [u8], cond| PutItem { key, value, cond };
    let out = s
        .put_many(&[
            item(b"a", b"1", Condition::IfVersion(1)),
            item(b"b", b"1", Condition::IfAbsent),
        ])
        .wait()
        .unwrap();
    assert_eq!(out.versions, vec![2, 1]);
    assert_eq!(out.revision, 2, "a batch is one write");
    assert_eq!(s.get(b"b").unwrap().unwrap().mod_revision, 2);
    let failed = s
        .put_many(&[
            item(b"c", b"1", Condition::None),
            item(b"a", b"x", Condition::IfVersion(1)),
        ])
        .wait();
    assert_eq!(
        failed,
        Err(StoreError::ConditionFailed {
            index: 1,
            current_version: Some(2)
        })
    );
    assert_eq!(
        s.get(b"c").unwrap(),
        None,
        "nothing of a failed batch is written"
    );
    assert_eq!(s.revision().unwrap(), 2);
    let (items, revision) = s.get_many(&[b"b", b"nope", b"a"]).unwrap();
    assert_eq!(revision, 2);
    assert_eq!(items[0].as_ref().unwrap().value, b"1");
    assert!(items[1].is_none());
    assert_eq!(items[2].as_ref().unwrap().version, 2);
    // Within a bound of bytes: the keys and values found, counted each time a key is
    // asked for; one byte over it, nothing.
    let b = s.get(b"b").unwrap().unwrap();
    let asked: [&[u8]; 3] = [b"b", b"nope", b"b"];
    let exact = 2 * (b.key.len() + b.value.len());
    let (items, revision) = s.get_many_within(&asked, exact).unwrap().expect("within");
    assert_eq!((items.len(), revision), (3, 2));
    assert_eq!(items[2].as_ref().unwrap().value, b"1");
    assert!(
        s.get_many_within(&asked, exact - 1).unwrap().is_none(),
        "over the bound"
    );
}

/// Writers on several threads on a few keys: every final value must be one that some
/// acknowledged write produced, versions must count the puts, revisions must be unique.
pub fn concurrent_writers(make: &dyn Fn() -> Arc<dyn Store>) {
    let s = make();
    let threads = 8;
    let per_thread = 200;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                let mut revisions = Vec::new();
                for i in 0..per_thread {
                    let key = [b'k', (i % 3) as u8];
                    let value = format!("{t}-{i}");
                    revisions.push(
                        s.put(&key, value.as_bytes(), Condition::None)
                            .wait()
                            .unwrap()
                            .revision,
                    );
                }
                revisions
            })
        })
        .collect();
    let mut all: Vec<u64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(
        all.len(),
        threads * per_thread,
        "each write got its own revision"
    );
    let mut versions = 0;
    for k in 0..3u8 {
        let e = s.get(&[b'k', k]).unwrap().unwrap();
        versions += e.version;
        let v = String::from_utf8(e.value).unwrap();
        let (t, i) = v.split_once('-').unwrap();
        let (t, i): (usize, usize) = (t.parse().unwrap(), i.parse().unwrap());
        assert!(t < threads && i < per_thread && i % 3 == k as usize);
    }
    assert_eq!(versions as usize, threads * per_thread);
}

/// Compare-and-set increments from several threads on one key: conditions must be checked
/// against every earlier write, including writes still waiting in the same commit group.
pub fn concurrent_compare_and_set(make: &dyn Fn() -> Arc<dyn Store>) {
    let s = make();
    let threads = 8;
    let per_thread = 50;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                let mut conflicts = 0u32;
                for _ in 0..per_thread {
                    // Bounded: each failed attempt means another thread's increment won.
                    for attempt in 0.. {
                        assert!(attempt < 10_000, "compare-and-set never succeeded");
                        let current = s.get(b"counter").unwrap();
                        let (n, version) = match &current {
                            Some(e) => (
                                String::from_utf8_lossy(&e.value).parse::<u64>().unwrap(),
                                e.version,
                            ),
                            None => (0, 0),
                        };
                        let next = (n + 1).to_string();
                        match s
                            .put(b"counter", next.as_bytes(), Condition::IfVersion(version))
                            .wait()
                        {
                            Ok(_) => break,
                            Err(StoreError::ConditionFailed { .. }) => conflicts += 1,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                conflicts
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let e = s.get(b"counter").unwrap().unwrap();
    assert_eq!(e.value, (threads * per_thread).to_string().into_bytes());
    assert_eq!(e.version, (threads * per_thread) as u64);
    assert_eq!(s.revision().unwrap(), (threads * per_thread) as u64);
}

/// Increments count like Redis INCR; non-integers are refused.
pub fn increments(s: &dyn Store) {
    let first = write::Increment {
        key: b"n".to_vec(),
        delta: 5,
    };
    let o = s.apply(first, None).wait().unwrap();
    assert_eq!((o.value, o.version, o.revision), (5, 1, 1));
    s.write(inc(b"n", -7), None).wait().unwrap();
    assert_eq!(s.get(b"n").unwrap().unwrap().value, b"-2");
    s.put(b"text", b"abc", Condition::None).wait().unwrap();
    assert_eq!(
        s.write(inc(b"text", 1), None).wait(),
        Err(StoreError::NotAnInteger)
    );
    s.put(b"max", i64::MAX.to_string().as_bytes(), Condition::None)
        .wait()
        .unwrap();
    assert_eq!(
        s.write(inc(b"max", 1), None).wait(),
        Err(StoreError::NotAnInteger)
    );
}

/// A replay returns the recorded outcome and writes nothing; other parameters under the
/// same key are refused every time; sessions are separate; a failed condition is recorded.
pub fn idempotent_replays(s: &dyn Store) {
    let first = s.write(inc(b"c", 1), idem("s1", "k1", far_future())).wait();
    for _ in 0..3 {
        assert_eq!(
            s.write(inc(b"c", 1), idem("s1", "k1", far_future())).wait(),
            first
        );
    }
    let e = s.get(b"c").unwrap().unwrap();
    assert_eq!(
        (e.value.as_slice(), e.version),
        (&b"1"[..], 1),
        "one effect"
    );
    assert_eq!(s.revision().unwrap(), 1);
    for _ in 0..3 {
        assert_eq!(
            s.write(inc(b"c", 2), idem("s1", "k1", far_future())).wait(),
            Err(StoreError::IdempotencyKeyReused)
        );
    }
    s.write(inc(b"c", 1), idem("s2", "k1", far_future()))
        .wait()
        .unwrap();
    assert_eq!(s.get(b"c").unwrap().unwrap().value, b"2", "another session");

    let cas = || {
        WriteOp::from(write::Put {
            key: b"c".to_vec(),
            value: b"x".to_vec(),
            cond: Condition::IfVersion(3),
            ..write::Put::default()
        })
    };
    let failed = s.write(cas(), idem("s1", "cas", far_future())).wait();
    assert!(matches!(failed, Err(StoreError::ConditionFailed { .. })));
    s.write(inc(b"c", 1), None).wait().unwrap(); // version 3 now
    assert_eq!(
        s.write(cas(), idem("s1", "cas", far_future())).wait(),
        failed,
        "the recorded failure is replayed, not re-evaluated"
    );
}

/// An expired record is forgotten: the same key writes again.
pub fn expired_records_are_forgotten(s: &dyn Store) {
    // Expired as soon as written (1 ms after the epoch).
    s.write(inc(b"e", 1), idem("s", "k", 1)).wait().unwrap();
    s.write(inc(b"e", 1), idem("s", "k", 1)).wait().unwrap();
    assert_eq!(s.get(b"e").unwrap().unwrap().value, b"2");
    s.compact().unwrap();
    s.write(inc(b"e", 5), idem("s", "k", far_future()))
        .wait()
        .unwrap();
    assert_eq!(
        s.get(b"e").unwrap().unwrap().value,
        b"7",
        "no reuse error after expiry"
    );
}

/// 100 identical writes at once with one key: one effect, 100 identical answers.
pub fn concurrent_duplicates_write_once(make: &dyn Fn() -> Arc<dyn Store>) {
    let s = make();
    let barrier = Arc::new(std::sync::Barrier::new(100));
    let handles: Vec<_> = (0..100)
        .map(|_| {
            let (s, barrier) = (Arc::clone(&s), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                s.write(inc(b"dup", 1), idem("s", "same", far_future()))
                    .wait()
            })
        })
        .collect();
    let outcomes: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(outcomes.iter().all(|o| o == &outcomes[0]), "{outcomes:?}");
    let e = s.get(b"dup").unwrap().unwrap();
    assert_eq!((e.value.as_slice(), e.version), (&b"1"[..], 1));
    assert_eq!(s.revision().unwrap(), 1);
}

/// Every read of the history after `after`, paged `max_events` at a time, to the head.
fn all_events(s: &dyn Store, range: &KeyRange, after: u64, max_events: usize) -> Vec<Event> {
    let head = s.revision().unwrap();
    let (mut events, mut at) = (Vec::new(), after);
    for _ in 0..=head {
        let page = s.events(range, at, PageLimits::events(max_events)).unwrap();
        assert!(page.through >= at, "a page never goes back");
        assert!(page
            .events
            .iter()
            .all(|e| e.revision() > at && e.revision() <= page.through));
        events.extend(page.events);
        if page.through == at {
            break;
        }
        at = page.through;
    }
    assert_eq!(at, head, "paging reaches the head");
    events
}

/// The history holds one event per change, at the change's revision, in order: puts and
/// increments with their new entry, each item of a batch at the batch's one revision, a
/// delete of a key that existed; failed conditions and deletes of missing keys add none.
/// A range sees exactly its keys' events; pages of any size add up to the whole.
pub fn history_replays_every_change_in_order(s: &dyn Store) {
    assert_eq!(s.changes().revision(), 0);
    assert!(all_events(s, &KeyRange::default(), 0, 10).is_empty());
    s.put(b"a/1", b"v1", Condition::None).wait().unwrap();
    let items = [
        PutItem {
            key: b"a/2",
            value: b"v2",
            cond: Condition::None,
        },
        PutItem {
            key: b"b/1",
            value: b"v3",
            cond: Condition::None,
        },
    ];
    s.put_many(&items).wait().unwrap();
    let failed = s.put(b"a/1", b"no", Condition::IfAbsent).wait();
    assert!(matches!(failed, Err(StoreError::ConditionFailed { .. })));
    s.delete(b"missing", Condition::None).wait().unwrap();
    s.write(inc(b"a/n", 5), None).wait().unwrap();
    s.delete(b"a/1", Condition::None).wait().unwrap();
    s.put(b"a/2", b"v4", Condition::None).wait().unwrap();
    assert_eq!(s.revision().unwrap(), 5);
    assert_eq!(s.changes().revision(), 5, "every write is published");

    let short = |e: &Event| {
        (
            e.kind,
            String::from_utf8_lossy(&e.entry.key).into_owned(),
            String::from_utf8_lossy(&e.entry.value).into_owned(),
            e.entry.version,
            e.revision(),
        )
    };
    let put = |k: &str, v: &str, version, rev| (EventKind::Put, k.into(), v.into(), version, rev);
    let all: Vec<_> = all_events(s, &KeyRange::default(), 0, 1000)
        .iter()
        .map(short)
        .collect();
    assert_eq!(
        all,
        vec![
            put("a/1", "v1", 1, 1),
            put("a/2", "v2", 1, 2),
            put("b/1", "v3", 1, 2),
            put("a/n", "5", 1, 3),
            (EventKind::Delete, "a/1".into(), String::new(), 0, 4),
            put("a/2", "v4", 2, 5),
        ]
    );
    for max in 1..4 {
        let paged: Vec<_> = all_events(s, &KeyRange::default(), 0, max)
            .iter()
            .map(short)
            .collect();
        assert_eq!(paged, all, "pages of {max}");
    }
    let from_3: Vec<_> = all_events(s, &KeyRange::default(), 3, 1000)
        .iter()
        .map(short)
        .collect();
    assert_eq!(from_3, all[4..].to_vec(), "after revision 3");
    let prefix_a: Vec<_> = all_events(s, &KeyRange::prefix(b"a/"), 0, 1)
        .iter()
        .map(short)
        .collect();
    let want: Vec<_> = all
        .iter()
        .filter(|e| e.1.starts_with("a/"))
        .cloned()
        .collect();
    assert_eq!(prefix_a, want);
    let b_range = KeyRange {
        start: b"b".to_vec(),
        end: Some(b"c".to_vec()),
    };
    let b: Vec<_> = all_events(s, &b_range, 0, 1).iter().map(short).collect();
    assert_eq!(b, vec![put("b/1", "v3", 1, 2)]);
    // A start past the head waits there.
    let page = s
        .events(&KeyRange::default(), 9, PageLimits::events(10))
        .unwrap();
    assert_eq!((page.events.len(), page.through), (0, 9));
}

/// Writers on several threads, and 100 watchers of overlapping ranges reading while they
/// write: every watcher sees exactly the history's events of its range, in the one order
/// the history has, with no gap and no duplicate.
pub fn concurrent_watchers_see_one_order(make: &dyn Fn() -> Arc<dyn Store>) {
    const WRITERS: usize = 4;
    const WRITES: usize = 150;
    const WATCHERS: usize = 100;
    const READERS: usize = 4;
    let s = make();
    let ranges = [
        KeyRange::default(),
        KeyRange::prefix(b"p0/"),
        KeyRange::prefix(b"p1/"),
        KeyRange {
            start: b"p1/".to_vec(),
            end: Some(b"p3/".to_vec()),
        },
        KeyRange::prefix(b"p3/1"),
    ];
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (s, done) = (Arc::clone(&s), Arc::clone(&done));
            std::thread::spawn(move || {
                for i in 0..WRITES {
                    let key = format!("p{}/{}", (w + i) % 4, i % 20).into_bytes();
                    match i % 5 {
                        0 => drop(s.delete(&key, Condition::None).wait()),
                        1 => {
                            let other = format!("p{w}/x{i}").into_bytes();
                            let items = [
                                PutItem {
                                    key: &key,
                                    value: b"m",
                                    cond: Condition::None,
                                },
                                PutItem {
                                    key: &other,
                                    value: b"m",
                                    cond: Condition::None,
                                },
                            ];
                            s.put_many(&items).wait().unwrap();
                        }
                        _ => drop(s.put(&key, &[w as u8; 3], Condition::None).wait().unwrap()),
                    }
                }
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })
        })
        .collect();
    // Each reader thread drives a share of the watchers, a page of at most 7 at a time.
    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let (s, done, ranges) = (Arc::clone(&s), Arc::clone(&done), ranges.clone());
            std::thread::spawn(move || {
                let mine: Vec<usize> = (0..WATCHERS).filter(|w| w % READERS == r).collect();
                let mut seen: Vec<(usize, Vec<Event>, u64)> =
                    mine.iter().map(|&w| (w, Vec::new(), 0)).collect();
                // Bounded in time, not in rounds: while the writers wait on their commits
                // the readers have nothing to read, and a durable engine's committer may
                // get a core only between their time slices (a round count ran out on a
                // busy machine before 600 synced writes did). A round that moves no
                // watcher yields the core.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
                while std::time::Instant::now() < deadline {
                    let finished = done.load(std::sync::atomic::Ordering::SeqCst) == WRITERS;
                    let head = s.revision().unwrap();
                    let mut moved = false;
                    for (w, events, at) in seen.iter_mut() {
                        let page = s
                            .events(&ranges[*w % ranges.len()], *at, PageLimits::events(7))
                            .unwrap();
                        moved |= page.through != *at;
                        events.extend(page.events);
                        *at = page.through;
                    }
                    if finished && seen.iter().all(|(_, _, at)| *at >= head) {
                        return seen;
                    }
                    if !moved {
                        std::thread::yield_now();
                    }
                }
                panic!("watchers did not reach the head within 120 s");
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let all = all_events(s.as_ref(), &KeyRange::default(), 0, 1000);
    for reader in readers {
        for (w, events, _) in reader.join().unwrap() {
            let range = &ranges[w % ranges.len()];
            let want: Vec<&Event> = all
                .iter()
                .filter(|e| range.contains(&e.entry.key))
                .collect();
            assert_eq!(events.iter().collect::<Vec<_>>(), want, "watcher {w}");
        }
    }
}

/// A put with a lease attaches its key, a put without detaches it, an increment keeps it;
/// revoking a lease deletes its keys at one new revision (watchers see the deletes); an
/// unknown lease fails the put and writes nothing; a put with a TTL grants a lease of its
/// own; a lease past its TTL is revoked by `ExpireLeases`.
pub fn leases_take_their_keys(s: &dyn Store) {
    use crate::write::{Attach, RevokeLease};
    let grant = |ttl_ms| grant_lease(s, ttl_ms);
    let put = |key: &[u8], attach| put_attached(s, key, attach, None);
    let long = grant(600_000);
    assert_ne!(long, 0);
    assert_eq!(put(b"a/1", Attach::Lease(long)).unwrap().lease, long);
    put(b"a/2", Attach::Lease(long)).unwrap();
    put(b"a/3", Attach::Lease(long)).unwrap();
    assert_eq!(put(b"a/3", Attach::None).unwrap().lease, 0, "detached");
    assert_eq!(
        put(b"b", Attach::Lease(long ^ 1)),
        Err(StoreError::LeaseNotFound { id: long ^ 1 })
    );
    assert_eq!(
        s.get(b"b").unwrap(),
        None,
        "an unknown lease writes nothing"
    );
    assert_eq!(s.lease_info(long).unwrap().keys, 2);
    assert!(s.lease_keep_alive(long).unwrap().remaining_ms > 0);

    let before = s.revision().unwrap();
    let revoked = s.apply(RevokeLease { id: long }, None).wait().unwrap();
    assert_eq!((revoked.deleted, revoked.revision), (2, before + 1));
    assert_eq!(s.get(b"a/1").unwrap(), None);
    assert!(s.get(b"a/3").unwrap().is_some(), "detached keys stay");
    let events = all_events(s, &KeyRange::default(), before, 100);
    assert_eq!(
        events
            .iter()
            .map(|e| (e.kind, e.entry.key.clone(), e.revision()))
            .collect::<Vec<_>>(),
        vec![
            (EventKind::Delete, b"a/1".to_vec(), before + 1),
            (EventKind::Delete, b"a/2".to_vec(), before + 1)
        ]
    );
    assert_eq!(
        s.apply(RevokeLease { id: long }, None).wait(),
        Err(StoreError::LeaseNotFound { id: long })
    );
    assert_eq!(
        s.lease_info(long),
        Err(StoreError::LeaseNotFound { id: long })
    );

    // An increment keeps the lease; a batch detaches.
    let kept = grant(600_000);
    put(b"n", Attach::Lease(kept)).unwrap();
    s.write(inc(b"n", 1), None).wait().unwrap_err(); // "v" is not an integer
    s.apply(
        write::Put {
            key: b"n".to_vec(),
            value: b"1".to_vec(),
            cond: Condition::None,
            attach: Attach::Lease(kept),
        },
        None,
    )
    .wait()
    .unwrap();
    s.write(inc(b"n", 1), None).wait().unwrap();
    assert_eq!(s.lease_info(kept).unwrap().keys, 1);
    let items = [PutItem {
        key: b"n",
        value: b"9",
        cond: Condition::None,
    }];
    s.put_many(&items).wait().unwrap();
    assert_eq!(s.lease_info(kept).unwrap().keys, 0);

    // Keyed, a put with a TTL and a revoke have one effect however often they are sent.
    let ttl_put = || {
        let attach = Attach::NewLease { ttl_ms: 600_000 };
        put_attached(s, b"once", attach, idem("s", "ttl-put", far_future())).unwrap()
    };
    let first = ttl_put();
    assert_ne!(first.lease, 0, "a lease of its own");
    assert_eq!(
        ttl_put(),
        first,
        "the replay answers the first outcome: one lease, not two"
    );
    assert_eq!(s.lease_info(first.lease).unwrap().keys, 1);
    let revoke = || {
        s.apply(
            RevokeLease { id: first.lease },
            idem("s", "revoke", far_future()),
        )
        .wait()
    };
    let revoked = revoke().unwrap();
    assert_eq!(revoked.deleted, 1);
    assert_eq!(revoke(), Ok(revoked), "the replay, not leaseNotFound");
}

/// Engines that keep lease deadlines themselves (the local ones; etcd expires leases on
/// its own clock): `lease_clock` counts the leases and names the next deadline, a put's
/// own lease of TTL 0 is past it at once, and the reaper's `ExpireLeases` takes its key
/// and leaves live leases alone. A keyed put's own lease is granted once.
pub fn leases_expire_by_the_reaper(s: &dyn Store) {
    use crate::write::{Attach, ExpireLeases};
    let put = |key: &[u8], attach, idem| put_attached(s, key, attach, idem).unwrap().lease;
    let live = grant_lease(s, 600_000);
    let ttl = put(b"t/1", Attach::NewLease { ttl_ms: 0 }, None);
    assert_ne!(ttl, 0);
    let (alive, next) = s.lease_clock();
    assert!(alive == 2 && next.is_some());
    assert_eq!(s.apply(ExpireLeases, None).wait(), Ok(1));
    assert_eq!(s.get(b"t/1").unwrap(), None);
    assert_eq!(
        s.lease_info(ttl),
        Err(StoreError::LeaseNotFound { id: ttl })
    );
    assert!(s.lease_info(live).is_ok(), "a live lease does not expire");

    let keyed = || {
        put(
            b"once",
            Attach::NewLease { ttl_ms: 600_000 },
            idem("s", "k", far_future()),
        )
    };
    let first = keyed();
    assert_eq!(keyed(), first);
    assert_eq!(s.lease_clock().0, 2, "one lease, not two");
}

/// A lease of `ttl_ms` granted on `s`: its id.
fn grant_lease(s: &dyn Store, ttl_ms: u64) -> u64 {
    match s.write(write::GrantLease { ttl_ms }.into(), None).wait() {
        Ok(crate::WriteOutcome::GrantLease(g)) => g.id,
        other => panic!("grant: {other:?}"),
    }
}

/// A put of `v` under `key`, its key attached as `attach`, keyed by `idem`.
fn put_attached(
    s: &dyn Store,
    key: &[u8],
    attach: write::Attach,
    idem: Option<IdempotencyKey>,
) -> Result<crate::PutOutcome, StoreError> {
    let w = write::Put {
        key: key.to_vec(),
        value: b"v".to_vec(),
        cond: Condition::None,
        attach,
    };
    s.apply(w, idem).wait()
}

/// Expands to one `#[test]` per conformance case for the engine `$make` builds.
#[macro_export]
macro_rules! conformance_tests {
    // The cases of every engine, including those that expire leases on a clock of their
    // own (etcd): all but `leases_expire_by_the_reaper`.
    (shared: $make:expr) => {
        $crate::conformance_tests!(@cases $make;
            get_missing_is_none, put_then_get, get_into_reads_what_get_reads,
            versions_and_revisions_advance,
            binary_keys_and_values, delete_missing_changes_nothing, conditions,
            scan_is_ordered_and_bounded, scan_pages_by_limit_and_bytes,
            batches_are_atomic_with_one_revision, increments, idempotent_replays,
            expired_records_are_forgotten, history_replays_every_change_in_order,
            leases_take_their_keys);
        #[test]
        fn concurrent_writers() {
            $crate::conformance::concurrent_writers(&|| {
                let s: ::std::sync::Arc<dyn $crate::Store> = ::std::sync::Arc::new($make);
                s
            });
        }
        #[test]
        fn concurrent_duplicates_write_once() {
            $crate::conformance::concurrent_duplicates_write_once(&|| {
                let s: ::std::sync::Arc<dyn $crate::Store> = ::std::sync::Arc::new($make);
                s
            });
        }
        #[test]
        fn concurrent_watchers_see_one_order() {
            $crate::conformance::concurrent_watchers_see_one_order(&|| {
                let s: ::std::sync::Arc<dyn $crate::Store> = ::std::sync::Arc::new($make);
                s
            });
        }
        #[test]
        fn concurrent_compare_and_set() {
            $crate::conformance::concurrent_compare_and_set(&|| {
                let s: ::std::sync::Arc<dyn $crate::Store> = ::std::sync::Arc::new($make);
                s
            });
        }
    };
    ($make:expr) => {
        $crate::conformance_tests!(shared: $make);
        $crate::conformance_tests!(@cases $make; leases_expire_by_the_reaper);
    };
    (@cases $make:expr; $($case:ident),*) => {
        $(
            #[test]
            fn $case() {
                let s = $make;
                $crate::conformance::$case(&s);
            }
        )*
    };
}

/// A store with something that must outlive it (its temp directory, the etcd cluster it
/// runs on): dropped after the store. Every [`Store`] method goes to the store.
pub struct Guarded<S, G> {
    // Field order is drop order.
    pub store: S,
    pub guard: G,
}

impl<S: Store, G: Send + Sync> Store for Guarded<S, G> {
    fn get(&self, key: &[u8]) -> Result<Option<crate::Entry>, StoreError> {
        self.store.get(key)
    }
    fn get_into(
        &self,
        key: &[u8],
        value: &mut Vec<u8>,
    ) -> Result<Option<crate::Found>, StoreError> {
        self.store.get_into(key, value)
    }
    fn write(
        &self,
        op: WriteOp,
        idem: Option<IdempotencyKey>,
    ) -> crate::Pending<crate::WriteOutcome> {
        self.store.write(op, idem)
    }
    fn scan(&self, req: &ScanRequest) -> Result<crate::ScanPage, StoreError> {
        self.store.scan(req)
    }
    fn get_many(&self, keys: &[&[u8]]) -> Result<(Vec<Option<crate::Entry>>, u64), StoreError> {
        self.store.get_many(keys)
    }
    fn get_many_within(
        &self,
        keys: &[&[u8]],
        max_payload_bytes: usize,
    ) -> Result<Option<crate::ManyRead>, StoreError> {
        self.store.get_many_within(keys, max_payload_bytes)
    }
    fn reads_complete_at_once(&self) -> bool {
        self.store.reads_complete_at_once()
    }
    fn scans_pin_revision(&self) -> bool {
        self.store.scans_pin_revision()
    }
    fn get_async(&self, key: &[u8]) -> crate::Pending<Option<crate::Entry>> {
        self.store.get_async(key)
    }
    fn scan_async(&self, req: &ScanRequest) -> crate::Pending<crate::ScanPage> {
        self.store.scan_async(req)
    }
    fn get_many_async(&self, keys: &[&[u8]]) -> crate::Pending<(Vec<Option<crate::Entry>>, u64)> {
        self.store.get_many_async(keys)
    }
    fn lease_keep_alive_async(&self, id: u64) -> crate::Pending<crate::LeaseInfo> {
        self.store.lease_keep_alive_async(id)
    }
    fn lease_info_async(&self, id: u64) -> crate::Pending<crate::LeaseInfo> {
        self.store.lease_info_async(id)
    }
    fn revision(&self) -> Result<u64, StoreError> {
        self.store.revision()
    }
    crate::forward_history_and_leases!(store);
    fn engine_name(&self) -> &'static str {
        self.store.engine_name()
    }
    fn stats(&self) -> crate::StoreStats {
        self.store.stats()
    }
    fn instance_secret(&self) -> [u8; 32] {
        self.store.instance_secret()
    }
    fn write_refusal(&self) -> Option<String> {
        self.store.write_refusal()
    }
    fn compact(&self) -> Result<(), StoreError> {
        self.store.compact()
    }
    fn checkpoint(&self, dir: &std::path::Path) -> Result<(), StoreError> {
        self.store.checkpoint(dir)
    }
}

/// The memory engine, showing `tap` every write it is given before applying it: for tests
/// of what reaches a store (which writes carry idempotency keys, with what expiry).
pub struct Tapped<F> {
    store: crate::memory::MemoryStore,
    tap: F,
}

impl<F> Tapped<F>
where
    F: Fn(&WriteOp, Option<&IdempotencyKey>) + Send + Sync,
{
    pub fn new(tap: F) -> Self {
        Self {
            store: crate::memory::MemoryStore::new(),
            tap,
        }
    }
}

impl<F> Store for Tapped<F>
where
    F: Fn(&WriteOp, Option<&IdempotencyKey>) + Send + Sync,
{
    fn get(&self, key: &[u8]) -> Result<Option<crate::Entry>, StoreError> {
        self.store.get(key)
    }
    fn write(
        &self,
        op: WriteOp,
        idem: Option<IdempotencyKey>,
    ) -> crate::Pending<crate::WriteOutcome> {
        (self.tap)(&op, idem.as_ref());
        self.store.write(op, idem)
    }
    fn scan(&self, req: &ScanRequest) -> Result<crate::ScanPage, StoreError> {
        self.store.scan(req)
    }
    fn get_many(&self, keys: &[&[u8]]) -> Result<(Vec<Option<crate::Entry>>, u64), StoreError> {
        self.store.get_many(keys)
    }
    fn get_many_within(
        &self,
        keys: &[&[u8]],
        max_payload_bytes: usize,
    ) -> Result<Option<crate::ManyRead>, StoreError> {
        self.store.get_many_within(keys, max_payload_bytes)
    }
    fn revision(&self) -> Result<u64, StoreError> {
        self.store.revision()
    }
    crate::forward_history_and_leases!(store);
    fn engine_name(&self) -> &'static str {
        "tapped-memory"
    }
    fn instance_secret(&self) -> [u8; 32] {
        self.store.instance_secret()
    }
}
