use super::*;
use crate::history::{KeyRange, PageLimits};
use crate::write::{self, Attach};
use crate::{Condition, MemoryStore, PutItem};

fn small(dir: &Path) -> LogOptions {
    let mut o = LogOptions::new(dir);
    o.segment_bytes = MIN_SEGMENT_BYTES;
    o.snapshot_min_log_bytes = 1 << 30;
    o
}

fn put(s: &dyn Store, k: &[u8], v: &[u8]) {
    s.put(k, v, Condition::None).wait().unwrap();
}

/// Everything a reader can see: every entry, the revision, the history's events.
fn state(s: &dyn Store) -> (Vec<Entry>, u64) {
    let page = s
        .scan(&ScanRequest {
            limit: usize::MAX,
            max_bytes: usize::MAX,
            ..ScanRequest::default()
        })
        .unwrap();
    (page.entries, s.revision().unwrap())
}

/// A mix of every kind of write, `rounds` times.
fn workload(s: &dyn Store, rounds: u32) {
    for i in 0..rounds {
        let k = format!("k{:04}", i % 37).into_bytes();
        put(s, &k, format!("value {i:0>120}").as_bytes());
        if i % 5 == 0 {
            s.delete(format!("k{:04}", (i + 3) % 37).as_bytes(), Condition::None)
                .wait()
                .unwrap();
        }
        if i % 7 == 0 {
            s.apply(
                write::PutMany {
                    items: vec![
                        (
                            b"batch-a".to_vec(),
                            i.to_string().into_bytes(),
                            Condition::None,
                        ),
                        (b"batch-b".to_vec(), vec![0, 1, 2], Condition::None),
                    ],
                },
                None,
            )
            .wait()
            .unwrap();
        }
        if i % 11 == 0 {
            s.apply(
                write::Increment {
                    key: b"counter".to_vec(),
                    delta: 3,
                },
                None,
            )
            .wait()
            .unwrap();
        }
    }
}

#[test]
fn every_kind_of_write_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (before, lease, keep) = {
        let store = LoggedStore::open(small(dir.path())).unwrap();
        let s: &dyn Store = &store;
        workload(s, 500);
        let lease = s
            .apply(
                write::Put {
                    key: b"leased".to_vec(),
                    value: b"v".to_vec(),
                    cond: Condition::None,
                    attach: Attach::NewLease { ttl_ms: 60_000 },
                },
                None,
            )
            .wait()
            .unwrap()
            .lease;
        let gone = s
            .apply(write::GrantLease { ttl_ms: 60_000 }, None)
            .wait()
            .unwrap()
            .id;
        s.apply(
            write::Put {
                key: b"revoked".to_vec(),
                value: b"v".to_vec(),
                cond: Condition::None,
                attach: Attach::Lease(gone),
            },
            None,
        )
        .wait()
        .unwrap();
        s.apply(write::RevokeLease { id: gone }, None)
            .wait()
            .unwrap();
        let idem = IdempotencyKey {
            session: b"s".to_vec(),
            key: b"once".to_vec(),
            expires_at_unix_ms: crate::write::now_unix_ms() + 60_000,
        };
        let keep = s
            .apply(
                write::Increment {
                    key: b"once".to_vec(),
                    delta: 5,
                },
                Some(idem),
            )
            .wait()
            .unwrap();
        assert!(s.stats().wal_syncs > 0);
        (state(s), lease, keep)
    };
    let store = LoggedStore::open(small(dir.path())).unwrap();
    let s: &dyn Store = &store;
    assert_eq!(state(s), before);
    assert!(
        files::numbered(dir.path(), "log-").unwrap().len() > 1,
        "the workload crossed segments"
    );
    assert_eq!(s.lease_info(lease).unwrap().keys, 1);
    assert_eq!(s.get(b"revoked").unwrap(), None);
    // The idempotency record came back: the same write is answered, not applied again.
    let again = s
        .apply(
            write::Increment {
                key: b"once".to_vec(),
                delta: 5,
            },
            Some(IdempotencyKey {
                session: b"s".to_vec(),
                key: b"once".to_vec(),
                expires_at_unix_ms: crate::write::now_unix_ms() + 60_000,
            }),
        )
        .wait()
        .unwrap();
    assert_eq!(again, keep);
    assert_eq!(s.get(b"once").unwrap().unwrap().value, b"5");
    // History after a reopen: the log's events are there to watch.
    let page = s
        .events(&KeyRange::prefix(b""), 0, PageLimits::events(100_000))
        .unwrap();
    assert!(!page.events.is_empty());
}

