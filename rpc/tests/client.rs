//! capkv's client engine (`capkv_rpc::client`) against both servers: capnp-rpc's
//! `RpcSystem` (the reference: the client must speak standard Cap'n Proto RPC, not a
//! dialect of capkv's own engine) and capkv's engine, with the same assertions. The server
//! is a small one built from capkv's schema, in process, over an in-memory stream.

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use capkv::kv_capnp::{gateway, kv_store};
use capkv_rpc::client::{self, ClientLimits, DirectCap};
use capnp::capability::FromClientHook;
use capnp_rpc::{rpc_twoparty_capnp, twoparty, RpcSystem};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

#[derive(Clone, Copy, Debug)]
enum Server {
    CapnpRpc,
    Capkv,
}

const SERVERS: [Server; 2] = [Server::CapnpRpc, Server::Capkv];

/// Counts the objects alive on the server: a released capability is dropped there.
#[derive(Clone, Default)]
struct Alive(Rc<Cell<usize>>);

struct TestKv {
    alive: Alive,
}

impl Drop for TestKv {
    fn drop(&mut self) {
        self.alive.0.set(self.alive.0.get() - 1);
    }
}

impl kv_store::Server for TestKv {
    /// `boom` fails with an exception, `slow` answers after a yield, anything else
    /// answers its own key as the value.
    async fn get(
        self: Rc<Self>,
        params: kv_store::GetParams,
        mut results: kv_store::GetResults,
    ) -> Result<(), capnp::Error> {
        let key = params.get()?.get_key()?.to_vec();
        if key == b"boom" {
            return Err(capnp::Error::failed("boom".into()));
        }
        if key == b"slow" {
            tokio::task::yield_now().await;
        }
        let mut e = results.get().init_result().init_ok();
        e.set_key(&key);
        e.set_value(&key);
        e.set_version(1);
        Ok(())
    }
}

struct TestGateway {
    alive: Alive,
}

impl gateway::Server for TestGateway {
    /// A new `KvStore` per open; token `bad` fails the call.
    async fn open(
        self: Rc<Self>,
        params: gateway::OpenParams,
        mut results: gateway::OpenResults,
    ) -> Result<(), capnp::Error> {
        let token = params.get()?.get_token()?.to_string()?;
        if token == "bad" {
            return Err(capnp::Error::failed("bad token".into()));
        }
        if token == "slow" {
            tokio::task::yield_now().await;
        }
        self.alive.0.set(self.alive.0.get() + 1);
        let kv: kv_store::Client = capkv_rpc::local::new_client(TestKv {
            alive: self.alive.clone(),
        });
        let mut out = results.get().init_result();
        out.set_kv(kv.clone());
        out.set_kv_cap(kv);
        Ok(())
    }
}

/// Counts the writes the client makes.
struct CountingWriter<W> {
    inner: W,
    writes: Rc<Cell<usize>>,
}

