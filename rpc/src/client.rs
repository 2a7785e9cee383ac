//! capkv's own Cap'n Proto RPC engine, client side: the standard protocol (`rpc.capnp`,
//! level 1) for a client that only imports capabilities, behind capnp's hook traits so that
//! generated clients (`gateway::Client`, `kv_store::Client`, pipelines) work unchanged.
//!
//! - [`connect`]: the bootstrap capability of a connection over a byte stream, and the
//!   connection's future (run it on the `LocalSet` the capabilities are used on). The
//!   future reads replies, routes each Return to its question, and writes what calls
//!   queued: the calls made in one scheduler pass leave in one write (a call only appends
//!   its message to the connection's outbox and wakes the future).
//! - Questions: a slab indexed by question id (ids are reused after Return and Finish).
//!   Each counts the handles that still need its answer on the server: the response
//!   promise, the pipeline, and capabilities pipelined on it (`promisedAnswer` targets).
//!   Finish is sent when the last goes, unless the Return said `noFinishNeeded`; a question
//!   dropped before its Return is finished at once with `releaseResultCaps`.
//! - Imports: capabilities the server sent (`senderHosted`), with the count of references
//!   received; when the last local handle goes, one `Release` gives them all back.
//! - Calls pipelined on an answer keep targeting `promisedAnswer` until their handles go,
//!   even after the Return: the server keeps the answer until Finish, so no embargo or
//!   resolution is ever needed (the order of calls is the order sent).
//!
//! Protocol decisions: the client exports nothing (a Call or Bootstrap from the server is
//! answered with an exception), `senderPromise` is imported like `senderHosted` (calls on
//! it reach the promise, which the server forwards), Resolve and Disembargo are echoed as
//! `Unimplemented`, Abort ends the connection with its reason, and every pending question
//! fails with `disconnected` when the connection ends. capnp-rpc's `RpcSystem` is the
//! reference this is tested against (`rpc/tests/client.rs`).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use capnp::any_pointer;
use capnp::capability::{Promise, RemotePromise, Request, Response};
use capnp::message::{self, HeapAllocator, ReaderOptions};
use capnp::private::capability::{
    ClientHook, ParamsHook, PipelineHook, PipelineOp, RequestHook, ResponseHook, ResultsHook,
};
use capnp::traits::{Imbue, ImbueMut};
use capnp::MessageSize;
use capnp_rpc::rpc_capnp::{cap_descriptor, exception, message as rpc_message, return_};
use futures::{AsyncRead, AsyncWrite};

use crate::engine::Writer;
use crate::frames::{ByteFrames, Frame, FrameSource};

/// Replies handled in one pass of the connection's future before it lets others run.
const MAX_REPLIES_PER_PASS: usize = 64;

/// Bounds of one client connection.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// Questions outstanding at once; a call past it fails with `overloaded` at once.
    pub max_questions: usize,
    /// Unsent bytes a call may add to; past it a call fails with `overloaded` (one call
    /// is always accepted on an empty outbox, however large).
    pub max_unsent_bytes: usize,
    /// Decoding limits for every reply.
    pub reader_options: ReaderOptions,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            max_questions: 65_536,
            max_unsent_bytes: 64 << 20,
            reader_options: ReaderOptions::new(),
        }
    }
}

/// A Return as the caller gets it: the reply message, read in place, and the
/// capabilities its results hold.
struct Reply {
    message: message::Reader<Frame>,
    caps: Vec<Option<Box<dyn ClientHook>>>,
    /// For each cap table entry, its import id when the server hosts it itself
    /// (`senderHosted`): what a pipelined capability may resolve to (`DirectCap::resolve`).
    hosted: Vec<Option<u32>>,
}

enum Answer {
    /// No Return yet; the caller's promise parks its waker here.
    Waiting(Option<Waker>),
    /// The Return came and the response promise has not taken it yet.
    Ready(Result<Reply, capnp::Error>),
    /// The response promise took it (or was dropped).
    Taken,
}

struct Question {
    answer: Answer,
    /// Handles needing the answer: the response promise until it completes or drops, the
    /// pipeline and each capability pipelined on it.
    refs: u32,
    returned: bool,
    /// The response promise is gone before the Return: its capabilities are not imported
    /// (Finish asks the server to release them).
    unwanted: bool,
    /// Finish was sent (early, when every handle went before the Return).
    finish_sent: bool,
    no_finish_needed: bool,
    /// The Return's capabilities were imported (counted, released by us); otherwise
    /// Finish asks the server to release them.
    imported: bool,
}

struct Import {
    /// References the server sent (one per cap table entry); all released together.
    remote_refs: u32,
    /// Local handles.
    local: u32,
}

struct State {
    limits: ClientLimits,
    questions: Vec<Option<Question>>,
    free: Vec<u32>,
    live_questions: usize,
    /// Questions whose Return has not come: a call made when it is the only one leaves at
    /// once ([`State::send`]).
    unanswered: usize,
    /// Most questions unanswered at once since `unanswered` was last 0, and in the busy
    /// stretch before that: a connection whose calls come in bursts (16 in flight) keeps
    /// writing each burst in one write, rather than its first call alone and then the rest.
    peak: usize,
    last_peak: usize,
    imports: BTreeMap<u32, Import>,
    /// Messages not yet handed to the writer.
    outbox: Vec<u8>,
    /// The socket's write side. Here rather than in the connection's future so that a call
    /// made while nothing else is outstanding leaves at once ([`State::send`]).
    writer: Writer<Box<dyn AsyncWrite + Unpin>>,
    /// A write made by [`State::send`] failed: the connection's future ends with it.
    write_failed: Option<std::io::Error>,
    /// The connection future, parked.
    driver: Option<Waker>,
    /// Why the connection ended; every later call fails with it.
    broken: Option<capnp::Error>,
}

