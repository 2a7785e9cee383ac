//! Leases over the wire, from a plain capnp-rpc client: keys put with a lease go when it
//! is revoked or expires (within its TTL + 1 s, seen by a watcher), keep-alives keep them,
//! a put's TTL is a lease of its own, bad inputs get their codes, and leases survive a
//! restart of the RocksDB server.

mod common;

use std::time::{Duration, Instant};

use capkv::kv_capnp::{
    get_result, lease, lease_info_result, lease_result, put_result, revoke_result, write_session,
};
use capkv::{ApiError, CallMeta, ErrorCode};
use common::*;

/// A write session on a fresh connection (pipelined on `open`).
async fn session(
    addr: std::net::SocketAddr,
) -> (capkv::kv_capnp::kv_store::Client, write_session::Client) {
    let gw = raw_gateway(addr).await;
    let mut open = gw.open_request();
    CallMeta::default().write(open.get().init_ctx());
    let kv = open.send().pipeline.get_result().get_kv_cap();
    let mut s = kv.session_request();
    CallMeta::default().write(s.get().init_ctx());
    let session = s.send().pipeline.get_result().get_session_cap();
    (kv, session)
}

/// `grantLease(ttl_ms)`: the lease's capability and id, or the error.
async fn grant(s: &write_session::Client, ttl_ms: u64) -> Result<(lease::Client, u64), ApiError> {
    let mut req = s.grant_lease_request();
    CallMeta::default().write(req.get().init_ctx());
    req.get().set_ttl_ms(ttl_ms);
    let resp = req.send().promise.await.unwrap();
    let r = resp.get().unwrap().get_result().unwrap();
    match r.which().unwrap() {
        lease_result::Which::Lease(l) => Ok((l.unwrap(), r.get_id())),
        lease_result::Which::Error(e) => Err(ApiError::read(e.unwrap())),
    }
}

/// A put with `lease` and `ttl_ms`: the lease the key lives by, or the error.
async fn put(
    s: &write_session::Client,
    key: &[u8],
    lease: u64,
    ttl_ms: u64,
) -> Result<u64, ApiError> {
    let mut req = s.put_request();
    CallMeta::default().write(req.get().init_ctx());
    req.get().set_key(key);
    req.get().set_value(b"v");
    req.get().set_lease(lease);
    req.get().set_ttl_ms(ttl_ms);
    let resp = req.send().promise.await.unwrap();
    match resp.get().unwrap().get_result().unwrap().which().unwrap() {
        put_result::Which::Ok(ok) => Ok(ok.get_lease()),
        put_result::Which::Error(e) => Err(ApiError::read(e.unwrap())),
    }
}

async fn exists(kv: &capkv::kv_capnp::kv_store::Client, key: &[u8]) -> bool {
    let mut req = kv.get_request();
    CallMeta::default().write(req.get().init_ctx());
    req.get().set_key(key);
    let resp = req.send().promise.await.unwrap();
    matches!(
        resp.get().unwrap().get_result().unwrap().which().unwrap(),
        get_result::Which::Ok(_)
    )
}

/// `timeToLive` (or `keepAlive` when `renew`): (remaining ms, keys), or the error.
async fn ttl(l: &lease::Client, renew: bool) -> Result<(u64, u64), ApiError> {
    let resp = if renew {
        let mut req = l.keep_alive_request();
        CallMeta::default().write(req.get().init_ctx());
        let r = req.send().promise.await.unwrap();
        read_info(r.get().unwrap().get_result().unwrap())
    } else {
        let mut req = l.time_to_live_request();
        CallMeta::default().write(req.get().init_ctx());
        let r = req.send().promise.await.unwrap();
        read_info(r.get().unwrap().get_result().unwrap())
    };
    resp
}

fn read_info(r: lease_info_result::Reader<'_>) -> Result<(u64, u64), ApiError> {
    match r.which().unwrap() {
        lease_info_result::Which::Ok(ok) => Ok((ok.get_remaining_ms(), ok.get_keys())),
        lease_info_result::Which::Error(e) => Err(ApiError::read(e.unwrap())),
    }
}