impl<W: futures::AsyncWrite + Unpin> futures::AsyncWrite for CountingWriter<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if r.is_ready() {
            self.writes.set(self.writes.get() + 1);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

struct Conn {
    gateway: gateway::Client,
    /// Server objects alive (each `open` makes one).
    alive: Alive,
    /// Writes the client made.
    writes: Rc<Cell<usize>>,
    /// The client connection's future, spawned.
    driver: tokio::task::JoinHandle<Result<(), capnp::Error>>,
    /// Ends the server side.
    server: tokio::task::JoinHandle<()>,
}

/// A server of `kind` over an in-memory stream (inside a `LocalSet`): the client's end,
/// the server's live objects, the server's task.
fn start_server(kind: Server) -> (tokio::io::DuplexStream, Alive, tokio::task::JoinHandle<()>) {
    let (client_end, server_end) = tokio::io::duplex(1 << 20);
    let alive = Alive::default();
    let gateway: gateway::Client = capkv_rpc::local::new_client(TestGateway {
        alive: alive.clone(),
    });
    let (sr, sw) = tokio::io::split(server_end);
    let server = match kind {
        Server::CapnpRpc => {
            let network = twoparty::VatNetwork::new(
                sr.compat(),
                sw.compat_write(),
                rpc_twoparty_capnp::Side::Server,
                Default::default(),
            );
            let rpc = RpcSystem::new(Box::new(network), Some(gateway.client));
            tokio::task::spawn_local(async move {
                let _ = rpc.await;
            })
        }
        Server::Capkv => tokio::task::spawn_local(async move {
            let _ = capkv_rpc::engine::serve(
                capkv_rpc::frames::ByteFrames::new(sr.compat(), 1 << 20),
                sw.compat_write(),
                gateway.client.hook,
                Default::default(),
                Default::default(),
            )
            .await;
        }),
    };
    (client_end, alive, server)
}

/// A server of `kind` and capkv's client over an in-memory stream (inside a `LocalSet`).
fn connect(kind: Server) -> Conn {
    let (client_end, alive, server) = start_server(kind);
    let (cr, cw) = tokio::io::split(client_end);
    let writes = Rc::new(Cell::new(0));
    let (hook, driver) = client::connect_halves(
        cr.compat(),
        CountingWriter {
            inner: cw.compat_write(),
            writes: Rc::clone(&writes),
        },
        ClientLimits::default(),
    );
    Conn {
        gateway: gateway::Client::new(hook),
        alive,
        writes,
        driver: tokio::task::spawn_local(driver),
        server,
    }
}

fn run<F: std::future::Future<Output = ()>>(f: impl Fn(Server) -> F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for kind in SERVERS {
        eprintln!("server: {kind:?}");
        tokio::task::LocalSet::new().block_on(&rt, f(kind));
    }
}

fn open(gateway: &gateway::Client, token: &str) -> kv_store::Client {
    let mut req = gateway.open_request();
    req.get().set_token(token);
    req.send().pipeline.get_result().get_kv_cap()
}

async fn get(kv: &kv_store::Client, key: &[u8]) -> Result<Vec<u8>, capnp::Error> {
    let mut req = kv.get_request();
    req.get().set_key(key);
    let resp = req.send().promise.await?;
    match resp.get()?.get_result()?.which()? {
        capkv::kv_capnp::get_result::Ok(e) => Ok(e?.get_value()?.to_vec()),
        capkv::kv_capnp::get_result::Error(_) => Err(capnp::Error::failed("error arm".into())),
    }
}

/// Yields until `done` holds; bounded.
async fn until(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..10_000 {
        if done() {
            return true;
        }
        tokio::task::yield_now().await;
    }
    done()
}

/// Bootstrap, `open` and a `get` pipelined on it leave in one write, one round trip, and
/// the answer is the server's.
#[test]
fn a_pipelined_get_leaves_with_bootstrap_and_open_in_one_write() {
    run(|kind| async move {
        let c = connect(kind);
        let kv = open(&c.gateway, "t");
        let mut req = kv.get_request();
        req.get().set_key(b"k1");
        let promise = req.send().promise;
        let resp = promise.await.unwrap();
        let capkv::kv_capnp::get_result::Ok(e) =
            resp.get().unwrap().get_result().unwrap().which().unwrap()
        else {
            panic!("error arm")
        };
        assert_eq!(e.unwrap().get_value().unwrap(), b"k1");
        assert_eq!(
            c.writes.get(),
            1,
            "{kind:?}: bootstrap, open and get in one write"
        );
        c.server.abort();
    });
}

/// Sixteen calls in flight on one connection each get their own answer, out of order
/// when the server answers so, and question ids are reused after.
#[test]
fn calls_in_flight_get_their_own_answers() {
    run(|kind| async move {
        let c = connect(kind);
        let kv = open(&c.gateway, "t");
        for round in 0..3 {
            let calls: Vec<_> = (0..16)
                .map(|i| {
                    let kv = kv.clone();
                    async move {
                        let key = if i % 3 == 0 {
                            b"slow".to_vec()
                        } else {
                            format!("k{round}-{i}").into_bytes()
                        };
                        (key.clone(), get(&kv, &key).await)
                    }
                })
                .collect();
            for (key, got) in futures::future::join_all(calls).await {
                assert_eq!(got.unwrap(), key, "{kind:?}");
            }
        }
        c.server.abort();
    });
}

/// A server exception reaches the caller as capnp-rpc words it; the connection stays.
#[test]
fn an_exception_fails_that_call_only() {
    run(|kind| async move {
        let c = connect(kind);
        let kv = open(&c.gateway, "t");
        let e = get(&kv, b"boom").await.unwrap_err();
        assert_eq!(e.kind, capnp::ErrorKind::Failed, "{kind:?}");
        assert!(
            e.to_string().contains("remote exception: boom"),
            "{kind:?}: {e}"
        );
        assert_eq!(get(&kv, b"after").await.unwrap(), b"after");
        c.server.abort();
    });
}

/// Calls pipelined on a call that failed fail with its error.
#[test]
fn calls_pipelined_on_a_failed_call_fail_alike() {
    run(|kind| async move {
        let c = connect(kind);
        let kv = open(&c.gateway, "bad");
        let e = get(&kv, b"k").await.unwrap_err();
        assert!(e.to_string().contains("bad token"), "{kind:?}: {e}");
        // The gateway still works.
        let kv = open(&c.gateway, "t");
        assert_eq!(get(&kv, b"k").await.unwrap(), b"k");
        c.server.abort();
    });
}

/// Capabilities the client drops are released on the server (whose object then goes),
/// whether imported from a response or pipelined on a question.
#[test]
fn dropped_capabilities_are_released_on_the_server() {
    run(|kind| async move {
        let c = connect(kind);
        // Pipelined only: the question's Finish releases the result's capability.
        let kv = open(&c.gateway, "t");
        assert_eq!(get(&kv, b"k").await.unwrap(), b"k");
        assert_eq!(c.alive.0.get(), 1);
        drop(kv);
        assert!(
            until(|| c.alive.0.get() == 0).await,
            "{kind:?}: pipelined kv not released"
        );
        // Imported from the response: Release gives it back.
        let mut req = c.gateway.open_request();
        req.get().set_token("t");
        let resp = req.send().promise.await.unwrap();
        let kv = resp
            .get()
            .unwrap()
            .get_result()
            .unwrap()
            .get_kv_cap()
            .unwrap();
        let kv2 = kv.clone();
        drop(resp);
        assert_eq!(get(&kv, b"a").await.unwrap(), b"a");
        drop(kv);
        assert_eq!(
            get(&kv2, b"b").await.unwrap(),
            b"b",
            "{kind:?}: a copy keeps it"
        );
        assert_eq!(c.alive.0.get(), 1);
        drop(kv2);
        assert!(
            until(|| c.alive.0.get() == 0).await,
            "{kind:?}: imported kv not released"
        );
        c.server.abort();
    });
}

/// A call whose caller gives up before the answer (a deadline) leaves nothing behind: the
/// capability its result would have held is released by the server.
#[test]
fn a_call_given_up_before_its_answer_leaves_nothing() {
    run(|kind| async move {
        let c = connect(kind);
        let mut req = c.gateway.open_request();
        req.get().set_token("t");
        let sent = req.send();
        drop(sent);
        assert!(until(|| c.alive.0.get() == 0).await);
        // Made and released (or never made): either way nothing stays.
        let kv = open(&c.gateway, "t");
        assert_eq!(get(&kv, b"k").await.unwrap(), b"k");
        drop(kv);
        assert!(until(|| c.alive.0.get() == 0).await, "{kind:?}");
        c.server.abort();
    });
}

/// When the server goes, calls waiting fail with `disconnected`, later calls fail at once,
/// and the connection's future ends with the reason.
#[test]
fn a_lost_server_fails_waiting_and_later_calls() {
    run(|kind| async move {
        let c = connect(kind);
        let kv = open(&c.gateway, "t");
        assert_eq!(get(&kv, b"k").await.unwrap(), b"k");
        c.server.abort();
        let _ = c.server.await;
        let e = get(&kv, b"k").await.unwrap_err();
        assert_eq!(e.kind, capnp::ErrorKind::Disconnected, "{kind:?}: {e}");
        let ended = c.driver.await.unwrap();
        assert!(ended.is_err(), "{kind:?}");
        let e = get(&kv, b"k").await.unwrap_err();
        assert_eq!(e.kind, capnp::ErrorKind::Disconnected, "{kind:?}: {e}");
    });
}

/// Dropping every capability of a connection ends it: its future resolves.
#[test]
fn a_connection_nobody_holds_ends() {
    run(|kind| async move {
        let c = connect(kind);
        let kv = open(&c.gateway, "t");
        assert_eq!(get(&kv, b"k").await.unwrap(), b"k");
        drop(kv);
        drop(c.gateway);
        ends_cleanly(kind, c.driver, c.server).await;
    });
}

/// A hundred calls pipelined on an answer still running wait for it and all get answers.
#[test]
fn a_hundred_calls_pipelined_on_a_running_answer() {
    run(|kind| async move {
        let c = connect(kind);
        let kv = open(&c.gateway, "slow");
        let calls: Vec<_> = (0..100)
            .map(|i| {
                let kv = kv.clone();
                async move {
                    let key = format!("k{i}").into_bytes();
                    (key.clone(), get(&kv, &key).await)
                }
            })
            .collect();
        let all = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            futures::future::join_all(calls),
        )
        .await
        .expect("calls hang");
        for (key, got) in all {
            assert_eq!(got.unwrap(), key, "{kind:?}");
        }
        c.server.abort();
    });
}

