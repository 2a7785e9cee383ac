//! `--target capkv-raw`: capkv's protocol without an RPC runtime on the client, as
//! redis-benchmark has none, so that a run measures the server and not the client library.
//!
//! Per connection: `Bootstrap`, `Gateway.open` and `KvStore.session` go out once, each
//! pipelined on the one before; then every get is a `Call` pipelined on `open`'s `kvCap`
//! and every put one pipelined on `session`'s `sessionCap`. Calls are encoded straight into
//! the connection's coalescing writer (calls of one scheduler tick leave in one write); one
//! reader task matches each `Return` to its caller by answer id and decodes only the
//! result union's arm. A `Finish` follows every Return not marked `noFinishNeeded`, so
//! question ids are reused against both of the server's RPC engines.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use capkv::kv_capnp::{gateway, kv_store, write_session};
use capkv::CallMeta;
use capnp::message;
use capnp_rpc::rpc_capnp::{message as rpc_message, return_};
use futures::AsyncWriteExt;
use tokio::sync::oneshot;
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

use crate::target::ErrorCode;
use crate::workload::OpKind;

const BOOTSTRAP: u32 = 0;
const OPEN: u32 = 1;
const SESSION: u32 = 2;
/// The first question id of ordinary calls (0-2 stay live for the connection's life).
const FIRST_CALL: u32 = 3;

const GATEWAY_OPEN: u16 = 2;
const KV_GET: u16 = 0;
const KV_SESSION: u16 = 2;
const SESSION_PUT: u16 = 0;
/// `OpenResults.result` (0), then `OpenResult.kvCap` (pointer 1, after the union's).
const KV_CAP: [u16; 2] = [0, 1];
/// `SessionResults.result` (0), then `SessionResult.sessionCap` (pointer 2: union, token).
const SESSION_CAP: [u16; 2] = [0, 2];

type Writer = capkv_rpc::transport::CoalescingWriter<
    tokio_util::compat::Compat<tokio::net::tcp::OwnedWriteHalf>,
>;

/// What a call's Return said.
enum Reply {
    /// The result union's success arm (a missing key is a success, as in Redis).
    Ok,
    /// Its error arm, by code name.
    Error(ErrorCode),
    /// An RPC exception.
    Exception,
}

struct Waiting {
    kind: OpKind,
    reply: oneshot::Sender<Reply>,
}

/// One raw connection.
pub struct RawConn {
    writer: tokio::sync::Mutex<Writer>,
    /// Callers waiting, by question id; free ids to reuse.
    waiting: RefCell<Vec<Option<Waiting>>>,
    free: RefCell<Vec<u32>>,
    /// Finish messages owed to the server, sent with the next write.
    finishes: RefCell<Vec<u32>>,
    dead: Cell<bool>,
    token: String,
}