async fn revoke(l: &lease::Client) -> Result<u64, ApiError> {
    let mut req = l.revoke_request();
    CallMeta::default().write(req.get().init_ctx());
    let resp = req.send().promise.await.unwrap();
    match resp.get().unwrap().get_result().unwrap().which().unwrap() {
        revoke_result::Which::Ok(ok) => Ok(ok.get_deleted()),
        revoke_result::Which::Error(e) => Err(ApiError::read(e.unwrap())),
    }
}

#[test]
fn a_lease_takes_its_keys_when_revoked_and_bad_inputs_get_their_codes() {
    let server = start(test_config());
    let addr = server.addr();
    local(async move {
        let (kv, s) = session(addr).await;
        let (l, id) = grant(&s, 60_000).await.unwrap();
        assert_ne!(id, 0);
        assert_eq!(put(&s, b"k1", id, 0).await.unwrap(), id);
        assert_eq!(put(&s, b"k2", id, 0).await.unwrap(), id);
        assert_eq!(
            put(&s, b"k2", 0, 0).await.unwrap(),
            0,
            "a put without a lease detaches"
        );
        let (remaining, keys) = ttl(&l, false).await.unwrap();
        assert!(remaining > 50_000 && remaining <= 60_000);
        assert_eq!(keys, 1);
        assert!(ttl(&l, true).await.unwrap().0 > 50_000);
        assert_eq!(revoke(&l).await.unwrap(), 1);
        assert!(!exists(&kv, b"k1").await);
        assert!(exists(&kv, b"k2").await);
        assert_eq!(
            ttl(&l, false).await.unwrap_err().code,
            ErrorCode::LeaseNotFound
        );
        assert_eq!(revoke(&l).await.unwrap_err().code, ErrorCode::LeaseNotFound);

        assert_eq!(
            put(&s, b"k3", id, 0).await.unwrap_err().code,
            ErrorCode::LeaseNotFound
        );
        assert!(!exists(&kv, b"k3").await, "nothing written");
        assert_eq!(
            put(&s, b"k3", 7, 1_000).await.unwrap_err().code,
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            grant(&s, 0).await.err().map(|e| e.code),
            Some(ErrorCode::InvalidArgument)
        );
        assert_eq!(
            grant(&s, u64::MAX).await.err().map(|e| e.code),
            Some(ErrorCode::InvalidArgument)
        );

        // A lease by id, from another connection's session.
        let (_, other) = session(addr).await;
        let (_, id2) = grant(&s, 60_000).await.unwrap();
        let mut req = other.lease_request();
        CallMeta::default().write(req.get().init_ctx());
        req.get().set_id(id2);
        let found = req.send().pipeline.get_result().get_lease_cap();
        assert_eq!(ttl(&found, false).await.unwrap().1, 0);
        let mut req = other.lease_request();
        CallMeta::default().write(req.get().init_ctx());
        req.get().set_id(id2 ^ 1);
        let missing = req.send().pipeline.get_result().get_lease_cap();
        assert_eq!(
            ttl(&missing, false).await.unwrap_err().code,
            ErrorCode::LeaseNotFound
        );
    });
}

/// The requirement, on both engines: a lease's keys are gone within its TTL + 1 s, and not
/// before its TTL; a watcher sees them go at one revision. A put's `ttlMs` is a lease of
/// its own.
#[test]
fn an_expired_lease_takes_its_keys_within_its_ttl_and_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let mut rocks = test_config();
    rocks.engine = capkv_server::config::Engine::Rocksdb;
    rocks.data_dir = dir.path().to_path_buf();
    rocks.storage.compaction_interval_s = 0;
    for config in [test_config(), rocks] {
        expiry_within_ttl_and_a_second(config);
    }
}

