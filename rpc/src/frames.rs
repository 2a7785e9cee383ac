//! The frame layer between a client's socket and the RPC system: nothing a peer sends
//! reaches capnp-rpc until it is a whole, checked message.
//!
//! Why: capnp-rpc trusts the framing. A segment table declaring 64 MiB makes its reader
//! allocate 64 MiB before a byte of data arrives; a 184-byte `Call` whose cap table lists
//! 8 million empty structs makes it build a 128 MiB vector; an unknown message kind is
//! echoed back at full size inside `Unimplemented`. A few cheap frames per connection, many
//! connections, and the server holds gigabytes. So each connection's bytes pass through a
//! [`GuardedReader`], which:
//!
//! 1. reads the segment table first and refuses a frame declaring more than the largest
//!    legal request (or more than 512 segments) before holding any of it;
//! 2. holds a frame's bytes only as they arrive (never by declared size), charging a large
//!    frame's bytes to one server-wide [`FrameBudget`]; when the budget is full, a large
//!    frame waits for room (backpressure on that connection; small frames are never held
//!    up, so small calls keep flowing);
//! 3. gives a frame that has started arriving `frame_timeout` to complete (slow senders);
//! 4. checks each complete frame: it decodes under the request reader limits, is a message
//!    kind a client may send (`call`, `return`, `finish`, `resolve`, `release`,
//!    `disembargo`, `bootstrap` — at most a few —, `abort`), and carries a cap table of at
//!    most [`MAX_CAP_TABLE`] entries;
//! 5. on any breach, sends the peer an RPC `Abort` saying why (a few bytes, never an echo)
//!    and ends the connection; `capkv_connections_closed_total{reason}` counts it.
//!
//! Only then is the frame handed on: whole, as a [`Frame`] (capkv's engine reads it in place:
//! one copy out of the socket buffer, one segment-table parse), or as bytes through
//! `AsyncRead` (capnp-rpc's VatNetwork, which decodes them again).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use capnp_rpc::rpc_capnp::message;
use futures::io::AsyncRead;
use tokio::time::{Instant, Sleep};

/// Most entries a cap table of a client message may have. capkv's calls carry no
/// capabilities at all; a few leave room for pipelined promises.
pub const MAX_CAP_TABLE: u32 = 16;
/// `Bootstrap` requests one connection may make (the client makes one).
pub const MAX_BOOTSTRAPS: u32 = 8;
/// capnp's own bound on segments per message.
pub(crate) const MAX_SEGMENTS: usize = 512;
/// Room for the largest segment table (4 bytes per segment and the count, rounded up).
const MAX_SEGMENT_TABLE_BYTES: usize = 4096;
/// Frames up to this size are not charged to the budget: they never wait, and one
/// connection holds at most one of them partially.
const SMALL_FRAME_BYTES: usize = 64 * 1024;
/// Bytes read from the socket per read call, at most.
const READ_CHUNK_BYTES: usize = 16 * 1024;

thread_local! {
    /// What every reader of this thread reads the socket into; whole frames are cut from
    /// it where they lie, and only an incomplete one is copied into the reader's own
    /// `pending` bytes: one warm buffer per worker instead of one per connection (each held
    /// 1-16 KiB for its whole life, and with 1,000 connections taking turns every read
    /// landed in a cold one).
    static READ_CHUNK: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Frame slots the thread keeps for its readers (a burst of small frames from one read may
/// need more; those are freed once handed over).
const SPARE_READY_FRAMES: usize = 64;

thread_local! {
    /// The frame slots of the thread's readers: a reader takes them for the frames of a
    /// read and gives them back once it has handed them over, so the slots are warm (a
    /// connection's own would be cold by its next turn).
    static SPARE_READY: std::cell::Cell<std::collections::VecDeque<Frame>> =
        const { std::cell::Cell::new(std::collections::VecDeque::new()) };
}

/// One whole message as it came off the wire (segment table and segments), copied once into
/// 8-byte-aligned memory so that capnp reads it in place: a [`capnp::message::Reader`] over a
/// `Frame` needs no further copy or allocation.
pub struct Frame {
    words: Vec<capnp::Word>,
    /// The first segment's word range (every capkv message but the largest has one).
    first: (u32, u32),
    /// Word ranges of segments after the first: empty, so not allocated, for most frames.
    rest: Vec<(u32, u32)>,
    /// What the frame layer's check read of the Call this frame holds, when it is a plain
    /// call on an imported capability; `None` for anything else, and for frames no
    /// [`GuardedReader`] checked.
    pub(crate) head: Option<CallHead>,
    /// When the read that completed it returned (one clock read per read; `None` for
    /// frames no [`GuardedReader`] cut): see [`crate::local::arrived`].
    pub(crate) arrived: Option<Instant>,
    /// Where the Call's params pointer is (its word in the one segment) when everything
    /// under it can be read through a view starting there exactly as through the root
    /// (`skeleton::plain_subtree`): the engine's direct path then reads the params without
    /// walking Message, Call and Payload again. `None` otherwise.
    pub(crate) params_at: Option<u32>,
}

/// The address of a Call to a capability the peer imported, with the results to the
/// caller and no capability in its params: all the engine needs to start it, read once by
/// the frame layer's check so that the engine does not decode the Call again (in capnp's
/// checked reader each struct pointer costs a bounds and traversal check; the Call's
/// target and params were a sixteenth of the server's CPU at 16 calls in flight). Any
/// other Call (pipelined on an answer, results elsewhere, capabilities in params) has no
/// head and is decoded by the engine, which decides its fate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CallHead {
    pub(crate) question_id: u32,
    pub(crate) import_id: u32,
    pub(crate) interface_id: u64,
    pub(crate) method_id: u16,
}

/// What [`check_message_shown`] found in a frame that passed.
#[derive(Debug, Default, PartialEq, Eq)]
struct Checked {
    bootstrap: bool,
    head: Option<CallHead>,
    /// See [`Frame::params_at`].
    params_at: Option<u32>,
}

impl Frame {
    /// Copies the frame at the start of `bytes`, whose size [`frame_size`] gave as `size`
    /// (so its segment table is known to be whole and within bounds).
    pub(crate) fn copy_from(bytes: &[u8], size: usize) -> Frame {
        let bytes = &bytes[..size];
        // Built from the bytes, not zeroed and then overwritten: a frame is copied once per
        // call, and zeroing it first cost a memset and the allocator's zeroing path.
        let words: Vec<capnp::Word> = bytes
            .chunks_exact(8)
            .map(|w| capnp::word(w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]))
            .collect();
        let word = |i: usize| {
            u32::from_le_bytes([
                bytes[i * 4],
                bytes[i * 4 + 1],
                bytes[i * 4 + 2],
                bytes[i * 4 + 3],
            ])
        };
        let segments = word(0) as usize + 1;
        let mut start = (4 + 4 * segments).div_ceil(8) as u32;
        let mut first = (start, start);
        let mut rest = Vec::new();
        for s in 0..segments {
            // Within `size`, which `frame_size` bounded by the frame limit (< 4 GiB).
            let end = start + word(1 + s);
            if s == 0 {
                first = (start, end);
            } else {
                rest.push((start, end));
            }
            start = end;
        }
        Frame {
            words,
            first,
            rest,
            head: None,
            arrived: None,
            params_at: None,
        }
    }

    /// The frame as wire bytes.
    pub fn as_bytes(&self) -> &[u8] {
        capnp::Word::words_to_bytes(&self.words)
    }

    /// Its size in bytes.
    pub fn len(&self) -> usize {
        self.words.len() * 8
    }

    /// Never true (a frame has at least a segment table); for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }
}