type Shared = Rc<RefCell<State>>;

/// Called by a handle about to go: when only the connection's future will hold the state
/// after it, wake the future so that it ends (nothing can use the connection any more).
fn wake_if_last(state: &Shared) {
    if Rc::strong_count(state) == 2 {
        if let Some(w) = &state.borrow().driver {
            w.wake_by_ref();
        }
    }
}

impl State {
    fn send(&mut self, m: &message::Builder<HeapAllocator>) {
        let was_empty = self.outbox.is_empty();
        // Writing into a Vec cannot fail.
        let _ = capnp::serialize::write_message(&mut self.outbox, m);
        if !was_empty {
            return;
        }
        // The only call outstanding, nothing queued or being written: it leaves now,
        // rather than after the connection's future has been woken and polled (at one call
        // at a time, that poll is on every round trip). Calls made together on a busy
        // connection still leave together, in one write of the outbox.
        let alone = self.unanswered <= 1 && self.last_peak <= 1;
        if alone && !self.writer.busy() && self.write_failed.is_none() {
            if let Some(driver) = self.driver.clone() {
                // What the socket does not take now is the writer's to finish: the
                // connection's future is the one woken when it can go on.
                let mut cx = Context::from_waker(&driver);
                let sent = self.writer.send_now(&self.outbox, &mut cx);
                self.outbox.clear();
                match sent {
                    Poll::Ready(Ok(())) => {}
                    Poll::Pending => driver.wake_by_ref(),
                    Poll::Ready(Err(e)) => {
                        self.write_failed = Some(e);
                        driver.wake_by_ref();
                    }
                }
                return;
            }
        }
        if let Some(w) = &self.driver {
            w.wake_by_ref();
        }
    }

    fn new_question(&mut self) -> Result<u32, capnp::Error> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        if self.live_questions >= self.limits.max_questions {
            return Err(capnp::Error::overloaded(format!(
                "more than {} calls outstanding on this connection",
                self.limits.max_questions
            )));
        }
        if !self.outbox.is_empty() && self.outbox.len() >= self.limits.max_unsent_bytes {
            return Err(capnp::Error::overloaded(format!(
                "more than {} bytes of calls not yet sent on this connection",
                self.limits.max_unsent_bytes
            )));
        }
        let q = Question {
            answer: Answer::Waiting(None),
            refs: 0,
            returned: false,
            unwanted: false,
            finish_sent: false,
            no_finish_needed: false,
            imported: false,
        };
        self.live_questions += 1;
        self.unanswered += 1;
        self.peak = self.peak.max(self.unanswered);
        Ok(match self.free.pop() {
            Some(id) => {
                self.questions[id as usize] = Some(q);
                id
            }
            None => {
                self.questions.push(Some(q));
                (self.questions.len() - 1) as u32
            }
        })
    }

    fn question(&mut self, id: u32) -> Option<&mut Question> {
        self.questions.get_mut(id as usize).and_then(Option::as_mut)
    }

    fn add_ref(&mut self, id: u32) {
        if let Some(q) = self.question(id) {
            q.refs += 1;
        }
    }

    /// One handle of question `id` went. Returns what must be dropped outside the borrow.
    fn release_question(&mut self, id: u32) -> Option<Answer> {
        let q = self.question(id)?;
        q.refs = q.refs.saturating_sub(1);
        if q.refs > 0 {
            return None;
        }
        let (returned, imported) = (q.returned, q.imported);
        // Owed unless sent, or the Return said none is needed.
        let finish_done = q.finish_sent || (returned && q.no_finish_needed);
        if !finish_done {
            q.finish_sent = true;
            self.send_finish(id, !imported);
        }
        if returned {
            self.free_question(id)
        } else {
            // The Return is still to come: the id stays taken until it does.
            if let Some(q) = self.question(id) {
                q.unwanted = true;
            }
            None
        }
    }

    /// A question's Return came (or it will never come).
    fn answered(&mut self) {
        self.unanswered = self.unanswered.saturating_sub(1);
        if self.unanswered == 0 {
            self.last_peak = std::mem::take(&mut self.peak);
        }
    }

    fn free_question(&mut self, id: u32) -> Option<Answer> {
        let q = self.questions.get_mut(id as usize)?.take()?;
        self.free.push(id);
        self.live_questions -= 1;
        if !q.returned {
            self.answered();
        }
        Some(q.answer)
    }

    fn send_finish(&mut self, id: u32, release_result_caps: bool) {
        if self.broken.is_some() {
            return;
        }
        let mut m = message::Builder::new(HeapAllocator::new().first_segment_words(8));
        let mut f = m.init_root::<rpc_message::Builder>().init_finish();
        f.set_question_id(id);
        f.set_release_result_caps(release_result_caps);
        self.send(&m);
    }

    fn import(&mut self, id: u32) {
        let e = self.imports.entry(id).or_insert(Import {
            remote_refs: 0,
            local: 0,
        });
        e.remote_refs = e.remote_refs.saturating_add(1);
        e.local += 1;
    }

    fn release_import(&mut self, id: u32) {
        let Some(e) = self.imports.get_mut(&id) else {
            return;
        };
        e.local -= 1;
        if e.local > 0 {
            return;
        }
        let count = e.remote_refs;
        self.imports.remove(&id);
        if self.broken.is_some() {
            return;
        }
        let mut m = message::Builder::new(HeapAllocator::new().first_segment_words(8));
        let mut r = m.init_root::<rpc_message::Builder>().init_release();
        r.set_id(id);
        r.set_reference_count(count);
        self.send(&m);
    }
}

