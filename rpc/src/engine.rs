//! capkv's own Cap'n Proto RPC engine, server side: the standard protocol (`rpc.capnp`,
//! level 1) for a server that only exports capabilities, in one future per connection.
//!
//! - [`serve`]: the connection loop, in passes. A pass settles the calls that ended, then
//!   takes every whole frame already buffered from the frame layer (checked, aligned, read
//!   in place: no further copy), answering what it can at once (Bootstrap, Finish, Release,
//!   protocol errors) and starting each Call, then writes everything the pass produced to
//!   the socket in one write, from the loop itself. (A flush task of its own, woken per
//!   reply, cost 1-17% of the calls/s at 1,000 connections in A/B pairs.) A call is polled
//!   once, in order, at the end of the step that started it; most complete there. One that
//!   waits (a group commit, an admission queue, a stall fault) runs on inside the loop's
//!   future (a `FuturesUnordered`) and holds up nothing else: answers may leave out of
//!   order, and dropping the connection drops its calls, as `RpcSystem` does.
//! - Handlers plug in as `ClientHook`s (what [`crate::local::new_client`] makes of a
//!   generated `Server`): a call is `hook.call(interface, method, params, results)`, where the params
//!   and results hooks here read the incoming message in place and build the Return message
//!   directly. Capabilities a handler puts in its results are exported from the Return's
//!   cap table. The engine knows nothing of the kv schema or the store.
//! - The direct path: an export whose object answers some methods at once
//!   ([`crate::local::Direct`], made by [`crate::local::new_direct_client`]) gets a plain
//!   call on it, or one pipelined on an answer that has returned it, through
//!   `Direct::call_now` with the message's params reader and a results builder over the
//!   thread's scratch segment; the Return (a fixed header before the results' words) is
//!   queued at once, and the call never takes an answer slot (`Conn::call_direct`). What it
//!   defers or does not serve goes down the hook path.
//! - Tables: `answers` by question id (a call running, returned with capabilities that
//!   later calls may pipeline on, or failed), `exports` by export id with reference counts
//!   (one per pointer a Return carried; `Release` takes them back).
//!
//! Protocol decisions (see each handler below): calls pipelined on an answer still running
//! wait in its queue and start, in the order sent, the moment it returns (E-order: before any
//! later direct call on the capability it resolves to, which the peer can only send after
//! seeing the Return); past [`EngineLimits::max_waiting_call_bytes`] of them the connection
//! is not read until some have started. `noFinishNeeded` is set when results hold no
//! capability, and the answer is dropped at once; a Finish for an unknown id is ignored
//! (clients older than Cap'n Proto 1.0 always send one). Disembargo aborts: an exports-only
//! server never returns a promise, so no peer ever has a reason to send one. Resolve,
//! Provide, Accept, Join and unknown kinds are echoed as `Unimplemented`. A call whose params
//! carry capabilities, a `sendResultsTo` other than the caller, an unknown target or
//! transform: that call gets an exception, the connection stays. A duplicate live question
//! id, an over-release, or more live answers than [`EngineLimits::max_answers`]: `Abort`.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use capnp::any_pointer;
use capnp::capability::Promise;
use capnp::message::{self, HeapAllocator, ReaderOptions};
use capnp::private::capability::{
    ClientHook, ParamsHook, PipelineHook, PipelineOp, RequestHook, ResultsHook,
};
use capnp::traits::{Imbue, ImbueMut};
use capnp_rpc::rpc_capnp::{call, exception, message as rpc_message, message_target, return_};
use futures::stream::FuturesUnordered;
use futures::{AsyncWrite, StreamExt};

use crate::frames::{Frame, FrameSource};
use crate::local::{Direct, Now, Waiting};

#[doc(hidden)]
pub mod script;

/// What a capability table holds while a message is built or read.
type CapTable = Vec<Option<Box<dyn ClientHook>>>;

/// An incoming message: a call's params are read in place from it, so it moves with the
/// call (into the queue it waits in, then into its params hook).
type Incoming = message::Reader<Frame>;

/// Steps in a promised answer's transform: capkv's capabilities sit one or two pointers
/// deep; a longer path is refused (that call only).
const MAX_TRANSFORM_OPS: usize = 16;

/// Slots for calls of one step a connection keeps between steps.
const FRESH_SLOTS_KEPT: usize = 64;

/// Bounds of one connection.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    /// Answers alive at once (calls running, or returned with capabilities not yet
    /// finished). A peer past it is aborted: no honest client keeps that many questions.
    pub max_answers: usize,
    /// Decoding limits for every message read.
    pub reader_options: ReaderOptions,
    /// How long an ended connection may take to write what it still holds: a peer that
    /// stopped reading must not keep its connection, and the connection's slot, forever.
    pub finish_timeout: std::time::Duration,
    /// Bytes of calls held because they were pipelined on a call still running (a
    /// watcher's waiting `next`, a connection's first writes behind its `session`): past
    /// it, the connection is not read until some of those calls have started (one frame
    /// over it at most). Without it a peer could park `max_answers` calls of the largest
    /// frame each behind one call that waits: no other bound counts them (the frame budget
    /// charges frames only while they arrive, the reply backlog only replies). Not a
    /// refusal: an honest client's first writes wait on its `session` this way, however
    /// large.
    pub max_waiting_call_bytes: usize,
}

impl Default for EngineLimits {
    fn default() -> Self {
        Self {
            max_answers: 65_536,
            reader_options: ReaderOptions::new(),
            finish_timeout: std::time::Duration::from_secs(5),
            max_waiting_call_bytes: 16 << 20,
        }
    }
}

/// Why a connection ended other than by the peer hanging up.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("reading a message failed: {0}")]
    Read(std::io::Error),
    #[error("writing failed: {0}")]
    Write(std::io::Error),
    #[error("protocol violation by the peer: {0}")]
    Protocol(String),
    #[error("the peer aborted: {0}")]
    PeerAborted(String),
}

/// Ends a connection from outside (worker shutdown): the loop stops reading, drops its
/// calls, and flushes what it has written.
#[derive(Clone, Default)]
pub struct Closer(Rc<CloserState>);

#[derive(Default)]
struct CloserState {
    close: crate::signal::Signal,
    ended: tokio::sync::Notify,
    is_ended: Cell<bool>,
}

impl Closer {
    /// Closes the connection and resolves once its loop has ended.
    pub async fn close(&self) {
        self.0.close.set();
        if !self.0.is_ended.get() {
            self.0.ended.notified().await;
        }
    }
}

/// Marks the connection ended however its loop ends (returned or dropped).
struct EndGuard(Closer);

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.0 .0.is_ended.set(true);
        self.0 .0.ended.notify_waiters();
    }
}

/// A Return being built: the whole rpc `Message`, and the capabilities its results hold.
struct Built {
    message: message::Builder<HeapAllocator>,
    cap_table: CapTable,
}

impl Built {
    /// A `Return` for `answer_id` with empty results, ready for a handler to fill.
    fn new_return(answer_id: u32) -> Self {
        // Most results are a few words: start small, grow on demand.
        let mut message = message::Builder::new(HeapAllocator::new().first_segment_words(32));
        init_return(&mut message, answer_id);
        Self {
            message,
            cap_table: Vec::new(),
        }
    }

    fn content_mut(&mut self) -> capnp::Result<any_pointer::Builder<'_>> {
        let Built { message, cap_table } = self;
        let root = message.get_root::<rpc_message::Builder>()?;
        let rpc_message::Which::Return(ret) = root.which()? else {
            return Err(capnp::Error::failed("not a Return".into()));
        };
        let return_::Which::Results(payload) = ret?.which()? else {
            return Err(capnp::Error::failed("not a result".into()));
        };
        let mut content = payload?.get_content();
        content.imbue_mut(cap_table);
        Ok(content)
    }

    fn content(&self) -> capnp::Result<any_pointer::Reader<'_>> {
        let root = self.message.get_root_as_reader::<rpc_message::Reader>()?;
        let mut content = results_content(root)?;
        content.imbue(&self.cap_table);
        Ok(content)
    }
}

/// Makes `message` a Return for `answer_id` with empty results, and gives the results to
/// fill. It says what a Return without capabilities says (a get's, a put's) from the start,
/// so that `write_results` touches the message again only when the results hold some: no
/// Finish needed, and the cap table a null pointer, which every reader takes as empty.
fn init_return<A: message::Allocator>(
    message: &mut message::Builder<A>,
    answer_id: u32,
) -> any_pointer::Builder<'_> {
    let mut ret = message.init_root::<rpc_message::Builder>().init_return();
    ret.set_answer_id(answer_id);
    ret.set_no_finish_needed(true);
    ret.init_results().get_content()
}

/// Words of a direct Return's message before the results: the root pointer, `Message`
/// (one data word, one pointer), `Return` (two data words, one pointer), `Payload`'s two
/// pointers (content, cap table).
const DIRECT_RETURN_WORDS: usize = 8;

/// The header (the segment table of one segment, then `Message`, `Return` and `Payload`)
/// of answer `answer_id`'s Return whose results are the root of `segment` (a one-segment
/// message's words), or `None` when that root is not a near struct pointer
/// (the caller then builds the Return with capnp). The results' words follow the header
/// as they are, all but the root pointer, which becomes the payload's content pointer
/// (one word further from them: the cap table's pointer sits between).
fn direct_return(answer_id: u32, segment: &[u8]) -> Option<[u8; 8 + 8 * DIRECT_RETURN_WORDS]> {
    /// A near struct pointer to the word after it, with the sections' sizes in words.
    const fn struct_here(data: u64, ptrs: u64) -> u64 {
        data << 32 | ptrs << 48
    }
    /// `Message`'s union tag for `return` (`rpc.capnp`).
    const RETURN: u64 = 3;
    /// `Return.noFinishNeeded`: bit 33 of its first data word.
    const NO_FINISH_NEEDED: u64 = 1 << 33;
    let root = u64::from_le_bytes(segment.get(..8)?.try_into().ok()?);
    if root == 0 || root & 3 != 0 {
        return None;
    }
    let offset = ((root as u32 as i32) >> 2).checked_add(1)?;
    // It must still fit the pointer's 30 signed bits.
    if offset >= 1 << 29 {
        return None;
    }
    let words = u32::try_from(DIRECT_RETURN_WORDS + segment.len() / 8 - 1).ok()?;
    let content = (root & !0xffff_ffff) | u64::from((offset as u32) << 2);
    let message = [
        struct_here(1, 1),
        RETURN,
        struct_here(2, 1),
        // answerId, `releaseParamCaps` left at its default (true), the union at `results`.
        u64::from(answer_id) | NO_FINISH_NEEDED,
        0,
        struct_here(0, 2),
        content,
        // The cap table: null, which every reader takes as empty.
        0,
    ];
    let mut header = [0u8; 8 + 8 * DIRECT_RETURN_WORDS];
    // The segment table: one segment (count minus one), then its size in words.
    header[4..8].copy_from_slice(&words.to_le_bytes());
    for (i, w) in message.iter().enumerate() {
        header[8 + 8 * i..16 + 8 * i].copy_from_slice(&w.to_le_bytes());
    }
    Some(header)
}

/// The results of a Return message (whose capabilities the caller imbues): how the engine
/// reads its own answers for pipelined calls and the client reads the server's.
pub(crate) fn results_content(
    root: rpc_message::Reader<'_>,
) -> capnp::Result<any_pointer::Reader<'_>> {
    let rpc_message::Which::Return(ret) = root.which()? else {
        return Err(capnp::Error::failed("not a Return".into()));
    };
    let return_::Which::Results(payload) = ret?.which()? else {
        return Err(capnp::Error::failed("not a result".into()));
    };
    Ok(payload?.get_content())
}

/// The results a handler writes into. The message goes back to the engine when the handler
/// drops it, which is when its call ends, however it ends.
struct EngineResults {
    built: Option<Built>,
    done: Rc<Cell<Option<Built>>>,
}

impl ResultsHook for EngineResults {
    fn get(&mut self) -> capnp::Result<any_pointer::Builder<'_>> {
        match &mut self.built {
            Some(b) => b.content_mut(),
            None => Err(capnp::Error::failed("results already sent".into())),
        }
    }

    /// Pipelining on results before the call returns is not offered: calls pipelined on a
    /// running answer wait for its Return.
    fn set_pipeline(&mut self) -> capnp::Result<()> {
        Ok(())
    }

    fn allow_cancellation(&self) {}

    fn tail_call(self: Box<Self>, _request: Box<dyn RequestHook>) -> Promise<(), capnp::Error> {
        Promise::err(capnp::Error::unimplemented(
            "tail calls are not supported by this server".into(),
        ))
    }

    fn direct_tail_call(
        self: Box<Self>,
        _request: Box<dyn RequestHook>,
    ) -> (Promise<(), capnp::Error>, Box<dyn PipelineHook>) {
        let e = capnp::Error::unimplemented("tail calls are not supported by this server".into());
        (Promise::err(e.clone()), Box::new(BrokenPipeline(e)))
    }
}