impl capnp::message::ReaderSegments for Frame {
    fn get_segment(&self, idx: u32) -> Option<&[u8]> {
        let (start, end) = match idx {
            0 => self.first,
            i => *self.rest.get(i as usize - 1)?,
        };
        self.words
            .get(start as usize..end as usize)
            .map(capnp::Word::words_to_bytes)
    }

    fn len(&self) -> usize {
        1 + self.rest.len()
    }
}

/// A stream of whole frames: what capkv's engine reads from.
pub trait FrameSource {
    /// The next frame; `None` once the peer has closed the stream between frames.
    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<Option<Frame>>>;

    /// Asks for the cache lines the next `poll_frame` touches outside the source itself
    /// (see [`crate::hint`]); the engine calls it at the start of a connection's turn.
    fn prefetch(&self) {}
}

/// Hints the frame layer gives about Calls as they arrive, before they run, so that a
/// server can start loading what they will touch (capkv's prefetches the store entries of
/// gets and puts). Every Call a socket read brought is shown as its frame is checked, then
/// the read is `flush`ed: the calls of one read are shown together, before the first of
/// them is handed over, so their cache misses can overlap instead of stalling one call at
/// a time. Must not fail or block; changes nothing a call sees.
pub trait Warm {
    /// A call that has arrived: its interface, method and params.
    fn call(&self, interface_id: u64, method_id: u16, params: capnp::any_pointer::Reader<'_>);
    /// The calls shown since the last flush are all this read brought.
    fn flush(&self) {}
}

/// Frames cut from any byte stream by their segment tables, bounded by `max_frame_bytes`
/// but without the frame layer's other checks: how the client engine reads the server it
/// chose (`crate::client`), and how tests and the fuzz target drive the server engine with
/// what the frame layer would refuse. Servers read through a [`GuardedReader`].
pub struct ByteFrames<R> {
    inner: R,
    buf: Vec<u8>,
    max_frame_bytes: usize,
    eof: bool,
}

impl<R> ByteFrames<R> {
    pub fn new(inner: R, max_frame_bytes: usize) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            max_frame_bytes,
            eof: false,
        }
    }
}

impl<R: AsyncRead + Unpin> FrameSource for ByteFrames<R> {
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Option<Frame>>> {
        let this = &mut *self;
        // Each pass reads at least one byte or ends: bounded by the stream.
        loop {
            let size = frame_size(&this.buf, this.max_frame_bytes)
                .map_err(|b| io::Error::new(io::ErrorKind::InvalidData, b.reason()))?;
            if let Some(size) = size.filter(|&s| this.buf.len() >= s) {
                let frame = Frame::copy_from(&this.buf, size);
                this.buf.drain(..size);
                return Poll::Ready(Ok(Some(frame)));
            }
            if this.eof {
                return Poll::Ready(if this.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "stream ended mid-frame",
                    ))
                });
            }
            let mut chunk = [0u8; 4096];
            match Pin::new(&mut this.inner).poll_read(cx, &mut chunk) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => this.eof = true,
                Poll::Ready(Ok(n)) => this.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// Why a connection was closed by the frame layer (also the metric's `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breach {
    FrameTooLarge,
    TooManySegments,
    FrameTimeout,
    Undecodable,
    UnsupportedMessage,
    CapTableTooLong,
    BootstrapFlood,
}

impl Breach {
    pub fn label(self) -> &'static str {
        match self {
            Breach::FrameTooLarge => "frame_too_large",
            Breach::TooManySegments => "too_many_segments",
            Breach::FrameTimeout => "frame_timeout",
            Breach::Undecodable => "undecodable",
            Breach::UnsupportedMessage => "unsupported_message",
            Breach::CapTableTooLong => "cap_table_too_long",
            Breach::BootstrapFlood => "bootstrap_flood",
        }
    }

    /// What the peer is told in the `Abort`.
    fn reason(self) -> &'static str {
        match self {
            Breach::FrameTooLarge => "message too large for this server",
            Breach::TooManySegments => "message with too many segments",
            Breach::FrameTimeout => "message not completed in time",
            Breach::Undecodable => "message does not decode within the server's limits",
            Breach::UnsupportedMessage => "message kind not supported by this server",
            Breach::CapTableTooLong => "capability table too long",
            Breach::BootstrapFlood => "too many bootstrap requests",
        }
    }
}

/// Limits of the frame layer (from `[limits]`).
#[derive(Debug, Clone)]
pub struct FrameLimits {
    /// Largest frame, header included.
    pub max_frame_bytes: usize,
    /// Time a started frame has to arrive completely.
    pub frame_timeout: Duration,
    /// How frames are decoded for checking (the request reader options).
    pub reader_options: capnp::message::ReaderOptions,
}

impl FrameLimits {
    /// The limits for frames carrying requests of at most `max_request_bytes` (decoded
    /// with `reader_options`): the largest legal request plus the largest segment table.
    pub fn for_requests(
        max_request_bytes: usize,
        reader_options: capnp::message::ReaderOptions,
        frame_timeout: Duration,
    ) -> Self {
        Self {
            max_frame_bytes: max_request_bytes + MAX_SEGMENT_TABLE_BYTES,
            frame_timeout,
            reader_options,
        }
    }
}

/// Bytes held by partially received large frames, over all connections.
pub struct FrameBudget {
    max_bytes: usize,
    used: AtomicUsize,
    /// Times a large frame had to wait for room (the server reports and logs it).
    waits: std::sync::atomic::AtomicU64,
    /// Readers waiting for room; woken together when bytes are released. At most one
    /// entry per connection.
    waiting: Mutex<Vec<Waker>>,
}

impl FrameBudget {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            used: AtomicUsize::new(0),
            waits: std::sync::atomic::AtomicU64::new(0),
            waiting: Mutex::new(Vec::new()),
        }
    }

    pub fn used_bytes(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// How many times a large frame has waited for room so far.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    fn try_charge(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + n <= self.max_bytes).then_some(u + n)
            })
            .is_ok()
    }

    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.used.fetch_sub(n, Ordering::AcqRel);
        let waiting = std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|p| p.into_inner()));
        for w in waiting {
            w.wake();
        }
    }

    fn wait(&self, waker: &Waker) {
        let mut w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if !w.iter().any(|x| x.will_wake(waker)) {
            w.push(waker.clone());
        }
    }
}

/// What the connection learns when the frame layer ends it.
pub type BreachCell = std::rc::Rc<std::cell::Cell<Option<Breach>>>;