/// Starts a client connection over `stream`: returns the server's bootstrap capability and
/// the future that runs the connection (it ends when the server hangs up or aborts, or
/// once every capability of the connection is dropped; its error says why).
pub fn connect<S>(
    stream: S,
    limits: ClientLimits,
) -> (
    Box<dyn ClientHook>,
    impl Future<Output = Result<(), capnp::Error>>,
)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    use futures::AsyncReadExt;
    use tokio_util::compat::TokioAsyncReadCompatExt;
    let (reader, writer) = stream.compat().split();
    let (bootstrap, driver) = connect_direct_halves(reader, writer, limits);
    (bootstrap.hook(), driver)
}

/// [`connect`] over a read and a write half.
pub fn connect_halves<R, W>(
    reader: R,
    writer: W,
    limits: ClientLimits,
) -> (
    Box<dyn ClientHook>,
    impl Future<Output = Result<(), capnp::Error>>,
)
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let (bootstrap, driver) = connect_direct_halves(reader, writer, limits);
    (bootstrap.hook(), driver)
}

/// [`connect`], with the bootstrap capability as a [`DirectCap`].
pub fn connect_direct<S>(
    stream: S,
    limits: ClientLimits,
) -> (DirectCap, impl Future<Output = Result<(), capnp::Error>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    use futures::AsyncReadExt;
    use tokio_util::compat::TokioAsyncReadCompatExt;
    let (reader, writer) = stream.compat().split();
    connect_direct_halves(reader, writer, limits)
}

/// [`connect_direct`] over a read and a write half.
pub fn connect_direct_halves<R, W>(
    reader: R,
    writer: W,
    limits: ClientLimits,
) -> (DirectCap, impl Future<Output = Result<(), capnp::Error>>)
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let state: Shared = Rc::new(RefCell::new(State {
        limits,
        questions: Vec::new(),
        free: Vec::new(),
        live_questions: 0,
        unanswered: 0,
        peak: 0,
        last_peak: 0,
        imports: BTreeMap::new(),
        outbox: Vec::new(),
        writer: Writer::new(Box::new(writer)),
        write_failed: None,
        driver: None,
        broken: None,
    }));
    let bootstrap = {
        let mut s = state.borrow_mut();
        s.new_question().inspect(|&id| {
            let mut m = message::Builder::new(HeapAllocator::new().first_segment_words(8));
            m.init_root::<rpc_message::Builder>()
                .init_bootstrap()
                .set_question_id(id);
            s.send(&m);
            // Nobody waits for the bootstrap's Return: calls pipeline on it.
            if let Some(q) = s.question(id) {
                q.answer = Answer::Taken;
                q.unwanted = true;
                q.refs = 1;
            }
        })
    };
    let cap = DirectCap(bootstrap.map(|id| Cap {
        state: Rc::clone(&state),
        target: Target::Promised(id, Rc::from(Vec::new())),
    }));
    let max_frame_bytes = frame_bound(&limits.reader_options);
    let frames = ByteFrames::new(
        futures::io::BufReader::with_capacity(64 * 1024, crate::transport::PeerCheck::new(reader)),
        max_frame_bytes,
    );
    (cap, drive(state, frames))
}

/// The largest reply frame the reader options can decode, with room for the header.
fn frame_bound(options: &ReaderOptions) -> usize {
    options
        .traversal_limit_in_words
        .map_or(usize::MAX, |w| w.saturating_mul(8).saturating_add(4096))
}

