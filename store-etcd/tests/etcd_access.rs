//! The engine over TLS to etcd (`storage.etcd.ca`, `cert`, `key`), and with etcd's own
//! authentication (`user`, `password`). TLS: a member whose client
//! URL is `https://` and that requires a client certificate, certificates from
//! `scripts/dev-ca.sh`. Without the client certificate the engine does not open, and says
//! where it could not connect.

use capkv_store::{Condition, Store};
use capkv_store_etcd::cluster::{Cluster, ClusterTls};
use capkv_store_etcd::{EtcdOptions, EtcdStore, EtcdTls};

#[test]
fn mutual_tls_to_etcd() {
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = dir.path().join("certs");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/dev-ca.sh");
    let made = std::process::Command::new("bash")
        .arg(&script)
        .arg(&certs)
        .output()
        .expect("run dev-ca.sh");
    assert!(made.status.success(), "{made:?}");
    let tls = ClusterTls {
        cert: certs.join("server.pem"),
        key: certs.join("server.key"),
        client_ca: certs.join("ca.pem"),
    };
    let cluster = Cluster::start_with(&dir.path().join("etcd"), 1, Some(tls)).expect("etcd");
    let endpoints = cluster.endpoints();
    assert!(endpoints[0].starts_with("https://"));

    let mut opts = EtcdOptions::new(endpoints.clone());
    opts.tls = Some(EtcdTls {
        ca: certs.join("ca.pem"),
        cert: Some(certs.join("client.pem")),
        key: Some(certs.join("client.key")),
    });
    let store = EtcdStore::open(opts.clone()).expect("open over mutual TLS");
    store.put(b"k", b"v", Condition::None).wait().expect("put");
    assert_eq!(store.get(b"k").expect("get").expect("found").value, b"v");
    drop(store);

    // The member requires a client certificate: without one, no store.
    opts.tls = Some(EtcdTls {
        ca: certs.join("ca.pem"),
        cert: None,
        key: None,
    });
    opts.connect_timeout = std::time::Duration::from_secs(2);
    opts.request_timeout = std::time::Duration::from_secs(2);
    let refused = EtcdStore::open(opts)
        .err()
        .expect("no client certificate: refused");
    assert!(refused.to_string().contains(&endpoints[0]), "{refused}");
}

/// etcd's own authentication (`storage.etcd.user`, `password`): with the right password
/// the engine works; with a wrong one it does not open.
#[test]
fn user_and_password() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = Cluster::start(dir.path(), 1).expect("etcd");
    let endpoints = cluster.endpoints();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut admin = etcd_client::Client::connect(&endpoints, None)
            .await
            .expect("connect");
        admin.user_add("root", "root-pw", None).await.expect("root");
        admin
            .user_grant_role("root", "root")
            .await
            .expect("root role");
        admin.auth_enable().await.expect("auth on");
    });
    let mut opts = EtcdOptions::new(endpoints);
    opts.user = Some(("root".into(), "root-pw".into()));
    let store = EtcdStore::open(opts.clone()).expect("open with a password");
    store.put(b"k", b"v", Condition::None).wait().expect("put");
    assert!(store.get(b"k").expect("get").is_some());
    drop(store);
    opts.user = Some(("root".into(), "wrong".into()));
    assert!(
        EtcdStore::open(opts).is_err(),
        "a wrong password opens nothing"
    );
}