impl RawConn {
    /// Connects and sends the bootstrap, `open` and `session` (inside a `LocalSet`).
    pub async fn connect(addr: &str, token: &str) -> anyhow::Result<Rc<RawConn>> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        let conn = Rc::new(RawConn {
            writer: tokio::sync::Mutex::new(Writer::new(w.compat_write())),
            waiting: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            finishes: RefCell::new(Vec::new()),
            dead: Cell::new(false),
            token: token.to_string(),
        });
        let mut out = Vec::new();
        encode(&mut out, |m| m.init_bootstrap().set_question_id(BOOTSTRAP));
        encode(&mut out, |m| {
            let mut c = call(m, OPEN, BOOTSTRAP, &[], gateway_id(), GATEWAY_OPEN);
            let mut p = c
                .reborrow()
                .init_params()
                .get_content()
                .init_as::<gateway::open_params::Builder>();
            ctx().write(p.reborrow().init_ctx());
            p.set_token(&conn.token);
        });
        encode(&mut out, |m| {
            let mut c = call(m, SESSION, OPEN, &KV_CAP, kv_id(), KV_SESSION);
            let mut p = c
                .reborrow()
                .init_params()
                .get_content()
                .init_as::<kv_store::session_params::Builder>();
            ctx().write(p.reborrow().init_ctx());
        });
        conn.send(&out).await?;
        tokio::task::spawn_local(read_replies(Rc::clone(&conn), r));
        Ok(conn)
    }

    async fn send(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut w = self.writer.lock().await;
        let finishes = std::mem::take(&mut *self.finishes.borrow_mut());
        if !finishes.is_empty() {
            let mut out = Vec::new();
            for id in finishes {
                encode(&mut out, |m| {
                    let mut f = m.init_finish();
                    f.set_question_id(id);
                    f.set_release_result_caps(false);
                });
            }
            w.write_all(&out).await?;
        }
        w.write_all(bytes).await?;
        w.flush().await
    }

    fn take_id(&self, kind: OpKind) -> (u32, oneshot::Receiver<Reply>) {
        let (tx, rx) = oneshot::channel();
        let waiting = Some(Waiting { kind, reply: tx });
        let mut slots = self.waiting.borrow_mut();
        let id = match self.free.borrow_mut().pop() {
            Some(id) => {
                slots[(id - FIRST_CALL) as usize] = waiting;
                id
            }
            None => {
                slots.push(waiting);
                FIRST_CALL + slots.len() as u32 - 1
            }
        };
        (id, rx)
    }

    /// One get or put of one key.
    pub async fn call(
        &self,
        kind: OpKind,
        keys: &[Vec<u8>],
        value: &[u8],
    ) -> Result<(), ErrorCode> {
        if self.dead.get() {
            return Err("transport");
        }
        let [key] = keys else {
            return Err("raw_mode_single_keys_only");
        };
        let (id, rx) = self.take_id(kind);
        let mut out = Vec::with_capacity(128 + key.len() + value.len());
        encode(&mut out, |m| match kind {
            OpKind::Get => {
                let mut c = call(m, id, OPEN, &KV_CAP, kv_id(), KV_GET);
                let mut p = c
                    .reborrow()
                    .init_params()
                    .get_content()
                    .init_as::<kv_store::get_params::Builder>();
                ctx().write(p.reborrow().init_ctx());
                p.set_key(key);
            }
            OpKind::Put => {
                let mut c = call(m, id, SESSION, &SESSION_CAP, session_id(), SESSION_PUT);
                let mut p = c
                    .reborrow()
                    .init_params()
                    .get_content()
                    .init_as::<write_session::put_params::Builder>();
                ctx().write(p.reborrow().init_ctx());
                p.set_key(key);
                p.set_value(value);
            }
        });
        if self.send(&out).await.is_err() {
            self.dead.set(true);
            return Err("transport");
        }
        match rx.await {
            Ok(Reply::Ok) => Ok(()),
            Ok(Reply::Error(code)) => Err(code),
            Ok(Reply::Exception) => Err("exception"),
            Err(_) => Err("transport"),
        }
    }

    /// A Return for `id`: wakes its caller and frees the id.
    fn answer(&self, id: u32, no_finish_needed: bool, reply: impl FnOnce(OpKind) -> Reply) {
        if id < FIRST_CALL {
            return;
        }
        let waiting = self
            .waiting
            .borrow_mut()
            .get_mut((id - FIRST_CALL) as usize)
            .and_then(Option::take);
        if let Some(w) = waiting {
            let _ = w.reply.send(reply(w.kind));
            if !no_finish_needed {
                self.finishes.borrow_mut().push(id);
            }
            self.free.borrow_mut().push(id);
        }
    }
}

