//! `--target capkv-raw`: capkv's protocol without an RPC runtime on the client, as
//! redis-benchmark has none, so that a run measures the server and not the client library.
//!
//! Per connection: `Bootstrap`, `Gateway.open` and `KvStore.session` go out once, each
//! pipelined on the one before. Gets are `Call`s on `open`'s `kvCap` and puts on `session`'s
//! `sessionCap`: pipelined on those answers until they return, then addressed to the
//! capabilities they carry (`importedCap`), as a Cap'n Proto client does once a promise
//! resolves. Calls are encoded into the connection's outbox and one writer task sends
//! whatever the outbox holds when it runs (the calls of one scheduler tick leave in one
//! write); one reader task hands each `Return` to its caller's slot by answer id, decoding
//! only the result union's arm. A `Finish` follows every Return not marked `noFinishNeeded`,
//! so question ids are reused against both of the server's RPC engines, and `open`'s and
//! `session`'s (with the bootstrap's) once their capabilities are imported, so the server
//! keeps no answer for the connection, as with a Cap'n Proto client.
//!
//! Per call the client allocates only the message it encodes: callers wait in a slab of
//! slots by question id (no channel per call), and the outbox and read buffer are reused.
//!
//! Each call also reports its *wire latency*: from the moment the writer hands the write
//! that carries it to the kernel to the moment the reader has the read that brought its
//! Return. That is how redis-benchmark times its requests (start when its write handler
//! writes, end when its read handler reads), so the two can be compared on one definition;
//! the caller's own latency adds the generator's scheduling on both ends.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use capkv::kv_capnp::{gateway, kv_store, write_session};
use capkv::CallMeta;
use capnp::message;
use capnp_rpc::rpc_capnp::{cap_descriptor, message as rpc_message, return_};

use crate::pipe::{Pipe, Reply};
use crate::target::ErrorCode;
use crate::workload::OpKind;

const BOOTSTRAP: u32 = 0;
const OPEN: u32 = 1;
const SESSION: u32 = 2;
/// The first question id of ordinary calls (0-2 are finished once `open` and `session`
/// have returned their capabilities).
const FIRST_CALL: u32 = 3;

const GATEWAY_OPEN: u16 = 2;
const KV_GET: u16 = 0;
const KV_SESSION: u16 = 2;
const SESSION_PUT: u16 = 0;
/// `OpenResults.result` (0), then `OpenResult.kvCap` (pointer 1, after the union's).
const KV_CAP: [u16; 2] = [0, 1];
/// `SessionResults.result` (0), then `SessionResult.sessionCap` (pointer 2: union, token).
const SESSION_CAP: [u16; 2] = [0, 2];

/// Where calls of one kind go: the answer that will carry the capability, or the
/// capability itself once that answer has returned.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Promised(u32, &'static [u16]),
    Imported(u32),
}

/// One raw connection.
pub struct RawConn {
    pipe: Rc<Pipe>,
    kv: Cell<Target>,
    session: Cell<Target>,
    /// The shape of the last get and of the last put encoded, each a template for the next
    /// of that shape (see [`Template`]).
    templates: std::cell::RefCell<[Option<Template>; 2]>,
}

/// A call shape (kind, target, key and value sizes) encoded once, with where its question
/// id, its key and its value lie: the next call of that shape is these bytes with those
/// patched (as redis-benchmark formats its commands once), not a message built again. A
/// shape that cannot be patched so is remembered too, and built each time.
struct Template {
    kind: OpKind,
    target: Target,
    key_len: usize,
    value_len: usize,
    patch: Option<Patch>,
}

/// The encoded call and where to write each call's own id, key and value.
struct Patch {
    bytes: Vec<u8>,
    id_at: usize,
    key: std::ops::Range<usize>,
    value: std::ops::Range<usize>,
}

