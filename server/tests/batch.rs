//! getMany / putMany over the wire: order, atomicity, one revision, and their limits.

mod common;

use capkv::ErrorCode;
use capkv_client::Condition;
use common::*;

fn item(k: &str, v: &str, c: Condition) -> (Vec<u8>, Vec<u8>, Condition) {
    (k.as_bytes().to_vec(), v.as_bytes().to_vec(), c)
}

#[tokio::test]
async fn batches_round_trip_atomically() {
    let server = start(test_config());
    let c = client(server.addr()).await;
    let out = c
        .put_many(vec![
            item("a", "1", Condition::None),
            item("b", "2", Condition::IfAbsent),
        ])
        .await
        .unwrap();
    assert_eq!(out.versions, vec![1, 1]);
    assert_eq!(out.revision, 1, "one batch, one revision");
    let got = c
        .get_many(vec![b"b".to_vec(), b"zz".to_vec(), b"a".to_vec()])
        .await
        .unwrap();
    assert_eq!(got[0].as_ref().unwrap().value, b"2");
    assert!(got[1].is_none());
    assert_eq!(got[2].as_ref().unwrap().mod_revision, 1);

    let err = c
        .put_many(vec![
            item("c", "3", Condition::None),
            item("a", "x", Condition::IfAbsent),
        ])
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::ConditionFailed);
    assert!(err.message.contains("item 1"), "{}", err.message);
    assert_eq!(
        c.get(b"c").await.unwrap(),
        None,
        "nothing of a failed batch is written"
    );
}

#[tokio::test]
async fn batch_limits_have_their_codes() {
    let mut config = test_config();
    config.limits.max_batch_items = 3;
    config.limits.max_scan_bytes = 1000;
    config.limits.max_value_bytes = 600;
    config.limits.max_key_bytes = 16;
    let server = start(config);
    let c = client(server.addr()).await;
    let keys = |n: usize| {
        (0..n)
            .map(|i| format!("k{i}").into_bytes())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        c.get_many(keys(4)).await.unwrap_err().code,
        ErrorCode::TooManyItems
    );
    assert_eq!(
        c.get_many(vec![]).await.unwrap_err().code,
        ErrorCode::TooManyItems
    );
    let four = (0..4)
        .map(|i| item(&format!("k{i}"), "v", Condition::None))
        .collect();
    assert_eq!(
        c.put_many(four).await.unwrap_err().code,
        ErrorCode::TooManyItems
    );
    let dup = vec![
        item("d", "1", Condition::None),
        item("d", "2", Condition::None),
    ];
    assert_eq!(
        c.put_many(dup).await.unwrap_err().code,
        ErrorCode::InvalidArgument
    );
    let bad = vec![
        item("ok", "1", Condition::None),
        item("", "2", Condition::None),
    ];
    let err = c.put_many(bad).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::EmptyKey);
    assert!(err.message.starts_with("item 1"), "{}", err.message);
    // Three 500-byte values: 1500 bytes of answer, over max(1000, one entry at the limits).
    let big = "x".repeat(500);
    let three = (0..3)
        .map(|i| item(&format!("k{i}"), &big, Condition::None))
        .collect();
    c.put_many(three).await.unwrap();
    assert_eq!(
        c.get_many(keys(3)).await.unwrap_err().code,
        ErrorCode::ResponseTooLarge
    );
    assert_eq!(c.get_many(keys(1)).await.unwrap().len(), 1);
}

/// A `LocalClient` that auto-batches up to `max_keys` gets, on the current `LocalSet`.
async fn batching_client(addr: std::net::SocketAddr, max_keys: usize) -> capkv_client::LocalClient {
    let options = capkv_client::ClientOptions {
        auto_batch_keys: max_keys,
        ..Default::default()
    };
    capkv_client::LocalClient::connect(&addr.to_string(), &options)
        .await
        .expect("connect")
}

fn in_10s() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(10)
}

