//! Promise pipelining, measured through a proxy that delays each direction by `DELAY`:
//! `open(t)` and `get(k)` sent together cost one round trip; awaiting `open` first costs two.
//!
//! The bounds are structural, not performance claims: the lower bounds follow from the
//! delays themselves, and the upper bound leaves half a round trip (100 ms) of slack for
//! a slow machine.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use capkv::kv_capnp::{kv_store, open_result};
use capkv::{send_with_union_cap, CallMeta};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DELAY: Duration = Duration::from_millis(100);
const RTT: Duration = Duration::from_millis(200);

/// Forwards bytes from `from` to `to`, each chunk delivered `DELAY` after it was read,
/// in order (a delay line, not a per-chunk sleep, so throughput is not throttled).
async fn delay_line(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(1024);
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let at = tokio::time::Instant::now() + DELAY;
                if tx.send((at, buf[..n].to_vec())).await.is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Starts a delaying proxy to `upstream`; returns its address. Serves any number of
/// connections until the test's runtime ends.
async fn delaying_proxy(upstream: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(delay_line(cr, sw));
            tokio::spawn(delay_line(sr, cw));
        }
    });
    addr
}

#[test]
fn open_and_get_pipelined_take_one_round_trip() {
    let server = start(test_config());
    let upstream = server.addr();
    local(async move {
        // Seed a key directly.
        client(upstream).await.put(b"k", b"v").await.unwrap();
        let proxy = delaying_proxy(upstream).await;
        let gw = raw_gateway(proxy).await;
        // Warm up: resolve the bootstrap capability (one round trip, not measured).
        let mut h = gw.health_request();
        CallMeta::default().write(h.get().init_ctx());
        h.send().promise.await.unwrap();

        // Pipelined: get is sent on the promised KvStore before open returns.
        let t0 = Instant::now();
        let mut open = gw.open_request();
        CallMeta::default().write(open.get().init_ctx());
        let (_open_resp, kv) = send_with_union_cap::<_, _, kv_store::Client>(open);
        let mut get = kv.get_request();
        CallMeta::default().write(get.get().init_ctx());
        get.get().set_key(b"k");
        let resp = get.send().promise.await.unwrap();
        let pipelined = t0.elapsed();
        assert!(matches!(
            resp.get().unwrap().get_result().unwrap().which().unwrap(),
            capkv::kv_capnp::get_result::Which::Ok(_)
        ));

        // Sequential: await open, then call get on the returned capability.
        let t0 = Instant::now();
        let mut open = gw.open_request();
        CallMeta::default().write(open.get().init_ctx());
        let resp = open.send().promise.await.unwrap();
        let kv = match resp.get().unwrap().get_result().unwrap().which().unwrap() {
            open_result::Which::Kv(kv) => kv.unwrap(),
            open_result::Which::Error(_) => panic!("open failed"),
        };
        let mut get = kv.get_request();
        CallMeta::default().write(get.get().init_ctx());
        get.get().set_key(b"k");
        get.send().promise.await.unwrap();
        let sequential = t0.elapsed();

        eprintln!("RTT {RTT:?}: pipelined {pipelined:?}, sequential {sequential:?}");
        assert!(
            pipelined >= RTT,
            "a call cannot beat the round trip: {pipelined:?}"
        );
        assert!(
            pipelined < RTT * 3 / 2,
            "pipelined open+get took {pipelined:?}"
        );
        assert!(
            sequential >= RTT * 2,
            "awaiting open first took {sequential:?}"
        );
    });
}

#[test]
fn client_library_pipelines_open_get_and_session_put() {
    let server = start(test_config());
    let upstream = server.addr();
    local(async move {
        let proxy = delaying_proxy(upstream).await;
        // connect() only opens TCP (to the local proxy): bootstrap, open and the first call
        // all leave together.
        let options = capkv_client::ClientOptions {
            timeout: Duration::from_secs(10),
            idempotent_writes: false,
            ..capkv_client::ClientOptions::default()
        };
        let c = capkv_client::Client::connect(&proxy.to_string(), options)
            .await
            .unwrap();
        let t0 = Instant::now();
        assert_eq!(c.get(b"missing").await.unwrap(), None);
        let first_get = t0.elapsed();
        // First write without an idempotency key: session() and put() leave together.
        let t0 = Instant::now();
        c.put(b"k", b"v").await.unwrap();
        let first_put = t0.elapsed();
        eprintln!("RTT {RTT:?}: first get {first_get:?}, first put {first_put:?}");
        assert!(first_get < RTT * 3 / 2, "first get took {first_get:?}");
        assert!(first_put < RTT * 3 / 2, "first put took {first_put:?}");

        // With a key (the default), the first write waits for the session's token (so its
        // retries can resume that session): two round trips once, then one per write.
        let keyed = client(proxy).await;
        let t0 = Instant::now();
        keyed.put(b"k", b"v").await.unwrap();
        let first = t0.elapsed();
        let t0 = Instant::now();
        keyed.put(b"k", b"w").await.unwrap();
        let second = t0.elapsed();
        eprintln!("keyed: first put {first:?}, second {second:?}");
        assert!(first < RTT * 5 / 2, "first keyed put took {first:?}");
        assert!(second < RTT * 3 / 2, "later keyed put took {second:?}");
    });
}
