//! The RPC protocol as a peer sees it, with hand-built `rpc.capnp` messages over an
//! in-process stream: each case runs against capkv's own engine and, where the two agree
//! (they do on everything a correct client does), against capnp-rpc's `RpcSystem`, the
//! reference. The cases where capkv decides differently (what capnp-rpc treats as fatal or
//! handles as a level-2+ peer would) say so and run on capkv's engine only.

mod common;

use std::time::Duration;

use capkv::kv_capnp::{gateway, kv_store, version_result};
use capkv::CallMeta;
use capkv_server::config::RpcEngine;
use capnp::message::{self, ReaderOptions};
use capnp::serialize::OwnedSegments;
use capnp_rpc::rpc_capnp::{exception, message as rpc_message, return_};
use common::*;
use futures::AsyncWriteExt;
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

const BOTH: [RpcEngine; 2] = [RpcEngine::CapnpRpc, RpcEngine::Capkv];
const PATIENCE: Duration = Duration::from_secs(10);

const GATEWAY: u64 = <gateway::Client as capnp::traits::HasTypeId>::TYPE_ID;
const KV_STORE: u64 = <kv_store::Client as capnp::traits::HasTypeId>::TYPE_ID;
const VERSION: u16 = 1;
const OPEN: u16 = 2;
const GET: u16 = 0;

/// One raw protocol connection to an in-process server.
struct Peer {
    reader: Compat<tokio::io::ReadHalf<tokio::io::DuplexStream>>,
    writer: Compat<tokio::io::WriteHalf<tokio::io::DuplexStream>>,
    shared: std::sync::Arc<capkv_server::chain::Shared>,
    /// Messages to send together, in one write.
    batch: Vec<u8>,
}

/// A decoded message, by what it is.
#[derive(Debug, PartialEq)]
enum Got {
    /// A Return with results: answer id, export ids in its cap table, noFinishNeeded.
    Results(u32, Vec<u32>, bool),
    /// A Return with an exception: answer id, type.
    Exception(u32, exception::Type),
    Unimplemented,
    Abort,
    /// The connection ended.
    Closed,
}

fn engine_config(engine: RpcEngine) -> capkv_server::Config {
    let mut config = test_config();
    config.rpc_engine = engine;
    config
}

impl Peer {
    fn new(engine: RpcEngine) -> Self {
        let (stream, shared) = in_process_stream(&engine_config(engine));
        let (r, w) = tokio::io::split(stream);
        Self {
            reader: r.compat(),
            writer: w.compat_write(),
            shared,
            batch: Vec::new(),
        }
    }