/// A log whose last record is one put: the state before it, the last segment's number,
/// path and bytes, and where its last record starts and ends.
struct LastRecord {
    before: (Vec<Entry>, u64),
    seq: u64,
    path: PathBuf,
    bytes: Vec<u8>,
    start: usize,
    end: usize,
}

fn log_with_a_last_put(dir: &Path) -> LastRecord {
    let before = {
        let s = LoggedStore::open(small(dir)).unwrap();
        workload(&s, 40);
        let before = state(&s);
        put(&s, b"last", &[9u8; 300]);
        before
    };
    let seq = *files::numbered(dir, "log-").unwrap().last().unwrap();
    let path = files::segment_path(dir, seq);
    let bytes = fs::read(&path).unwrap();
    let (records, end, _) = files::records(seq, &bytes);
    // A record: 8 bytes of length and checksum, 8 of revision, the effects.
    let start = end - (records.last().unwrap().effects.len() + 16);
    LastRecord {
        before,
        seq,
        path,
        bytes,
        start,
        end,
    }
}

#[test]
fn a_torn_last_record_is_dropped_at_every_byte_and_writing_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let LastRecord {
        before,
        path,
        bytes: whole,
        start: last_start,
        end,
        ..
    } = log_with_a_last_put(dir.path());
    // Every cut of the last record (the bytes from the cut on, garbage).
    for cut in (last_start..end).step_by(7).chain([end - 1]) {
        let mut torn = whole.clone();
        torn[cut..end].iter_mut().for_each(|b| *b = 0x5A);
        fs::write(&path, &torn).unwrap();
        {
            let s = LoggedStore::open(small(dir.path())).unwrap();
            assert_eq!(state(&s), before, "cut at {cut}");
            put(&s, b"after", b"x");
        }
        let s = LoggedStore::open(small(dir.path())).unwrap();
        assert_eq!(
            s.get(b"after").unwrap().map(|e| e.value),
            Some(b"x".to_vec()),
            "a write after the torn record survives (cut at {cut})"
        );
        assert_eq!(s.get(b"last").unwrap(), None);
    }
}

#[test]
fn a_bad_record_before_the_last_segment_fails_the_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = LoggedStore::open(small(dir.path())).unwrap();
        workload(&s, 600);
    }
    let segs = files::numbered(dir.path(), "log-").unwrap();
    assert!(segs.len() >= 2);
    let path = files::segment_path(dir.path(), segs[0]);
    let mut b = fs::read(&path).unwrap();
    b[40] ^= 0xFF;
    fs::write(&path, &b).unwrap();
    match LoggedStore::open(small(dir.path())) {
        Err(LogError::Corrupt { detail, .. }) => assert!(detail.contains("segment"), "{detail}"),
        other => panic!("expected corruption, got {other:?}"),
    }
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _s = LoggedStore::open(small(dir.path())).unwrap();
    assert!(matches!(
        LoggedStore::open(small(dir.path())),
        Err(LogError::Locked(_))
    ));
}

#[test]
fn bad_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = small(dir.path());
    o.segment_bytes = 1_000;
    assert!(matches!(LoggedStore::open(o), Err(LogError::Invalid(_))));
}

#[test]
fn a_snapshot_taken_under_writes_replaces_the_old_segments() {
    let dir = tempfile::tempdir().unwrap();
    let live = {
        let s = Arc::new(LoggedStore::open(small(dir.path())).unwrap());
        workload(s.as_ref(), 800);
        for i in 0..2_000u32 {
            put(s.as_ref(), format!("bulk{i:05}").as_bytes(), &[1u8; 64]);
        }
        let segs_before = files::numbered(dir.path(), "log-").unwrap();
        assert!(segs_before.len() > 3);
        s.compact().unwrap();
        // Writes go on while the snapshot is written.
        let writer = {
            let s = Arc::clone(&s);
            std::thread::spawn(move || workload(s.as_ref(), 300))
        };
        let mut waited = 0;
        while snapshots(dir.path()).is_empty() {
            assert!(waited < 1_000, "no snapshot after 10 s");
            std::thread::sleep(Duration::from_millis(10));
            waited += 1;
        }
        writer.join().unwrap();
        state(s.as_ref())
    };
    let snap = snapshots(dir.path());
    assert_eq!(snap.len(), 1);
    let segs = files::numbered(dir.path(), "log-").unwrap();
    assert!(
        segs.iter().all(|&s| s >= snap[0]),
        "{segs:?} before {snap:?}"
    );
    let s = LoggedStore::open(small(dir.path())).unwrap();
    assert_eq!(state(&s), live);
    // The history starts at the snapshot: a watch from before is told it is compacted.
    assert!(matches!(
        s.events(&KeyRange::prefix(b""), 0, PageLimits::events(100_000)),
        Err(StoreError::Compacted { .. })
    ));
}