/// The read side of a connection, able to push a few bytes back to the peer without
/// waiting (the `Abort` that says why the connection ends).
pub trait PeerReader: AsyncRead + Unpin {
    fn try_send(&self, bytes: &[u8]);
}

/// Over TLS the reason cannot be written beside the TLS writer; the connection just ends.
impl<S> PeerReader
    for tokio_util::compat::Compat<tokio::io::ReadHalf<tokio_rustls::server::TlsStream<S>>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    fn try_send(&self, _: &[u8]) {}
}

/// An in-process stream (`tokio::io::duplex`, for tests): no side channel either.
impl PeerReader for tokio_util::compat::Compat<tokio::io::ReadHalf<tokio::io::DuplexStream>> {
    fn try_send(&self, _: &[u8]) {}
}

impl PeerReader for tokio_util::compat::Compat<tokio::net::tcp::OwnedReadHalf> {
    fn try_send(&self, bytes: &[u8]) {
        // Best effort and never blocking: a full socket buffer just loses the reason.
        let _ = self.get_ref().as_ref().try_write(bytes);
    }
}

/// An `AsyncRead` that yields only whole, checked frames (see the module docs).
pub struct GuardedReader<R> {
    inner: R,
    limits: std::sync::Arc<FrameLimits>,
    budget: std::sync::Arc<FrameBudget>,
    /// Bytes of the frame being received (and possibly the start of the next).
    pending: Vec<u8>,
    /// Bytes of `pending` charged to the budget.
    charged: usize,
    /// Checked frames not yet handed over. The socket is read only when this is empty, so
    /// it holds what one read brought at most: a peer cannot make the server buffer many
    /// checked frames either.
    ready: std::collections::VecDeque<Frame>,
    /// Bytes of the front frame already read through `AsyncRead`.
    front_pos: usize,
    /// Where socket reads land (zeroed once, when allocated or grown; see
    /// [`READ_CHUNK_BYTES`]). Empty until the first read.
    /// When the frame being received must be complete. Armed only when the socket runs dry
    /// with a frame incomplete: a message that arrives whole (nearly every one) never
    /// touches the timer, whose registration cost a wake-up syscall per message.
    deadline: Option<Pin<Box<Sleep>>>,
    bootstraps: u32,
    /// Where the breach that closed the connection is told to its owner (set once).
    breach: BreachCell,
    /// A breach was found: read nothing more. Its own flag beside `breach`, which lives in
    /// an allocation of its own, read at every fill otherwise: one more cold cache line a
    /// call with thousands of connections.
    failed: bool,
    eof: bool,
    /// The connection's unsent replies: over its bound, the next frame waits.
    backlog: Option<std::rc::Rc<crate::backlog::ReplyBacklog>>,
    /// Shown the calls of each read as they are checked ([`Warm`]).
    warm: Option<std::rc::Rc<dyn Warm>>,
}

impl<R: PeerReader> GuardedReader<R> {
    pub fn new(
        inner: R,
        limits: std::sync::Arc<FrameLimits>,
        budget: std::sync::Arc<FrameBudget>,
        breach: BreachCell,
    ) -> Self {
        Self {
            inner,
            limits,
            budget,
            pending: Vec::new(),
            charged: 0,
            ready: std::collections::VecDeque::new(),
            front_pos: 0,
            deadline: None,
            bootstraps: 0,
            breach,
            failed: false,
            eof: false,
            backlog: None,
            warm: None,
        }
    }

    /// Shows the calls of each read to `warm` as they are checked (see [`Warm`]). One hook
    /// may serve every connection of a thread: a read's calls are shown and flushed within
    /// one poll of its reader.
    pub fn with_warm(mut self, warm: std::rc::Rc<dyn Warm>) -> Self {
        self.warm = Some(warm);
        self
    }

    /// Holds each next frame back while `backlog` is over its bound (see
    /// [`crate::backlog`]).
    pub fn with_backlog(mut self, backlog: std::rc::Rc<crate::backlog::ReplyBacklog>) -> Self {
        self.backlog = Some(backlog);
        self
    }

    fn fail(&mut self, b: Breach) -> io::Error {
        if !self.failed {
            self.failed = true;
            self.breach.set(Some(b));
            self.inner.try_send(&abort_frame(
                b.reason(),
                capnp_rpc::rpc_capnp::exception::Type::Failed,
            ));
        }
        self.drop_pending();
        io::Error::new(io::ErrorKind::InvalidData, b.reason())
    }

