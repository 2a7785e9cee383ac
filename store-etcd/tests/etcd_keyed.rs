//! Keyed unconditional puts on etcd are one transaction (the put and its record, no read
//! first), so their record cannot hold the version etcd gives the put; a replay reads it
//! back at the record's revision. These cases pin what a replay answers when the key has
//! changed since, when etcd has compacted that revision, and when the key is reused.
//! Keyed unconditional deletes are one transaction too (a nested one whose two branches
//! record whether the key existed): a replay answers what the first delete did.

use capkv_store::write::{self, now_unix_ms, Attach, IdempotencyKey};
use capkv_store::{Condition, DeleteOutcome, PutOutcome, Store, StoreError, WriteOp, WriteOutcome};
use capkv_store_etcd::cluster::Cluster;
use capkv_store_etcd::{EtcdOptions, EtcdStore};

fn keyed(key: &[u8]) -> IdempotencyKey {
    IdempotencyKey {
        session: b"session-1".to_vec(),
        key: key.to_vec(),
        expires_at_unix_ms: now_unix_ms() + 60_000,
    }
}

fn put(store: &EtcdStore, value: &[u8], idem: Option<IdempotencyKey>) -> PutOutcome {
    put_result(store, value, idem).expect("put")
}

fn put_result(
    store: &EtcdStore,
    value: &[u8],
    idem: Option<IdempotencyKey>,
) -> Result<PutOutcome, StoreError> {
    let op = WriteOp::Put(write::Put {
        key: b"k".to_vec(),
        value: value.to_vec(),
        cond: Condition::None,
        attach: Attach::None,
    });
    match store.write(op, idem).wait()? {
        WriteOutcome::Put(o) => Ok(o),
        other => panic!("a put answered {other:?}"),
    }
}

#[test]
fn a_replay_answers_the_recorded_put_even_after_the_key_changed_or_was_compacted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = Cluster::start(dir.path(), 1).expect("etcd");
    let mut opts = EtcdOptions::new(cluster.endpoints());
    opts.compact_keep_revisions = 0;
    let store = EtcdStore::open(opts).expect("open");

    put(&store, b"v1", None);
    let first = put(&store, b"v2", Some(keyed(b"w1")));
    assert_eq!(first.version, 2, "the version etcd gave the put");

    // Unchanged since: read from the key's present.
    assert_eq!(put(&store, b"v2", Some(keyed(b"w1"))), first);
    // Changed since: read at the record's revision.
    put(&store, b"v3", None);
    assert_eq!(put(&store, b"v2", Some(keyed(b"w1"))), first);
    assert_eq!(store.stats().idempotent_replays, 2);
    // The key is reused for another write: refused, whatever path takes it.
    assert!(matches!(
        put_result(&store, b"other", Some(keyed(b"w1"))),
        Err(StoreError::IdempotencyKeyReused)
    ));

    // Compacted past the put's revision and changed since: the revision is still known,
    // the version no longer (0: never a version of a present key).
    store.compact().expect("compact");
    let replay = put(&store, b"v2", Some(keyed(b"w1")));
    assert_eq!(
        replay,
        PutOutcome {
            version: 0,
            ..first
        }
    );
    // A new key writes again, with its version.
    let second = put(&store, b"v4", Some(keyed(b"w2")));
    assert_eq!(second.version, 4);
    assert!(second.revision > first.revision);
    assert_eq!(store.get(b"k").expect("get").expect("present").value, b"v4");
}

fn delete(
    store: &EtcdStore,
    key: &[u8],
    idem: Option<IdempotencyKey>,
) -> Result<DeleteOutcome, StoreError> {
    let op = WriteOp::Delete(write::Delete {
        key: key.to_vec(),
        cond: Condition::None,
    });
    match store.write(op, idem).wait()? {
        WriteOutcome::Delete(o) => Ok(o),
        other => panic!("a delete answered {other:?}"),
    }
}

#[test]
fn a_keyed_delete_records_whether_the_key_existed_and_a_replay_answers_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = Cluster::start(dir.path(), 1).expect("etcd");
    let store = EtcdStore::open(EtcdOptions::new(cluster.endpoints())).expect("open");

    put(&store, b"v1", None);
    let gone = delete(&store, b"k", Some(keyed(b"d1"))).expect("delete");
    assert!(gone.existed);
    assert_eq!(store.get(b"k").expect("get"), None);
    assert_eq!(store.revision().expect("revision"), gone.revision);
    // The key comes back; the retried delete answers what it did, and deletes nothing.
    put(&store, b"v2", None);
    assert_eq!(
        delete(&store, b"k", Some(keyed(b"d1"))).expect("replay"),
        gone
    );
    assert_eq!(store.get(b"k").expect("get").expect("present").value, b"v2");
    assert_eq!(store.stats().idempotent_replays, 1);

    // An absent key: recorded as not there, and so replayed after the key appears.
    let absent = delete(&store, b"other", Some(keyed(b"d2"))).expect("delete");
    assert!(!absent.existed);
    assert!(
        absent.revision > gone.revision,
        "the record is a revision of its own"
    );
    let op = WriteOp::Put(write::Put {
        key: b"other".to_vec(),
        value: b"x".to_vec(),
        cond: Condition::None,
        attach: Attach::None,
    });
    store.write(op, None).wait().expect("put other");
    assert_eq!(
        delete(&store, b"other", Some(keyed(b"d2"))).expect("replay"),
        absent
    );
    assert!(store.get(b"other").expect("get").is_some());

    // The key reused for another write: refused.
    assert!(matches!(
        delete(&store, b"k", Some(keyed(b"d2"))),
        Err(StoreError::IdempotencyKeyReused)
    ));
}