/// What a server could send, decoded from arbitrary bytes: Returns for small question ids
/// (results whose capability tables hold every kind of descriptor, exceptions, cancels,
/// results sent elsewhere), Aborts, Calls, Bootstraps, Finishes, Releases, Resolves,
/// Disembargos, Unimplementeds and undecodable bodies, each framed as on the wire.
fn server_messages(input: &[u8]) -> Vec<u8> {
    use capnp_rpc::rpc_capnp::{exception, message as rpc_message};
    let mut out = Vec::new();
    let mut bytes = input.iter().copied();
    let mut next = move || bytes.next();
    while let Some(kind) = next() {
        let a = u32::from(next().unwrap_or(0) % 8);
        let b = next().unwrap_or(0);
        let mut m = capnp::message::Builder::new_default();
        let root = m.init_root::<rpc_message::Builder>();
        match kind % 12 {
            0..=3 => {
                let mut r = root.init_return();
                r.set_answer_id(a);
                r.set_no_finish_needed(b & 1 == 1);
                let mut p = r.init_results();
                let n = u32::from(b % 4);
                let mut t = p.reborrow().init_cap_table(n);
                for i in 0..n {
                    let mut d = t.reborrow().get(i);
                    match (b >> 2).wrapping_add(i as u8) % 5 {
                        0 => d.set_none(()),
                        1 => d.set_sender_hosted(u32::from(b % 3)),
                        2 => d.set_sender_promise(u32::from(b % 3)),
                        3 => d.set_receiver_hosted(1),
                        _ => {
                            let mut pa = d.init_receiver_answer();
                            pa.set_question_id(a);
                        }
                    }
                }
                if n > 0 {
                    // A struct whose first pointer is capability 0, as `open`'s result.
                    let c = p.init_content();
                    let mut s = c.init_as::<capkv::kv_capnp::gateway::open_results::Builder>();
                    let _ = s.reborrow().init_result();
                }
            }
            4 => {
                let mut r = root.init_return();
                r.set_answer_id(a);
                let mut e = r.init_exception();
                e.set_type(exception::Type::Failed);
                e.set_reason("scripted");
            }
            5 => {
                let mut r = root.init_return();
                r.set_answer_id(a);
                if b & 1 == 0 {
                    r.set_canceled(());
                } else {
                    r.set_results_sent_elsewhere(());
                }
            }
            6 => root.init_abort().set_reason("scripted abort"),
            7 => {
                let mut c = root.init_call();
                c.set_question_id(a);
                c.init_target().set_imported_cap(u32::from(b));
            }
            8 => root.init_bootstrap().set_question_id(a),
            9 => {
                if b & 1 == 0 {
                    let mut f = root.init_finish();
                    f.set_question_id(a);
                } else {
                    let mut r = root.init_release();
                    r.set_id(a);
                    r.set_reference_count(u32::from(b));
                }
            }
            10 => {
                let mut r = root.init_resolve();
                r.set_promise_id(a);
                r.init_cap().set_sender_hosted(1);
            }
            _ => {
                let mut u = root.init_unimplemented().init_call();
                u.set_question_id(a);
                u.init_target().set_imported_cap(0);
            }
        }
        capnp::serialize::write_message(&mut out, &m).unwrap();
    }
    out
}

