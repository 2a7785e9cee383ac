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
