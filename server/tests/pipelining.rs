//! Promise pipelining, measured through a proxy that delays each direction by `DELAY`:
//! `open(t)` and `get(k)` sent together cost one round trip; awaiting `open` first costs two.
//!
//! The bounds are structural, not performance claims: the lower bounds follow from the
//! delays themselves, and the upper bound leaves half a round trip (100 ms) of slack for
//! a slow machine.

mod common;

use std::time::{Duration, Instant};

use capkv::kv_capnp::open_result;
use capkv::{ApiError, CallMeta, ErrorCode};
use common::*;

const DELAY: Duration = Duration::from_millis(100);
const RTT: Duration = Duration::from_millis(200);

#[test]
fn open_and_get_pipelined_take_one_round_trip() {
    let server = start(test_config());
    let upstream = server.addr();
    local(async move {
        // Seed a key directly.
        client(upstream).await.put(b"k", b"v").await.unwrap();
        let proxy = delaying_proxy(upstream, DELAY).await;
        let gw = raw_gateway(proxy).await;
        // Warm up: resolve the bootstrap capability (one round trip, not measured).
        let mut h = gw.health_request();
        CallMeta::default().write(h.get().init_ctx());
        h.send().promise.await.unwrap();

        // Pipelined: get is sent on the promised KvStore before open returns.
        let t0 = Instant::now();
        let mut open = gw.open_request();
        CallMeta::default().write(open.get().init_ctx());
        let kv = open.send().pipeline.get_result().get_kv_cap();
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
        let proxy = delaying_proxy(upstream, DELAY).await;
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

const TOKEN: &str = "data-token";
const ADMIN: &str = "admin-token";

fn config_with_tokens() -> capkv_server::Config {
    let mut config = test_config();
    config.auth.token = Some(capkv_server::config::Secret::new(TOKEN));
    config.admin.token = Some(capkv_server::config::Secret::new(ADMIN));
    config
}

fn ctx() -> CallMeta {
    CallMeta {
        budget_ms: Some(10_000),
        ..CallMeta::default()
    }
}

/// Clients built against API v2 pipelined through union member 0 of each result (the
/// transform `send_v2_pipelined` sends); the server still fills it.
#[test]
fn api_v2_clients_pipelining_through_union_member_0_keep_working() {
    use capkv::kv_capnp::{admin, kv_store, write_session};
    // The network is not the subject: an in-process stream.
    local(async move {
        let (gw, _shared) = in_process_gateway(&config_with_tokens());
        let mut open = gw.open_request();
        ctx().write(open.get().init_ctx());
        open.get().set_token(TOKEN);
        let (opened, kv) = send_v2_pipelined::<_, _, kv_store::Client>(open);
        let mut session = kv.session_request();
        ctx().write(session.get().init_ctx());
        let (session_resp, ws) = send_v2_pipelined::<_, _, write_session::Client>(session);
        let mut put = ws.put_request();
        ctx().write(put.get().init_ctx());
        put.get().set_key(b"v2");
        put.get().set_value(b"still works");
        put.get().set_idempotency_key(b"v2-idem");
        let put = put.send().promise.await.unwrap();
        assert_eq!(code_of!(put, put_result), None);
        assert_eq!(code_of!(opened.await.unwrap(), open_result), None);
        let session_resp = session_resp.await.unwrap();
        let token = session_resp
            .get()
            .unwrap()
            .get_result()
            .unwrap()
            .get_token()
            .unwrap()
            .to_vec();

        // resumeSession through member 0, and the put replayed: the same outcome.
        let mut resume = kv.resume_session_request();
        ctx().write(resume.get().init_ctx());
        resume.get().set_token(&token);
        let (_resumed, ws) = send_v2_pipelined::<_, _, write_session::Client>(resume);
        let mut replay = ws.put_request();
        ctx().write(replay.get().init_ctx());
        replay.get().set_key(b"v2");
        replay.get().set_value(b"still works");
        replay.get().set_idempotency_key(b"v2-idem");
        let replay = replay.send().promise.await.unwrap();
        assert_eq!(code_of!(replay, put_result), None);

        let mut get = kv.get_request();
        ctx().write(get.get().init_ctx());
        get.get().set_key(b"v2");
        let got = get.send().promise.await.unwrap();
        match got.get().unwrap().get_result().unwrap().which().unwrap() {
            capkv::kv_capnp::get_result::Which::Ok(e) => {
                let e = e.unwrap();
                assert_eq!(e.get_value().unwrap(), b"still works");
                assert_eq!(e.get_version(), 1, "the replay wrote nothing");
            }
            capkv::kv_capnp::get_result::Which::Error(_) => panic!("get failed"),
        }

        let mut adm = gw.admin_request();
        ctx().write(adm.get().init_ctx());
        adm.get().set_admin_token(ADMIN);
        let (_adm, admin_cap) = send_v2_pipelined::<_, _, admin::Client>(adm);
        let mut show = admin_cap.show_faults_request();
        ctx().write(show.get().init_ctx());
        let show = show.send().promise.await.unwrap();
        assert_eq!(code_of!(show, faults_result), None);

        // A refused open: a v2 client's pipelined call fails (an exception: union member 0
        // holds the error, not a capability) and the open result says why.
        let mut open = gw.open_request();
        ctx().write(open.get().init_ctx());
        open.get().set_token("wrong");
        let (opened, kv) = send_v2_pipelined::<_, _, kv_store::Client>(open);
        let mut get = kv.get_request();
        ctx().write(get.get().init_ctx());
        get.get().set_key(b"v2");
        assert!(get.send().promise.await.is_err());
        assert_eq!(
            code_of!(opened.await.unwrap(), open_result),
            Some(ErrorCode::Unauthenticated)
        );
    });
}

/// API v3: a call pipelined on a refused `open`/`admin` (through the generated Pipeline
/// API) is answered by the server's stand-in with the refusal's code, not a hang or a bare
/// exception, however long the chain; the refused call's own result says the same.
#[test]
fn calls_pipelined_on_a_refused_capability_fail_with_its_code() {
    // The network is not the subject: an in-process stream.
    local(async move {
        let (gw, _shared) = in_process_gateway(&config_with_tokens());
        let mut open = gw.open_request();
        ctx().write(open.get().init_ctx());
        open.get().set_token("wrong");
        let opened = open.send();
        let kv = opened.pipeline.get_result().get_kv_cap();
        let mut get = kv.get_request();
        ctx().write(get.get().init_ctx());
        get.get().set_key(b"k");
        let got = get.send().promise.await.unwrap();
        assert_eq!(code_of!(got, get_result), Some(ErrorCode::Unauthenticated));
        let mut session = kv.session_request();
        ctx().write(session.get().init_ctx());
        let ws = session.send().pipeline.get_result().get_session_cap();
        let mut put = ws.put_request();
        ctx().write(put.get().init_ctx());
        put.get().set_key(b"k");
        put.get().set_value(b"v");
        let put = put.send().promise.await.unwrap();
        assert_eq!(code_of!(put, put_result), Some(ErrorCode::Unauthenticated));
        let opened = opened.promise.await.unwrap();
        let result = opened.get().unwrap().get_result().unwrap();
        match result.which().unwrap() {
            open_result::Which::Error(e) => {
                let e = ApiError::read(e.unwrap());
                assert_eq!(e.code, ErrorCode::Unauthenticated);
                assert!(!e.message.is_empty());
            }
            open_result::Which::Kv(_) => panic!("a wrong token opened the store"),
        }

        let mut adm = gw.admin_request();
        ctx().write(adm.get().init_ctx());
        adm.get().set_admin_token("wrong");
        let admin_cap = adm.send().pipeline.get_result().get_admin_cap();
        let mut clear = admin_cap.clear_faults_request();
        ctx().write(clear.get().init_ctx());
        let clear = clear.send().promise.await.unwrap();
        assert_eq!(
            code_of!(clear, faults_result),
            Some(ErrorCode::Unauthenticated)
        );

        // The right token on the same connection works (nothing was poisoned).
        let mut open = gw.open_request();
        ctx().write(open.get().init_ctx());
        open.get().set_token(TOKEN);
        let kv = open.send().pipeline.get_result().get_kv_cap();
        let mut get = kv.get_request();
        ctx().write(get.get().init_ctx());
        get.get().set_key(b"k");
        let got = get.send().promise.await.unwrap();
        assert_eq!(code_of!(got, get_result), Some(ErrorCode::NotFound));
    });
}

/// The client library on a refused open reports the refusal on every call, and a write on
/// a session refused by the chain is not stuck with the stand-in: the next write asks for
/// a new session.
#[test]
fn client_library_reports_refusals_from_stand_ins() {
    let server = start(config_with_tokens());
    let addr = server.addr();
    local(async move {
        let c = client_with(addr, TOKEN).await;
        c.set_faults(ADMIN, "session fail=permission_denied times=1")
            .await
            .unwrap();
        assert_eq!(
            c.put(b"k", b"v").await.unwrap_err().code,
            ErrorCode::PermissionDenied
        );
        c.put(b"k", b"v")
            .await
            .expect("the next write opens a new session");

        // A refused admin call is not the session's failure: the session stays.
        let token = c.session_token().await.unwrap().expect("a session");
        let refused = c.show_faults("wrong-admin-token").await.unwrap_err();
        assert_eq!(refused.code, ErrorCode::Unauthenticated);
        c.put(b"k", b"w").await.unwrap();
        assert_eq!(c.session_token().await.unwrap(), Some(token));

        // Last: the client answers a write on a refused open at once, while the `session`
        // call it pipelined may still reach the server (and a fault plan armed later).
        let bad = client_with(addr, "wrong").await;
        assert_eq!(
            bad.get(b"k").await.unwrap_err().code,
            ErrorCode::Unauthenticated
        );
        assert_eq!(
            bad.put(b"k", b"v").await.unwrap_err().code,
            ErrorCode::Unauthenticated
        );
    });
}