    /// Returns `Pending` with the incomplete frame's clock running (armed now if it is
    /// not yet), or the timeout breach if it has run out.
    fn pending_within_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if !self.pending.is_empty() && self.deadline.is_none() {
            let mut sleep = Box::pin(tokio::time::sleep_until(
                Instant::now() + self.limits.frame_timeout,
            ));
            // Registers the timer with this task.
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(self.fail(Breach::FrameTimeout)));
            }
            self.deadline = Some(sleep);
        }
        Poll::Pending
    }

    fn drop_pending(&mut self) {
        self.pending = Vec::new();
        self.budget.release(std::mem::take(&mut self.charged));
        self.deadline = None;
    }

    /// Moves every complete frame at the front of `bytes` to `ready`, checking each;
    /// returns how many bytes they took (the rest is an incomplete frame, if anything).
    fn cut_frames(&mut self, bytes: &[u8]) -> (usize, Result<(), Breach>) {
        let mut taken = 0;
        let mut arrived = None;
        let result = loop {
            let rest = &bytes[taken..];
            let size = match frame_size(rest, self.limits.max_frame_bytes) {
                Ok(Some(size)) if rest.len() >= size => size,
                Ok(_) => break Ok(()),
                Err(b) => break Err(b),
            };
            let mut frame = Frame::copy_from(rest, size);
            frame.arrived = Some(*arrived.get_or_insert_with(Instant::now));
            match check_message_shown(&frame, self.limits.reader_options, self.warm.as_deref()) {
                Ok(Checked {
                    bootstrap: true, ..
                }) => {
                    self.bootstraps += 1;
                    if self.bootstraps > MAX_BOOTSTRAPS {
                        break Err(Breach::BootstrapFlood);
                    }
                }
                Ok(Checked {
                    head, params_at, ..
                }) => {
                    frame.head = head;
                    frame.params_at = params_at;
                }
                Err(b) => break Err(b),
            }
            if self.ready.capacity() == 0 {
                self.ready = SPARE_READY.take();
            }
            self.ready.push_back(frame);
            taken += size;
            // The next frame (if any) starts its own clock (when the socket next runs dry)
            // and its own charge.
            self.deadline = None;
        };
        if taken > 0 {
            if let Some(w) = &self.warm {
                w.flush();
            }
        }
        (taken, result)
    }

    /// Takes the bytes a read brought: whole frames are cut from them where they lie
    /// (the thread's chunk, when nothing of an earlier frame waits), and only the
    /// incomplete rest is kept in `pending`.
    fn take_read(&mut self, read: &[u8]) -> Result<(), Breach> {
        let (taken, result) = if self.pending.is_empty() {
            let (taken, result) = self.cut_frames(read);
            self.pending.extend_from_slice(&read[taken..]);
            (0, result)
        } else {
            self.pending.extend_from_slice(read);
            let pending = std::mem::take(&mut self.pending);
            let (taken, result) = self.cut_frames(&pending);
            self.pending = pending;
            (taken, result)
        };
        // One move of the incomplete rest, however many frames came before it.
        self.pending.drain(..taken);
        let held = self.pending.len();
        if self.charged > held {
            self.budget.release(self.charged - held);
            self.charged = held;
        }
        result
    }

    /// Reads until a checked frame is ready (`true`) or the peer has closed (`false`).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        loop {
            if !self.ready.is_empty() {
                return Poll::Ready(Ok(true));
            }
            if self.failed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "connection closed by the frame layer",
                )));
            }
            if self.eof {
                return Poll::Ready(Ok(false));
            }
            // A started frame must complete in time.
            if let Some(d) = self.deadline.as_mut() {
                if d.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(self.fail(Breach::FrameTimeout)));
                }
            }
            // A large frame's bytes need room in the server-wide budget first.
            let size = match frame_size(&self.pending, self.limits.max_frame_bytes) {
                Ok(s) => s,
                Err(b) => return Poll::Ready(Err(self.fail(b))),
            };
            let want = match size {
                Some(total) => (total - self.pending.len().min(total)).clamp(1, READ_CHUNK_BYTES),
                None => READ_CHUNK_BYTES,
            };
            let large = size.is_some_and(|t| t > SMALL_FRAME_BYTES);
            if large && self.pending.len() + want > self.charged {
                let need = self.pending.len() + want - self.charged;
                if !self.budget.try_charge(need) {
                    self.budget.waits.fetch_add(1, Ordering::Relaxed);
                    self.budget.wait(cx.waker());
                    // Re-check after registering: room may have come in between.
                    if !self.budget.try_charge(need) {
                        return self.pending_within_deadline(cx);
                    }
                }
                self.charged += need;
            }
            // Taken out while read into (put back below; a reader polled in between, which
            // nothing here does, would find none and make its own).
            let mut chunk = READ_CHUNK.take();
            if chunk.len() < READ_CHUNK_BYTES {
                chunk = vec![0; READ_CHUNK_BYTES];
            }
            let read = Pin::new(&mut self.inner).poll_read(cx, &mut chunk[..want]);
            let taken = match read {
                Poll::Ready(Ok(n)) if n > 0 => Some(self.take_read(&chunk[..n])),
                _ => None,
            };
            READ_CHUNK.set(chunk);
            if let Some(Err(b)) = taken {
                return Poll::Ready(Err(self.fail(b)));
            }
            match read {
                Poll::Pending => return self.pending_within_deadline(cx),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => {
                    // A peer closing mid-frame just ends the connection.
                    self.eof = true;
                    self.drop_pending();
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    /// Whether the next frame may be handed over: not while the connection's unsent
    /// replies are over their bound.
    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        match &self.backlog {
            Some(b) => b.poll_room(cx),
            None => Poll::Ready(()),
        }
    }

    /// The front frame has been handed over.
    fn pop_front(&mut self) -> Option<Frame> {
        self.front_pos = 0;
        let frame = self.ready.pop_front();
        if self.ready.is_empty() {
            // Whole frames are cut from the thread's chunk: a connection holds bytes of its
            // own only for a frame that has not all arrived. Nor does it keep frame slots
            // between reads: they go back to the thread (see [`SPARE_READY`]).
            if self.pending.is_empty() {
                self.pending = Vec::new();
            }
            let slots = std::mem::take(&mut self.ready);
            if slots.capacity() <= SPARE_READY_FRAMES {
                SPARE_READY.set(slots);
            }
        }
        frame
    }
}

impl<R: PeerReader> FrameSource for GuardedReader<R> {
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Option<Frame>>> {
        let this = &mut *self;
        if !std::task::ready!(this.poll_fill(cx))? {
            return Poll::Ready(Ok(None));
        }
        if this.front_pos > 0 {
            return Poll::Ready(Err(io::Error::other(
                "frame reader used as a byte stream and a frame stream at once",
            )));
        }
        if this.poll_room(cx).is_pending() {
            return Poll::Pending;
        }
        Poll::Ready(Ok(this.pop_front()))
    }

    fn prefetch(&self) {
        if let Some(b) = &self.backlog {
            crate::hint::prefetch(std::rc::Rc::as_ptr(b));
        }
    }
}

/// Checks one complete frame (see the module docs); `Ok(true)` for a `Bootstrap`. By the
/// path `GuardedReader` takes (cut into a [`Frame`], then checked in place), so that the
/// fuzz target and the tests exercise what the server runs.
pub fn check_frame(frame: &[u8], options: capnp::message::ReaderOptions) -> Result<bool, Breach> {
    match frame_size(frame, frame.len()) {
        Ok(Some(size)) => check_message(&Frame::copy_from(frame, size), options),
        _ => Err(Breach::Undecodable),
    }
}

/// [`check_frame`] of a frame already cut and aligned.
fn check_message(frame: &Frame, options: capnp::message::ReaderOptions) -> Result<bool, Breach> {
    check_message_shown(frame, options, None).map(|c| c.bootstrap)
}

/// [`check_message`], showing a Call that passes to `warm`: the one decode of a frame
/// before the engine's. A plain Call is checked from its skeleton (`crate::skeleton`),
/// anything else by capnp's reader; both decide alike (asserted in debug builds).
fn check_message_shown(
    frame: &Frame,
    options: capnp::message::ReaderOptions,
    warm: Option<&dyn Warm>,
) -> Result<Checked, Breach> {
    if let Some(checked) = check_plain_call(frame, options, warm) {
        debug_assert_eq!(
            Ok(Checked {
                params_at: None,
                ..checked
            }),
            check_decoded(frame, options, None),
            "the skeleton's check and capnp's decided differently"
        );
        return Ok(checked);
    }
    check_decoded(frame, options, warm)
}

/// The check of a single-segment Call of the plain shape (`crate::skeleton`): it decodes,
/// carries no capability, and is shown to `warm`. `None` for any other frame.
fn check_plain_call(
    frame: &Frame,
    options: capnp::message::ReaderOptions,
    warm: Option<&dyn Warm>,
) -> Option<Checked> {
    if !frame.rest.is_empty() {
        return None;
    }
    let segment = capnp::message::ReaderSegments::get_segment(frame, 0)?;
    let s = crate::skeleton::read(segment)?;
    let params_at = crate::skeleton::plain_subtree(segment, s.content_at, options.nesting_limit)
        .then(|| u32::try_from(s.content_at).ok())
        .flatten();
    // The params from their own pointer: a segment view starting there (its pointers are
    // relative, so they lead where they did).
    let view = content_view(segment, s.content_at, options)?;
    // What the walk promised: the params read alike through the view and from the root.
    debug_assert!(
        params_at.is_none() || reads_alike(segment, s.content_at, frame, options),
        "a plain subtree read otherwise"
    );
    if let Some(w) = warm {
        // Only a hint: params this view cannot read are left to the call itself.
        if let Ok(params) = view.get_root::<capnp::any_pointer::Reader<'_>>() {
            w.call(s.interface_id, s.method_id, params);
        }
    }
    let head = match (s.to_caller, s.imported) {
        (true, Some(import_id)) => Some(CallHead {
            question_id: s.question_id,
            import_id,
            interface_id: s.interface_id,
            method_id: s.method_id,
        }),
        _ => None,
    };
    Some(Checked {
        bootstrap: false,
        head,
        params_at,
    })
}