/// The connection's future: reads and handles replies, writes the outbox.
async fn drive<R>(state: Shared, mut frames: ByteFrames<R>) -> Result<(), capnp::Error>
where
    R: AsyncRead + Unpin,
{
    let options = state.borrow().limits.reader_options;
    let ended = std::future::poll_fn(|cx| {
        state.borrow_mut().driver = Some(cx.waker().clone());
        if let Poll::Ready(end) = read_pass(&state, &mut frames, options, cx) {
            return Poll::Ready(Err(end.error()));
        }
        // Write: the outbox becomes the write buffer when no write runs.
        loop {
            let written = {
                let mut s = state.borrow_mut();
                match s.write_failed.take() {
                    Some(e) => Poll::Ready(Err(e)),
                    None => {
                        let State { writer, outbox, .. } = &mut *s;
                        writer.start(outbox);
                        writer.poll_written(cx)
                    }
                }
            };
            match written {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => {
                    // A server that refuses or ends a connection says why (an Abort) and
                    // closes; a write racing its close fails first. What it said is in the
                    // socket already (it was sent before the close): read it before
                    // settling for the write's error.
                    if let Poll::Ready(ReadEnd::Said(said)) =
                        read_pass(&state, &mut frames, options, cx)
                    {
                        return Poll::Ready(Err(said));
                    }
                    return Poll::Ready(Err(io_error(e)));
                }
                Poll::Pending => break,
            }
        }
        // Every capability and question gone, nothing left to write: the connection is
        // no longer used by anyone.
        let s = state.borrow();
        if Rc::strong_count(&state) == 1 && s.outbox.is_empty() && !s.writer.busy() {
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    })
    .await;
    // Pending questions fail; what they held is dropped outside the borrow.
    let error = match &ended {
        Ok(()) => capnp::Error::disconnected("the connection was closed".into()),
        Err(e) => e.clone(),
    };
    {
        let mut s = state.borrow_mut();
        s.broken = Some(error.clone());
        s.driver = None;
        s.outbox.clear();
        // The socket's write side goes with the connection's future, as it did when the
        // future owned it (handles may keep the state for a while).
        s.writer.close();
        for q in s.questions.iter_mut().flatten() {
            if let Answer::Waiting(w) = &mut q.answer {
                if let Some(w) = w.take() {
                    w.wake();
                }
                q.answer = Answer::Ready(Err(error.clone()));
                q.returned = true;
            }
        }
        s.unanswered = 0;
    }
    ended
}

/// How the read side of a connection ended.
enum ReadEnd {
    /// The stream ended or failed.
    Lost(capnp::Error),
    /// The server said why (an Abort), or broke the protocol.
    Said(capnp::Error),
}

impl ReadEnd {
    fn error(self) -> capnp::Error {
        match self {
            ReadEnd::Lost(e) | ReadEnd::Said(e) => e,
        }
    }
}

/// Handles the replies already buffered, at most [`MAX_REPLIES_PER_PASS`] (then the pass
/// comes back at once: the rest may be buffered, with no wake-up to come). Ready when the
/// connection has ended, with why.
fn read_pass<R: AsyncRead + Unpin>(
    state: &Shared,
    frames: &mut ByteFrames<R>,
    options: ReaderOptions,
    cx: &mut Context<'_>,
) -> Poll<ReadEnd> {
    for _ in 0..MAX_REPLIES_PER_PASS {
        match Pin::new(&mut *frames).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(None)) => {
                return Poll::Ready(ReadEnd::Lost(capnp::Error::disconnected(
                    "the server closed the connection".into(),
                )))
            }
            Poll::Ready(Err(e)) => return Poll::Ready(ReadEnd::Lost(io_error(e))),
            Poll::Ready(Ok(Some(frame))) => {
                if let Err(e) = handle(state, message::Reader::new(frame, options)) {
                    return Poll::Ready(ReadEnd::Said(e));
                }
            }
        }
    }
    cx.waker().wake_by_ref();
    Poll::Pending
}

fn io_error(e: std::io::Error) -> capnp::Error {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::ConnectionAborted
        | std::io::ErrorKind::BrokenPipe => {
            capnp::Error::disconnected(format!("connection lost: {e}"))
        }
        _ => capnp::Error::failed(e.to_string()),
    }
}

fn remote_exception(e: exception::Reader<'_>) -> capnp::Error {
    let kind = match e.get_type() {
        Ok(exception::Type::Overloaded) => capnp::ErrorKind::Overloaded,
        Ok(exception::Type::Disconnected) => capnp::ErrorKind::Disconnected,
        Ok(exception::Type::Unimplemented) => capnp::ErrorKind::Unimplemented,
        _ => capnp::ErrorKind::Failed,
    };
    let reason = e
        .get_reason()
        .ok()
        .and_then(|r| r.to_str().ok())
        .unwrap_or("(malformed error)");
    // As capnp-rpc words it, so that callers (and ApiError::from_capnp) read both alike.
    capnp::Error {
        kind,
        extra: format!("remote exception: {reason}"),
    }
}