    /// Queues one message (sent by `flush`).
    fn queue(&mut self, build: impl FnOnce(rpc_message::Builder<'_>)) {
        let mut m = message::Builder::new_default();
        build(m.init_root());
        capnp::serialize::write_message(&mut self.batch, &m).unwrap();
    }

    async fn flush(&mut self) {
        let bytes = std::mem::take(&mut self.batch);
        // A server that aborted may have closed its end already.
        let _ = self.writer.write_all(&bytes).await;
        let _ = self.writer.flush().await;
    }

    async fn recv_message(&mut self) -> Option<message::Reader<OwnedSegments>> {
        tokio::time::timeout(
            PATIENCE,
            capnp_futures::serialize::try_read_message(&mut self.reader, ReaderOptions::new()),
        )
        .await
        .expect("the server answers in time")
        .ok()
        .flatten()
    }

    async fn recv(&mut self) -> Got {
        let Some(m) = self.recv_message().await else {
            return Got::Closed;
        };
        decode(&m)
    }

    /// A Return's version result, checked to be the success arm.
    async fn recv_version_ok(&mut self, id: u32) {
        let m = self.recv_message().await.expect("a Return");
        let root = m.get_root::<rpc_message::Reader>().unwrap();
        let rpc_message::Which::Return(ret) = root.which().unwrap() else {
            panic!("{:?}", decode(&m))
        };
        let ret = ret.unwrap();
        assert_eq!(ret.get_answer_id(), id);
        let return_::Which::Results(p) = ret.which().unwrap() else {
            panic!("{:?}", decode(&m))
        };
        let results: gateway::version_results::Reader = p.unwrap().get_content().get_as().unwrap();
        match results.get_result().unwrap().which().unwrap() {
            version_result::Which::Ok(ok) => {
                assert_eq!(ok.get_api_version(), capkv::API_VERSION)
            }
            version_result::Which::Error(_) => panic!("version failed"),
        }
    }

    fn bootstrap(&mut self, id: u32) {
        self.queue(|m| m.init_bootstrap().set_question_id(id));
    }

    /// `Gateway.version` on `target`: an export id, or a question id and its transform.
    fn version(&mut self, id: u32, target: Target<'_>) {
        self.call(id, target, GATEWAY, VERSION, |content| {
            let mut p = content.init_as::<gateway::version_params::Builder>();
            ctx().write(p.reborrow().init_ctx());
        });
    }

    fn call(
        &mut self,
        id: u32,
        target: Target<'_>,
        interface: u64,
        method: u16,
        params: impl FnOnce(capnp::any_pointer::Builder<'_>),
    ) {
        self.queue(|m| {
            let mut c = m.init_call();
            c.set_question_id(id);
            c.set_interface_id(interface);
            c.set_method_id(method);
            let mut t = c.reborrow().init_target();
            match target {
                Target::Export(e) => t.set_imported_cap(e),
                Target::Answer(q, ops) => {
                    let mut p = t.init_promised_answer();
                    p.set_question_id(q);
                    let mut list = p.init_transform(ops.len() as u32);
                    for (i, op) in ops.iter().enumerate() {
                        list.reborrow().get(i as u32).set_get_pointer_field(*op);
                    }
                }
            }
            params(c.init_params().get_content());
        });
    }

    fn finish(&mut self, id: u32, release_result_caps: bool) {
        self.queue(|m| {
            let mut f = m.init_finish();
            f.set_question_id(id);
            f.set_release_result_caps(release_result_caps);
        });
    }

    fn release(&mut self, export: u32, count: u32) {
        self.queue(|m| {
            let mut r = m.init_release();
            r.set_id(export);
            r.set_reference_count(count);
        });
    }

    /// Bootstraps as question 0 and returns the gateway's export id.
    async fn gateway(&mut self) -> u32 {
        self.bootstrap(0);
        self.flush().await;
        match self.recv().await {
            Got::Results(0, exports, false) if exports.len() == 1 => exports[0],
            other => panic!("bootstrap: {other:?}"),
        }
    }

    /// `Gateway.open` as question `id` on the gateway export; returns its Return.
    async fn open(&mut self, id: u32, gateway: u32) -> Got {
        self.call(id, Target::Export(gateway), GATEWAY, OPEN, |content| {
            let mut p = content.init_as::<gateway::open_params::Builder>();
            ctx().write(p.reborrow().init_ctx());
        });
        self.flush().await;
        self.recv().await
    }
}

enum Target<'a> {
    Export(u32),
    Answer(u32, &'a [u16]),
}

fn ctx() -> CallMeta {
    CallMeta {
        budget_ms: Some(10_000),
        ..CallMeta::default()
    }
}

fn decode(m: &message::Reader<OwnedSegments>) -> Got {
    let root = m.get_root::<rpc_message::Reader>().unwrap();
    match root.which().unwrap() {
        rpc_message::Which::Return(ret) => {
            let ret = ret.unwrap();
            let id = ret.get_answer_id();
            match ret.which().unwrap() {
                return_::Which::Results(p) => {
                    let p = p.unwrap();
                    let exports = p
                        .get_cap_table()
                        .unwrap()
                        .iter()
                        .map(|d| match d.which().unwrap() {
                            capnp_rpc::rpc_capnp::cap_descriptor::Which::SenderHosted(e) => e,
                            _ => panic!("a capability not hosted by the server"),
                        })
                        .collect();
                    Got::Results(id, exports, ret.get_no_finish_needed())
                }
                return_::Which::Exception(e) => Got::Exception(id, e.unwrap().get_type().unwrap()),
                _ => panic!("an unexpected Return"),
            }
        }
        rpc_message::Which::Unimplemented(_) => Got::Unimplemented,
        rpc_message::Which::Abort(_) => Got::Abort,
        _ => panic!("an unexpected message"),
    }
}

/// Path from `OpenResults` to `kvCap`: field 0 (`result`), then pointer 1 of `OpenResult`.
const KV_CAP: [u16; 2] = [0, 1];

#[test]
fn bootstrap_and_a_call_pipelined_on_it_leave_in_one_flight() {
    for engine in BOTH {
        local(async move {
            let mut peer = Peer::new(engine);
            peer.bootstrap(0);
            peer.version(1, Target::Answer(0, &[]));
            peer.flush().await;
            assert!(
                matches!(peer.recv().await, Got::Results(0, e, false) if e.len() == 1),
                "{engine:?}"
            );
            peer.recv_version_ok(1).await;
        });
    }
}

#[test]
fn an_unknown_method_or_interface_fails_that_call_only() {
    for engine in BOTH {
        local(async move {
            let mut peer = Peer::new(engine);
            let gw = peer.gateway().await;
            peer.call(1, Target::Export(gw), GATEWAY, 999, |_| {});
            peer.call(2, Target::Export(gw), 0x1234, 0, |_| {});
            peer.flush().await;
            for id in [1, 2] {
                assert_eq!(
                    peer.recv().await,
                    Got::Exception(id, exception::Type::Unimplemented),
                    "{engine:?}"
                );
            }
            peer.version(3, Target::Export(gw));
            peer.flush().await;
            peer.recv_version_ok(3).await;
        });
    }
}

#[test]
fn a_finish_for_an_unknown_question_is_ignored() {
    for engine in BOTH {
        local(async move {
            let mut peer = Peer::new(engine);
            let gw = peer.gateway().await;
            peer.finish(77, true);
            peer.version(1, Target::Export(gw));
            peer.flush().await;
            peer.recv_version_ok(1).await;
        });
    }
}

#[test]
fn a_duplicate_live_question_id_or_an_over_release_aborts() {
    for engine in BOTH {
        local(async move {
            let mut peer = Peer::new(engine);
            let _gw = peer.gateway().await;
            // Question 0 (the bootstrap) is live until its Finish.
            peer.bootstrap(0);
            peer.flush().await;
            assert_eq!(peer.recv().await, Got::Abort, "{engine:?}");
        });
        local(async move {
            let mut peer = Peer::new(engine);
            let gw = peer.gateway().await;
            peer.release(gw, 2);
            peer.flush().await;
            assert_eq!(peer.recv().await, Got::Abort, "{engine:?}");
        });
    }
}

/// `open` returns the same KvStore in `kv` (for API v2) and `kvCap`: one export, two
/// references, freed by `Release(id, 2)`; every capability is freed with the connection.
#[test]
fn the_same_export_returned_twice_is_one_export_freed_by_its_count() {
    for engine in BOTH {
        local(async move {
            let mut peer = Peer::new(engine);
            let gw = peer.gateway().await;
            let kv = match peer.open(1, gw).await {
                Got::Results(1, exports, false) => {
                    assert_eq!(exports.len(), 2, "{engine:?}");
                    assert_eq!(exports[0], exports[1], "{engine:?}: one export");
                    exports[0]
                }
                other => panic!("{engine:?}: open: {other:?}"),
            };
            assert_eq!(peer.shared.capabilities_held(), 1);
            peer.finish(1, false);
            peer.release(kv, 2);
            // The gateway still answers: only the KvStore went.
            peer.version(2, Target::Export(gw));
            peer.flush().await;
            peer.recv_version_ok(2).await;
            assert_eq!(peer.shared.capabilities_held(), 0, "{engine:?}: released");

            // A second open, then the connection goes: its capabilities go with it.
            assert!(matches!(peer.open(3, gw).await, Got::Results(3, ..)));
            assert_eq!(peer.shared.capabilities_held(), 1);
            let shared = std::sync::Arc::clone(&peer.shared);
            drop(peer);
            for _ in 0..10_000 {
                if shared.capabilities_held() == 0 {
                    break;
                }
                tokio::task::yield_now().await;
            }
            assert_eq!(
                shared.capabilities_held(),
                0,
                "{engine:?}: freed on disconnect"
            );
        });
    }
}

/// Calls pipelined on `open` before its Return run after it, in the order sent; after the
/// Return and before Finish they still work (the answer keeps its capabilities).
#[test]
fn calls_pipelined_on_a_running_and_on_a_returned_answer_work() {
    for engine in BOTH {
        local(async move {
            let mut peer = Peer::new(engine);
            let gw = peer.gateway().await;
            peer.call(1, Target::Export(gw), GATEWAY, OPEN, |content| {
                let mut p = content.init_as::<gateway::open_params::Builder>();
                ctx().write(p.reborrow().init_ctx());
            });
            for id in 2..6 {
                peer.call(id, Target::Answer(1, &KV_CAP), KV_STORE, GET, |content| {
                    let mut p = content.init_as::<kv_store::get_params::Builder>();
                    ctx().write(p.reborrow().init_ctx());
                    p.set_key(b"k");
                });
            }
            peer.flush().await;
            let mut answered = Vec::new();
            for _ in 1..6 {
                match peer.recv().await {
                    Got::Results(id, _, _) => answered.push(id),
                    other => panic!("{engine:?}: {other:?}"),
                }
            }
            assert_eq!(answered, [1, 2, 3, 4, 5], "{engine:?}: in the order sent");
            // After the Return, before Finish.
            peer.call(6, Target::Answer(1, &KV_CAP), KV_STORE, GET, |content| {
                let mut p = content.init_as::<kv_store::get_params::Builder>();
                ctx().write(p.reborrow().init_ctx());
                p.set_key(b"k");
            });
            peer.flush().await;
            assert!(
                matches!(peer.recv().await, Got::Results(6, ..)),
                "{engine:?}"
            );
        });
    }
}

/// Decisions capkv's engine makes where capnp-rpc's differs (capnp-rpc aborts on a call to
/// an unknown export and handles Resolve and Disembargo as a level-2+ peer would).
#[test]
fn capkv_engine_fails_bad_targets_alone_echoes_resolve_and_aborts_on_disembargo() {
    local(async {
        let mut peer = Peer::new(RpcEngine::Capkv);
        let gw = peer.gateway().await;
        // An unknown export, a pipelined call after Finish, a transform to a non-capability.
        peer.version(1, Target::Export(99));
        peer.flush().await;
        assert_eq!(
            peer.recv().await,
            Got::Exception(1, exception::Type::Failed)
        );
        assert!(matches!(peer.open(2, gw).await, Got::Results(2, ..)));
        peer.finish(2, false);
        peer.call(3, Target::Answer(2, &KV_CAP), KV_STORE, GET, |_| {});
        peer.call(4, Target::Answer(0, &[0]), GATEWAY, VERSION, |_| {});
        peer.flush().await;
        assert_eq!(
            peer.recv().await,
            Got::Exception(3, exception::Type::Failed)
        );
        assert_eq!(
            peer.recv().await,
            Got::Exception(4, exception::Type::Failed)
        );
        // Results without a capability: noFinishNeeded, and the answer is gone at once.
        peer.version(5, Target::Export(gw));
        peer.flush().await;
        assert!(matches!(peer.recv().await, Got::Results(5, e, true) if e.is_empty()));

        peer.queue(|m| {
            let mut r = m.init_resolve();
            r.set_promise_id(1);
            r.init_exception().set_reason("x");
        });
        peer.flush().await;
        assert_eq!(peer.recv().await, Got::Unimplemented);

        peer.queue(|m| {
            let mut d = m.init_disembargo();
            d.reborrow().init_target().set_imported_cap(gw);
            d.init_context().set_sender_loopback(1);
        });
        peer.flush().await;
        assert_eq!(peer.recv().await, Got::Abort);
        assert_eq!(peer.recv().await, Got::Closed);
    });
}

/// A call whose params carry a capability is refused (this server takes none), alone.
#[test]
fn capkv_engine_refuses_capabilities_in_params() {
    local(async {
        let mut peer = Peer::new(RpcEngine::Capkv);
        let gw = peer.gateway().await;
        peer.queue(|m| {
            let mut c = m.init_call();
            c.set_question_id(1);
            c.set_interface_id(GATEWAY);
            c.set_method_id(VERSION);
            c.reborrow().init_target().set_imported_cap(gw);
            let mut p = c.init_params();
            p.reborrow().get_content().clear();
            p.init_cap_table(1).get(0).set_sender_hosted(5);
        });
        peer.version(2, Target::Export(gw));
        peer.flush().await;
        assert_eq!(
            peer.recv().await,
            Got::Exception(1, exception::Type::Failed)
        );
        peer.recv_version_ok(2).await;
    });
}