/// Whatever a server sends, the client never panics, and its connection ends or serves
/// on: seeded sequences of every message kind, for questions that exist and that do not,
/// while calls are waiting and being dropped.
#[test]
fn no_server_message_sequence_panics_the_client() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for round in 0..300 {
        // 1 to 8 messages: long scripts almost always end the connection early (an
        // Abort, a second Return), short ones leave it serving.
        let len = 3 * (1 + round % 8);
        let input: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let script = server_messages(&input);
        tokio::task::LocalSet::new().block_on(&rt, async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (client_end, mut server_end) = tokio::io::duplex(1 << 20);
            let server = tokio::task::spawn_local(async move {
                // Let the client's first calls out, then the script, then read until the
                // client hangs up (bounded by the test's own end).
                tokio::task::yield_now().await;
                let _ = server_end.write_all(&script).await;
                let mut sink = [0u8; 4096];
                while let Ok(n) = server_end.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            });
            let (cr, cw) = tokio::io::split(client_end);
            let (hook, driver) =
                client::connect_halves(cr.compat(), cw.compat_write(), ClientLimits::default());
            let driver = tokio::task::spawn_local(driver);
            let gateway = gateway::Client::new(hook);
            let kv = open(&gateway, "t");
            let calls: Vec<_> = (0..6)
                .map(|i| {
                    let kv = kv.clone();
                    tokio::task::spawn_local(async move {
                        // A scripted server may never answer: a bound, not a wait.
                        let _ = tokio::time::timeout(
                            std::time::Duration::from_millis(20),
                            get(&kv, format!("k{i}").as_bytes()),
                        )
                        .await;
                    })
                })
                .collect();
            for c in calls {
                assert!(c.await.is_ok(), "round {round}: a call panicked");
            }
            drop(kv);
            drop(gateway);
            let ended = tokio::time::timeout(std::time::Duration::from_secs(5), driver)
                .await
                .unwrap_or_else(|_| panic!("round {round}: the connection did not end"));
            assert!(ended.is_ok(), "round {round}: the connection panicked");
            server.abort();
        });
    }
}

