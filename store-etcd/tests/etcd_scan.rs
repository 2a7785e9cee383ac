//! Scans on etcd read every page at the first page's revision (`ScanRequest::revision`,
//! which the server carries in the cursor): writes between pages do not show, and a page
//! whose revision etcd has compacted away is `Compacted`.

use capkv_store::{Condition, ScanRequest, Store, StoreError};
use capkv_store_etcd::cluster::Cluster;
use capkv_store_etcd::{EtcdOptions, EtcdStore};

#[test]
fn later_pages_read_at_the_first_pages_revision() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = Cluster::start(dir.path(), 1).expect("etcd");
    let mut opts = EtcdOptions::new(cluster.endpoints());
    opts.compact_keep_revisions = 0;
    let store = EtcdStore::open(opts).expect("open");
    assert!(store.scans_pin_revision());
    for i in 0..6u8 {
        store
            .put(&[b'k', b'0' + i], b"old", Condition::None)
            .wait()
            .expect("put");
    }
    let page = |start: &[u8], revision| {
        store.scan(&ScanRequest {
            start: start.to_vec(),
            end: None,
            limit: 3,
            max_bytes: usize::MAX,
            keys_only: false,
            revision,
        })
    };
    let first = page(b"k", None).expect("first page");
    assert!(first.more);
    let at = first.revision;

    // Between the pages: an overwrite, a delete and a new key in the second page's range.
    store
        .put(b"k4", b"new", Condition::None)
        .wait()
        .expect("put");
    store.delete(b"k5", Condition::None).wait().expect("delete");
    store
        .put(b"k45", b"new", Condition::None)
        .wait()
        .expect("put");

    let second = page(b"k2\0", Some(at)).expect("second page");
    assert_eq!(second.revision, at, "a pinned page reports its revision");
    let seen: Vec<(Vec<u8>, Vec<u8>)> = second
        .entries
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect();
    assert_eq!(
        seen,
        vec![
            (b"k3".to_vec(), b"old".to_vec()),
            (b"k4".to_vec(), b"old".to_vec()),
            (b"k5".to_vec(), b"old".to_vec()),
        ]
    );
    // Unpinned, the latest state.
    let now = page(b"k2\0", None).expect("latest");
    assert_eq!(now.entries[1].key, b"k4");
    assert_eq!(now.entries[1].value, b"new");

    // Compacted past the pinned revision: the page cannot be had.
    store.compact().expect("compact");
    assert!(matches!(
        page(b"k2\0", Some(at)),
        Err(StoreError::Compacted { .. })
    ));
}