impl Template {
    fn fits(&self, kind: OpKind, target: Target, key: &[u8], value: &[u8]) -> bool {
        self.kind == kind
            && self.target == target
            && self.key_len == key.len()
            && self.value_len == value_of(kind, value).len()
    }

    /// Writes the call: patched from the template, or built by `encode` when the shape
    /// has none.
    fn write(
        &self,
        out: &mut Vec<u8>,
        id: u32,
        key: &[u8],
        value: &[u8],
        encode: impl Fn(&mut Vec<u8>, u32, &[u8], &[u8]),
    ) {
        let Some(p) = &self.patch else {
            return encode(out, id, key, value);
        };
        let at = out.len();
        out.extend_from_slice(&p.bytes);
        let m = &mut out[at..];
        m[p.id_at..p.id_at + 4].copy_from_slice(&id.to_le_bytes());
        m[p.key.clone()].copy_from_slice(key);
        m[p.value.clone()].copy_from_slice(value_of(self.kind, value));
    }

    /// The template of a shape: the call encoded twice, with ids, keys and values
    /// differing in every byte, each found by where the two differ (exactly those bytes,
    /// or no patch).
    fn make(
        kind: OpKind,
        target: Target,
        key_len: usize,
        value_len: usize,
        encode: impl Fn(&mut Vec<u8>, u32, &[u8], &[u8]),
    ) -> Template {
        Template {
            kind,
            target,
            key_len,
            value_len,
            patch: Patch::find(key_len, value_len, encode),
        }
    }
}

impl Patch {
    fn find(
        key_len: usize,
        value_len: usize,
        encode: impl Fn(&mut Vec<u8>, u32, &[u8], &[u8]),
    ) -> Option<Patch> {
        let (id_a, id_b) = (0x1111_1111u32, 0x2222_2222u32);
        let (key_a, key_b) = (vec![0xa1; key_len], vec![0x5e; key_len]);
        let (value_a, value_b) = (vec![0xb2; value_len], vec![0x4d; value_len]);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        encode(&mut a, id_a, &key_a, &value_a);
        encode(&mut b, id_b, &key_b, &value_b);
        if a.len() != b.len() {
            return None;
        }
        let find = |pattern: &[u8]| -> Option<std::ops::Range<usize>> {
            if pattern.is_empty() {
                return Some(0..0);
            }
            let at = a.windows(pattern.len()).position(|w| w == pattern)?;
            Some(at..at + pattern.len())
        };
        let id = find(&id_a.to_le_bytes())?;
        let (key, value) = (find(&key_a)?, find(&value_a)?);
        let mut expected: Vec<usize> = id.clone().chain(key.clone()).chain(value.clone()).collect();
        let count = expected.len();
        expected.sort_unstable();
        expected.dedup();
        let differ: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
        if expected.len() != count || differ != expected {
            return None;
        }
        Some(Patch {
            bytes: a,
            id_at: id.start,
            key,
            value,
        })
    }
}

/// The value a call of `kind` carries: a get's none.
fn value_of(kind: OpKind, value: &[u8]) -> &[u8] {
    match kind {
        OpKind::Get => &[],
        OpKind::Put => value,
    }
}