/// One segment from a Call's params pointer on: `Warm` reads the params through it, and
/// the engine's direct path when the frame says it reads them exactly
/// ([`Frame::params_at`]).
pub(crate) struct ContentView<'a>(&'a [u8]);

/// A reader whose root is the pointer at word `at` of `segment` (a [`ContentView`]).
pub(crate) fn content_view(
    segment: &[u8],
    at: usize,
    options: capnp::message::ReaderOptions,
) -> Option<capnp::message::Reader<ContentView<'_>>> {
    let bytes = segment.get(at.checked_mul(8)?..)?;
    Some(capnp::message::Reader::new(ContentView(bytes), options))
}

/// A Call's params, read from the message's root: Message, Call, Payload, content.
pub(crate) fn call_params<S: capnp::message::ReaderSegments>(
    m: &capnp::message::Reader<S>,
) -> capnp::Result<capnp::any_pointer::Reader<'_>> {
    match m.get_root::<message::Reader<'_>>()?.which()? {
        message::Call(c) => Ok(c?.get_params()?.get_content()),
        _ => Err(capnp::Error::failed("not a Call".into())),
    }
}

/// Whether the params read through a view at word `at` of `segment` and from the root of
/// `segments` (the whole message) read as the same tree (same size, or the same step
/// failing): the debug builds' check of `skeleton::plain_subtree`. Both readers are its
/// own: every read counts against its reader's traversal limit, and the check must not
/// spend the budget of the readers the call is then served from (a value near the limit
/// would fail its second read).
pub(crate) fn reads_alike<S: capnp::message::ReaderSegments>(
    segment: &[u8],
    at: usize,
    segments: S,
    options: capnp::message::ReaderOptions,
) -> bool {
    let size =
        |p: capnp::Result<capnp::any_pointer::Reader<'_>>| p.map(|p| p.target_size().ok()).ok();
    let Some(view) = content_view(segment, at, options) else {
        return false;
    };
    size(view.get_root()) == size(call_params(&capnp::message::Reader::new(segments, options)))
}

impl capnp::message::ReaderSegments for ContentView<'_> {
    fn get_segment(&self, idx: u32) -> Option<&[u8]> {
        (idx == 0).then_some(self.0)
    }

    fn len(&self) -> usize {
        1
    }
}

/// [`check_message_shown`] by capnp's reader: every message kind and shape.
fn check_decoded(
    frame: &Frame,
    options: capnp::message::ReaderOptions,
    warm: Option<&dyn Warm>,
) -> Result<Checked, Breach> {
    let msg = capnp::message::Reader::new(frame, options);
    let root: message::Reader<'_> = msg.get_root().map_err(|_| Breach::Undecodable)?;
    let cap_table_len = |payload: capnp::Result<capnp_rpc::rpc_capnp::payload::Reader<'_>>| {
        payload
            .and_then(|p| p.get_cap_table())
            .map(|t| t.len())
            .map_err(|_| Breach::Undecodable)
    };
    match root.which().map_err(|_| Breach::UnsupportedMessage)? {
        message::Call(c) => {
            let c = c.map_err(|_| Breach::Undecodable)?;
            // Read once, for the check and the hint.
            let params = c.get_params().map_err(|_| Breach::Undecodable)?;
            let caps = cap_table_len(Ok(params))?;
            if caps > MAX_CAP_TABLE {
                return Err(Breach::CapTableTooLong);
            }
            if let Some(w) = warm {
                w.call(
                    c.get_interface_id(),
                    c.get_method_id(),
                    params.get_content(),
                );
            }
            return Ok(Checked {
                bootstrap: false,
                head: call_head(c, caps),
                params_at: None,
            });
        }
        message::Return(r) => {
            let r = r.map_err(|_| Breach::Undecodable)?;
            if let Ok(capnp_rpc::rpc_capnp::return_::Results(p)) = r.which() {
                if cap_table_len(p)? > MAX_CAP_TABLE {
                    return Err(Breach::CapTableTooLong);
                }
            }
        }
        message::Bootstrap(_) => {
            return Ok(Checked {
                bootstrap: true,
                head: None,
                params_at: None,
            })
        }
        message::Finish(_)
        | message::Resolve(_)
        | message::Release(_)
        | message::Disembargo(_)
        | message::Abort(_) => {}
        _ => return Err(Breach::UnsupportedMessage),
    }
    Ok(Checked::default())
}

/// The [`CallHead`] of Call `c` whose params carry `caps` capabilities, when it has one.
fn call_head(c: capnp_rpc::rpc_capnp::call::Reader<'_>, caps: u32) -> Option<CallHead> {
    use capnp_rpc::rpc_capnp::{call, message_target};
    if caps != 0
        || !matches!(
            c.get_send_results_to().which(),
            Ok(call::send_results_to::Caller(()))
        )
    {
        return None;
    }
    match c.get_target().ok()?.which().ok()? {
        message_target::ImportedCap(import_id) => Some(CallHead {
            question_id: c.get_question_id(),
            import_id,
            interface_id: c.get_interface_id(),
            method_id: c.get_method_id(),
        }),
        message_target::PromisedAnswer(_) => None,
    }
}