/// A group applied but not synced is invisible: keys it changed read as before (including
/// keys it deleted, in scans), the revision and watch pages stop before it.
#[test]
fn reads_see_a_group_only_once_it_is_durable() {
    let m = MemoryStore::logging(100, 1 << 20, [0; 32]);
    let mut g = m.begin_group();
    for k in [&b"a"[..], b"b", b"c"] {
        g.write(
            WriteOp::Put(write::Put {
                key: k.to_vec(),
                value: b"old".to_vec(),
                ..Default::default()
            }),
            None,
        )
        .unwrap();
    }
    let (effects, _) = g.done();
    m.end_group(effects);
    let durable = state(&m);
    let mut g = m.begin_group();
    g.write(
        WriteOp::Put(write::Put {
            key: b"a".to_vec(),
            value: b"new".to_vec(),
            ..Default::default()
        }),
        None,
    )
    .unwrap();
    g.write(
        WriteOp::Delete(write::Delete {
            key: b"b".to_vec(),
            cond: Condition::None,
        }),
        None,
    )
    .unwrap();
    g.write(
        WriteOp::Put(write::Put {
            key: b"0-new".to_vec(),
            value: b"x".to_vec(),
            ..Default::default()
        }),
        None,
    )
    .unwrap();
    let (effects, revision) = g.done();
    assert_eq!(state(&m), durable, "in flight: nothing of the group shows");
    assert_eq!(m.get(b"a").unwrap().unwrap().value, b"old");
    assert!(m.get(b"b").unwrap().is_some());
    assert_eq!(m.get(b"0-new").unwrap(), None);
    let (many, r) = m.get_many(&[b"a", b"b"]).unwrap();
    assert_eq!(
        (many[0].as_ref().unwrap().value.as_slice(), r),
        (&b"old"[..], durable.1)
    );
    let page = m
        .events(&KeyRange::prefix(b""), 0, PageLimits::events(100_000))
        .unwrap();
    assert!(page
        .events
        .iter()
        .all(|e| e.entry.mod_revision <= durable.1));
    m.end_group(effects);
    let (entries, rev) = state(&m);
    assert_eq!(rev, revision);
    let keys: Vec<&[u8]> = entries.iter().map(|e| e.key.as_slice()).collect();
    assert_eq!(keys, vec![&b"0-new"[..], b"a", b"c"]);
}

/// A log that cannot be synced: the group's writes fail, every later write is refused
/// (`write_refusal` says why), and reads keep to what was durable before (the failed
/// group stays hidden).
#[test]
fn a_failed_sync_refuses_writes_and_hides_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let store = LoggedStore::open(small(dir.path())).unwrap();
    let s: &dyn Store = &store;
    put(s, b"a", b"durable");
    assert!(s.write_refusal().is_none());
    store.counters.fail_syncs.store(true, Ordering::Release);
    let failed = s.put(b"a", b"lost?", Condition::None).wait();
    assert!(
        matches!(failed, Err(StoreError::Unavailable(_))),
        "{failed:?}"
    );
    assert_eq!(s.get(b"a").unwrap().unwrap().value, b"durable");
    assert_eq!(s.revision().unwrap(), 1);
    store.counters.fail_syncs.store(false, Ordering::Release);
    let refused = s.put(b"b", b"x", Condition::None).wait();
    assert!(
        matches!(refused, Err(StoreError::Unavailable(_))),
        "{refused:?}"
    );
    assert!(s.write_refusal().is_some());
    assert_eq!(s.get(b"b").unwrap(), None);
}

/// The engine refuses a RocksDB directory, and RocksDB refuses a log's (tested in
/// capkv-store-rocks); `holds_a_log` tells them apart.
#[test]
fn a_rocksdb_directory_is_refused_and_a_log_is_recognised() {
    let dir = tempfile::tempdir().unwrap();
    assert!(!holds_a_log(dir.path()));
    drop(LoggedStore::open(small(dir.path())).unwrap());
    assert!(holds_a_log(dir.path()));
    let rocks = tempfile::tempdir().unwrap();
    fs::write(rocks.path().join("CURRENT"), b"MANIFEST-000001\n").unwrap();
    assert!(matches!(
        LoggedStore::open(small(rocks.path())),
        Err(LogError::Invalid(_))
    ));
}