impl Drop for EngineResults {
    fn drop(&mut self) {
        self.done.set(self.built.take());
    }
}

/// A pipeline every capability of which is broken with one error.
struct BrokenPipeline(capnp::Error);

impl PipelineHook for BrokenPipeline {
    fn add_ref(&self) -> Box<dyn PipelineHook> {
        Box::new(BrokenPipeline(self.0.clone()))
    }
    fn get_pipelined_cap(&self, _ops: &[PipelineOp]) -> Box<dyn ClientHook> {
        capnp_rpc::new_future_client::<capnp::capability::Client>(Promise::err(self.0.clone())).hook
    }
}

/// A call's params, read in place from the message that carried them.
struct EngineParams(Incoming);

impl ParamsHook for EngineParams {
    fn get(&self) -> capnp::Result<any_pointer::Reader<'_>> {
        // No cap table: params with capabilities are refused before the call starts.
        crate::frames::call_params(&self.0)
    }
}

/// The bytes a message holds (its segments), as counted against
/// [`EngineLimits::max_waiting_call_bytes`].
fn message_bytes(m: &Incoming) -> usize {
    m.size_in_words() * 8
}

fn call_of(m: &Incoming) -> capnp::Result<call::Reader<'_>> {
    match m.get_root::<rpc_message::Reader>()?.which()? {
        rpc_message::Which::Call(c) => c,
        _ => Err(capnp::Error::failed("not a Call".into())),
    }
}

struct Export {
    hook: Box<dyn ClientHook>,
    /// Its object's synchronous methods, when it has some ([`crate::local::Direct`]).
    direct: Option<Rc<dyn Direct>>,
    refs: u32,
}

/// Exported capabilities by id, with one reference per pointer sent.
#[derive(Default)]
struct Exports {
    slots: Vec<Option<Export>>,
    free: Vec<u32>,
    /// The export id of each capability (by `ClientHook::get_ptr`), so the same object
    /// sent twice is one export with two references. Keyed by this process's own
    /// addresses, never by anything a peer chooses: a fast non-keyed hash is safe here.
    by_ptr: rustc_hash::FxHashMap<usize, u32>,
    /// The export last called directly, with its object. A connection calls one or two
    /// capabilities over and over; this field lives in the connection's state, which a call
    /// touches anyway, where the slot is a cache line of its own (cold, with thousands of
    /// connections). Cleared when that export is released.
    last_direct: Option<(u32, Rc<dyn Direct>)>,
}

impl Exports {
    fn add(&mut self, hook: &dyn ClientHook) -> u32 {
        let ptr = hook.get_ptr();
        if let Some(&id) = self.by_ptr.get(&ptr) {
            if let Some(Some(e)) = self.slots.get_mut(id as usize) {
                e.refs = e.refs.saturating_add(1);
                return id;
            }
        }
        let export = Export {
            hook: hook.add_ref(),
            direct: crate::local::direct_of(hook),
            refs: 1,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = Some(export);
                id
            }
            None => {
                self.slots.push(Some(export));
                (self.slots.len() - 1) as u32
            }
        };
        self.by_ptr.insert(ptr, id);
        id
    }

    /// Whether export `id` is live (a call may name it).
    fn is_live(&self, id: u32) -> bool {
        matches!(&self.last_direct, Some((last, _)) if *last == id) || self.get(id).is_some()
    }

    fn get(&self, id: u32) -> Option<&dyn ClientHook> {
        match self.slots.get(id as usize) {
            Some(Some(e)) => Some(e.hook.as_ref()),
            _ => None,
        }
    }

    /// The export of `hook`'s object, if it is exported.
    fn id_of(&self, hook: &dyn ClientHook) -> Option<u32> {
        let id = *self.by_ptr.get(&hook.get_ptr())?;
        self.get(id).map(|_| id)
    }

    fn direct(&mut self, id: u32) -> Option<Rc<dyn Direct>> {
        if let Some((last, direct)) = &self.last_direct {
            if *last == id {
                return Some(Rc::clone(direct));
            }
        }
        let direct = match self.slots.get(id as usize) {
            Some(Some(e)) => e.direct.clone(),
            _ => None,
        };
        if let Some(d) = &direct {
            self.last_direct = Some((id, Rc::clone(d)));
        }
        direct
    }

    fn release(&mut self, id: u32, count: u32) -> Result<(), EngineError> {
        let Some(Some(e)) = self.slots.get_mut(id as usize) else {
            return Err(EngineError::Protocol(format!(
                "Release of unknown export {id}"
            )));
        };
        if count > e.refs {
            return Err(EngineError::Protocol(format!(
                "Release of export {id} by {count}, which holds {}",
                e.refs
            )));
        }
        e.refs -= count;
        if e.refs == 0 {
            if let Some(e) = self.slots[id as usize].take() {
                self.by_ptr.remove(&e.hook.get_ptr());
            }
            if matches!(&self.last_direct, Some((last, _)) if *last == id) {
                self.last_direct = None;
            }
            self.free.push(id);
        }
        Ok(())
    }

    /// The table's own invariants: every live export has references and is found by its
    /// object, every free id is empty, and the object index points only at live exports.
    fn consistent(&self) -> bool {
        let live_ok = self.slots.iter().enumerate().all(|(id, e)| match e {
            Some(e) => e.refs > 0 && self.by_ptr.get(&e.hook.get_ptr()) == Some(&(id as u32)),
            None => true,
        });
        let free_ok = self
            .free
            .iter()
            .all(|&id| matches!(self.slots.get(id as usize), Some(None)));
        let index_ok = self
            .by_ptr
            .values()
            .all(|&id| matches!(self.slots.get(id as usize), Some(Some(_))));
        let last_ok = match &self.last_direct {
            Some((id, _)) => matches!(self.slots.get(*id as usize), Some(Some(_))),
            None => true,
        };
        live_ok && free_ok && index_ok && last_ok
    }

    #[cfg(test)]
    fn live(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }
}

enum AnswerState {
    /// The call runs; calls pipelined on it wait here, in the order they came.
    Running { queued: Vec<Incoming> },
    /// Returned with capabilities: later calls may pipeline on them until Finish. (Boxed:
    /// few answers carry capabilities, and every slab slot is as large as the largest state.)
    Returned {
        built: Box<Built>,
        exports: Vec<u32>,
    },
    /// The call failed (or could not start): calls pipelined on it fail alike.
    Failed(capnp::Error),
}

/// Live answers by question id. Peers number their questions from 0 and reuse ids after
/// Finish, so ids stay small: those below [`DENSE_IDS`] index a slab (no hashing, no
/// allocation once it has grown); a peer numbering higher lands in an ordered map, which no
/// choice of ids can degrade (a hash keyed by peer-chosen ids could be).
#[derive(Default)]
struct Answers {
    dense: Vec<Option<Answer>>,
    sparse: std::collections::BTreeMap<u32, Answer>,
    len: usize,
}

/// Question ids held in the slab: at most this many slots, whatever the peer does.
const DENSE_IDS: u32 = 1024;

impl Answers {
    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, id: u32) -> Option<&Answer> {
        // Most connections have no answer live between calls (direct calls answered at
        // once take none): then the slab, a cold line of its own, is not read.
        if self.len == 0 {
            return None;
        }
        if id < DENSE_IDS {
            self.dense.get(id as usize).and_then(Option::as_ref)
        } else {
            self.sparse.get(&id)
        }
    }

    fn get_mut(&mut self, id: u32) -> Option<&mut Answer> {
        if id < DENSE_IDS {
            self.dense.get_mut(id as usize).and_then(Option::as_mut)
        } else {
            self.sparse.get_mut(&id)
        }
    }

    fn contains(&self, id: u32) -> bool {
        self.get(id).is_some()
    }

    /// Sets `id`'s answer, replacing the one it had.
    fn insert(&mut self, id: u32, answer: Answer) {
        let old = if id < DENSE_IDS {
            let i = id as usize;
            if self.dense.len() <= i {
                self.dense.resize_with(i + 1, || None);
            }
            self.dense[i].replace(answer)
        } else {
            self.sparse.insert(id, answer)
        };
        if old.is_none() {
            self.len += 1;
        }
    }

    fn remove(&mut self, id: u32) -> Option<Answer> {
        let old = if id < DENSE_IDS {
            self.dense.get_mut(id as usize).and_then(Option::take)
        } else {
            self.sparse.remove(&id)
        };
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// The count matches the entries.
    fn consistent(&self) -> bool {
        self.dense.iter().flatten().count() + self.sparse.len() == self.len
    }

    /// Bytes of the calls queued on running answers (checked against the connection's
    /// count: `Conn::consistent`).
    fn queued_bytes(&self) -> usize {
        self.dense
            .iter()
            .flatten()
            .chain(self.sparse.values())
            .map(|a| match &a.state {
                AnswerState::Running { queued } => queued.iter().map(message_bytes).sum(),
                _ => 0,
            })
            .sum()
    }
}

impl Answer {
    /// The answer of a call that has not returned yet.
    fn running() -> Self {
        Answer {
            state: AnswerState::Running { queued: Vec::new() },
            finished: false,
            release_on_return: false,
        }
    }
}

struct Answer {
    state: AnswerState,
    /// Finish came while the call ran: drop the answer when it returns.
    finished: bool,
    /// ... and release the capabilities its Return carries (the peer will not import them).
    release_on_return: bool,
}

/// A call running: its question id and its work. A future of its own (not an `async`
/// block) so that starting a call boxes nothing beyond what its work already is.
struct Running {
    id: u32,
    work: Work,
}

enum Work {
    /// The hook path: the handler's promise, and where its results message lands when the
    /// handler drops it.
    Hook {
        promise: Promise<(), capnp::Error>,
        done: Rc<Cell<Option<Built>>>,
    },
    /// A direct call that waits ([`Now::Wait`]); taken when it is ready.
    Wait(Option<Pin<Box<dyn Waiting>>>),
}

/// What a call ending hands back to the loop: its question id and how it ended.
type Done = (u32, Ended);

enum Ended {
    Hook(Result<(), capnp::Error>, Rc<Cell<Option<Built>>>),
    /// Ready to write its results ([`Conn::answer_waiting`]).
    Wait(Pin<Box<dyn Waiting>>),
}

impl Future for Running {
    type Output = Done;
    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Done> {
        let this = self.get_mut();
        match &mut this.work {
            Work::Hook { promise, done } => Pin::new(promise)
                .poll(cx)
                .map(|r| (this.id, Ended::Hook(r, Rc::clone(done)))),
            Work::Wait(waiting) => match waiting {
                Some(w) => match w.as_mut().poll_ready(cx) {
                    Poll::Ready(()) => match waiting.take() {
                        Some(w) => Poll::Ready((this.id, Ended::Wait(w))),
                        None => Poll::Pending,
                    },
                    Poll::Pending => Poll::Pending,
                },
                // Polled after it ended: never, as `FuturesUnordered` drops what it yielded.
                None => Poll::Pending,
            },
        }
    }
}

/// One connection's tables and its unsent bytes.
struct Conn {
    bootstrap: Box<dyn ClientHook>,
    limits: EngineLimits,
    exports: Exports,
    answers: Answers,
    /// Messages of the running pass: the worker thread's [`OUTBOX`] while a pass runs
    /// (empty, without capacity, between passes); the replies of one pass leave together.
    outbox: Vec<u8>,
    /// Where the bytes put in `outbox` are counted until the writer sends them.
    backlog: Option<Rc<crate::backlog::ReplyBacklog>>,
    /// Calls started in this step, not yet polled: they run once at the end of the step,
    /// and only those that wait join the loop's `FuturesUnordered` (most complete at once:
    /// no task of their own, no wake-up, no extra pass of the loop).
    fresh: Vec<Running>,
    /// Calls of this step that completed at once (kept for its capacity).
    done_now: Vec<Done>,
    /// The last pass stopped at its bound of frames, more may be buffered: the loop passes
    /// again (see [`Conn::pass_inner`]).
    again: bool,
    /// Bytes of the calls queued on running answers (see
    /// [`EngineLimits::max_waiting_call_bytes`]).
    waiting_call_bytes: usize,
    /// When the closing signal was last polled: this thread's count of signals set then
    /// ([`crate::signal::sets_on_this_thread`]) and the waker it registered. Until either
    /// changes it cannot have become ready, and is not polled again: with thousands of
    /// connections its state is one more cold cache line a call.
    closing_seen: Option<(u64, std::task::Waker)>,
}