/// The size of the frame at the start of `buf` (header included), once its segment table
/// is there; a breach if it declares too much.
pub fn frame_size(buf: &[u8], max_frame_bytes: usize) -> Result<Option<usize>, Breach> {
    let word = |i: usize| -> Option<usize> {
        buf.get(i * 4..i * 4 + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let Some(first) = word(0) else {
        return Ok(None);
    };
    let segments = first.saturating_add(1);
    if segments > MAX_SEGMENTS {
        return Err(Breach::TooManySegments);
    }
    // Segment count word + one size word per segment, padded to a whole 8-byte word.
    let header = (4 + 4 * segments).next_multiple_of(8);
    if header > max_frame_bytes {
        return Err(Breach::FrameTooLarge);
    }
    let mut total = header;
    for s in 0..segments {
        let Some(words) = word(1 + s) else {
            return Ok(None);
        };
        total = total.saturating_add(words.saturating_mul(8));
        if total > max_frame_bytes {
            return Err(Breach::FrameTooLarge);
        }
    }
    Ok(Some(total))
}

impl<R: PeerReader> AsyncRead for GuardedReader<R> {
    /// Hands over one frame's bytes at most per read, so the reply backlog can hold the
    /// next frame back.
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if !std::task::ready!(this.poll_fill(cx))? {
            return Poll::Ready(Ok(0));
        }
        if this.front_pos == 0 && this.poll_room(cx).is_pending() {
            return Poll::Pending;
        }
        let Some(front) = this.ready.front() else {
            return Poll::Ready(Ok(0));
        };
        let bytes = &front.as_bytes()[this.front_pos..];
        let n = dst.len().min(bytes.len());
        dst[..n].copy_from_slice(&bytes[..n]);
        this.front_pos += n;
        if n == bytes.len() {
            this.pop_front();
        }
        Poll::Ready(Ok(n))
    }
}

impl<R> Drop for GuardedReader<R> {
    fn drop(&mut self) {
        self.budget.release(std::mem::take(&mut self.charged));
    }
}

/// A Cap'n Proto RPC `Abort` message saying `reason`, framed for the wire: for ending a
/// connection with words rather than a bare close.
pub fn abort_frame(reason: &str, kind: capnp_rpc::rpc_capnp::exception::Type) -> Vec<u8> {
    let mut msg = capnp::message::Builder::new_default();
    {
        let root = msg.init_root::<message::Builder<'_>>();
        let mut ex = root.init_abort();
        ex.set_reason(reason);
        ex.set_type(kind);
    }
    capnp::serialize::write_message_to_words(&msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_sizes_from_segment_tables() {
        let max = 1 << 20;
        // One segment of 2 words: 8-byte header + 16 bytes.
        let mut one = vec![0, 0, 0, 0, 2, 0, 0, 0];
        assert_eq!(frame_size(&one[..4], max), Ok(None));
        assert_eq!(frame_size(&one, max), Ok(Some(24)));
        one.extend_from_slice(&[0; 16]);
        assert_eq!(frame_size(&one, max), Ok(Some(24)));
        // Two segments: 4 + 8 bytes, padded to 16.
        let two = [1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0];
        assert_eq!(frame_size(&two, max), Ok(Some(16 + 16)));
        // Declared sizes past the maximum are refused before any data.
        let huge = [0, 0, 0, 0, 0xff, 0xff, 0x7f, 0];
        assert_eq!(frame_size(&huge, max), Err(Breach::FrameTooLarge));
        let many = 600u32.to_le_bytes();
        assert_eq!(frame_size(&many, max), Err(Breach::TooManySegments));
        assert_eq!(
            frame_size(&u32::MAX.to_le_bytes(), max),
            Err(Breach::TooManySegments)
        );
    }

    fn framed(build: impl FnOnce(message::Builder<'_>)) -> Vec<u8> {
        let mut msg = capnp::message::Builder::new_default();
        build(msg.init_root());
        capnp::serialize::write_message_to_words(&msg)
    }

    #[test]
    fn messages_are_checked_by_kind_and_cap_table() {
        let o = capkv::Limits::default().request_reader_options();
        let call = |caps: u32| {
            framed(|m| {
                let mut c = m.init_call();
                c.reborrow().init_target().set_imported_cap(0);
                let mut t = c.init_params().init_cap_table(caps);
                for i in 0..caps {
                    t.reborrow().get(i).set_none(());
                }
            })
        };
        assert_eq!(check_frame(&call(0), o), Ok(false));
        assert_eq!(check_frame(&call(MAX_CAP_TABLE), o), Ok(false));
        assert_eq!(
            check_frame(&call(MAX_CAP_TABLE + 1), o),
            Err(Breach::CapTableTooLong)
        );
        assert_eq!(
            check_frame(&framed(|m| m.init_bootstrap().set_question_id(0)), o),
            Ok(true)
        );
        assert_eq!(
            check_frame(&framed(|m| m.init_finish().set_question_id(0)), o),
            Ok(false)
        );
        let obsolete = framed(|m| {
            m.init_obsolete_save()
                .set_as::<capnp::data::Owned>(&[1u8; 64][..])
                .unwrap()
        });
        assert_eq!(check_frame(&obsolete, o), Err(Breach::UnsupportedMessage));
        let unimplemented = framed(|m| m.init_unimplemented().init_abort().set_reason("x"));
        assert_eq!(
            check_frame(&unimplemented, o),
            Err(Breach::UnsupportedMessage)
        );
        // An unknown union discriminant (patched into the root struct's data word).
        let mut unknown = framed(|m| m.init_finish().set_question_id(0));
        let root_data = 8 + 8; // segment table, root pointer
        unknown[root_data..root_data + 2].copy_from_slice(&99u16.to_le_bytes());
        assert_eq!(check_frame(&unknown, o), Err(Breach::UnsupportedMessage));
        assert_eq!(check_frame(&[1, 2, 3], o), Err(Breach::Undecodable));
    }

    /// A plain call on an imported capability carries its address to the engine; a call
    /// the engine must decode itself (pipelined, results elsewhere, capabilities in its
    /// params) and every other message carry none.
    #[test]
    fn the_check_hands_a_plain_call_s_address_to_the_engine() {
        let o = capkv::Limits::default().request_reader_options();
        let head = |bytes: Vec<u8>| {
            let size = frame_size(&bytes, bytes.len()).unwrap().unwrap();
            check_message_shown(&Frame::copy_from(&bytes, size), o, None)
                .unwrap()
                .head
        };
        let call = |shape: fn(capnp_rpc::rpc_capnp::call::Builder<'_>)| {
            framed(|m| {
                let mut c = m.init_call();
                c.set_question_id(7);
                c.set_interface_id(0xabcd);
                c.set_method_id(3);
                c.reborrow().init_target().set_imported_cap(5);
                c.reborrow().init_params();
                shape(c);
            })
        };
        assert_eq!(
            head(call(|_| {})),
            Some(CallHead {
                question_id: 7,
                import_id: 5,
                interface_id: 0xabcd,
                method_id: 3,
            })
        );
        assert_eq!(
            head(call(|c| c
                .init_target()
                .init_promised_answer()
                .set_question_id(1))),
            None
        );
        assert_eq!(
            head(call(|c| c.init_send_results_to().set_yourself(()))),
            None
        );
        assert_eq!(
            head(call(|c| c
                .init_params()
                .init_cap_table(1)
                .get(0)
                .set_none(()))),
            None
        );
        assert_eq!(head(framed(|m| m.init_finish().set_question_id(7))), None);
        assert_eq!(
            head(framed(|m| m.init_bootstrap().set_question_id(7))),
            None
        );
    }

    /// A peer whose bytes arrive in the chunks the test pushes; `Pending` in between.
    struct Chunks(Pushed);

    impl AsyncRead for Chunks {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            dst: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let mut q = self.0.borrow_mut();
            let Some(front) = q.front_mut() else {
                return Poll::Pending;
            };
            let n = dst.len().min(front.len());
            dst[..n].copy_from_slice(&front[..n]);
            front.drain(..n);
            if front.is_empty() {
                q.pop_front();
            }
            Poll::Ready(Ok(n))
        }
    }

    impl PeerReader for Chunks {
        fn try_send(&self, _: &[u8]) {}
    }

    /// The bytes a test pushes for a [`Chunks`] peer to deliver.
    type Pushed = std::rc::Rc<std::cell::RefCell<std::collections::VecDeque<Vec<u8>>>>;

    /// A guarded reader of what `q` delivers: 1 MiB frames, a minute to complete one, a
    /// 4 MiB budget.
    fn guarded(q: &Pushed) -> GuardedReader<Chunks> {
        let limits = std::sync::Arc::new(FrameLimits {
            max_frame_bytes: 1 << 20,
            frame_timeout: Duration::from_secs(60),
            reader_options: capkv::Limits::default().request_reader_options(),
        });
        GuardedReader::new(
            Chunks(std::rc::Rc::clone(q)),
            limits,
            std::sync::Arc::new(FrameBudget::new(4 << 20)),
            BreachCell::default(),
        )
    }

    /// The question id of a frame that carries a Finish.
    fn finish_id(f: &Frame) -> u32 {
        let m = capnp::message::Reader::new(f, capnp::message::ReaderOptions::new());
        match m
            .get_root::<message::Reader<'_>>()
            .unwrap()
            .which()
            .unwrap()
        {
            message::Finish(f) => f.unwrap().get_question_id(),
            _ => panic!("not a Finish"),
        }
    }

    /// Frames come out whole and in order whatever the reads cut, multi-segment ones
    /// included (far pointers across segments read in place), from the guarded reader and
    /// the bare one alike.
    #[test]
    fn frames_come_out_whole_in_order_multi_segment_too() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let _in_rt = rt.enter();
        // A 16-word first segment: the 100-byte reason lands in another one.
        let mut multi = capnp::message::Builder::new(
            capnp::message::HeapAllocator::new()
                .first_segment_words(16)
                .allocation_strategy(capnp::message::AllocationStrategy::FixedSize),
        );
        let reason = "r".repeat(100);
        multi
            .init_root::<message::Builder<'_>>()
            .init_abort()
            .set_reason(&reason[..]);
        assert!(multi.get_segments_for_output().len() > 1);
        let multi = capnp::serialize::write_message_to_words(&multi);
        let finish = |id| framed(|m| m.init_finish().set_question_id(id));
        let mut wire = finish(1);
        wire.extend_from_slice(&multi);
        wire.extend_from_slice(&finish(2));
        let check = |frames: Vec<Frame>| {
            assert_eq!(frames.len(), 3);
            let o = capnp::message::ReaderOptions::new();
            assert_eq!([finish_id(&frames[0]), finish_id(&frames[2])], [1, 2]);
            let m = capnp::message::Reader::new(&frames[1], o);
            assert!(capnp::message::ReaderSegments::len(&frames[1]) > 1);
            match m
                .get_root::<message::Reader<'_>>()
                .unwrap()
                .which()
                .unwrap()
            {
                message::Abort(e) => {
                    assert_eq!(e.unwrap().get_reason().unwrap().to_str().unwrap(), reason)
                }
                _ => panic!("not an Abort"),
            }
            assert_eq!(frames[1].as_bytes(), &multi[..]);
        };
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        // Cut into 7-byte reads: frames and segment tables straddle them.
        let q: Pushed = std::rc::Rc::new(std::cell::RefCell::new(
            wire.chunks(7).map(<[u8]>::to_vec).collect(),
        ));
        let mut guarded = guarded(&q);
        let mut frames = Vec::new();
        while frames.len() < 3 {
            match Pin::new(&mut guarded).poll_frame(&mut cx) {
                Poll::Ready(Ok(Some(f))) => frames.push(f),
                other => panic!("{:?}", other.map(|r| r.map(|f| f.map(|f| f.len())))),
            }
        }
        check(frames);
        let mut bare = ByteFrames::new(futures::io::Cursor::new(wire), 1 << 20);
        let mut frames = Vec::new();
        while let Poll::Ready(Ok(Some(f))) = Pin::new(&mut bare).poll_frame(&mut cx) {
            frames.push(f);
        }
        check(frames);
    }

    /// Records what it is shown: the interface id of each call, and `None` per flush.
    #[derive(Clone, Default)]
    struct Recorded(std::rc::Rc<std::cell::RefCell<Vec<Option<u64>>>>);

    impl Warm for Recorded {
        fn call(&self, interface_id: u64, _: u16, _: capnp::any_pointer::Reader<'_>) {
            self.0.borrow_mut().push(Some(interface_id));
        }
        fn flush(&self) {
            self.0.borrow_mut().push(None);
        }
    }

    /// The calls a read brings are all shown to `Warm`, then flushed once, before the first
    /// of them is handed over; each once; messages that are not calls are shown nothing;
    /// a call cut across two reads is shown when the read that completes it is checked.
    #[test]
    fn calls_read_together_are_shown_together_once() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let _in_rt = rt.enter();
        let call = |id: u32| {
            framed(|m| {
                let mut c = m.init_call();
                c.set_question_id(id);
                // The interface id names the call in the record.
                c.set_interface_id(u64::from(id));
                c.reborrow().init_target().set_imported_cap(0);
                c.init_params();
            })
        };
        let finish = framed(|m| m.init_finish().set_question_id(9));
        let q: Pushed = std::rc::Rc::default();
        let recorded = Recorded::default();
        let mut r = guarded(&q).with_warm(std::rc::Rc::new(recorded.clone()));
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut next = |r: &mut GuardedReader<Chunks>| match Pin::new(r).poll_frame(&mut cx) {
            Poll::Ready(Ok(Some(f))) => f,
            other => panic!("{:?}", other.map(|r| r.map(|f| f.map(|f| f.len())))),
        };
        let seen = || recorded.0.borrow().clone();
        q.borrow_mut()
            .push_back([call(1), finish.clone(), call(2), call(3)].concat());
        let first = next(&mut r).arrived;
        assert_eq!(seen(), [Some(1), Some(2), Some(3), None]);
        assert!(first.is_some());
        for _ in 0..3 {
            assert_eq!(
                next(&mut r).arrived,
                first,
                "one arrival for the frames of a read"
            );
        }
        assert_eq!(seen().len(), 4, "each call shown once");
        // Call 4 arrives cut in two: shown once its frame is whole. (Once a frame's size is
        // known the reader reads only up to its end, so call 5 comes in a read of its own.)
        let four = call(4);
        let (head, tail) = four.split_at(four.len() / 2);
        q.borrow_mut().push_back(head.to_vec());
        q.borrow_mut().push_back([tail, &call(5)[..]].concat());
        next(&mut r);
        assert_eq!(seen()[4..], [Some(4), None]);
        next(&mut r);
        assert_eq!(seen()[4..], [Some(4), None, Some(5), None]);
    }

    /// A connection holds no read buffer before its first read, and gives a burst's
    /// memory back once the burst has been handed over (the socket is read into the
    /// thread's one chunk).
    #[test]
    fn read_buffers_grow_with_use_and_shrink_back() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let _in_rt = rt.enter();
        let small = framed(|m| m.init_finish().set_question_id(1));
        let large = framed(|m| {
            m.init_call()
                .init_params()
                .get_content()
                .set_as::<capnp::data::Owned>(&vec![3u8; 200 * 1024][..])
                .unwrap()
        });
        let q: Pushed = std::rc::Rc::default();
        let mut r = guarded(&q);
        assert_eq!(
            r.pending.capacity(),
            0,
            "nothing held before the first read"
        );
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut out = vec![0u8; 1 << 20];
        let mut read_all = |r: &mut GuardedReader<Chunks>, len: usize| {
            let mut got = 0;
            while got < len {
                match Pin::new(&mut *r).poll_read(&mut cx, &mut out) {
                    Poll::Ready(Ok(n)) => got += n,
                    other => panic!("{other:?}"),
                }
            }
        };
        q.borrow_mut().push_back(small.clone());
        read_all(&mut r, small.len());
        q.borrow_mut().push_back(large.clone());
        read_all(&mut r, large.len());
        assert!(r.ready.is_empty() && r.ready.capacity() == 0);
        assert!(
            r.pending.capacity() <= crate::transport::IDLE_BUFFER_BYTES,
            "{}",
            r.pending.capacity()
        );
        // Still in step: the next frame reads as it should.
        q.borrow_mut().push_back(small.clone());
        read_all(&mut r, small.len());
    }

    #[test]
    fn a_large_frame_waits_for_budget_and_goes_on_when_room_comes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let _in_rt = rt.enter();
        let frame = framed(|m| {
            m.init_call()
                .init_params()
                .get_content()
                .set_as::<capnp::data::Owned>(&vec![3u8; 100 * 1024][..])
                .unwrap()
        });
        let limits = std::sync::Arc::new(FrameLimits {
            max_frame_bytes: 1 << 20,
            frame_timeout: Duration::from_secs(60),
            reader_options: capkv::Limits::default().request_reader_options(),
        });
        let budget = std::sync::Arc::new(FrameBudget::new(frame.len() + frame.len() / 2));
        let reader = |q: &Pushed| {
            GuardedReader::new(
                Chunks(std::rc::Rc::clone(q)),
                std::sync::Arc::clone(&limits),
                std::sync::Arc::clone(&budget),
                BreachCell::default(),
            )
        };
        let (qa, qb) = (std::rc::Rc::default(), std::rc::Rc::default());
        let (mut a, mut b) = (reader(&qa), reader(&qb));
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut out = vec![0u8; 2 << 20];
        // A's frame arrives but for its last byte: A holds most of the budget.
        qa.borrow_mut().push_back(frame[..frame.len() - 1].to_vec());
        assert!(Pin::new(&mut a).poll_read(&mut cx, &mut out).is_pending());
        assert!(budget.used_bytes() >= frame.len() - 1);
        // B's whole frame is there, but there is no room: B waits, nothing read.
        qb.borrow_mut().push_back(frame.clone());
        assert!(Pin::new(&mut b).poll_read(&mut cx, &mut out).is_pending());
        assert_eq!(budget.waits(), 1);
        // A completes: its frame is handed over and its bytes released...
        qa.borrow_mut().push_back(frame[frame.len() - 1..].to_vec());
        let mut got = 0;
        while got < frame.len() {
            match Pin::new(&mut a).poll_read(&mut cx, &mut out) {
                Poll::Ready(Ok(n)) => got += n,
                other => panic!("A: {other:?}"),
            }
        }
        // Only what B already holds of its frame is still charged.
        assert!(
            budget.used_bytes() < frame.len() / 2,
            "{}",
            budget.used_bytes()
        );
        // ...and B goes on.
        let mut got = 0;
        while got < frame.len() {
            match Pin::new(&mut b).poll_read(&mut cx, &mut out) {
                Poll::Ready(Ok(n)) => got += n,
                other => panic!("B: {other:?}"),
            }
        }
        assert_eq!(budget.used_bytes(), 0);
    }

    #[test]
    fn only_a_frame_left_incomplete_runs_a_clock_and_it_runs_out() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let _in_rt = rt.enter();
        let frame = framed(|m| m.init_finish().set_question_id(7));
        let reader = |timeout_ms: u64| {
            let q: Pushed = std::rc::Rc::default();
            let limits = std::sync::Arc::new(FrameLimits {
                max_frame_bytes: 1 << 20,
                frame_timeout: Duration::from_millis(timeout_ms),
                reader_options: capkv::Limits::default().request_reader_options(),
            });
            let r = GuardedReader::new(
                Chunks(std::rc::Rc::clone(&q)),
                limits,
                std::sync::Arc::new(FrameBudget::new(1 << 20)),
                BreachCell::default(),
            );
            (q, r)
        };
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut out = vec![0u8; 4096];

        // Whole frames, the common case: handed over, and no timer was ever armed.
        let (q, mut r) = reader(60_000);
        q.borrow_mut().push_back(frame.clone());
        assert_eq!(
            Pin::new(&mut r)
                .poll_read(&mut cx, &mut out)
                .map(|r| r.ok()),
            Poll::Ready(Some(frame.len()))
        );
        assert!(Pin::new(&mut r).poll_read(&mut cx, &mut out).is_pending());
        assert!(r.deadline.is_none());

        // A whole frame and the start of the next in one read: the rest's clock runs once
        // the socket is dry.
        let mut two = frame.clone();
        two.extend_from_slice(&frame[..5]);
        q.borrow_mut().push_back(two);
        assert!(Pin::new(&mut r).poll_read(&mut cx, &mut out).is_ready());
        assert!(Pin::new(&mut r).poll_read(&mut cx, &mut out).is_pending());
        assert!(r.deadline.is_some());
        // Its end arrives: the clock stops.
        q.borrow_mut().push_back(frame[5..].to_vec());
        assert!(Pin::new(&mut r).poll_read(&mut cx, &mut out).is_ready());
        assert!(Pin::new(&mut r).poll_read(&mut cx, &mut out).is_pending());
        assert!(r.deadline.is_none());

        // A frame that stops half-way: its clock starts, and when it runs out (1 ms; the
        // runtime waits for the timer) the connection gets the breach.
        let (q, mut r) = reader(1);
        q.borrow_mut().push_back(frame[..frame.len() / 2].to_vec());
        assert!(Pin::new(&mut r).poll_read(&mut cx, &mut out).is_pending());
        assert!(r.deadline.is_some());
        let ended = rt.block_on(futures::future::poll_fn(|cx| {
            Pin::new(&mut r).poll_read(cx, &mut out)
        }));
        match ended {
            Err(e) => assert!(e.to_string().contains("in time"), "{e}"),
            other => panic!("expected the frame timeout, got {other:?}"),
        }
    }

    #[test]
    fn the_budget_charges_releases_and_wakes() {
        let b = FrameBudget::new(100);
        assert!(b.try_charge(60));
        assert!(!b.try_charge(50));
        let waker = futures::task::noop_waker();
        b.wait(&waker);
        b.wait(&waker);
        assert_eq!(b.waiting.lock().unwrap().len(), 1);
        b.release(60);
        assert!(b.waiting.lock().unwrap().is_empty());
        assert!(b.try_charge(100));
        assert_eq!(b.used_bytes(), 100);
    }
}