/// Handles one message from the server.
fn handle(state: &Shared, m: message::Reader<Frame>) -> Result<(), capnp::Error> {
    let root = m.get_root::<rpc_message::Reader>()?;
    match root.which() {
        Ok(rpc_message::Which::Return(r)) => {
            let r = r?;
            let id = r.get_answer_id();
            let no_finish = r.get_no_finish_needed();
            let mut s = state.borrow_mut();
            let unwanted = match s.question(id) {
                Some(q) if !q.returned => {
                    q.returned = true;
                    q.no_finish_needed = no_finish;
                    let unwanted = q.unwanted;
                    s.answered();
                    unwanted
                }
                _ => {
                    return Err(capnp::Error::failed(format!(
                        "Return for question {id}, which is not waiting for one"
                    )))
                }
            };
            if unwanted {
                // Nobody reads it: its capabilities are not imported (Finish, sent already
                // or when the last pipelined handle goes, has the server release them).
                if s.question(id).is_some_and(|q| q.refs == 0) {
                    let dropped = s.free_question(id);
                    drop(s);
                    drop(dropped);
                }
                return Ok(());
            }
            let reply = match r.which()? {
                return_::Which::Results(p) => {
                    // Read the whole table before making any capability: one made and
                    // dropped here (a later descriptor failing to decode) would release
                    // its import through the state this function holds borrowed.
                    let table = p?.get_cap_table()?;
                    let mut imports = Vec::with_capacity(table.len() as usize);
                    let mut hosted = Vec::with_capacity(table.len() as usize);
                    for d in table.iter() {
                        let which = d.which()?;
                        hosted.push(match which {
                            cap_descriptor::SenderHosted(i) => Some(i),
                            _ => None,
                        });
                        imports.push(match which {
                            cap_descriptor::None(()) => None,
                            cap_descriptor::SenderHosted(i) | cap_descriptor::SenderPromise(i) => {
                                Some(Some(i))
                            }
                            _ => Some(None),
                        });
                    }
                    let caps: Vec<Option<Box<dyn ClientHook>>> = imports
                        .into_iter()
                        .map(|d| {
                            d.map(|import| match import {
                                Some(i) => {
                                    s.import(i);
                                    Box::new(Cap {
                                        state: Rc::clone(state),
                                        target: Target::Import(i),
                                    }) as Box<dyn ClientHook>
                                }
                                None => broken_cap(capnp::Error::unimplemented(
                                    "this client imports only capabilities the server hosts".into(),
                                )),
                            })
                        })
                        .collect();
                    if let Some(q) = s.question(id) {
                        q.imported = true;
                    }
                    Ok(Reply {
                        message: m,
                        caps,
                        hosted,
                    })
                }
                return_::Which::Exception(e) => Err(remote_exception(e?)),
                return_::Which::Canceled(()) => {
                    Err(capnp::Error::failed("the call was canceled".into()))
                }
                _ => Err(capnp::Error::unimplemented(
                    "this client takes results only in the Return".into(),
                )),
            };
            if let Some(q) = s.question(id) {
                if let Answer::Waiting(Some(w)) =
                    std::mem::replace(&mut q.answer, Answer::Ready(reply))
                {
                    w.wake();
                }
            }
            Ok(())
        }
        Ok(rpc_message::Which::Abort(e)) => Err(match e {
            Ok(e) => remote_exception(e),
            Err(e) => e,
        }),
        // This client exports nothing: say so, the connection stays.
        Ok(rpc_message::Which::Call(c)) => {
            refuse(
                state,
                c?.get_question_id(),
                "this client serves no capabilities",
            );
            Ok(())
        }
        Ok(rpc_message::Which::Bootstrap(b)) => {
            refuse(
                state,
                b?.get_question_id(),
                "this client has no bootstrap capability",
            );
            Ok(())
        }
        // Answers to what the client never keeps (it answers calls at once, exports
        // nothing): nothing to do.
        Ok(rpc_message::Which::Finish(_)) | Ok(rpc_message::Which::Release(_)) => Ok(()),
        Ok(rpc_message::Which::Unimplemented(u)) => {
            // The server refused a message of ours; only a refused Call leaves a caller
            // waiting.
            if let Ok(rpc_message::Which::Call(Ok(c))) = u?.which() {
                let id = c.get_question_id();
                let mut s = state.borrow_mut();
                if let Some(q) = s.question(id) {
                    if !q.returned {
                        q.returned = true;
                        q.no_finish_needed = true;
                        let e =
                            capnp::Error::unimplemented("the server does not take calls".into());
                        let old = std::mem::replace(&mut q.answer, Answer::Ready(Err(e)));
                        if let Answer::Waiting(Some(w)) = old {
                            w.wake();
                        }
                        s.answered();
                    }
                }
                // As after a Return: a question nobody holds any more goes now.
                if s.question(id).is_some_and(|q| q.returned && q.refs == 0) {
                    let dropped = s.free_question(id);
                    drop(s);
                    drop(dropped);
                }
            }
            Ok(())
        }
        // Resolve, Disembargo, level 2+ and unknown kinds: echoed, as the protocol asks.
        Ok(_) | Err(_) => {
            let mut reply = message::Builder::new_default();
            reply
                .init_root::<rpc_message::Builder>()
                .set_unimplemented(root)?;
            state.borrow_mut().send(&reply);
            Ok(())
        }
    }
}

/// Answers the server's question `id` with an `unimplemented` exception.
fn refuse(state: &Shared, id: u32, reason: &str) {
    let mut reply = message::Builder::new_default();
    let mut ret = reply.init_root::<rpc_message::Builder>().init_return();
    ret.set_answer_id(id);
    let mut e = ret.init_exception();
    e.set_type(exception::Type::Unimplemented);
    e.set_reason(reason);
    state.borrow_mut().send(&reply);
}

#[derive(Clone)]
enum Target {
    /// A capability the server sent (its export id).
    Import(u32),
    /// A capability in the results of question `id`, at the path of pointer fields.
    Promised(u32, Rc<[PipelineOp]>),
}

/// A capability on the server: imported, or pipelined on a question.
struct Cap {
    state: Shared,
    target: Target,
}

impl Drop for Cap {
    fn drop(&mut self) {
        let dropped = {
            let mut s = self.state.borrow_mut();
            match &self.target {
                Target::Import(id) => {
                    s.release_import(*id);
                    None
                }
                Target::Promised(id, _) => s.release_question(*id),
            }
        };
        drop(dropped);
        wake_if_last(&self.state);
    }
}

impl Cap {
    /// Writes a Call's address: `method_id` of `interface_id` on this capability.
    fn address(
        &self,
        mut call: capnp_rpc::rpc_capnp::call::Builder<'_>,
        interface_id: u64,
        method_id: u16,
    ) {
        call.set_interface_id(interface_id);
        call.set_method_id(method_id);
        let mut target = call.init_target();
        match &self.target {
            Target::Import(id) => target.set_imported_cap(*id),
            Target::Promised(id, ops) => {
                let mut p = target.init_promised_answer();
                p.set_question_id(*id);
                let mut t = p.init_transform(ops.len() as u32);
                for (i, op) in ops.iter().enumerate() {
                    let mut o = t.reborrow().get(i as u32);
                    match op {
                        PipelineOp::Noop => o.set_noop(()),
                        PipelineOp::GetPointerField(f) => o.set_get_pointer_field(*f),
                    }
                }
            }
        }
    }

    /// Another handle of the same capability (one more reference).
    fn clone_ref(&self) -> Cap {
        {
            let mut s = self.state.borrow_mut();
            match &self.target {
                Target::Import(id) => {
                    if let Some(e) = s.imports.get_mut(id) {
                        e.local += 1;
                    }
                }
                Target::Promised(id, _) => s.add_ref(*id),
            }
        }
        Cap {
            state: Rc::clone(&self.state),
            target: self.target.clone(),
        }
    }
}