/// Words of the scratch segment: a get's or a put's results with a key and a value of a
/// few hundred bytes. Larger results go on in a heap segment of their own (and their Return
/// is built by capnp around a copy).
const SCRATCH_WORDS: usize = 96;

/// Bytes of outbox a worker thread keeps between passes (more came from one large reply).
const OUTBOX_BYTES_KEPT: usize = 256 * 1024;

thread_local! {
    /// Where every pass on this thread builds its messages (taken by the pass, given back
    /// empty): the bytes a connection sends are written from a buffer already in cache,
    /// and a connection keeps no write buffer of its own unless its socket is full (with
    /// 1,000 connections taking turns, writing each one's replies into its own buffer
    /// missed the cache on every call).
    static OUTBOX: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };

    /// The first segment of every Return a direct call builds on this thread: most fit, so
    /// answering one allocates no segment (see [`Conn::call_direct`]). One per thread, not
    /// per connection: its bytes are copied into the outbox before the next call can start,
    /// so a worker's connections share one warm buffer instead of each keeping 768 cold
    /// bytes (with 1,000 connections taking turns, every call missed the cache on its own).
    static SCRATCH: std::cell::Cell<Vec<capnp::Word>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Serves one connection until the peer hangs up, aborts, breaks the protocol, or `closer`
/// closes it. `reader` yields whole frames (the frame layer checked them); `bootstrap` is
/// what `Bootstrap` returns. Calls still running when it ends are dropped, unanswered.
pub async fn serve<R, W>(
    reader: R,
    writer: W,
    bootstrap: Box<dyn ClientHook>,
    limits: EngineLimits,
    closer: Closer,
) -> Result<(), EngineError>
where
    R: FrameSource + Unpin,
    W: AsyncWrite + Unpin + 'static,
{
    serve_with(reader, writer, bootstrap, limits, closer, None).await
}