impl RawConn {
    /// Connects and sends the bootstrap, `open` and `session` (inside a `LocalSet`).
    pub async fn connect(addr: &str, token: &str) -> anyhow::Result<Rc<RawConn>> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        let conn = Rc::new(RawConn {
            pipe: Rc::new(Pipe::new(FIRST_CALL)),
            kv: Cell::new(Target::Promised(OPEN, &KV_CAP)),
            session: Cell::new(Target::Promised(SESSION, &SESSION_CAP)),
            templates: std::cell::RefCell::new([None, None]),
        });
        conn.pipe.send(|out| {
            encode(out, |m| m.init_bootstrap().set_question_id(BOOTSTRAP));
            encode(out, |m| {
                let target = Target::Promised(BOOTSTRAP, &[]);
                let mut c = call(m, OPEN, target, gateway_id(), GATEWAY_OPEN);
                let mut p = c
                    .reborrow()
                    .init_params()
                    .get_content()
                    .init_as::<gateway::open_params::Builder>();
                ctx().write(p.reborrow().init_ctx());
                p.set_token(token);
            });
            encode(out, |m| {
                let target = Target::Promised(OPEN, &KV_CAP);
                let mut c = call(m, SESSION, target, kv_id(), KV_SESSION);
                let mut p = c
                    .reborrow()
                    .init_params()
                    .get_content()
                    .init_as::<kv_store::session_params::Builder>();
                ctx().write(p.reborrow().init_ctx());
            });
        });
        conn.pipe.start(w, read_replies(Rc::clone(&conn), r));
        Ok(conn)
    }

    /// One get or put of one key; with its wire latency when it was answered.
    pub async fn call(
        &self,
        kind: OpKind,
        keys: &[Vec<u8>],
        value: &[u8],
    ) -> (Result<(), ErrorCode>, Option<Duration>) {
        let target = match kind {
            OpKind::Get => self.kv.get(),
            OpKind::Put => self.session.get(),
        };
        let build = |out: &mut Vec<u8>, id: u32, key: &[u8], value: &[u8]| {
            encode_call(out, kind, target, id, key, value)
        };
        let message = |out: &mut Vec<u8>, id: u32, key: &[u8]| {
            let mut templates = self.templates.borrow_mut();
            let template = &mut templates[kind as usize];
            let t = match template {
                Some(t) if t.fits(kind, target, key, value) => t,
                _ => {
                    let value_len = value_of(kind, value).len();
                    template.insert(Template::make(kind, target, key.len(), value_len, build))
                }
            };
            t.write(out, id, key, value, build);
        };
        self.pipe.call(kind, keys, message).await
    }
}