impl ClientHook for Cap {
    fn add_ref(&self) -> Box<dyn ClientHook> {
        Box::new(self.clone_ref())
    }

    fn new_call(
        &self,
        interface_id: u64,
        method_id: u16,
        size_hint: Option<MessageSize>,
    ) -> Request<any_pointer::Owned, any_pointer::Owned> {
        // Most calls are a few words of params.
        let words = size_hint.map_or(64, |s| (s.word_count as u32).saturating_add(16));
        let mut message = message::Builder::new(HeapAllocator::new().first_segment_words(words));
        {
            let mut call = message.init_root::<rpc_message::Builder>().init_call();
            self.address(call.reborrow(), interface_id, method_id);
            call.init_params();
        }
        Request::new(Box::new(CallRequest {
            cap: self.add_ref(),
            state: Rc::clone(&self.state),
            message,
            cap_table: Vec::new(),
        }))
    }

    fn call(
        &self,
        interface_id: u64,
        method_id: u16,
        params: Box<dyn ParamsHook>,
        mut results: Box<dyn ResultsHook>,
    ) -> Promise<(), capnp::Error> {
        // A call forwarded through this capability (not capkv's use): copy params in,
        // results out.
        let mut req = self.new_call(interface_id, method_id, None);
        let copied = params.get().and_then(|p| req.get().set_as(p));
        if let Err(e) = copied {
            return Promise::err(e);
        }
        let promise = req.send().promise;
        Promise::from_future(async move {
            let response = promise.await?;
            results.get()?.set_as(response.get()?)
        })
    }

    fn get_brand(&self) -> usize {
        Rc::as_ptr(&self.state) as *const () as usize
    }

    fn get_ptr(&self) -> usize {
        self as *const Self as usize
    }

    fn get_resolved(&self) -> Option<Box<dyn ClientHook>> {
        None
    }

    fn when_more_resolved(&self) -> Option<Promise<Box<dyn ClientHook>, capnp::Error>> {
        None
    }

    fn when_resolved(&self) -> Promise<(), capnp::Error> {
        Promise::ok(())
    }
}

/// A call being built: the rpc Call message itself, sent as it is.
struct CallRequest {
    /// Keeps the target (and the question it pipelines on) alive until the call is sent.
    cap: Box<dyn ClientHook>,
    state: Shared,
    message: message::Builder<HeapAllocator>,
    cap_table: Vec<Option<Box<dyn ClientHook>>>,
}

impl CallRequest {
    fn params(&mut self) -> capnp::Result<any_pointer::Builder<'_>> {
        let root = self.message.get_root::<rpc_message::Builder>()?;
        let rpc_message::Which::Call(call) = root.which()? else {
            return Err(capnp::Error::failed("not a Call".into()));
        };
        let mut content = call?.get_params()?.get_content();
        content.imbue_mut(&mut self.cap_table);
        Ok(content)
    }
}

impl RequestHook for CallRequest {
    fn get(&mut self) -> any_pointer::Builder<'_> {
        match self.params() {
            Ok(p) => p,
            // Built by `new_call` as a Call: cannot fail. A detached builder keeps the
            // caller going; `send` refuses the request.
            Err(_) => unreachable!("a CallRequest always holds a Call"),
        }
    }

    fn get_brand(&self) -> usize {
        Rc::as_ptr(&self.state) as *const () as usize
    }

    fn send(self: Box<Self>) -> RemotePromise<any_pointer::Owned> {
        let CallRequest {
            cap,
            state,
            mut message,
            cap_table,
        } = *self;
        let broken = |e: capnp::Error| RemotePromise {
            promise: Promise::err(e.clone()),
            pipeline: any_pointer::Pipeline::new(Box::new(BrokenPipeline(e))),
        };
        if cap_table.iter().any(Option::is_some) {
            return broken(capnp::Error::unimplemented(
                "this client sends no capabilities in parameters".into(),
            ));
        }
        let id = {
            let mut s = state.borrow_mut();
            let id = match s.new_question() {
                Ok(id) => id,
                Err(e) => return broken(e),
            };
            let set = message
                .get_root::<rpc_message::Builder>()
                .and_then(|r| match r.which()? {
                    rpc_message::Which::Call(c) => {
                        c?.set_question_id(id);
                        Ok(())
                    }
                    _ => Err(capnp::Error::failed("not a Call".into())),
                });
            if let Err(e) = set {
                let dropped = s.free_question(id);
                drop(s);
                drop(dropped);
                return broken(e);
            }
            s.send(&message);
            // The response promise and the pipeline.
            if let Some(q) = s.question(id) {
                q.refs = 2;
            }
            id
        };
        drop(cap);
        RemotePromise {
            promise: Promise::from_future(ResponseFuture(ReplyFuture {
                state: Rc::clone(&state),
                id,
                done: false,
            })),
            pipeline: any_pointer::Pipeline::new(Box::new(QuestionPipeline { state, id })),
        }
    }

    fn send_streaming(self: Box<Self>) -> Promise<(), capnp::Error> {
        let promise = self.send().promise;
        Promise::from_future(async move {
            promise.await?;
            Ok(())
        })
    }

    fn tail_send(
        self: Box<Self>,
    ) -> Option<(u32, Promise<(), capnp::Error>, Box<dyn PipelineHook>)> {
        None
    }
}

/// The caller's side of a question: ready with its Return.
struct ReplyFuture {
    state: Shared,
    id: u32,
    /// The Return was taken (the question's reference given back).
    done: bool,
}