/// [`serve`], counting the bytes of every message it queues for the writer on `backlog`
/// (which the writer uncounts as they leave), so that the frame layer can stop reading a
/// peer that does not read its replies: exact, where a handler could only estimate its
/// reply. (Hints about the calls of a read are the frame layer's:
/// `GuardedReader::with_warm`.)
pub async fn serve_with<R, W>(
    mut reader: R,
    writer: W,
    bootstrap: Box<dyn ClientHook>,
    limits: EngineLimits,
    closer: Closer,
    backlog: Option<Rc<crate::backlog::ReplyBacklog>>,
) -> Result<(), EngineError>
where
    R: FrameSource + Unpin,
    W: AsyncWrite + Unpin + 'static,
{
    if let Some(b) = &backlog {
        b.count_at_send();
    }
    let mut conn = Conn {
        bootstrap,
        limits,
        exports: Exports::default(),
        answers: Answers::default(),
        outbox: Vec::new(),
        backlog,
        fresh: Vec::new(),
        done_now: Vec::new(),
        again: false,
        waiting_call_bytes: 0,
        closing_seen: None,
    };
    let mut calls: FuturesUnordered<Running> = FuturesUnordered::new();
    let _ended = EndGuard(closer.clone());
    let closed = Rc::clone(&closer.0);
    // A flag and a waker, no lock (see `crate::signal`), polled when a signal was set on
    // this thread since its last poll (see `Conn::closing_may_be_ready`).
    let closing = closed.close.wait();
    futures::pin_mut!(closing);
    // Writes run beside reading and calls, never in their way: a peer that does not read
    // its replies fills the socket, which must not stop the reads that let the backlog see
    // it pause (and close it). The writer is the socket itself: a pass's replies leave in
    // one write at its end, from this future (no flush task to wake), straight from the
    // thread's outbox (copied into the writer's own buffer only when the socket is full).
    let mut writer = Writer::with_backlog(writer, conn.backlog.clone());
    let ended = std::future::poll_fn(|cx| {
        // What a turn touches beside this future, asked for at once (see `crate::hint`).
        reader.prefetch();
        conn.prefetch();
        for _ in 0..MAX_PASSES_PER_POLL {
            match conn.pass(&mut reader, &mut calls, &mut writer, closing.as_mut(), cx) {
                Poll::Ready(ended) => return Poll::Ready(ended),
                Poll::Pending if !conn.again => return Poll::Pending,
                Poll::Pending => {}
            }
        }
        // Busy for many passes in a row: let the worker's other connections run first.
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
    // Calls are dropped before the capabilities they run on; what was written goes out,
    // within the finish timeout.
    drop(calls);
    // Failed or timed out: the peer is gone, or does not read; nothing more to tell it.
    // Boxed: only an ending connection needs room for its last write and its timer, not
    // every connection's future for its whole life.
    let finish = Box::pin(tokio::time::timeout(
        conn.limits.finish_timeout,
        writer.finish(&mut conn.outbox),
    ));
    let _ = finish.await;
    ended
}

/// Passes of the connection loop in one poll before it yields to the worker's other
/// connections (each pass drains what is buffered, so more passes mean a busy peer).
const MAX_PASSES_PER_POLL: usize = 8;

/// Messages one pass takes before it writes what they produced: bounds the outbox a
/// pass builds, and how long the other sources wait.
const MAX_FRAMES_PER_PASS: usize = 256;

/// Bytes written in the background of the connection loop, one buffer at a time (no
/// future of its own per write: the loop polls it).
pub(crate) struct Writer<W> {
    /// `None` once a write has failed: the connection ends.
    w: Option<W>,
    /// What is being written; empty when no write runs.
    buf: Vec<u8>,
    /// How much of `buf` the writer has taken.
    pos: usize,
    /// Told about every byte that reaches the socket (server connections).
    backlog: Option<Rc<crate::backlog::ReplyBacklog>>,
    /// Everything was written but the stream's flush has not completed (TLS).
    flush_due: bool,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    pub(crate) fn new(w: W) -> Self {
        Self::with_backlog(w, None)
    }

    pub(crate) fn with_backlog(w: W, backlog: Option<Rc<crate::backlog::ReplyBacklog>>) -> Self {
        Self {
            w: Some(w),
            buf: Vec::new(),
            pos: 0,
            backlog,
            flush_due: false,
        }
    }

    /// Drops the stream (closing it) and anything unsent.
    pub(crate) fn close(&mut self) {
        self.w = None;
        self.buf = Vec::new();
        self.pos = 0;
        self.flush_due = false;
    }

    /// A write is running.
    pub(crate) fn busy(&self) -> bool {
        !self.buf.is_empty() || self.flush_due
    }

    /// Writes `bytes` to the stream now, while no write runs: what the stream does not take
    /// at once is copied into the writer's own buffer and written by `poll_written` (so a
    /// caller's buffer is free again when this returns). `Ready(Ok)` when all of it left.
    pub(crate) fn send_now(
        &mut self,
        bytes: &[u8],
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        debug_assert!(!self.busy(), "send_now while a write runs");
        let Some(w) = self.w.as_mut() else {
            return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        };
        let mut at = 0;
        let r = loop {
            if at == bytes.len() {
                match Pin::new(&mut *w).poll_flush(cx) {
                    Poll::Pending => {
                        self.flush_due = true;
                        return Poll::Pending;
                    }
                    Poll::Ready(r) => break r,
                }
            }
            match Pin::new(&mut *w).poll_write(cx, &bytes[at..]) {
                Poll::Pending => {
                    self.append(&bytes[at..]);
                    return Poll::Pending;
                }
                Poll::Ready(Ok(0)) => break Err(std::io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    at += n;
                    if let Some(b) = &self.backlog {
                        b.written(n);
                    }
                }
                Poll::Ready(Err(e)) => break Err(e),
            }
        };
        if r.is_err() {
            self.w = None;
        }
        Poll::Ready(r)
    }

    /// Queues `bytes` after what is being written.
    pub(crate) fn append(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Starts writing what `outbox` holds, if nothing is being written.
    pub(crate) fn start(&mut self, outbox: &mut Vec<u8>) {
        if self.buf.is_empty() && !outbox.is_empty() {
            // The outbox takes the spare buffer; the write takes what was in it.
            std::mem::swap(outbox, &mut self.buf);
            self.pos = 0;
        }
    }

    /// Ready when the running write has ended; pending while none runs.
    pub(crate) fn poll_written(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let busy = self.busy();
        let (Some(w), true) = (self.w.as_mut(), busy) else {
            return Poll::Pending;
        };
        let r = loop {
            if self.pos == self.buf.len() {
                match Pin::new(&mut *w).poll_flush(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(r) => break r,
                }
            }
            match Pin::new(&mut *w).poll_write(cx, &self.buf[self.pos..]) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => break Err(std::io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    self.pos += n;
                    if let Some(b) = &self.backlog {
                        b.written(n);
                    }
                }
                Poll::Ready(Err(e)) => break Err(e),
            }
        };
        if r.is_err() {
            self.w = None;
        }
        self.flush_due = false;
        self.buf.clear();
        self.pos = 0;
        // Bounded: a buffer that grew for one large reply does not stay that large.
        if self.buf.capacity() > 1 << 20 {
            self.buf.shrink_to(64 * 1024);
        }
        Poll::Ready(r)
    }

    async fn written(&mut self) -> std::io::Result<()> {
        std::future::poll_fn(|cx| self.poll_written(cx)).await
    }

    /// Ends the running write, then writes what is left.
    async fn finish(mut self, outbox: &mut Vec<u8>) -> std::io::Result<()> {
        if self.busy() {
            self.written().await?;
        }
        self.start(outbox);
        if self.busy() {
            self.written().await?;
        }
        Ok(())
    }
}

impl Conn {
    /// Asks for the cache lines of this connection's tables and buffers (see
    /// `crate::hint`): its exports (every call names one) and its reply counter.
    fn prefetch(&self) {
        crate::hint::prefetch(self.exports.slots.as_ptr());
        if let Some(b) = &self.backlog {
            crate::hint::prefetch(Rc::as_ptr(b));
        }
    }

    /// Polls the calls started in this step once each, in the order they started (E-order);
    /// settles those that completed, which may start calls pipelined on them, polled in turn.
    /// Bounded: every call is started once, and only calls already queued start here.
    fn run_fresh(&mut self, calls: &mut FuturesUnordered<Running>, cx: &mut Context<'_>) {
        while !self.fresh.is_empty() {
            let mut fresh = std::mem::take(&mut self.fresh);
            let mut done = std::mem::take(&mut self.done_now);
            for mut running in fresh.drain(..) {
                match Pin::new(&mut running).poll(cx) {
                    Poll::Ready(d) => done.push(d),
                    Poll::Pending => calls.push(running),
                }
            }
            self.fresh = fresh;
            for (id, ended) in done.drain(..) {
                self.ended(id, ended);
            }
            self.done_now = done;
        }
        // A burst's slots are given back; a steady connection keeps a few.
        if self.fresh.capacity() > FRESH_SLOTS_KEPT {
            self.fresh = Vec::new();
            self.done_now = Vec::new();
        }
    }

    /// One pass of the connection loop (see [`Conn::pass_inner`]), its messages built in the
    /// worker thread's outbox ([`OUTBOX`]) and written from there: only what the socket
    /// does not take at once is copied into the connection's own write buffer.
    fn pass<R: FrameSource + Unpin, W: AsyncWrite + Unpin>(
        &mut self,
        reader: &mut R,
        calls: &mut FuturesUnordered<Running>,
        writer: &mut Writer<W>,
        closing: Pin<&mut impl Future<Output = ()>>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), EngineError>> {
        debug_assert!(
            self.outbox.is_empty(),
            "a pass began with bytes left unsent"
        );
        self.outbox = OUTBOX.take();
        let r = match self.pass_inner(reader, calls, closing, cx) {
            Poll::Pending => self.write_out(writer, cx),
            ended => {
                // The connection ends: its last messages go to the writer's buffer, which
                // `serve_with` finishes.
                writer.append(&self.outbox);
                ended
            }
        };
        // And after the calls that ended in the pass (their queued calls started).
        debug_assert!(self.consistent(), "engine tables inconsistent after a pass");
        let mut outbox = std::mem::take(&mut self.outbox);
        outbox.clear();
        // Bounded: a pass that built a large reply does not leave the thread holding it.
        if outbox.capacity() > OUTBOX_BYTES_KEPT {
            outbox = Vec::new();
        }
        OUTBOX.set(outbox);
        r
    }

    /// Writes what the pass produced: straight from the outbox while no write runs, else
    /// after the running write. `Pending` while the connection goes on.
    fn write_out<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut Writer<W>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), EngineError>> {
        loop {
            if writer.busy() {
                match writer.poll_written(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(EngineError::Write(e))),
                    Poll::Pending => {
                        writer.append(&self.outbox);
                        return Poll::Pending;
                    }
                }
            } else if self.outbox.is_empty() {
                return Poll::Pending;
            } else {
                let sent = writer.send_now(&self.outbox, cx);
                self.outbox.clear();
                match sent {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(EngineError::Write(e))),
                    Poll::Pending => return Poll::Pending,
                }
            }
        }
    }

    /// One pass of the connection loop: the calls that ended (their Returns, and the calls
    /// waiting on them, before more work comes in), then every whole message already
    /// buffered (at most [`MAX_FRAMES_PER_PASS`]), each call started polled once at the end
    /// of its message's step; [`Conn::pass`] then writes what it produced. `Ready` when the
    /// connection ends; sets `again` when it stopped at its bound of frames.
    ///
    /// Nothing else makes the loop pass again: every source that left work for later
    /// returned `Pending` having registered this task's waker (the socket, a waiting call,
    /// the closing signal, the reply backlog, whose writer wakes a paused reader), so a
    /// second pass after a busy one, which found nothing in nearly every case, would cost
    /// each call a socket poll and a waker registration for nothing.
    fn pass_inner<R: FrameSource + Unpin>(
        &mut self,
        reader: &mut R,
        calls: &mut FuturesUnordered<Running>,
        closing: Pin<&mut impl Future<Output = ()>>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), EngineError>> {
        self.again = false;
        if self.closing_may_be_ready(cx) && closing.poll(cx).is_ready() {
            // As `RpcSystem` does: say why, after the replies already written.
            self.write_abort("the server is shutting down", exception::Type::Disconnected);
            return Poll::Ready(Ok(()));
        }
        // Most connections have no call waiting: an empty set is not polled (its poll
        // registers the waker, atomics and all).
        while !calls.is_empty() {
            let Poll::Ready(Some((id, ended))) = calls.poll_next_unpin(cx) else {
                break;
            };
            self.ended(id, ended);
        }
        if !self.fresh.is_empty() {
            self.run_fresh(calls, cx);
        }
        for _ in 0..MAX_FRAMES_PER_PASS {
            // Calls pipelined on calls still running hold the connection's bound: nothing
            // more is read until some start. Those calls are in `calls`, each with this
            // task's waker: the first to return wakes the loop.
            if self.waiting_call_bytes >= self.limits.max_waiting_call_bytes {
                return Poll::Pending;
            }
            // The frame source keeps a half-read frame across the loop's other wake-ups.
            let frame = match Pin::new(&mut *reader).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(None)) => return Poll::Ready(Ok(())),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(EngineError::Read(e))),
                Poll::Ready(Ok(Some(frame))) => frame,
            };
            let step = self.handle(message::Reader::new(frame, self.limits.reader_options));
            // Most steps start nothing on the hook path (no future to build for them).
            if !self.fresh.is_empty() {
                self.run_fresh(calls, cx);
            }
            // Checked after every step in debug builds (tests, the fuzz target).
            debug_assert!(self.consistent(), "engine tables inconsistent");
            match step {
                Ok(true) => {}
                Ok(false) => return Poll::Ready(Ok(())),
                Err(e) => {
                    if let EngineError::Protocol(reason) = &e {
                        self.write_abort(reason, exception::Type::Failed);
                    }
                    return Poll::Ready(Err(e));
                }
            }
        }
        // The bound, not the socket, ended the reads: no waker will say there is more.
        self.again = true;
        Poll::Pending
    }

    /// Whether the closing signal must be polled in this pass (see `closing_seen`): at the
    /// first, after this thread set a signal, or under a waker other than the registered one.
    fn closing_may_be_ready(&mut self, cx: &Context<'_>) -> bool {
        let sets = crate::signal::sets_on_this_thread();
        match &self.closing_seen {
            Some((seen, waker)) if *seen == sets && waker.will_wake(cx.waker()) => false,
            _ => {
                self.closing_seen = Some((sets, cx.waker().clone()));
                true
            }
        }
    }

    /// The tables' invariants (see `Exports::consistent`), answers within their bound, and
    /// the bytes of waiting calls counted as they are held.
    fn consistent(&self) -> bool {
        self.exports.consistent()
            && self.answers.consistent()
            && self.answers.len() <= self.limits.max_answers
            && self.answers.queued_bytes() == self.waiting_call_bytes
    }

    fn send<A: message::Allocator>(&mut self, message: &message::Builder<A>) {
        let before = self.outbox.len();
        // Writing into a Vec cannot fail.
        let _ = capnp::serialize::write_message(&mut self.outbox, message);
        if let Some(b) = &self.backlog {
            b.queued(self.outbox.len() - before);
        }
    }

    fn write_abort(&mut self, reason: &str, kind: exception::Type) {
        let mut m = message::Builder::new_default();
        let mut e = m.init_root::<rpc_message::Builder>().init_abort();
        e.set_reason(reason);
        e.set_type(kind);
        self.send(&m);
    }

    /// Handles one message; `Ok(false)` ends the connection cleanly.
    fn handle(&mut self, m: Incoming) -> Result<bool, EngineError> {
        if let Some(head) = m.get_segments().head {
            // A plain call on an imported capability, already read by the frame layer:
            // what `target` would decide of it, without decoding the Call again.
            self.admit_answer(head.question_id)?;
            let called = self
                .imported(head.import_id)
                .map(|t| (t, head.interface_id, head.method_id));
            self.start_called(head.question_id, m, called);
            return Ok(true);
        }
        let proto = |e: capnp::Error| EngineError::Protocol(e.to_string());
        let root = m.get_root::<rpc_message::Reader>().map_err(proto)?;
        match root.which() {
            Ok(rpc_message::Which::Call(c)) => {
                let c = c.map_err(proto)?;
                let id = c.get_question_id();
                self.admit_answer(id)?;
                // Read from the Call already open here, not from the message's root again.
                let called = self.called(c);
                // The call takes its message with it (its params are read from it).
                self.start_called(id, m, called);
            }
            Ok(rpc_message::Which::Bootstrap(b)) => {
                let id = b.map_err(proto)?.get_question_id();
                self.bootstrap(id)?;
            }
            Ok(rpc_message::Which::Finish(f)) => {
                let f = f.map_err(proto)?;
                self.finish(f.get_question_id(), f.get_release_result_caps())?;
            }
            Ok(rpc_message::Which::Release(r)) => {
                let r = r.map_err(proto)?;
                self.exports.release(r.get_id(), r.get_reference_count())?;
            }
            Ok(rpc_message::Which::Abort(e)) => {
                let reason = e
                    .ok()
                    .and_then(|e| e.get_reason().ok())
                    .and_then(|r| r.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                return Err(EngineError::PeerAborted(reason));
            }
            // We never send what a peer could answer with Unimplemented (no Resolve, no
            // calls to the peer), so there is nothing to undo.
            Ok(rpc_message::Which::Unimplemented(_)) => {}
            // Only needed when a promise the peer called through resolves back to the
            // peer or elsewhere; every capability this server returns is settled and its
            // own, so a Disembargo is a peer that does not follow the protocol.
            Ok(rpc_message::Which::Disembargo(_)) => {
                return Err(EngineError::Protocol(
                    "Disembargo is never needed with this server: it returns no promises".into(),
                ));
            }
            Ok(rpc_message::Which::Return(_)) => {
                return Err(EngineError::Protocol(
                    "Return for a question this server never asked".into(),
                ));
            }
            // Level 2+ and obsolete messages, and kinds from newer versions: echoed, as
            // the protocol asks of a peer that does not implement them.
            Ok(_) | Err(_) => {
                let mut reply = message::Builder::new_default();
                reply
                    .init_root::<rpc_message::Builder>()
                    .set_unimplemented(root)
                    .map_err(proto)?;
                self.send(&reply);
            }
        }
        Ok(true)
    }

    fn admit_answer(&self, id: u32) -> Result<(), EngineError> {
        if self.answers.contains(id) {
            return Err(EngineError::Protocol(format!(
                "question id {id} is already in use"
            )));
        }
        if self.answers.len() >= self.limits.max_answers {
            return Err(EngineError::Protocol(format!(
                "more than {} questions outstanding",
                self.limits.max_answers
            )));
        }
        Ok(())
    }

    /// Gives question `id` a running answer unless it has one: every call has one from
    /// its start to its Return, except a direct call answered at once, which never needs
    /// one (its id was admitted, and is free again as soon as it returns).
    fn ensure_answer(&mut self, id: u32) {
        if !self.answers.contains(id) {
            self.answers.insert(id, Answer::running());
        }
    }

    fn bootstrap(&mut self, id: u32) -> Result<(), EngineError> {
        self.admit_answer(id)?;
        let mut built = Built::new_return(id);
        let cap = self.bootstrap.add_ref();
        match built.content_mut() {
            Ok(mut content) => content.set_as_capability(cap),
            Err(e) => return Err(EngineError::Protocol(e.to_string())),
        }
        let (built, exports) = self.write_results(built);
        self.answers.insert(
            id,
            Answer {
                state: AnswerState::Returned {
                    built: Box::new(built),
                    exports,
                },
                finished: false,
                release_on_return: false,
            },
        );
        Ok(())
    }

    /// Starts (or queues, or fails) the call `m` whose question id `id` is admitted. Its
    /// answer may exist already (made when it was queued, with calls queued on it).
    fn start(&mut self, id: u32, m: Incoming) {
        self.ensure_answer(id);
        let called = call_of(&m).and_then(|c| self.called(c));
        self.start_called(id, m, called);
    }

    /// What a Call addresses: its target, interface and method.
    fn called(&self, c: call::Reader<'_>) -> Result<(Target, u64, u16), capnp::Error> {
        Ok((self.target(c)?, c.get_interface_id(), c.get_method_id()))
    }

    /// [`start`](Self::start) of a call whose answer exists and whose address is read
    /// (`called`): the Call is read once for that; its params once more, by the handler.
    fn start_called(
        &mut self,
        id: u32,
        m: Incoming,
        called: Result<(Target, u64, u16), capnp::Error>,
    ) {
        let (target, interface_id, method_id) = match called {
            Ok((Target::Wait(on), ..)) => {
                self.ensure_answer(id);
                let bytes = message_bytes(&m);
                if let Some(Answer {
                    state: AnswerState::Running { queued },
                    ..
                }) = self.answers.get_mut(on)
                {
                    queued.push(m);
                    self.waiting_call_bytes += bytes;
                }
                return;
            }
            Ok(called) => called,
            Err(e) => {
                self.ensure_answer(id);
                self.settle(id, Err(e), None);
                return;
            }
        };
        let mut deferred = None;
        if let Target::Export(export) = &target {
            if let Some(direct) = self.exports.direct(*export) {
                match self.call_direct(id, direct, interface_id, method_id, &m) {
                    Now::Done(_) => return,
                    Now::Defer(d) => deferred = Some(d),
                    Now::Wait(w) => {
                        // An answer while it waits: calls pipelined on it queue there, and
                        // a Finish finds it.
                        self.ensure_answer(id);
                        self.fresh.push(Running {
                            id,
                            work: Work::Wait(Some(w)),
                        });
                        return;
                    }
                    Now::Elsewhere => {}
                }
            }
        }
        self.ensure_answer(id);
        let done = Rc::new(Cell::new(None));
        let results = EngineResults {
            built: Some(Built::new_return(id)),
            done: Rc::clone(&done),
        };
        let params = Box::new(EngineParams(m));
        // An export is called through the table's own reference (no new one per call).
        let hook = match &target {
            Target::Export(export) => self.exports.get(*export),
            Target::Cap(hook) => Some(hook.as_ref()),
            Target::Wait(_) => None,
        };
        let promise = match (deferred, hook) {
            (Some(d), _) => d(params, Box::new(results)),
            (None, Some(hook)) => hook.call(interface_id, method_id, params, Box::new(results)),
            (None, None) => {
                Promise::err(capnp::Error::failed("call to an unknown capability".into()))
            }
        };
        self.fresh.push(Running {
            id,
            work: Work::Hook { promise, done },
        });
    }

    /// The direct path: a call to an object that answers it at once ([`Direct`]) is run
    /// here, its results built in the connection's scratch segment and queued behind a
    /// fixed Return header, without an answer slot, with none of the hook path's boxes (params, results, promise, the cell its
    /// results come back in) and no poll. A call it does not serve (`Elsewhere`), or that
    /// must wait (`Defer`), goes on down the hook path; neither wrote anything.
    fn call_direct(
        &mut self,
        id: u32,
        direct: Rc<dyn Direct>,
        interface_id: u64,
        method_id: u16,
        m: &Incoming,
    ) -> Now {
        // The params through a view from their pointer when the frame layer found that it
        // reads them exactly (`Frame::params_at`), else from the message's root.
        let frame = m.get_segments();
        let view = frame.params_at.and_then(|at| {
            let segment = capnp::message::ReaderSegments::get_segment(frame, 0)?;
            crate::frames::content_view(segment, at as usize, self.limits.reader_options)
        });
        let params = match &view {
            Some(view) => view.get_root::<any_pointer::Reader<'_>>(),
            None => crate::frames::call_params(m),
        };
        // Both ways read the same tree (what the frame layer's walk promised).
        debug_assert!(
            frame.params_at.is_none_or(|at| {
                capnp::message::ReaderSegments::get_segment(frame, 0).is_some_and(|segment| {
                    crate::frames::reads_alike(
                        segment,
                        at as usize,
                        frame,
                        self.limits.reader_options,
                    )
                })
            }),
            "the params read through a view and from the root differ"
        );
        let params = match params {
            Ok(p) => p,
            // The hook path reads the params again and fails that call alike.
            Err(_) => return Now::Elsewhere,
        };
        let arrived = frame.arrived;
        self.direct_results(id, |results| {
            crate::local::with_arrival(arrived, || {
                direct.call_now(interface_id, method_id, params, results)
            })
        })
    }

    /// Answers a waiting direct call ([`Now::Wait`]) that is ready, as the direct path
    /// answers.
    fn answer_waiting(&mut self, id: u32, mut waiting: Pin<Box<dyn Waiting>>) {
        let now = self.direct_results(id, |results| Now::Done(waiting.as_mut().answer(results)));
        if !matches!(now, Now::Done(Ok(()))) {
            // No results message to write into (never, short of the scratch segment's
            // root failing): the call still gets its Return.
            self.ensure_answer(id);
            self.settle(
                id,
                Err(capnp::Error::failed(
                    "the call's results could not be built".into(),
                )),
                None,
            );
        }
    }

    /// Has `write` write a direct call's results, built in the connection's scratch
    /// segment, and queues them behind a fixed Return header; settles the call with its
    /// error if it failed. What `write` says it did, but a failure, which is answered here
    /// (`Done(Ok)`).
    fn direct_results(
        &mut self,
        id: u32,
        write: impl FnOnce(any_pointer::Builder<'_>) -> Now,
    ) -> Now {
        // Taken out while the message borrows it (put back below; a call that somehow came
        // in between would find none and make its own).
        let mut scratch = SCRATCH.take();
        if scratch.len() != SCRATCH_WORDS {
            scratch = capnp::Word::allocate_zeroed_vec(SCRATCH_WORDS);
        }
        let now = {
            let mut alloc = message::ScratchSpaceHeapAllocator::new(
                capnp::Word::words_to_bytes_mut(&mut scratch),
            );
            // The results alone, as the root of their own message: the Return around them
            // is a fixed header (`queue_direct_return`). Results without capabilities, the
            // only kind this path writes.
            let mut message = message::Builder::new(&mut alloc);
            let now = match message.get_root::<any_pointer::Builder<'_>>() {
                Ok(results) => write(results),
                Err(_) => Now::Elsewhere,
            };
            match now {
                Now::Done(Ok(())) => match self.queue_direct_return(id, message) {
                    Ok(()) => {
                        // Answered without a capability. A call that started from a queue,
                        // or waited, has an answer, which calls may have been pipelined on
                        // meanwhile.
                        if let Some(Answer {
                            state: AnswerState::Running { queued },
                            ..
                        }) = self.answers.remove(id)
                        {
                            self.fail_pipelined(id, queued);
                        }
                        Now::Done(Ok(()))
                    }
                    Err(e) => Now::Done(Err(e)),
                },
                other => other,
            }
        };
        SCRATCH.set(scratch);
        match now {
            Now::Done(Err(e)) => {
                self.ensure_answer(id);
                self.settle(id, Err(e), None);
                Now::Done(Ok(()))
            }
            other => other,
        }
    }

    /// Settles a call that ended.
    fn ended(&mut self, id: u32, ended: Ended) {
        match ended {
            Ended::Hook(result, done) => self.settle(id, result, done.take()),
            Ended::Wait(waiting) => self.answer_waiting(id, waiting),
        }
    }

    /// Queues the Return of answer `id` whose results are the root of `results` (a
    /// direct call's): a fixed header, then the results' words as they are. The header says
    /// what [`init_return`] says (results, `noFinishNeeded`, a null cap table), so the bytes
    /// are the ones capnp would build, without building the four structs again per call.
    /// Results that spilled past one segment (a large value) are copied into a Return
    /// built by capnp instead, in one segment of their size, and freed before it is
    /// queued (so a large value is held twice at most, as when it was built in place).
    fn queue_direct_return<A: message::Allocator>(
        &mut self,
        id: u32,
        results: message::Builder<A>,
    ) -> capnp::Result<()> {
        let segments = results.get_segments_for_output();
        if let [segment] = &segments[..] {
            if let Some(header) = direct_return(id, segment) {
                let before = self.outbox.len();
                self.outbox.extend_from_slice(&header);
                self.outbox.extend_from_slice(&segment[8..]);
                if let Some(b) = &self.backlog {
                    b.queued(self.outbox.len() - before);
                }
                return Ok(());
            }
        }
        let words = results.size_in_words() + DIRECT_RETURN_WORDS;
        let mut m = message::Builder::new(
            HeapAllocator::new().first_segment_words(u32::try_from(words).unwrap_or(u32::MAX)),
        );
        init_return(&mut m, id).set_as(results.get_root_as_reader::<any_pointer::Reader<'_>>()?)?;
        drop(results);
        self.send(&m);
        Ok(())
    }

    /// A call's target when it names export `export` (`importedCap`).
    fn imported(&self, export: u32) -> Result<Target, capnp::Error> {
        if self.exports.is_live(export) {
            Ok(Target::Export(export))
        } else {
            Err(capnp::Error::failed(format!(
                "call to unknown capability {export}"
            )))
        }
    }

    /// The capability a call is addressed to.
    fn target(&self, c: call::Reader<'_>) -> Result<Target, capnp::Error> {
        if !matches!(
            c.get_send_results_to().which()?,
            call::send_results_to::Caller(())
        ) {
            return Err(capnp::Error::unimplemented(
                "results can only be sent to the caller".into(),
            ));
        }
        if c.get_params()?.has_cap_table() && !c.get_params()?.get_cap_table()?.is_empty() {
            return Err(capnp::Error::failed(
                "this server accepts no capabilities in parameters".into(),
            ));
        }
        match c.get_target()?.which()? {
            message_target::ImportedCap(export) => self.imported(export),
            message_target::PromisedAnswer(p) => {
                let p = p?;
                let on = p.get_question_id();
                // Transforms are a field or two deep: read them onto the stack.
                let transform = p.get_transform()?;
                let mut ops = [PipelineOp::Noop; MAX_TRANSFORM_OPS];
                if transform.len() as usize > MAX_TRANSFORM_OPS {
                    return Err(capnp::Error::failed(format!(
                        "transform of {} steps; at most {MAX_TRANSFORM_OPS}",
                        transform.len()
                    )));
                }
                for (slot, op) in ops.iter_mut().zip(transform.iter()) {
                    *slot = match op.which()? {
                        capnp_rpc::rpc_capnp::promised_answer::op::Noop(()) => PipelineOp::Noop,
                        capnp_rpc::rpc_capnp::promised_answer::op::GetPointerField(i) => {
                            PipelineOp::GetPointerField(i)
                        }
                    };
                }
                let ops = &ops[..transform.len() as usize];
                match self.answers.get(on).map(|a| &a.state) {
                    None => Err(capnp::Error::failed(format!(
                        "call pipelined on question {on}, which has no answer (finished, or \
                         its results held no capability)"
                    ))),
                    Some(AnswerState::Running { .. }) => Ok(Target::Wait(on)),
                    Some(AnswerState::Failed(e)) => Err(e.clone()),
                    Some(AnswerState::Returned { built, .. }) => {
                        let hook = built.content()?.get_pipelined_cap(ops)?;
                        // Every capability of a Return is exported with it: calling the
                        // export is calling the same object, through the table's own
                        // reference and on the direct path when it has one. A client that
                        // keeps addressing a capability through the answer it came in
                        // (capkv's own does, for `open(t).kv`) costs what one calling the
                        // import does.
                        Ok(match self.exports.id_of(hook.as_ref()) {
                            Some(export) => Target::Export(export),
                            None => Target::Cap(hook),
                        })
                    }
                }
            }
        }
    }

    fn return_error(&mut self, id: u32, e: &capnp::Error) {
        let mut m = message::Builder::new_default();
        let mut ret = m.init_root::<rpc_message::Builder>().init_return();
        ret.set_answer_id(id);
        write_exception(e, ret.init_exception());
        self.send(&m);
    }

    /// Sends a Return with results: exports its capabilities (one reference per pointer),
    /// and sets `noFinishNeeded` when there are none. Returns the message, kept for calls
    /// pipelined on it, and the export id of each capability pointer.
    fn write_results(&mut self, mut built: Built) -> (Built, Vec<u32>) {
        let exports: Vec<u32> = built
            .cap_table
            .iter()
            .flatten()
            .map(|hook| self.exports.add(hook.as_ref()))
            .collect();
        let Built { message, cap_table } = &mut built;
        if cap_table.is_empty() {
            // Already a capability-free Return (see `Built::new_return`).
            self.send(&built.message);
            return (built, exports);
        }
        if let Ok(root) = message.get_root::<rpc_message::Builder>() {
            if let Ok(rpc_message::Which::Return(Ok(mut ret))) = root.which() {
                ret.set_no_finish_needed(exports.is_empty());
                if let Ok(return_::Which::Results(Ok(payload))) = ret.which() {
                    let mut table = payload.init_cap_table(cap_table.len() as u32);
                    let mut ids = exports.iter();
                    for (i, cap) in cap_table.iter().enumerate() {
                        let mut d = table.reborrow().get(i as u32);
                        match (cap, cap.as_ref().and_then(|_| ids.next())) {
                            (Some(_), Some(&id)) => d.set_sender_hosted(id),
                            _ => d.set_none(()),
                        }
                    }
                }
            }
        }
        self.send(&built.message);
        (built, exports)
    }

    /// A call ended (or could not start): its Return goes out, then the calls pipelined on
    /// it start, in the order they came. Its answer stays for later pipelined calls and
    /// the peer's Finish when it holds capabilities or an exception; results without a
    /// capability are answered `noFinishNeeded` and dropped at once.
    fn settle(&mut self, id: u32, result: Result<(), capnp::Error>, built: Option<Built>) {
        let (queued, finished, release) = match self.answers.get_mut(id) {
            Some(Answer {
                state: AnswerState::Running { queued },
                finished,
                release_on_return,
            }) => (std::mem::take(queued), *finished, *release_on_return),
            _ => return,
        };
        let state = match (result, built) {
            (Ok(()), Some(built)) => {
                let (built, exports) = self.write_results(built);
                if exports.is_empty() {
                    // The common case (a get, a put): answered `noFinishNeeded`, so it
                    // goes at once; calls pipelined on it meanwhile fail.
                    self.answers.remove(id);
                    self.fail_pipelined(id, queued);
                    return;
                }
                AnswerState::Returned {
                    built: Box::new(built),
                    exports,
                }
            }
            (result, _) => {
                let e = result.err().unwrap_or_else(|| {
                    capnp::Error::failed("the call ended without results".into())
                });
                self.return_error(id, &e);
                AnswerState::Failed(e)
            }
        };
        self.answers.insert(
            id,
            Answer {
                state,
                finished,
                release_on_return: release,
            },
        );
        self.start_queued(queued);
        // Kept for pipelined calls and the peer's Finish, unless that came already.
        if finished {
            if let Some(Answer {
                state: AnswerState::Returned { exports, .. },
                ..
            }) = self.answers.remove(id)
            {
                if finished && release {
                    for e in exports {
                        // Ours to release: the peer never saw these references.
                        let _ = self.exports.release(e, 1);
                    }
                }
            }
        }
    }

    /// The calls `queued` on answer `id`, which returned results without a capability
    /// (and is gone): each fails, that call only (rare: a peer that pipelines on a
    /// capability-free result).
    fn fail_pipelined(&mut self, id: u32, queued: Vec<Incoming>) {
        if queued.is_empty() {
            return;
        }
        let e = capnp::Error::failed(format!(
            "call pipelined on question {id}, whose results hold no capability"
        ));
        // Failed while they start (they fail on it), then gone as the Return said.
        self.answers.insert(
            id,
            Answer {
                state: AnswerState::Failed(e),
                finished: false,
                release_on_return: false,
            },
        );
        self.start_queued(queued);
        self.answers.remove(id);
    }

    /// Starts the calls that were queued on an answer, in the order they came.
    fn start_queued(&mut self, queued: Vec<Incoming>) {
        for m in queued {
            self.waiting_call_bytes = self.waiting_call_bytes.saturating_sub(message_bytes(&m));
            if let Ok(qid) = call_of(&m).map(|c| c.get_question_id()) {
                self.start(qid, m);
            }
        }
    }

    fn finish(&mut self, id: u32, release: bool) -> Result<(), EngineError> {
        let Some(answer) = self.answers.get_mut(id) else {
            // Already dropped (noFinishNeeded, or results without capabilities): fine.
            return Ok(());
        };
        match &mut answer.state {
            AnswerState::Running { .. } => {
                answer.finished = true;
                answer.release_on_return = release;
            }
            AnswerState::Failed(_) => {
                self.answers.remove(id);
            }
            AnswerState::Returned { .. } => {
                if let Some(Answer {
                    state: AnswerState::Returned { exports, .. },
                    ..
                }) = self.answers.remove(id)
                {
                    if release {
                        for e in exports {
                            self.exports.release(e, 1)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

enum Target {
    /// A pipelined capability, resolved for this call.
    Cap(Box<dyn ClientHook>),
    /// The export the call names (`importedCap`), found in the table.
    Export(u32),
    /// Pipelined on this answer, still running.
    Wait(u32),
}

fn write_exception(e: &capnp::Error, mut b: exception::Builder<'_>) {
    let kind = match e.kind {
        capnp::ErrorKind::Overloaded => exception::Type::Overloaded,
        capnp::ErrorKind::Disconnected => exception::Type::Disconnected,
        capnp::ErrorKind::Unimplemented => exception::Type::Unimplemented,
        _ => exception::Type::Failed,
    };
    b.set_type(kind);
    match e.kind {
        capnp::ErrorKind::Failed
        | capnp::ErrorKind::Overloaded
        | capnp::ErrorKind::Disconnected
        | capnp::ErrorKind::Unimplemented => b.set_reason(&e.extra),
        // Decoding kinds say what went wrong in the kind itself.
        _ => b.set_reason(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use script::ScriptCap;

    /// What one connection's loop costs in memory, for the server's own reader and socket:
    /// every connection holds this future for its life (1,232 bytes before its ending was
    /// boxed; a server with thousands of connections pays it thousands of times).
    #[test]
    fn a_connection_loop_stays_small() {
        fn size_of_future<A, B, C, D, E, G, F>(_: impl FnOnce(A, B, C, D, E, G) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        type Reader = crate::frames::GuardedReader<
            tokio_util::compat::Compat<tokio::net::tcp::OwnedReadHalf>,
        >;
        type Socket = tokio_util::compat::Compat<tokio::net::tcp::OwnedWriteHalf>;
        let bytes = size_of_future(serve_with::<Reader, Socket>);
        assert!(bytes <= 1024, "serve_with's future is {bytes} bytes");
    }

    #[test]
    fn the_same_object_twice_is_one_export_released_by_its_count() {
        let mut ex = Exports::default();
        let a = ex.add(&ScriptCap::new(7));
        assert_eq!(ex.add(&ScriptCap::new(7)), a);
        let b = ex.add(&ScriptCap::new(8));
        assert_ne!(a, b);
        assert!(ex.release(a, 3).is_err(), "over-release");
        ex.release(a, 2).unwrap();
        assert!(ex.get(a).is_none());
        assert_eq!(ex.live(), 1);
        // The freed id is reused.
        assert_eq!(ex.add(&ScriptCap::new(9)), a);
    }

    /// A capability called directly, then released, is gone: the next call on its id fails
    /// (the export remembered for direct calls goes with it) and the connection stays up.
    #[test]
    fn a_call_after_its_export_was_released_fails() {
        use capkv::kv_capnp::kv_store;
        on_local_set(async {
            let cap: kv_store::Client = crate::local::new_direct_client(TwoWays);
            let mut input = Vec::new();
            queue(&mut input, |m| m.init_bootstrap().set_question_id(0));
            // The bootstrap's answer finished, its capability kept.
            queue(&mut input, |m| {
                let mut f = m.init_finish();
                f.set_question_id(0);
                f.set_release_result_caps(false);
            });
            for id in [1, 2] {
                queue_get(&mut input, id, 0, b"a", None);
                if id == 1 {
                    queue(&mut input, |m| {
                        let mut r = m.init_release();
                        r.set_id(0);
                        r.set_reference_count(1);
                    });
                }
            }
            let bytes = serve_all(input, cap.client.hook, 3).await;
            let mut answers = Vec::new();
            for m in written(&bytes) {
                let root = m.get_root::<rpc_message::Reader>().unwrap();
                if let Ok(rpc_message::Which::Return(Ok(ret))) = root.which() {
                    let failed = match ret.which().unwrap() {
                        return_::Which::Exception(e) => {
                            Some(e.unwrap().get_reason().unwrap().to_string().unwrap())
                        }
                        _ => None,
                    };
                    answers.push((ret.get_answer_id(), failed));
                }
            }
            assert_eq!(answers.len(), 3, "{answers:?}");
            assert_eq!(answers[1], (1, None), "the first call was answered");
            let (id, failed) = &answers[2];
            assert_eq!(*id, 2);
            assert!(
                failed
                    .as_deref()
                    .is_some_and(|r| r.contains("unknown capability 0")),
                "{failed:?}"
            );
        });
    }

    /// Ids below `DENSE_IDS` live in the slab, higher ones in the ordered map; both count,
    /// replace and remove alike, and the slab never grows past its bound.
    #[test]
    fn answers_by_any_question_id() {
        let mut a = Answers::default();
        for id in [0, 3, DENSE_IDS - 1, DENSE_IDS, u32::MAX] {
            assert!(!a.contains(id));
            a.insert(id, Answer::running());
            assert!(a.contains(id));
        }
        assert_eq!(a.len(), 5);
        // Replacing is not adding.
        a.insert(3, Answer::running());
        assert_eq!(a.len(), 5);
        assert!(a.consistent());
        assert!(a.dense.len() <= DENSE_IDS as usize);
        for id in [3, u32::MAX, DENSE_IDS] {
            assert!(a.remove(id).is_some());
            assert!(a.remove(id).is_none());
            assert!(a.get(id).is_none());
        }
        assert_eq!(a.len(), 2);
        assert!(a.get_mut(0).is_some() && a.get_mut(DENSE_IDS - 1).is_some());
        assert!(a.consistent());
    }

    /// Runs `f` to completion on a current-thread runtime's `LocalSet`, as a worker does.
    fn on_local_set<F: Future>(f: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, f)
    }

    /// Serves the messages `input` holds to `bootstrap`, as a peer that sends them all at
    /// once and hangs up after `replies` messages have come back (it reads its answers
    /// before it closes); what the engine wrote.
    async fn serve_all(input: Vec<u8>, bootstrap: Box<dyn ClientHook>, replies: usize) -> Vec<u8> {
        serve_all_with(input, bootstrap, replies, EngineLimits::default()).await
    }

    /// [`serve_all`] within `limits`.
    async fn serve_all_with(
        input: Vec<u8>,
        bootstrap: Box<dyn ClientHook>,
        replies: usize,
        limits: EngineLimits,
    ) -> Vec<u8> {
        let out = Rc::new(std::cell::RefCell::new(Vec::new()));
        let woken = Rc::new(Cell::new(None));
        let peer = Peer {
            input: std::io::Cursor::new(input),
            out: Rc::clone(&out),
            replies,
            woken: Rc::clone(&woken),
        };
        serve(
            crate::frames::ByteFrames::new(peer, 1 << 20),
            Counting(Rc::new(Cell::new(0)), Rc::clone(&out), Some(woken)),
            bootstrap,
            limits,
            Closer::default(),
        )
        .await
        .unwrap();
        out.take()
    }

    /// The sending half of [`serve_all`]'s peer.
    struct Peer {
        input: std::io::Cursor<Vec<u8>>,
        out: Rc<std::cell::RefCell<Vec<u8>>>,
        replies: usize,
        /// Where the engine's writes wake the peer (it hangs up once the replies are in).
        woken: Rc<Cell<Option<std::task::Waker>>>,
    }

    impl futures::io::AsyncRead for Peer {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = std::io::Read::read(&mut self.input, buf)?;
            if n > 0 || written(&self.out.borrow()).len() >= self.replies {
                return Poll::Ready(Ok(n));
            }
            self.woken.set(Some(cx.waker().clone()));
            Poll::Pending
        }
    }

    /// The messages in `bytes`, as the engine wrote them.
    fn written(mut bytes: &[u8]) -> Vec<message::Reader<capnp::serialize::OwnedSegments>> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            out.push(capnp::serialize::read_message(&mut bytes, ReaderOptions::new()).unwrap());
        }
        out
    }

    /// A KvStore whose `get` is served both ways, telling in its value which way ran: the
    /// direct path (`Direct`), the rest of a deferred direct call, or the hook path
    /// (`getMany`, which the direct path leaves to it).
    struct TwoWays;

    fn answer_get(mut results: capkv::kv_capnp::kv_store::get_results::Builder<'_>, value: &str) {
        let mut e = results.reborrow().init_result().init_ok();
        e.set_value(value.as_bytes());
    }

    impl capkv::kv_capnp::kv_store::Server for TwoWays {
        async fn get(
            self: Rc<Self>,
            _: capkv::kv_capnp::kv_store::GetParams,
            mut results: capkv::kv_capnp::kv_store::GetResults,
        ) -> Result<(), capnp::Error> {
            answer_get(results.get(), "hook");
            Ok(())
        }
        async fn get_many(
            self: Rc<Self>,
            _: capkv::kv_capnp::kv_store::GetManyParams,
            mut results: capkv::kv_capnp::kv_store::GetManyResults,
        ) -> Result<(), capnp::Error> {
            results.get().init_result().init_ok().set_revision(7);
            Ok(())
        }
    }

    impl Direct for TwoWays {
        fn call_now(
            self: Rc<Self>,
            _interface_id: u64,
            method_id: u16,
            params: any_pointer::Reader<'_>,
            results: any_pointer::Builder<'_>,
        ) -> Now {
            use capkv::kv_capnp::kv_store;
            if method_id != 0 {
                return Now::Elsewhere;
            }
            let key = params
                .get_as::<kv_store::get_params::Reader>()
                .and_then(|p| p.get_key())
                .unwrap_or_default()
                .to_vec();
            match &key[..] {
                b"defer" => Now::Defer(Box::new(|_params, results| {
                    let mut results =
                        capnp::capability::Results::<kv_store::get_results::Owned>::new(results);
                    Promise::from_future(async move {
                        tokio::task::yield_now().await;
                        answer_get(results.get(), "deferred");
                        Ok(())
                    })
                })),
                b"wait" => YieldThen::waiting(false, false),
                b"waitfail" => YieldThen::waiting(true, false),
                b"waitlarge" => YieldThen::waiting(false, true),
                b"fail" => Now::Done(Err(capnp::Error::failed("refused directly".into()))),
                // Past the scratch segment: the Return is built by capnp around a copy.
                b"large" => {
                    answer_get(results.get_as().unwrap(), &"x".repeat(4000));
                    Now::Done(Ok(()))
                }
                _ => {
                    answer_get(results.get_as().unwrap(), "direct");
                    Now::Done(Ok(()))
                }
            }
        }
    }

    /// Queues a `KvStore` Call `id` of `method` with get's params (`key`), on export 0
    /// (`on: None`) or pipelined on the answer to question `on`.
    fn queue_get(out: &mut Vec<u8>, id: u32, method: u16, key: &[u8], on: Option<u32>) {
        use capkv::kv_capnp::kv_store;
        use capnp::traits::HasTypeId;
        queue(out, |m| {
            init_call_on(m, id, kv_store::Client::TYPE_ID, method, on)
                .init_params()
                .init_content()
                .init_as::<kv_store::get_params::Builder>()
                .set_key(key);
        });
    }

    /// Starts a Call `id` of `method` on export 0 (`on: None`) or pipelined on the answer
    /// to question `on`; its params are left to the caller.
    fn init_call_on(
        m: rpc_message::Builder<'_>,
        id: u32,
        interface_id: u64,
        method: u16,
        on: Option<u32>,
    ) -> call::Builder<'_> {
        let mut c = m.init_call();
        c.set_question_id(id);
        c.set_interface_id(interface_id);
        c.set_method_id(method);
        match on {
            Some(q) => c
                .reborrow()
                .init_target()
                .init_promised_answer()
                .set_question_id(q),
            None => c.reborrow().init_target().set_imported_cap(0),
        }
        c
    }

    /// A waiting direct call ([`Now::Wait`]): ready after one yield, then answers (past the
    /// scratch segment when `large`) or fails.
    struct YieldThen {
        yielded: bool,
        fail: bool,
        large: bool,
    }

    impl YieldThen {
        fn waiting(fail: bool, large: bool) -> Now {
            Now::Wait(Box::pin(YieldThen {
                yielded: false,
                fail,
                large,
            }))
        }
    }

    impl crate::local::Waiting for YieldThen {
        fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if std::mem::replace(&mut self.yielded, true) {
                Poll::Ready(())
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }

        fn answer(self: Pin<&mut Self>, results: any_pointer::Builder<'_>) -> capnp::Result<()> {
            assert!(self.yielded, "answered before it was ready");
            if self.fail {
                return Err(capnp::Error::failed("waited and failed".into()));
            }
            let value = if self.large {
                "w".repeat(4000)
            } else {
                "waited".into()
            };
            answer_get(results.get_as()?, &value);
            Ok(())
        }
    }

    /// A direct call that waits is answered once ready, after calls that came later and
    /// did not wait; a call pipelined on it waits for it and then fails (its results hold
    /// no capability); a Finish sent while it waits does not lose its answer (nor its
    /// failure); a failure is the call's exception, and the exception of the calls pipelined
    /// on it; results past the scratch segment leave whole.
    #[test]
    fn a_waiting_direct_call_is_answered_once_ready() {
        use capkv::kv_capnp::kv_store;
        on_local_set(async {
            let cap: kv_store::Client = crate::local::new_direct_client(TwoWays);
            let mut input = Vec::new();
            queue(&mut input, |m| m.init_bootstrap().set_question_id(0));
            // (question, key, pipelined on this answer)
            let calls: [(u32, &str, Option<u32>); 6] = [
                (1, "wait", None),
                (2, "a", Some(1)),
                (3, "waitfail", None),
                (4, "a", None),
                (5, "a", Some(3)),
                (6, "waitlarge", None),
            ];
            for (id, key, on) in calls {
                queue_get(&mut input, id, 0, key.as_bytes(), on);
            }
            // Questions 1 and 3 finished while they wait (3 then fails).
            queue(&mut input, |m| m.init_finish().set_question_id(1));
            queue(&mut input, |m| m.init_finish().set_question_id(3));
            let bytes = serve_all(input, cap.client.hook, 7).await;
            let mut order = Vec::new();
            for m in written(&bytes) {
                let root = m.get_root::<rpc_message::Reader>().unwrap();
                let Ok(rpc_message::Which::Return(Ok(ret))) = root.which() else {
                    continue;
                };
                let what = match ret.which().unwrap() {
                    return_::Which::Results(_) if ret.get_answer_id() == 0 => "bootstrap".into(),
                    return_::Which::Results(p) => {
                        assert!(ret.get_no_finish_needed());
                        let r = p
                            .unwrap()
                            .get_content()
                            .get_as::<kv_store::get_results::Reader>()
                            .unwrap();
                        match r.get_result().unwrap().which().unwrap() {
                            capkv::kv_capnp::get_result::Which::Ok(e) => {
                                String::from_utf8(e.unwrap().get_value().unwrap().to_vec()).unwrap()
                            }
                            _ => "error".into(),
                        }
                    }
                    return_::Which::Exception(e) => {
                        e.unwrap().get_reason().unwrap().to_string().unwrap()
                    }
                    _ => "other".into(),
                };
                order.push((ret.get_answer_id(), what));
            }
            let order: Vec<(u32, &str)> = order.iter().map(|(k, v)| (*k, v.as_str())).collect();
            assert_eq!(
                order,
                [
                    (0, "bootstrap"),
                    (4, "direct"),
                    (1, "waited"),
                    (
                        2,
                        "call pipelined on question 1, whose results hold no capability"
                    ),
                    (3, "waited and failed"),
                    (5, "waited and failed"),
                    (6, "w".repeat(4000).as_str()),
                ]
            );
        });
    }

    /// Calls pipelined on calls still running are held up to the connection's byte limit;
    /// at it, nothing more is read until they start: the call after them is read once the
    /// call they wait on has returned (it then finds that answer gone, where the held ones
    /// failed on its capability-free results). (That the count follows what is held, and
    /// comes back when they start, the tables' consistency check asserts after every step
    /// and pass.)
    #[test]
    fn calls_waiting_on_a_running_call_are_held_up_to_a_byte_limit() {
        on_local_set(async {
            let cap: capkv::kv_capnp::kv_store::Client = crate::local::new_direct_client(TwoWays);
            let mut one = Vec::new();
            queue_get(&mut one, 2, 0, b"a", Some(1));
            // One segment: its table is one word.
            let call_bytes = one.len() - 8;
            let mut input = Vec::new();
            queue(&mut input, |m| m.init_bootstrap().set_question_id(0));
            queue_get(&mut input, 1, 0, b"wait", None);
            for id in 2..=4 {
                queue_get(&mut input, id, 0, b"a", Some(1));
            }
            // Read once question 1 has returned: the bytes held are free again.
            queue_get(&mut input, 5, 0, b"wait", None);
            queue_get(&mut input, 6, 0, b"a", Some(5));
            let limits = EngineLimits {
                max_waiting_call_bytes: 2 * call_bytes,
                ..Default::default()
            };
            let bytes = serve_all_with(input, cap.client.hook, 7, limits).await;
            let mut answers = Vec::new();
            for m in written(&bytes) {
                let root = m.get_root::<rpc_message::Reader>().unwrap();
                let Ok(rpc_message::Which::Return(Ok(ret))) = root.which() else {
                    continue;
                };
                let what = match ret.which().unwrap() {
                    return_::Which::Exception(e) => {
                        let reason = e.unwrap().get_reason().unwrap().to_string().unwrap();
                        if reason.contains("which has no answer") {
                            "read after its answer went"
                        } else {
                            "failed on its results"
                        }
                    }
                    _ => "results",
                };
                answers.push((ret.get_answer_id(), what));
            }
            answers.sort();
            assert_eq!(
                answers,
                [
                    (0, "results"),
                    (1, "results"),
                    // Held, then failed on results without a capability.
                    (2, "failed on its results"),
                    (3, "failed on its results"),
                    // Not read while 2 and 3 held the bound.
                    (4, "read after its answer went"),
                    (5, "results"),
                    (6, "failed on its results"),
                ]
            );
        });
    }

    /// Calls on an export whose object is [`Direct`] are answered by it at once; what it
    /// defers finishes on the hook path's params and results; what it leaves (`Elsewhere`)
    /// reaches the hook; a direct failure is the call's exception. And the registry holds
    /// the object only while it lives.
    #[test]
    fn a_direct_object_answers_at_once_defers_or_leaves_the_call_to_its_hook() {
        use capkv::kv_capnp::kv_store;
        on_local_set(async {
            let before = crate::local::direct_registry_len();
            let cap: kv_store::Client = crate::local::new_direct_client(TwoWays);
            assert_eq!(crate::local::direct_registry_len(), before + 1);
            let mut input = Vec::new();
            queue(&mut input, |m| m.init_bootstrap().set_question_id(0));
            // (question, method, key, pipelined on the bootstrap's answer)
            let calls: [(u32, u16, &str, bool); 6] = [
                (1, 0, "a", false),
                (2, 0, "defer", false),
                (3, 3, "a", false),
                (4, 0, "fail", false),
                (5, 0, "a", true),
                (6, 0, "large", false),
            ];
            for (id, method, key, pipelined) in calls {
                // The bootstrap's Return exports the capability as id 0; a call through
                // the answer reaches the same export, so the direct path too.
                queue_get(
                    &mut input,
                    id,
                    method,
                    key.as_bytes(),
                    pipelined.then_some(0),
                );
            }
            let bytes = serve_all(input, cap.client.hook, 7).await;
            let mut seen = std::collections::BTreeMap::new();
            for m in written(&bytes) {
                let root = m.get_root::<rpc_message::Reader>().unwrap();
                let Ok(rpc_message::Which::Return(Ok(ret))) = root.which() else {
                    panic!("not a Return");
                };
                let what = match ret.which().unwrap() {
                    return_::Which::Results(p) if ret.get_answer_id() == 3 => {
                        let r = p
                            .unwrap()
                            .get_content()
                            .get_as::<kv_store::get_many_results::Reader>()
                            .unwrap();
                        match r.get_result().unwrap().which().unwrap() {
                            capkv::kv_capnp::get_many_result::Which::Ok(ok) => {
                                format!("revision {}", ok.get_revision())
                            }
                            _ => "error".into(),
                        }
                    }
                    return_::Which::Results(p) if ret.get_answer_id() > 0 => {
                        let r = p
                            .unwrap()
                            .get_content()
                            .get_as::<kv_store::get_results::Reader>()
                            .unwrap();
                        // What a Return without capabilities says (the direct path's
                        // header too).
                        assert!(ret.get_no_finish_needed() && ret.get_release_param_caps());
                        match r.get_result().unwrap().which().unwrap() {
                            capkv::kv_capnp::get_result::Which::Ok(e) => {
                                let v = e.unwrap().get_value().unwrap();
                                if v.len() > 100 && v.iter().all(|&b| b == b'x') {
                                    format!("{} x", v.len())
                                } else {
                                    String::from_utf8(v.to_vec()).unwrap()
                                }
                            }
                            _ => "error".into(),
                        }
                    }
                    return_::Which::Results(_) => "bootstrap".into(),
                    return_::Which::Exception(e) => {
                        e.unwrap().get_reason().unwrap().to_string().unwrap()
                    }
                    _ => "other".into(),
                };
                seen.insert(ret.get_answer_id(), what);
            }
            let seen: Vec<(u32, &str)> = seen.iter().map(|(k, v)| (*k, v.as_str())).collect();
            assert_eq!(
                seen,
                [
                    (0, "bootstrap"),
                    (1, "direct"),
                    (2, "deferred"),
                    (3, "revision 7"),
                    (4, "refused directly"),
                    (5, "direct"),
                    (6, "4000 x"),
                ]
            );
        });
        // The connection and the client are gone: so is the registry's entry.
        assert_eq!(crate::local::direct_registry_len(), 0);
    }

    /// A call pipelined on the answer of a call that was itself queued and then answered
    /// on the direct path (results without a capability) fails: it is answered, not lost.
    #[test]
    fn a_call_pipelined_on_a_direct_answer_without_capabilities_fails() {
        on_local_set(async {
            let mut input = Vec::new();
            queue(&mut input, |m| m.init_bootstrap().set_question_id(0));
            // (question, method, target: the import, or the answer pipelined on). Method 2
            // answers a capability after a yield; 3 is answered on the direct path.
            let calls: [(u32, u16, Option<u32>); 3] =
                [(1, 2, None), (2, 3, Some(1)), (3, 0, Some(2))];
            for (id, method, on) in calls {
                queue(&mut input, |m| {
                    init_call_on(m, id, 1, method, on).init_params();
                });
            }
            let bytes = serve_all(input, Box::new(script::ScriptCap::new(0)), 4).await;
            let mut returned = std::collections::BTreeMap::new();
            for m in written(&bytes) {
                let root = m.get_root::<rpc_message::Reader>().unwrap();
                let Ok(rpc_message::Which::Return(Ok(ret))) = root.which() else {
                    continue;
                };
                let what = match ret.which().unwrap() {
                    return_::Which::Results(_) => "results".to_string(),
                    return_::Which::Exception(e) => {
                        e.unwrap().get_reason().unwrap().to_string().unwrap()
                    }
                    _ => "other".into(),
                };
                returned.insert(ret.get_answer_id(), what);
            }
            assert_eq!(returned.len(), 4, "{returned:?}");
            assert_eq!(returned[&2], "results");
            assert_eq!(
                returned[&3],
                "call pipelined on question 2, whose results hold no capability"
            );
        });
    }

    /// A direct call's Return, header and results' words, reads as the Return capnp
    /// builds around the same results (for results of every size one segment holds).
    #[test]
    fn a_direct_return_reads_as_the_one_capnp_builds() {
        use capkv::kv_capnp::kv_store;
        for len in [0, 1, 7, 8, 9, 100, 500, 700] {
            let value = vec![b'v'; len];
            let mut scratch = capnp::Word::allocate_zeroed_vec(SCRATCH_WORDS);
            let mut alloc = message::ScratchSpaceHeapAllocator::new(
                capnp::Word::words_to_bytes_mut(&mut scratch),
            );
            let mut results = message::Builder::new(&mut alloc);
            {
                let r = results
                    .get_root::<any_pointer::Builder<'_>>()
                    .unwrap()
                    .init_as::<kv_store::get_results::Builder<'_>>();
                let mut e = r.init_result().init_ok();
                e.set_key(b"key");
                e.set_value(&value);
                e.set_version(len as u64 + 1);
            }
            let segments = results.get_segments_for_output();
            let [segment] = &segments[..] else {
                assert!(len > 500, "{len} bytes should fit the scratch segment");
                continue;
            };
            let header = direct_return(41, segment).expect("a struct root");
            let bytes = [&header[..], &segment[8..]].concat();
            let m = capnp::serialize::read_message_from_flat_slice(
                &mut &bytes[..],
                ReaderOptions::new(),
            )
            .unwrap();
            let root = m.get_root::<rpc_message::Reader<'_>>().unwrap();
            let Ok(rpc_message::Which::Return(Ok(ret))) = root.which() else {
                panic!("not a Return");
            };
            assert_eq!(ret.get_answer_id(), 41);
            assert!(ret.get_no_finish_needed() && ret.get_release_param_caps());
            let Ok(return_::Which::Results(Ok(payload))) = ret.which() else {
                panic!("not results");
            };
            assert_eq!(payload.get_cap_table().unwrap().len(), 0);
            let r = payload
                .get_content()
                .get_as::<kv_store::get_results::Reader<'_>>()
                .unwrap();
            let Ok(capkv::kv_capnp::get_result::Which::Ok(Ok(e))) = r.get_result().unwrap().which()
            else {
                panic!("not an entry");
            };
            assert_eq!(
                (
                    e.get_key().unwrap(),
                    e.get_value().unwrap(),
                    e.get_version()
                ),
                (&b"key"[..], &value[..], len as u64 + 1)
            );
        }
    }

    /// Counts the writes that reach the "socket".
    /// A writer that counts its writes and keeps their bytes, waking a reader on each.
    struct Counting(
        Rc<Cell<usize>>,
        Rc<std::cell::RefCell<Vec<u8>>>,
        Option<Rc<Cell<Option<std::task::Waker>>>>,
    );

    impl AsyncWrite for Counting {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.0.set(self.0.get() + 1);
            self.1.borrow_mut().extend_from_slice(buf);
            if let Some(w) = self.2.as_ref().and_then(|w| w.take()) {
                w.wake();
            }
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_close(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn queue(out: &mut Vec<u8>, build: impl FnOnce(rpc_message::Builder<'_>)) {
        let mut m = message::Builder::new_default();
        build(m.init_root());
        capnp::serialize::write_message(out, &m).unwrap();
    }

    /// A peer that sends, hangs up its sending half and never reads: the connection ends
    /// once the finish timeout has passed, its last bytes unwritten (the server's slot
    /// would otherwise stay taken for as long as the peer keeps the socket open).
    #[test]
    fn an_ended_connection_whose_peer_does_not_read_ends_within_the_finish_timeout() {
        struct Stuck;
        impl AsyncWrite for Stuck {
            fn poll_write(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &[u8],
            ) -> Poll<std::io::Result<usize>> {
                Poll::Pending
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                Poll::Pending
            }
            fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                Poll::Pending
            }
        }
        on_local_set(async {
            let mut input = Vec::new();
            queue(&mut input, |m| m.init_bootstrap().set_question_id(0));
            let limits = EngineLimits {
                finish_timeout: std::time::Duration::from_millis(50),
                ..EngineLimits::default()
            };
            let serving = serve(
                crate::frames::ByteFrames::new(futures::io::Cursor::new(input), 1 << 20),
                Stuck,
                Box::new(ScriptCap::new(1)),
                limits,
                Closer::default(),
            );
            // A bound on the test, not a measure: without the finish timeout it never ends.
            let ended = tokio::time::timeout(std::time::Duration::from_secs(60), serving).await;
            assert!(matches!(ended, Ok(Ok(()))), "{ended:?}");
        });
    }

    /// A connection waiting on its peer ends when its closer closes it, with an Abort after
    /// the replies already written, though the loop polls its closing signal only after a
    /// signal was set on its thread (`Conn::closing_may_be_ready`): an idle connection
    /// among others, closed after they had their turns, still sees its close.
    #[test]
    fn a_closer_ends_a_waiting_connection_with_an_abort() {
        on_local_set(async {
            let mut input = Vec::new();
            queue(&mut input, |m| m.init_bootstrap().set_question_id(0));
            let bytes = Rc::new(std::cell::RefCell::new(Vec::new()));
            let writes = Rc::new(Cell::new(0));
            let closer = Closer::default();
            // The bootstrap, then silence: the peer stays connected.
            let reader = ThenDry(Some(input), Rc::default());
            let serving = tokio::task::spawn_local(serve(
                crate::frames::ByteFrames::new(reader, 1 << 20),
                Counting(Rc::clone(&writes), Rc::clone(&bytes), None),
                Box::new(ScriptCap::new(1)),
                EngineLimits::default(),
                closer.clone(),
            ));
            // Turns of the loop, and of a signal set elsewhere on this thread, before the
            // close (bounded: the bootstrap's Return is one write).
            for _ in 0..100 {
                if writes.get() > 0 {
                    break;
                }
                tokio::task::yield_now().await;
            }
            assert_eq!(writes.get(), 1, "the bootstrap's Return was written");
            crate::signal::Signal::default().set();
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert!(!serving.is_finished(), "another signal closed nothing");
            // A bound on the test, not a measure: a loop that missed its close never ends.
            let closed =
                tokio::time::timeout(std::time::Duration::from_secs(60), closer.close()).await;
            assert!(closed.is_ok(), "the loop did not end when closed");
            let ended = serving.await.expect("the loop's task");
            assert!(ended.is_ok(), "{ended:?}");
            let written = written(&bytes.borrow());
            let last = written.last().expect("messages");
            match last.get_root::<rpc_message::Reader>().unwrap().which() {
                Ok(rpc_message::Which::Abort(Ok(e))) => {
                    let reason = e.get_reason().unwrap().to_str().unwrap().to_string();
                    assert!(reason.contains("shutting down"), "{reason}");
                }
                _ => panic!("the last message is not an Abort"),
            }
        });
    }

    /// A Bootstrap and `calls` calls (questions 1..=calls, empty params) pipelined on its
    /// answer, as a peer sending them at once would.
    fn bootstrap_and_pipelined_calls(calls: u32) -> Vec<u8> {
        let mut input = Vec::new();
        queue(&mut input, |m| m.init_bootstrap().set_question_id(0));
        for id in 1..=calls {
            queue(&mut input, |m| {
                let mut c = m.init_call();
                c.set_question_id(id);
                c.reborrow()
                    .init_target()
                    .init_promised_answer()
                    .set_question_id(0);
                c.init_params();
            });
        }
        input
    }

    /// 16 calls that arrive in one read are answered in at most 2 writes (the bootstrap's
    /// Return may leave first): a pass of the loop answers everything buffered, then writes
    /// what it produced at once.
    #[test]
    fn sixteen_calls_in_one_packet_leave_in_at_most_two_writes() {
        on_local_set(async {
            let input = bootstrap_and_pipelined_calls(16);
            let writes = Rc::new(Cell::new(0));
            let bytes = Rc::new(std::cell::RefCell::new(Vec::new()));
            let writer = Counting(Rc::clone(&writes), Rc::clone(&bytes), None);
            serve(
                crate::frames::ByteFrames::new(futures::io::Cursor::new(input), 1 << 20),
                writer,
                Box::new(ScriptCap::new(1)),
                EngineLimits::default(),
                Closer::default(),
            )
            .await
            .unwrap();
            assert!(writes.get() <= 2, "{} writes", writes.get());
            let written = written(&bytes.borrow());
            for m in &written {
                let root = m.get_root::<rpc_message::Reader>().unwrap();
                assert!(matches!(root.which(), Ok(rpc_message::Which::Return(_))));
            }
            assert_eq!(written.len(), 17);
        });
    }

    /// A turn that answered calls does not pass again to find the socket still dry: the
    /// socket registered the task's waker when it ran out, so a second pass would only poll
    /// it (and register again) for nothing, once a call. Fails if the loop re-passes after
    /// every busy pass.
    #[test]
    fn a_busy_turn_reads_its_dry_socket_once() {
        on_local_set(async {
            let (reads, bytes) = serve_then_dry(1).await;
            assert_eq!(returns(&bytes), 2, "both Returns were written");
            assert_eq!(
                reads, 2,
                "one read brought the calls, one found the socket dry"
            );
        });
    }

    /// More calls in one read than a pass takes ([`MAX_FRAMES_PER_PASS`]) are all answered,
    /// though no waker will fire for those left buffered after the first pass.
    #[test]
    fn calls_past_a_pass_s_bound_are_answered_without_a_wake() {
        on_local_set(async {
            let calls = MAX_FRAMES_PER_PASS as u32 + 44;
            let (_, bytes) = serve_then_dry(calls).await;
            assert_eq!(returns(&bytes), calls as usize + 1);
        });
    }

    /// How many of the messages in `bytes` are Returns (a closed loop ends with an Abort).
    fn returns(bytes: &[u8]) -> usize {
        written(bytes)
            .iter()
            .filter(|m| {
                let root = m.get_root::<rpc_message::Reader>().unwrap();
                matches!(root.which(), Ok(rpc_message::Which::Return(_)))
            })
            .count()
    }

    /// `input` at the first read, then dry for ever (the peer stays connected); counts its
    /// reads.
    struct ThenDry(Option<Vec<u8>>, Rc<Cell<usize>>);

    impl futures::AsyncRead for ThenDry {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<std::io::Result<usize>> {
            self.1.set(self.1.get() + 1);
            let Some(mut input) = self.0.take() else {
                return Poll::Pending;
            };
            let n = input.len().min(buf.len());
            buf[..n].copy_from_slice(&input[..n]);
            if n < input.len() {
                self.0 = Some(input.split_off(n));
            }
            Poll::Ready(Ok(n))
        }
    }

    /// A bootstrap and `calls` calls pipelined on it, sent at once by a peer that then
    /// stays connected and silent; once the loop has answered and gone quiet, how often it
    /// read the socket and what it wrote.
    async fn serve_then_dry(calls: u32) -> (usize, Vec<u8>) {
        let input = bootstrap_and_pipelined_calls(calls);
        let reads = Rc::new(Cell::new(0));
        let writes = Rc::new(Cell::new(0));
        let bytes = Rc::new(std::cell::RefCell::new(Vec::new()));
        let closer = Closer::default();
        let serving = tokio::task::spawn_local(serve(
            crate::frames::ByteFrames::new(ThenDry(Some(input), Rc::clone(&reads)), 1 << 20),
            Counting(Rc::clone(&writes), Rc::clone(&bytes), None),
            Box::new(ScriptCap::new(1)),
            EngineLimits::default(),
            closer.clone(),
        ));
        // Bounded turns: the loop answers within a few, then nothing wakes it.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        closer.close().await;
        assert!(serving.await.expect("the loop's task").is_ok());
        let bytes = bytes.take();
        (reads.get(), bytes)
    }
}