#[test]
fn concurrent_gets_leave_as_get_many_calls_and_each_gets_its_own_answer() {
    let server = start(test_config());
    local(async {
        let c = batching_client(server.addr(), 8).await;
        for (k, v) in [("a", "1"), ("b", "2")] {
            c.put(k.as_bytes(), v.as_bytes(), Condition::None, in_10s())
                .await
                .unwrap();
        }
        // Issued in one tick: repeated keys and missing ones, more than one batch holds.
        let keys: Vec<&str> = "a b zz a b b a nope a b a zz b a b a b zz a b"
            .split(' ')
            .collect();
        let answers =
            futures::future::join_all(keys.iter().map(|k| c.get(k.as_bytes(), in_10s()))).await;
        for (k, answer) in keys.iter().zip(answers) {
            let value = answer.unwrap().map(|e| String::from_utf8(e.value).unwrap());
            let want = match *k {
                "a" => Some("1".to_string()),
                "b" => Some("2".to_string()),
                _ => None,
            };
            assert_eq!(value, want, "get {k}");
        }
        let stats = c.batch_stats().expect("auto-batching is on");
        assert_eq!(stats.gets, 20);
        assert_eq!(stats.calls, 3, "20 gets, at most 8 per getMany: 8 + 8 + 4");

        // A lone get is a plain get (one call, no batch).
        assert!(c.get(b"a", in_10s()).await.unwrap().is_some());
        assert_eq!(c.batch_stats().unwrap().calls, 4);
    });
}

#[test]
fn a_bad_key_fails_only_its_own_get_in_a_batch() {
    let server = start(test_config());
    local(async {
        let c = batching_client(server.addr(), 16).await;
        c.put(b"k", b"v", Condition::None, in_10s()).await.unwrap();
        let long = vec![b'x'; capkv::Limits::default().max_key_bytes + 1];
        let keys: Vec<&[u8]> = vec![b"k", b"", b"k", &long, b"missing"];
        let answers = futures::future::join_all(keys.iter().map(|k| c.get(k, in_10s()))).await;
        assert_eq!(answers[0].as_ref().unwrap().as_ref().unwrap().value, b"v");
        assert_eq!(answers[1].as_ref().unwrap_err().code, ErrorCode::EmptyKey);
        assert_eq!(answers[2].as_ref().unwrap().as_ref().unwrap().value, b"v");
        assert_eq!(
            answers[3].as_ref().unwrap_err().code,
            ErrorCode::KeyTooLarge
        );
        assert!(answers[4].as_ref().unwrap().is_none());
        // The getMany failed for one key's sake; then each get went alone.
        assert_eq!(c.batch_stats().unwrap().calls, 1 + 5);
    });
}

#[test]
fn a_batch_keeps_each_callers_deadline() {
    const ADMIN: &str = "admin-secret";
    let server = start(common::admin_config(ADMIN));
    local(async {
        let c = batching_client(server.addr(), 16).await;
        c.put(b"k", b"v", Condition::None, in_10s()).await.unwrap();
        // The next getMany never answers; plain gets do.
        c.set_faults(ADMIN, "get_many stall times=1", in_10s())
            .await
            .unwrap();
        let soon = tokio::time::Instant::now() + std::time::Duration::from_millis(200);
        let (short, long) = futures::join!(c.get(b"k", soon), c.get(b"k", in_10s()));
        // The batch gave up at the earliest deadline: that caller's error...
        assert_eq!(short.unwrap_err().code, ErrorCode::DeadlineExceeded);
        // ...while the caller with time left was served alone.
        assert_eq!(long.unwrap().unwrap().value, b"v");
        assert_eq!(c.batch_stats().unwrap().calls, 2);
    });
}

#[test]
fn auto_batching_is_off_by_default() {
    let server = start(test_config());
    local(async {
        let c = capkv_client::LocalClient::connect(
            &server.addr().to_string(),
            &capkv_client::ClientOptions::default(),
        )
        .await
        .unwrap();
        assert!(c.batch_stats().is_none());
        assert!(c.get(b"nothing", in_10s()).await.unwrap().is_none());
    });
}