fn expiry_within_ttl_and_a_second(config: capkv_server::Config) {
    const TTL_MS: u64 = 500;
    let server = start(config);
    let addr = server.addr();
    local(async move {
        let (kv, s) = session(addr).await;
        // Watch from the next write.
        let mut w = kv.watch_request();
        CallMeta::default().write(w.get().init_ctx());
        w.get().init_range().set_prefix(b"e/");
        let watcher = w.send().pipeline.get_result().get_watcher_cap();
        let mut first = watcher.next_request();
        CallMeta::default().write(first.get().init_ctx());
        first.send().promise.await.unwrap();

        let granted = Instant::now();
        let (_l, id) = grant(&s, TTL_MS).await.unwrap();
        put(&s, b"e/1", id, 0).await.unwrap();
        put(&s, b"e/2", id, 0).await.unwrap();
        let own = put(&s, b"e/3", 0, TTL_MS).await.unwrap();
        assert!(own != 0 && own != id, "a TTL is a lease of its own");

        let mut deletes = Vec::new();
        // Bounded: each `next` waits at most 5 s, and a few are enough.
        for _ in 0..20 {
            if deletes.len() == 3 {
                break;
            }
            let mut req = watcher.next_request();
            CallMeta::default().write(req.get().init_ctx());
            req.get().set_wait_ms(5_000);
            let resp = req.send().promise.await.unwrap();
            let r = resp.get().unwrap().get_result().unwrap();
            let capkv::kv_capnp::watch_events::Which::Ok(ok) = r.which().unwrap() else {
                panic!("next failed");
            };
            for e in ok.get_events().unwrap() {
                if e.get_kind().unwrap() == capkv::kv_capnp::EventKind::Delete {
                    deletes.push((e.get_entry().unwrap().get_mod_revision(), granted.elapsed()));
                }
            }
        }
        assert_eq!(deletes.len(), 3, "every key went");
        let ttl = Duration::from_millis(TTL_MS);
        for (_, at) in &deletes {
            assert!(*at >= ttl, "a key went before its lease's TTL: {at:?}");
            assert!(
                *at <= ttl + Duration::from_secs(1),
                "a key went late: {at:?}"
            );
        }
        assert_eq!(
            deletes[0].0, deletes[1].0,
            "one lease's keys go at one revision"
        );
        for k in [&b"e/1"[..], b"e/2", b"e/3"] {
            assert!(!exists(&kv, k).await);
        }
    });
}

/// Keep-alives every tenth of the TTL keep the keys past two TTLs (a stall of most of a
/// TTL on a loaded machine would still not lose them).
#[test]
fn keep_alives_keep_the_keys() {
    const TTL_MS: u64 = 1_000;
    let server = start(test_config());
    let addr = server.addr();
    local(async move {
        let (kv, s) = session(addr).await;
        let (l, id) = grant(&s, TTL_MS).await.unwrap();
        put(&s, b"alive", id, 0).await.unwrap();
        let until = Instant::now() + Duration::from_millis(2 * TTL_MS);
        let mut renewals = 0;
        while Instant::now() < until && renewals < 100 {
            tokio::time::sleep(Duration::from_millis(TTL_MS / 10)).await;
            ttl(&l, true).await.expect("kept alive");
            renewals += 1;
        }
        assert!(exists(&kv, b"alive").await);
    });
}

/// A restart of the RocksDB server keeps every lease (with its full TTL again) and its
/// keys; revoking it afterwards takes them.
#[test]
fn leases_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let (_server, addr) = spawn_rocks_server(dir.path());
        let addr = addr.parse().unwrap();
        local_result(async move {
            let (_, s) = session(addr).await;
            let (_, id) = grant(&s, 120_000).await.unwrap();
            put(&s, b"member/1", id, 0).await.unwrap();
            id
        })
    };
    let (_server, addr) = spawn_rocks_server(dir.path());
    let addr = addr.parse().unwrap();
    local(async move {
        let (kv, s) = session(addr).await;
        assert!(exists(&kv, b"member/1").await);
        let mut req = s.lease_request();
        CallMeta::default().write(req.get().init_ctx());
        req.get().set_id(id);
        let l = req.send().pipeline.get_result().get_lease_cap();
        let (remaining, keys) = ttl(&l, false).await.unwrap();
        assert_eq!(keys, 1);
        assert!(remaining > 100_000, "a full TTL again: {remaining}");
        assert_eq!(revoke(&l).await.unwrap(), 1);
        assert!(!exists(&kv, b"member/1").await);
    });
}