/// A checkpoint taken while batches are written opens to a state the store went through:
/// everything written before it, each batch whole, nothing written after it returned.
#[test]
fn a_checkpoint_under_writes_opens_to_a_consistent_state() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy");
    let live = dir.path().join("live");
    let store = Arc::new(LoggedStore::open(small(&live)).unwrap());
    let s: &dyn Store = store.as_ref();
    workload(s, 400);
    let before = state(s);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
        std::thread::spawn(move || {
            let s: &dyn Store = store.as_ref();
            // Bounded: at most 20,000 batches, ended early by `stop`.
            for i in 0..20_000u32 {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let v = i.to_string().into_bytes();
                s.apply(
                    write::PutMany {
                        items: vec![
                            (b"pair-a".to_vec(), v.clone(), Condition::None),
                            (b"pair-b".to_vec(), v, Condition::None),
                        ],
                    },
                    None,
                )
                .wait()
                .unwrap();
            }
        })
    };
    // Let the writer get going, then a checkpoint while it runs.
    while s.get(b"pair-a").unwrap().is_none() {
        std::thread::yield_now();
    }
    s.checkpoint(&copy).unwrap();
    stop.store(true, Ordering::Release);
    writer.join().unwrap();
    put(s, b"after", b"x");
    let e = s.checkpoint(&copy).unwrap_err();
    assert!(
        matches!(e, StoreError::Invalid(ref m) if m.contains("already exists")),
        "{e:?}"
    );
    drop(store);

    let restored = LoggedStore::open(small(&copy)).unwrap();
    let r: &dyn Store = &restored;
    let (a, b) = (
        r.get(b"pair-a").unwrap().unwrap(),
        r.get(b"pair-b").unwrap().unwrap(),
    );
    assert_eq!(a.value, b.value, "a batch is whole in the copy");
    assert_eq!(a.mod_revision, b.mod_revision);
    assert_eq!(r.get(b"after").unwrap(), None, "later writes are not in it");
    for e in &before.0 {
        assert_eq!(r.get(&e.key).unwrap().as_ref(), Some(e), "{:?}", e.key);
    }
    assert_eq!(r.instance_secret(), {
        let live = LoggedStore::open(small(&live)).unwrap();
        live.instance_secret()
    });
}

/// A disk too full for the next segment: writes that might not fit what is left of this
/// one are refused with `storageFull` before they touch anything, the store never goes
/// into its failed state (which needs a restart), and writes resume once a segment can be
/// made again.
#[test]
fn a_full_disk_refuses_writes_until_a_segment_can_be_made() {
    // 1 KB puts, and writes whose records outweigh their keys and values: batches of
    // many tiny items, keyed puts (their idempotency records). The group's size is
    // estimated before it is applied; an estimate short of the record let a group through
    // that then needed the segment that could not be made, and failed the log.
    let value = [7u8; 1_000];
    full_disk_refuses(|s, i| {
        s.put(format!("k{i}").as_bytes(), &value, Condition::None)
            .wait()
            .map(drop)
    });
    full_disk_refuses(|s, i| {
        let keys: Vec<String> = (0..100).map(|j| format!("{i}/{j}")).collect();
        let items: Vec<PutItem<'_>> = keys
            .iter()
            .map(|k| PutItem {
                key: k.as_bytes(),
                value: b"v",
                cond: Condition::None,
            })
            .collect();
        s.put_many(&items).wait().map(drop)
    });
    full_disk_refuses(|s, i| {
        let idem = IdempotencyKey {
            session: vec![b's'; 32],
            key: format!("{i:064}").into_bytes(),
            expires_at_unix_ms: crate::write::now_unix_ms() + 60_000,
        };
        let put = write::Put {
            key: format!("k{i}").into_bytes(),
            value: b"v".to_vec(),
            cond: Condition::None,
            attach: Attach::None,
        };
        s.apply(put, Some(idem)).wait().map(drop)
    });
}

