//! The conformance suite against the etcd engine, each case on a 3-member loopback cluster
//! of its own (a fresh store: capkv's revisions start at 0 with the store), started from
//! Debian's `etcd-server` in a temp directory and killed by PID when the case ends.

use capkv_store::conformance::Guarded;
use capkv_store_etcd::cluster::Cluster;
use capkv_store_etcd::{EtcdOptions, EtcdStore};

struct Running {
    // Field order is drop order: the members go before their directory.
    _cluster: Cluster,
    _dir: tempfile::TempDir,
}

fn temp_etcd() -> Guarded<EtcdStore, Running> {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = Cluster::start(dir.path(), 3).expect("start a 3-member etcd cluster");
    let store =
        EtcdStore::open(EtcdOptions::new(cluster.endpoints())).expect("open the etcd engine");
    Guarded {
        store,
        guard: Running {
            _cluster: cluster,
            _dir: dir,
        },
    }
}

capkv_store::conformance_tests!(shared: temp_etcd());
