//! Every input limit and bad input gets its own code (or a closed connection), and the
//! server keeps serving the next client afterwards.

mod common;

use std::time::Duration;

use capkv::{ApiError, CallMeta, ErrorCode};
use capkv_client::{Condition, ScanBounds, ScanOptions};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn code<T: std::fmt::Debug>(r: Result<T, ApiError>) -> ErrorCode {
    r.expect_err("call should fail").code
}

/// After a bad input, a brand-new client is served normally.
async fn still_serves(addr: std::net::SocketAddr) {
    let c = client(addr).await;
    c.put(b"after", b"ok").await.expect("put after bad input");
    assert_eq!(c.get(b"after").await.unwrap().unwrap().value, b"ok");
}

#[tokio::test]
async fn key_value_and_scan_limits_have_distinct_codes() {
    let server = start(test_config());
    let c = client(server.addr()).await;
    let limits = capkv::Limits::default();

    assert_eq!(code(c.put(b"", b"v").await), ErrorCode::EmptyKey);
    assert_eq!(code(c.get(b"").await), ErrorCode::EmptyKey);
    assert_eq!(code(c.delete(b"").await), ErrorCode::EmptyKey);

    let long_key = vec![b'k'; limits.max_key_bytes + 1];
    assert_eq!(code(c.put(&long_key, b"v").await), ErrorCode::KeyTooLarge);
    assert_eq!(code(c.get(&long_key).await), ErrorCode::KeyTooLarge);
    let max_key = vec![b'k'; limits.max_key_bytes];
    c.put(&max_key, b"v")
        .await
        .expect("a key at the limit is fine");

    let big = vec![7u8; limits.max_value_bytes + 1];
    assert_eq!(code(c.put(b"big", &big).await), ErrorCode::ValueTooLarge);
    let at_limit = vec![7u8; limits.max_value_bytes];
    c.put(b"big", &at_limit)
        .await
        .expect("a value at the limit is fine");
    assert_eq!(
        c.get(b"big").await.unwrap().unwrap().value.len(),
        limits.max_value_bytes
    );

    let over = ScanOptions {
        limit: limits.max_scan_limit + 1,
        ..ScanOptions::default()
    };
    assert_eq!(code(c.scan(over).await), ErrorCode::ScanLimitTooLarge);
    let inverted = ScanOptions {
        bounds: ScanBounds::Range {
            start: b"z".to_vec(),
            end: b"a".to_vec(),
        },
        ..ScanOptions::default()
    };
    assert_eq!(code(c.scan(inverted).await), ErrorCode::InvalidRange);
    let bad_cursor = ScanOptions {
        bounds: ScanBounds::Prefix(b"p".to_vec()),
        cursor: b"q".to_vec(),
        ..ScanOptions::default()
    };
    assert_eq!(code(c.scan(bad_cursor).await), ErrorCode::InvalidRange);

    assert_eq!(
        code(c.put_if(b"big", b"x", Condition::IfAbsent).await),
        ErrorCode::ConditionFailed
    );
    still_serves(server.addr()).await;
}

#[tokio::test]
async fn limits_are_configurable() {
    let mut config = test_config();
    config.limits.max_key_bytes = 4;
    config.limits.max_value_bytes = 8;
    config.limits.max_scan_limit = 2;
    config.limits.default_scan_limit = 2;
    let server = start(config);
    let c = client(server.addr()).await;
    assert_eq!(code(c.put(b"12345", b"v").await), ErrorCode::KeyTooLarge);
    assert_eq!(
        code(c.put(b"k", b"123456789").await),
        ErrorCode::ValueTooLarge
    );
    let over = ScanOptions {
        limit: 3,
        ..ScanOptions::default()
    };
    assert_eq!(code(c.scan(over).await), ErrorCode::ScanLimitTooLarge);
    c.put(b"1234", b"12345678").await.unwrap();
}