/// Writes `write(store, i)` for i = 0, 1, ... while the log's next segment cannot be made:
/// they are refused (`storageFull`) once the segment is full, the log does not fail, and
/// writes resume once a segment can be made.
fn full_disk_refuses(write: impl Fn(&dyn Store, u32) -> Result<(), StoreError>) {
    let dir = tempfile::tempdir().unwrap();
    let store = LoggedStore::open(small(dir.path())).unwrap();
    let s: &dyn Store = &store;
    store.counters.fail_prepare.store(true, Ordering::SeqCst);
    let mut refused = 0;
    // Bounded: at most 1,000 writes of 1 KB, for 3.5 s once refusals start (the failed
    // segment is tried again each second: three tries, each of which must not let a write
    // through that would need the segment; with one try the write still fits).
    let mut refusing_since = None::<Instant>;
    for i in 0..1_000u32 {
        match write(s, i) {
            Ok(()) => {}
            Err(StoreError::StorageFull(_)) => {
                refused += 1;
                refusing_since.get_or_insert_with(Instant::now);
            }
            Err(e) => panic!("write {i}: {e:?}"),
        }
        match refusing_since {
            Some(t) if t.elapsed() >= Duration::from_millis(3_500) => break,
            Some(_) => std::thread::sleep(Duration::from_millis(10)),
            None => {}
        }
    }
    assert!(refused > 0, "the segment filled without a refusal");
    assert!(
        s.write_refusal().is_none(),
        "a full disk must not fail the log"
    );
    store.counters.fail_prepare.store(false, Ordering::SeqCst);
    let mut resumed = false;
    // Bounded: at most 5 s for the next try (once a second) to make a segment.
    for _ in 0..500 {
        if s.put(b"after", b"room again", Condition::None)
            .wait()
            .is_ok()
        {
            resumed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        resumed,
        "writes did not resume once a segment could be made"
    );
    let before = state(s);
    drop(store);
    let reopened = LoggedStore::open(small(dir.path())).unwrap();
    assert_eq!(state(&reopened), before);
}

/// A crash after a segment was started for a snapshot (or a checkpoint), with a torn record
/// at the end of the one before: the log ends at the torn record, the empty later segment
/// goes, and the store opens.
#[test]
fn a_torn_record_before_an_empty_later_segment_still_ends_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let LastRecord {
        before,
        seq,
        path,
        bytes: mut buf,
        start: last_start,
        end,
    } = log_with_a_last_put(dir.path());
    buf[last_start + 20..end].iter_mut().for_each(|b| *b = 0x5A);
    fs::write(&path, &buf).unwrap();
    files::zero_filled(&files::segment_path(dir.path(), seq + 1), MIN_SEGMENT_BYTES).unwrap();
    let s = LoggedStore::open(small(dir.path())).unwrap();
    assert_eq!(state(&s), before);
    put(&s, b"after", b"x");
    drop(s);
    let s = LoggedStore::open(small(dir.path())).unwrap();
    assert_eq!(
        s.get(b"after").unwrap().map(|e| e.value),
        Some(b"x".to_vec())
    );
}

/// Grants a lease of `ttl_ms` in the group `g`; its id.
fn grant_in(g: &mut crate::memory::Applying<'_>, ttl_ms: u64) -> u64 {
    match g.write(WriteOp::GrantLease(write::GrantLease { ttl_ms }), None) {
        Ok(WriteOutcome::GrantLease(l)) => l.id,
        other => panic!("{other:?}"),
    }
}

/// Lease reads answer as before a group in flight too: a lease it grants is not there yet,
/// one it revokes still is (and can be kept alive) until the group is durable.
#[test]
fn lease_reads_see_a_group_only_once_it_is_durable() {
    let m = MemoryStore::logging(100, 1 << 20, [0; 32]);
    let s: &dyn Store = &m;
    let mut g = m.begin_group();
    let old = grant_in(&mut g, 60_000);
    let (effects, _) = g.done();
    m.end_group(effects);
    let mut g = m.begin_group();
    let new = grant_in(&mut g, 5_000);
    g.write(WriteOp::RevokeLease(write::RevokeLease { id: old }), None)
        .unwrap();
    let (effects, _) = g.done();
    assert!(matches!(
        s.lease_info(new),
        Err(StoreError::LeaseNotFound { .. })
    ));
    assert!(matches!(
        s.lease_keep_alive(new),
        Err(StoreError::LeaseNotFound { .. })
    ));
    assert_eq!(s.lease_info(old).unwrap().ttl_ms, 60_000);
    assert_eq!(s.lease_keep_alive(old).unwrap().remaining_ms, 60_000);
    m.end_group(effects);
    assert_eq!(s.lease_info(new).unwrap().ttl_ms, 5_000);
    assert!(matches!(
        s.lease_info(old),
        Err(StoreError::LeaseNotFound { .. })
    ));
}