/// A server of `kind` and capkv's client, its bootstrap as a direct capability.
/// With every capability gone, the connection's future ends, without error (then the
/// server task is stopped).
async fn ends_cleanly(
    kind: Server,
    driver: tokio::task::JoinHandle<Result<(), capnp::Error>>,
    server: tokio::task::JoinHandle<()>,
) {
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), driver)
        .await
        .expect("the connection did not end");
    assert!(ended.unwrap().is_ok(), "{kind:?}");
    server.abort();
}

fn connect_direct(
    kind: Server,
) -> (
    DirectCap,
    Alive,
    tokio::task::JoinHandle<()>,
    tokio::task::JoinHandle<Result<(), capnp::Error>>,
) {
    let (client_end, alive, server) = start_server(kind);
    let (cr, cw) = tokio::io::split(client_end);
    let (bootstrap, driver) =
        client::connect_direct_halves(cr.compat(), cw.compat_write(), ClientLimits::default());
    (bootstrap, alive, server, tokio::task::spawn_local(driver))
}

const GATEWAY_ID: u64 = <gateway::Client as capnp::traits::HasTypeId>::TYPE_ID;
const KV_ID: u64 = <kv_store::Client as capnp::traits::HasTypeId>::TYPE_ID;

/// `open(token)` made directly, and the `KvStore` pipelined on it.
fn open_direct(bootstrap: &DirectCap, token: &str) -> (client::DirectCall, DirectCap) {
    let call = bootstrap.call(GATEWAY_ID, 2, 32, |p| {
        p.init_as::<gateway::open_params::Builder>()
            .set_token(token);
        Ok(())
    });
    let kv = call.pipelined(&[0, 1]);
    (call, kv)
}