#[tokio::test]
async fn scan_pages_resume_with_the_cursor() {
    let server = start(test_config());
    let c = client(server.addr()).await;
    for i in 0..25u32 {
        c.put(format!("p/{i:02}").as_bytes(), b"v").await.unwrap();
    }
    c.put(b"q", b"outside").await.unwrap();
    let mut seen = Vec::new();
    let mut cursor = Vec::new();
    for _ in 0..10 {
        let page = c
            .scan(ScanOptions {
                bounds: ScanBounds::Prefix(b"p/".to_vec()),
                limit: 10,
                cursor: cursor.clone(),
                keys_only: true,
            })
            .await
            .unwrap();
        seen.extend(page.entries.into_iter().map(|e| e.key));
        match page.next_cursor {
            Some(next) => cursor = next,
            None => break,
        }
    }
    let expected: Vec<Vec<u8>> = (0..25u32)
        .map(|i| format!("p/{i:02}").into_bytes())
        .collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn wrong_or_missing_token_is_unauthenticated() {
    let mut config = test_config();
    config.auth.token = Some(capkv_server::config::Secret::new("right-token"));
    let server = start(config);
    let wrong = client_with(server.addr(), "wrong-token").await;
    assert_eq!(code(wrong.get(b"k").await), ErrorCode::Unauthenticated);
    assert_eq!(
        code(wrong.put(b"k", b"v").await),
        ErrorCode::Unauthenticated
    );
    // Health and version need no token.
    assert!(wrong.health().await.unwrap().live);
    let missing = client_with(server.addr(), "").await;
    assert_eq!(code(missing.get(b"k").await), ErrorCode::Unauthenticated);
    let right = client_with(server.addr(), "right-token").await;
    right.put(b"k", b"v").await.unwrap();
    assert_eq!(right.get(b"k").await.unwrap().unwrap().value, b"v");
}

#[tokio::test]
async fn request_over_the_message_limit_closes_only_that_connection() {
    let mut config = test_config();
    config.limits.max_value_bytes = 64 * 1024;
    let server = start(config);
    let c = client(server.addr()).await;
    // Bigger than max_value_bytes + overhead: the decoder refuses it before any handler.
    let huge = vec![1u8; 512 * 1024];
    let err = c.put(b"huge", &huge).await.expect_err("must fail");
    eprintln!("oversized request: {err:?}");
    assert!(
        matches!(
            err.code,
            ErrorCode::RequestTooLarge | ErrorCode::Unavailable
        ),
        "{err:?}"
    );
    still_serves(server.addr()).await;
}

#[tokio::test]
async fn malformed_frames_close_the_connection_and_the_server_survives() {
    let server = start(test_config());
    let frames: Vec<Vec<u8>> = vec![
        // Segment count 2^32 (count-1 = 0xffffffff).
        vec![0xff; 16],
        // One segment declared, far beyond the traversal limit.
        [0u32.to_le_bytes(), 0x0fff_ffffu32.to_le_bytes()].concat(),
        // A well-framed one-word message whose root is not an RPC Message struct.
        [&0u32.to_le_bytes()[..], &1u32.to_le_bytes(), &[0xfb; 8]].concat(),
        // Plain text.
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
    ];
    for frame in frames {
        let mut s = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
        s.write_all(&frame).await.unwrap();
        // The server must hang up (EOF or reset) rather than wait or answer at size.
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "server kept a malformed connection open");
        assert!(
            total < 4096,
            "server answered a malformed frame with {total} bytes"
        );
        still_serves(server.addr()).await;
    }
}

#[test]
fn spent_budget_is_rejected_before_work() {
    let server = start(test_config());
    let addr = server.addr();
    local(async move {
        let gw = raw_gateway(addr).await;
        let mut open = gw.open_request();
        CallMeta::default().write(open.get().init_ctx());
        let kv = open.send().pipeline.get_result().get_kv_cap();
        let mut get = kv.get_request();
        let spent = CallMeta {
            budget_ms: Some(0),
            ..CallMeta::default()
        };
        spent.write(get.get().init_ctx());
        get.get().set_key(b"k");
        let resp = get.send().promise.await.unwrap();
        let result = resp.get().unwrap().get_result().unwrap();
        match result.which().unwrap() {
            capkv::kv_capnp::get_result::Which::Error(e) => {
                assert_eq!(ApiError::read(e.unwrap()).code, ErrorCode::DeadlineExceeded)
            }
            _ => panic!("expected deadlineExceeded"),
        }
    });
}