/// Reads Returns until the connection ends; then fails every caller still waiting.
async fn read_replies(conn: Rc<RawConn>, r: tokio::net::tcp::OwnedReadHalf) {
    let mut r = futures::io::BufReader::with_capacity(64 * 1024, r.compat());
    let options = capkv::response_reader_options(&capkv::Limits::default());
    while let Ok(Some(m)) = capnp_futures::serialize::try_read_message(&mut r, options).await {
        let Ok(root) = m.get_root::<rpc_message::Reader>() else {
            break;
        };
        match root.which() {
            Ok(rpc_message::Which::Return(Ok(ret))) => {
                let id = ret.get_answer_id();
                let no_finish = ret.get_no_finish_needed();
                conn.answer(id, no_finish, |kind| match ret.which() {
                    Ok(return_::Which::Results(Ok(p))) => decode(kind, p.get_content()),
                    _ => Reply::Exception,
                });
            }
            Ok(rpc_message::Which::Abort(_)) | Err(_) => break,
            _ => {}
        }
    }
    conn.dead.set(true);
    for w in conn.waiting.borrow_mut().iter_mut() {
        if let Some(w) = w.take() {
            let _ = w.reply.send(Reply::Exception);
        }
    }
}

/// The result union's arm of a get's or put's results.
fn decode(kind: OpKind, content: capnp::any_pointer::Reader<'_>) -> Reply {
    let error = |e: capnp::Result<capkv::kv_capnp::error::Reader<'_>>| match e {
        Ok(e) => Reply::Error(capkv::code_name(capkv::ApiError::read(e).code)),
        Err(_) => Reply::Exception,
    };
    match kind {
        OpKind::Get => {
            let Ok(results) = content.get_as::<kv_store::get_results::Reader>() else {
                return Reply::Exception;
            };
            use capkv::kv_capnp::get_result::Which;
            match results.get_result().map(|r| r.which()) {
                Ok(Ok(Which::Ok(_))) => Reply::Ok,
                Ok(Ok(Which::Error(e))) => match error(e) {
                    Reply::Error("not_found") => Reply::Ok,
                    other => other,
                },
                _ => Reply::Exception,
            }
        }
        OpKind::Put => {
            let Ok(results) = content.get_as::<write_session::put_results::Reader>() else {
                return Reply::Exception;
            };
            use capkv::kv_capnp::put_result::Which;
            match results.get_result().map(|r| r.which()) {
                Ok(Ok(Which::Ok(_))) => Reply::Ok,
                Ok(Ok(Which::Error(e))) => error(e),
                _ => Reply::Exception,
            }
        }
    }
}

fn encode(out: &mut Vec<u8>, build: impl FnOnce(rpc_message::Builder<'_>)) {
    let mut m = message::Builder::new(message::HeapAllocator::new().first_segment_words(64));
    build(m.init_root());
    // Writing into a Vec cannot fail.
    let _ = capnp::serialize::write_message(out, &m);
}

/// A Call of `method` on `interface`, pipelined on question `on` through `transform`.
fn call<'a>(
    m: rpc_message::Builder<'a>,
    id: u32,
    on: u32,
    transform: &[u16],
    interface: u64,
    method: u16,
) -> capnp_rpc::rpc_capnp::call::Builder<'a> {
    let mut c = m.init_call();
    c.set_question_id(id);
    c.set_interface_id(interface);
    c.set_method_id(method);
    let mut p = c.reborrow().init_target().init_promised_answer();
    p.set_question_id(on);
    let mut ops = p.init_transform(transform.len() as u32);
    for (i, &field) in transform.iter().enumerate() {
        ops.reborrow().get(i as u32).set_get_pointer_field(field);
    }
    c
}

fn ctx() -> CallMeta {
    CallMeta {
        budget_ms: Some(5_000),
        ..CallMeta::default()
    }
}

fn gateway_id() -> u64 {
    <gateway::Client as capnp::traits::HasTypeId>::TYPE_ID
}

fn kv_id() -> u64 {
    <kv_store::Client as capnp::traits::HasTypeId>::TYPE_ID
}

fn session_id() -> u64 {
    <write_session::Client as capnp::traits::HasTypeId>::TYPE_ID
}