async fn get_direct(kv: &DirectCap, key: &[u8]) -> Result<Vec<u8>, capnp::Error> {
    let reply = kv
        .call(KV_ID, 0, 32, |p| {
            p.init_as::<kv_store::get_params::Builder>().set_key(key);
            Ok(())
        })
        .await?;
    let results = reply.results()?.get_as::<kv_store::get_results::Reader>()?;
    match results.get_result()?.which()? {
        capkv::kv_capnp::get_result::Ok(e) => Ok(e?.get_value()?.to_vec()),
        capkv::kv_capnp::get_result::Error(_) => Err(capnp::Error::failed("error arm".into())),
    }
}

/// Direct calls (no capnp hook objects) and hook calls on the same capability share the
/// connection: pipelined gets are answered, in flight together; an exception fails that
/// call only; calls on a failed `open` fail; a direct call given up before its answer
/// leaves nothing; every capability dropped is released on the server, and the
/// connection ends once nothing holds it.
#[test]
fn direct_calls_share_the_connection_with_hook_calls() {
    run(|kind| async move {
        let (bootstrap, alive, server, driver) = connect_direct(kind);
        let (open, kv) = open_direct(&bootstrap, "t");
        let hooked: kv_store::Client = kv_store::Client::new(kv.hook());
        let (a, b, c) = futures::join!(
            get_direct(&kv, b"a"),
            get(&hooked, b"b"),
            get_direct(&kv, b"c")
        );
        assert_eq!(
            (a.unwrap(), b.unwrap(), c.unwrap()),
            (b"a".to_vec(), b"b".to_vec(), b"c".to_vec()),
            "{kind:?}"
        );
        let reply = open.await.unwrap();
        assert!(reply.results().is_ok(), "{kind:?}");
        drop(reply);
        let e = get_direct(&kv, b"boom").await.unwrap_err();
        assert!(e.to_string().contains("boom"), "{kind:?}: {e}");
        assert_eq!(get_direct(&kv, b"k").await.unwrap(), b"k", "{kind:?}");
        // Keys past the call's first segment (the message grows a second one), then small.
        for len in [4_000, 1_500, 2] {
            let key = vec![b'x'; len];
            assert_eq!(get_direct(&kv, &key).await.unwrap(), key, "{kind:?} {len}");
        }
        // Given up before its answer: its question goes when the Return comes.
        drop(kv.call(KV_ID, 0, 32, |p| {
            p.init_as::<kv_store::get_params::Builder>()
                .set_key(b"slow");
            Ok(())
        }));
        assert_eq!(
            get_direct(&kv, b"after").await.unwrap(),
            b"after",
            "{kind:?}"
        );
        // A failed open fails the calls pipelined on it.
        let (bad, bad_kv) = open_direct(&bootstrap, "bad");
        assert!(get_direct(&bad_kv, b"k").await.is_err(), "{kind:?}");
        assert!(bad.await.is_err(), "{kind:?}");
        drop(bad_kv);
        assert_eq!(alive.0.get(), 1, "{kind:?}");
        drop(hooked);
        drop(kv);
        assert!(
            until(|| alive.0.get() == 0).await,
            "{kind:?}: kv not released"
        );
        drop(bootstrap);
        ends_cleanly(kind, driver, server).await;
    });
}