impl Future for ReplyFuture {
    type Output = Result<Reply, capnp::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let (taken, dropped) = {
            let mut s = this.state.borrow_mut();
            let Some(q) = s.question(this.id) else {
                return Poll::Ready(Err(capnp::Error::failed("question gone".into())));
            };
            match &mut q.answer {
                Answer::Waiting(w) => {
                    if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *w = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
                Answer::Taken => {
                    return Poll::Ready(Err(capnp::Error::failed("response already taken".into())))
                }
                Answer::Ready(_) => {}
            }
            let taken = std::mem::replace(&mut q.answer, Answer::Taken);
            this.done = true;
            (taken, s.release_question(this.id))
        };
        drop(dropped);
        match taken {
            Answer::Ready(r) => Poll::Ready(r),
            _ => Poll::Ready(Err(capnp::Error::failed("response already taken".into()))),
        }
    }
}

/// The hook path's response promise: the Return as capnp's `Response`.
struct ResponseFuture(ReplyFuture);

impl Future for ResponseFuture {
    type Output = Result<Response<any_pointer::Owned>, capnp::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.map(|reply| Response::new(Box::new(reply))))
    }
}

impl Drop for ReplyFuture {
    fn drop(&mut self) {
        if self.done {
            wake_if_last(&self.state);
            return;
        }
        // Given up before the Return (a deadline, a dropped call): its results are not
        // wanted; a Return already here is dropped (its imports released) outside the
        // borrow.
        let (ready, dropped) = {
            let mut s = self.state.borrow_mut();
            let ready = match s.question(self.id) {
                Some(q) => {
                    if !q.returned {
                        q.unwanted = true;
                    }
                    std::mem::replace(&mut q.answer, Answer::Taken)
                }
                None => Answer::Taken,
            };
            (ready, s.release_question(self.id))
        };
        drop(ready);
        drop(dropped);
        wake_if_last(&self.state);
    }
}

impl ResponseHook for Reply {
    fn get(&self) -> capnp::Result<any_pointer::Reader<'_>> {
        let root = self.message.get_root::<rpc_message::Reader>()?;
        let mut content = crate::engine::results_content(root)?;
        content.imbue(&self.caps);
        Ok(content)
    }
}

/// A capability of this engine's connection, called without capnp's hook objects:
/// [`DirectCap::call`] writes a Call into the connection's outbox and its future yields the
/// Return, read in place: no boxed request, promise, pipeline or response per call (the
/// hook path allocates each). The same capability as a capnp hook ([`DirectCap::hook`])
/// serves everything else; both keep the same question and import counts.
pub struct DirectCap(Result<Cap, capnp::Error>);

impl DirectCap {
    /// The same capability as a capnp hook, for generated clients (one more reference).
    pub fn hook(&self) -> Box<dyn ClientHook> {
        match &self.0 {
            Ok(cap) => Box::new(cap.clone_ref()),
            Err(e) => broken_cap(e.clone()),
        }
    }

    /// This capability, pipelined on the question `reply` answers, as the import the
    /// server returned there, when it hosts it itself (`senderHosted`): later calls then go
    /// to `importedCap`, which the server reads on its fast path. Order is kept: the
    /// server delivered every call made on the answer to that same object in the order
    /// received, and the import is already settled (a `senderPromise` would need an
    /// embargo, so it is not resolved). `None` when it does not apply.
    pub fn resolve(&self, reply: &DirectReply) -> Option<DirectCap> {
        let cap = self.0.as_ref().ok()?;
        let Target::Promised(question, ops) = &cap.target else {
            return None;
        };
        if *question != reply.question {
            return None;
        }
        let id = reply.hosted_at(ops)?;
        // One more local handle of the import the reply's capabilities hold (so it is
        // still counted): released with the others when the last goes.
        cap.state.borrow_mut().imports.get_mut(&id)?.local += 1;
        Some(DirectCap(Ok(Cap {
            state: Rc::clone(&cap.state),
            target: Target::Import(id),
        })))
    }

    /// Calls `method_id` of `interface_id` on this capability, its params written by
    /// `params` into the Call's params (no capabilities: this client sends none);
    /// `size_words` sizes the message's one segment.
    pub fn call(
        &self,
        interface_id: u64,
        method_id: u16,
        size_words: u32,
        params: impl FnOnce(any_pointer::Builder<'_>) -> capnp::Result<()>,
    ) -> DirectCall {
        let cap = match &self.0 {
            Ok(cap) => cap,
            Err(e) => return DirectCall(Err(Some(e.clone()))),
        };
        let state = &cap.state;
        let id = match state.borrow_mut().new_question() {
            Ok(id) => id,
            Err(e) => return DirectCall(Err(Some(e))),
        };
        let mut message =
            message::Builder::new(HeapAllocator::new().first_segment_words(size_words.max(16)));
        let built = {
            let mut call = message.init_root::<rpc_message::Builder>().init_call();
            call.set_question_id(id);
            cap.address(call.reborrow(), interface_id, method_id);
            params(call.init_params().get_content())
        };
        let mut s = state.borrow_mut();
        if let Err(e) = built {
            let dropped = s.free_question(id);
            drop(s);
            drop(dropped);
            return DirectCall(Err(Some(e)));
        }
        s.send(&message);
        // The call's future holds the one reference; `pipelined` adds others.
        if let Some(q) = s.question(id) {
            q.refs = 1;
        }
        DirectCall(Ok(ReplyFuture {
            state: Rc::clone(state),
            id,
            done: false,
        }))
    }
}

/// A call made through [`DirectCap::call`]: resolves to its Return.
pub struct DirectCall(Result<ReplyFuture, Option<capnp::Error>>);

/// A failed [`DirectCall`]'s error, once its future has taken it.
fn result_taken() -> capnp::Error {
    capnp::Error::failed("the call's result was already taken".into())
}

impl DirectCall {
    /// The capability its results will hold at the path of pointer fields `fields`, usable
    /// at once: calls on it are pipelined on this question (`promisedAnswer`).
    pub fn pipelined(&self, fields: &[u16]) -> DirectCap {
        match &self.0 {
            Ok(f) => {
                f.state.borrow_mut().add_ref(f.id);
                let ops: Vec<PipelineOp> = fields
                    .iter()
                    .map(|&f| PipelineOp::GetPointerField(f))
                    .collect();
                DirectCap(Ok(Cap {
                    state: Rc::clone(&f.state),
                    target: Target::Promised(f.id, Rc::from(ops)),
                }))
            }
            Err(e) => DirectCap(Err(e.clone().unwrap_or_else(result_taken))),
        }
    }
}

impl Future for DirectCall {
    type Output = Result<DirectReply, capnp::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            Ok(f) => {
                let question = f.id;
                Pin::new(f)
                    .poll(cx)
                    .map(|r| r.map(|reply| DirectReply { reply, question }))
            }
            Err(e) => Poll::Ready(Err(e.take().unwrap_or_else(result_taken))),
        }
    }
}