/// Reads Returns until the connection ends; then fails every caller still waiting.
async fn read_replies(conn: Rc<RawConn>, mut r: tokio::net::tcp::OwnedReadHalf) {
    use tokio::io::AsyncReadExt;
    let options = capkv::response_reader_options(&capkv::Limits::default());
    // Room for the RPC envelope around the largest results.
    let max_frame_bytes = capkv::Limits::default().max_response_bytes() + 64 * 1024;
    // Words, so that every frame starts 8-byte aligned and is read in place (frames are
    // whole words long, and the bytes left after a read's frames move to the start).
    let mut buf: Vec<capnp::Word> = capnp::Word::allocate_zeroed_vec(READ_BUFFER_BYTES / 8);
    let mut filled = 0;
    loop {
        if filled == buf.len() * 8 {
            // A frame longer than the buffer (bounded by `frame_size`'s limit).
            buf.resize(buf.len() * 2, capnp::word(0, 0, 0, 0, 0, 0, 0, 0));
        }
        let bytes = capnp::Word::words_to_bytes_mut(&mut buf);
        match r.read(&mut bytes[filled..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => filled += n,
        }
        // The read that brought these messages returned just before they are parsed.
        let read_at = Instant::now();
        let mut at = 0;
        loop {
            let size = match capkv_rpc::frames::frame_size(&bytes[at..filled], max_frame_bytes) {
                Ok(Some(size)) if size <= filled - at => size,
                Ok(_) => break,
                Err(_) => {
                    conn.pipe.fail_all();
                    return;
                }
            };
            let mut frame = &bytes[at..at + size];
            at += size;
            let Ok(m) =
                capnp::serialize::read_message_from_flat_slice_no_alloc(&mut frame, options)
            else {
                conn.pipe.fail_all();
                return;
            };
            if !on_message(&conn, &m, read_at) {
                conn.pipe.fail_all();
                return;
            }
        }
        bytes.copy_within(at..filled, 0);
        filled -= at;
    }
    conn.pipe.fail_all();
}

/// Bytes of a connection's read buffer (grown for a frame that does not fit).
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Hands one message from the server to whoever waits for it; false when the connection
/// must end (an Abort, or a message that does not read as one).
fn on_message<S: capnp::message::ReaderSegments>(
    conn: &RawConn,
    m: &capnp::message::Reader<S>,
    read_at: Instant,
) -> bool {
    let Ok(root) = m.get_root::<rpc_message::Reader>() else {
        return false;
    };
    match root.which() {
        Ok(rpc_message::Which::Return(Ok(ret))) => {
            let id = ret.get_answer_id();
            match id {
                // Once a capability resolves, its answer is finished, keeping the
                // capability (as a Cap'n Proto client does once it holds the import): the
                // server then keeps no answers for this connection. The bootstrap answer
                // goes with `open`'s, which was its only use.
                OPEN => {
                    if resolve(&conn.kv, ret) {
                        conn.pipe.send(|out| {
                            finish(out, BOOTSTRAP);
                            finish(out, OPEN);
                        });
                    }
                }
                SESSION => {
                    if resolve(&conn.session, ret) {
                        conn.pipe.send(|out| finish(out, SESSION));
                    }
                }
                _ => {
                    let known = conn.pipe.answer(id, read_at, |kind| match ret.which() {
                        Ok(return_::Which::Results(Ok(p))) => decode(kind, p.get_content()),
                        _ => Reply::Exception,
                    });
                    if known && !ret.get_no_finish_needed() {
                        conn.pipe.send(|out| finish(out, id));
                    }
                }
            }
            true
        }
        Ok(rpc_message::Which::Abort(_)) | Err(_) => false,
        _ => true,
    }
}

/// A get's or a put's Call, as a Cap'n Proto client would send it.
fn encode_call(out: &mut Vec<u8>, kind: OpKind, target: Target, id: u32, key: &[u8], value: &[u8]) {
    encode(out, |m| match kind {
        OpKind::Get => {
            let mut c = call(m, id, target, kv_id(), KV_GET);
            let mut p = c
                .reborrow()
                .init_params()
                .get_content()
                .init_as::<kv_store::get_params::Builder>();
            ctx().write(p.reborrow().init_ctx());
            p.set_key(key);
        }
        OpKind::Put => {
            let mut c = call(m, id, target, session_id(), SESSION_PUT);
            let mut p = c
                .reborrow()
                .init_params()
                .get_content()
                .init_as::<write_session::put_params::Builder>();
            ctx().write(p.reborrow().init_ctx());
            p.set_key(key);
            p.set_value(value);
        }
    })
}

/// A `Finish` of question `id` that keeps the capabilities its results carried.
fn finish(out: &mut Vec<u8>, id: u32) {
    encode(out, |m| {
        let mut f = m.init_finish();
        f.set_question_id(id);
        f.set_release_result_caps(false);
    })
}

/// `open`'s or `session`'s Return: later calls go straight to the capability it carries
/// (true), when it carries one.
/// Their results hold one capability (in the union's arm and again outside it, for
/// pipelining: one export, two pointers); anything else (an error with a stand-in) keeps
/// the calls pipelined on the answer, which answers them.
fn resolve(target: &Cell<Target>, ret: return_::Reader<'_>) -> bool {
    let Ok(return_::Which::Results(Ok(payload))) = ret.which() else {
        return false;
    };
    let Ok(table) = payload.get_cap_table() else {
        return false;
    };
    let mut ids = table.iter().map(|d| match d.which() {
        Ok(cap_descriptor::SenderHosted(id)) => Some(id),
        _ => None,
    });
    let Some(Some(first)) = ids.next() else {
        return false;
    };
    if !ids.all(|id| id == Some(first)) {
        return false;
    }
    target.set(Target::Imported(first));
    true
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
    let mut scratch = SCRATCH.take();
    if scratch.len() != SCRATCH_WORDS {
        scratch = capnp::Word::allocate_zeroed_vec(SCRATCH_WORDS);
    }
    {
        // capnp zeroes what it used of the scratch when the builder drops: reusable.
        let mut alloc =
            message::ScratchSpaceHeapAllocator::new(capnp::Word::words_to_bytes_mut(&mut scratch));
        let mut m = message::Builder::new(&mut alloc);
        build(m.init_root());
        // Writing into a Vec cannot fail.
        let _ = capnp::serialize::write_message(out, &m);
    }
    SCRATCH.set(scratch);
}

/// Words of the scratch segment: a call with a key and a value of a few hundred bytes
/// (a longer one goes on in a heap segment of its own).
const SCRATCH_WORDS: usize = 128;

thread_local! {
    /// The segment every call encoded on this thread is built in: no allocation per call
    /// (as redis-raw formats its commands straight into the outbox).
    static SCRATCH: std::cell::Cell<Vec<capnp::Word>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A Call of `method` on `interface`, addressed to `target`.
fn call<'a>(
    m: rpc_message::Builder<'a>,
    id: u32,
    target: Target,
    interface: u64,
    method: u16,
) -> capnp_rpc::rpc_capnp::call::Builder<'a> {
    let mut c = m.init_call();
    c.set_question_id(id);
    c.set_interface_id(interface);
    c.set_method_id(method);
    match target {
        Target::Imported(export) => c.reborrow().init_target().set_imported_cap(export),
        Target::Promised(on, transform) => {
            let mut p = c.reborrow().init_target().init_promised_answer();
            p.set_question_id(on);
            let mut ops = p.init_transform(transform.len() as u32);
            for (i, &field) in transform.iter().enumerate() {
                ops.reborrow().get(i as u32).set_get_pointer_field(field);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A call written from a template is, byte for byte, the call built for it; a shape
    /// it does not fit is told apart.
    #[test]
    fn a_template_writes_the_call_it_stands_for() {
        let cases = [
            (OpKind::Get, Target::Imported(3)),
            (OpKind::Get, Target::Promised(OPEN, &KV_CAP)),
            (OpKind::Put, Target::Imported(4)),
            (OpKind::Put, Target::Promised(SESSION, &SESSION_CAP)),
        ];
        for (kind, target) in cases {
            let build = |out: &mut Vec<u8>, id: u32, key: &[u8], value: &[u8]| {
                encode_call(out, kind, target, id, key, value)
            };
            let t = Template::make(kind, target, 16, value_of(kind, &[7; 100]).len(), build);
            assert!(
                t.patch.is_some(),
                "{kind:?}: a call of this shape is patched"
            );
            for (id, key, value) in [
                (3u32, [b'k'; 16], [1u8; 100]),
                (70_000, *b"key:000000001234", [0xaa; 100]),
            ] {
                let (mut from_template, mut built) = (vec![9u8], vec![9u8]);
                t.write(&mut from_template, id, &key, &value, build);
                build(&mut built, id, &key, &value);
                assert_eq!(from_template, built, "{kind:?}");
                assert!(t.fits(kind, target, &key, &value));
            }
            assert!(!t.fits(kind, target, &[0; 15], &[0; 100]));
            assert!(!t.fits(kind, Target::Imported(99), &[0; 16], &[0; 100]));
        }
        // A call whose bytes differ elsewhere too has no patch: it is built each time.
        let odd = |out: &mut Vec<u8>, id: u32, key: &[u8], value: &[u8]| {
            encode_call(out, OpKind::Put, Target::Imported(4), id, key, value);
            out.push(id as u8 ^ key[0]);
        };
        let t = Template::make(OpKind::Put, Target::Imported(4), 16, 100, odd);
        assert!(t.patch.is_none());
        let (mut written, mut built) = (Vec::new(), Vec::new());
        t.write(&mut written, 5, &[3; 16], &[4; 100], odd);
        odd(&mut built, 5, &[3; 16], &[4; 100]);
        assert_eq!(written, built);
    }
}