/// A capability pipelined on `open` resolves, once `open` returned, to the import the
/// server hosts: calls on it then address the import, before and after the pipelined
/// handle goes, and everything is released in the end; a reply of another question does
/// not resolve it.
#[test]
fn a_pipelined_direct_capability_resolves_to_its_import() {
    run(|kind| async move {
        let (bootstrap, alive, server, driver) = connect_direct(kind);
        let (open, kv) = open_direct(&bootstrap, "t");
        assert_eq!(get_direct(&kv, b"a").await.unwrap(), b"a", "{kind:?}");
        let reply = open.await.unwrap();
        let imported = kv.resolve(&reply).expect("kvCap is hosted by the server");
        assert!(
            bootstrap.resolve(&reply).is_none(),
            "{kind:?}: not pipelined on open"
        );
        let (other, other_kv) = open_direct(&bootstrap, "t");
        let other_reply = other.await.unwrap();
        assert!(
            kv.resolve(&other_reply).is_none(),
            "{kind:?}: another question"
        );
        drop((other_reply, other_kv));
        assert!(
            until(|| alive.0.get() == 1).await,
            "{kind:?}: the other kv stays"
        );
        drop(reply);
        assert_eq!(get_direct(&imported, b"b").await.unwrap(), b"b", "{kind:?}");
        drop(kv);
        assert_eq!(get_direct(&imported, b"c").await.unwrap(), b"c", "{kind:?}");
        let hooked = kv_store::Client::new(imported.hook());
        assert_eq!(get(&hooked, b"d").await.unwrap(), b"d", "{kind:?}");
        assert_eq!(alive.0.get(), 1, "{kind:?}");
        drop((hooked, imported));
        assert!(
            until(|| alive.0.get() == 0).await,
            "{kind:?}: kv not released"
        );
        drop(bootstrap);
        ends_cleanly(kind, driver, server).await;
    });
}

/// A call made while no other waits for its answer leaves at once, without the
/// connection's future being polled again (one task poll fewer on every round trip at one
/// call at a time); a second call made while the first waits is queued for the future,
/// so that calls made together leave together.
#[tokio::test(flavor = "current_thread")]
async fn a_call_made_alone_leaves_before_the_connection_runs_again() {
    use capnp_rpc::rpc_capnp::message as rpc_message;
    use futures::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (client_end, mut server_end) = tokio::io::duplex(1 << 16);
    let (cr, cw) = tokio::io::split(client_end);
    let (bootstrap, driver) =
        client::connect_direct_halves(cr.compat(), cw.compat_write(), ClientLimits::default());
    let mut driver = Box::pin(driver);
    let mut buf = vec![0u8; 1 << 16];
    // The first poll sends the Bootstrap.
    assert!(futures::poll!(driver.as_mut()).is_pending());
    let n = server_end.read(&mut buf).await.unwrap();
    assert!(n > 0, "the bootstrap left");
    // The server answers it with a capability; the client reads the Return.
    let mut m = capnp::message::Builder::new_default();
    {
        let mut ret = m.init_root::<rpc_message::Builder>().init_return();
        ret.set_answer_id(0);
        let mut payload = ret.init_results();
        // The capability pointer, index 0 of the cap table below.
        let mut caps = Vec::new();
        let mut content = payload.reborrow().get_content();
        capnp::traits::ImbueMut::imbue_mut(&mut content, &mut caps);
        content.set_as_capability(
            capnp_rpc::new_client::<gateway::Client, _>(NoGateway)
                .client
                .hook,
        );
        payload.init_cap_table(1).get(0).set_sender_hosted(0);
    }
    let mut bytes = Vec::new();
    capnp::serialize::write_message(&mut bytes, &m).unwrap();
    server_end.write_all(&bytes).await.unwrap();
    for _ in 0..100 {
        assert!(futures::poll!(driver.as_mut()).is_pending());
        tokio::task::yield_now().await;
    }
    // Alone: the Call is on the wire with no further poll of the connection's future.
    let first = bootstrap.call(GATEWAY_ID, 2, 32, |p| {
        p.init_as::<gateway::open_params::Builder>().set_token("t");
        Ok(())
    });
    let n = server_end
        .read(&mut buf)
        .now_or_never()
        .expect("the call left at once")
        .unwrap();
    assert!(n > 0);
    // The first still waits: the second waits for the connection's future.
    let second = bootstrap.call(GATEWAY_ID, 2, 32, |p| {
        p.init_as::<gateway::open_params::Builder>().set_token("t");
        Ok(())
    });
    assert!(server_end.read(&mut buf).now_or_never().is_none());
    assert!(futures::poll!(driver.as_mut()).is_pending());
    assert!(server_end.read(&mut buf).await.unwrap() > 0);
    drop((first, second));
}

/// A gateway that is never called (it only stands for the bootstrap's capability).
struct NoGateway;
impl gateway::Server for NoGateway {}