/// A Return's message, read in place.
pub struct DirectReply {
    reply: Reply,
    /// The question it answers.
    question: u32,
}

impl DirectReply {
    /// The results' content (`Payload.content`).
    pub fn results(&self) -> capnp::Result<any_pointer::Reader<'_>> {
        self.reply.get()
    }

    /// The import a path of pointer fields in the results leads to, when the server hosts
    /// it itself: found by capnp's own pipelined walk over a cap table of stand-ins that
    /// only say which import they are.
    fn hosted_at(&self, ops: &[PipelineOp]) -> Option<u32> {
        let table: Vec<Option<Box<dyn ClientHook>>> = self
            .reply
            .hosted
            .iter()
            .map(|&id| Some(Box::new(ImportIndex(id)) as Box<dyn ClientHook>))
            .collect();
        let root = self.reply.message.get_root::<rpc_message::Reader>().ok()?;
        let mut content = crate::engine::results_content(root).ok()?;
        content.imbue(&table);
        let hook = content.get_pipelined_cap(ops).ok()?;
        u32::try_from(hook.get_ptr()).ok()
    }
}

/// A stand-in capability for `DirectReply::hosted_at`'s walk: `get_ptr` is the import id it
/// stands for (`usize::MAX` for none); nothing is ever called on it.
struct ImportIndex(Option<u32>);

impl ClientHook for ImportIndex {
    fn add_ref(&self) -> Box<dyn ClientHook> {
        Box::new(ImportIndex(self.0))
    }
    fn new_call(
        &self,
        interface_id: u64,
        method_id: u16,
        size_hint: Option<MessageSize>,
    ) -> Request<any_pointer::Owned, any_pointer::Owned> {
        broken_cap(capnp::Error::failed("a stand-in, not a capability".into())).new_call(
            interface_id,
            method_id,
            size_hint,
        )
    }
    fn call(
        &self,
        _interface_id: u64,
        _method_id: u16,
        _params: Box<dyn ParamsHook>,
        _results: Box<dyn ResultsHook>,
    ) -> Promise<(), capnp::Error> {
        Promise::err(capnp::Error::failed("a stand-in, not a capability".into()))
    }
    fn get_brand(&self) -> usize {
        0
    }
    fn get_ptr(&self) -> usize {
        self.0.map_or(usize::MAX, |id| id as usize)
    }
    fn get_resolved(&self) -> Option<Box<dyn ClientHook>> {
        None
    }
    fn when_more_resolved(&self) -> Option<Promise<Box<dyn ClientHook>, capnp::Error>> {
        None
    }
    fn when_resolved(&self) -> Promise<(), capnp::Error> {
        Promise::ok(())
    }
}

/// Capabilities pipelined on a question: each is a `promisedAnswer` target.
struct QuestionPipeline {
    state: Shared,
    id: u32,
}

impl PipelineHook for QuestionPipeline {
    fn add_ref(&self) -> Box<dyn PipelineHook> {
        self.state.borrow_mut().add_ref(self.id);
        Box::new(QuestionPipeline {
            state: Rc::clone(&self.state),
            id: self.id,
        })
    }

    fn get_pipelined_cap(&self, ops: &[PipelineOp]) -> Box<dyn ClientHook> {
        self.state.borrow_mut().add_ref(self.id);
        Box::new(Cap {
            state: Rc::clone(&self.state),
            target: Target::Promised(self.id, Rc::from(ops)),
        })
    }
}

impl Drop for QuestionPipeline {
    fn drop(&mut self) {
        let dropped = self.state.borrow_mut().release_question(self.id);
        drop(dropped);
        wake_if_last(&self.state);
    }
}

/// A pipeline every capability of which fails with one error.
struct BrokenPipeline(capnp::Error);

impl PipelineHook for BrokenPipeline {
    fn add_ref(&self) -> Box<dyn PipelineHook> {
        Box::new(BrokenPipeline(self.0.clone()))
    }
    fn get_pipelined_cap(&self, _ops: &[PipelineOp]) -> Box<dyn ClientHook> {
        broken_cap(self.0.clone())
    }
}

/// A capability every call on which fails with `e`.
fn broken_cap(e: capnp::Error) -> Box<dyn ClientHook> {
    capnp_rpc::new_future_client::<capnp::capability::Client>(Promise::err(e)).hook
}
