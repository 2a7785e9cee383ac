//! A worker's own readiness loop: its TCP connections are futures in one slab, polled when
//! their socket is ready or their waker fired, with no tokio task, waker or `ScheduledIo`
//! per connection. The map:
//!
//! - [`ReadyLoop`]: the handle a worker serves a new connection through
//!   ([`ReadyLoop::serve`]); the connection is a future built over its socket.
//! - [`Driver`]: the loop itself, one tokio task on the worker's `LocalSet`. Its sockets
//!   are registered (edge-triggered) with an epoll of its own, which tokio's reactor watches
//!   as one file descriptor: tokio's timers, channels and other tasks keep working for the
//!   connections, and the thread still parks in tokio's reactor.
//! - [`ReadySocket`]: the connection's socket as handed to it, whole (tokio's `AsyncRead`
//!   and `AsyncWrite`, for a TLS stream over it) or split into [`SocketReader`] and
//!   [`SocketWriter`] (futures' traits), which keep its readiness in two flags the driver
//!   sets from its events.
//! - [`AheadHint`]: where a connection names its scattered state (an `Ahead` record per
//!   slab key, with its socket and future), which the driver asks the CPU for while it
//!   serves the event before the connection's.
//!
//! Why: with 1,000 connections and one call in flight on each, every call went through
//! tokio's readiness (`ScheduledIo::wake`), its task queue and the task's own poll
//! (`Registration::poll_ready`): about a fifth of the server's user time, profiled, and
//! what put it above Redis's event loop there. Here an event is a slab index, two flags and
//! the connection's poll: the readiness state lives beside the socket the read touches anyway.
//!
//! What it relies on (Linux, edge-triggered epoll): every arrival of data, and every time
//! the send buffer frees room, is an event, whether or not the socket was drained. So a
//! half that saw `WouldBlock`, or took less than it asked for (the socket is dry or full:
//! tokio reads the same), is ready again only after an event, and its future is polled at
//! that event if it asked for that half (a half polled from another task, such as
//! capnp-rpc's flush task, has that task woken instead). A future that waits on anything
//! else registers the connection's waker, which queues the connection for the driver's
//! next turn.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures::task::AtomicWaker;
use mio::{Interest, Token};
use slab::Slab;
use tokio::io::unix::AsyncFd;

/// Events the driver takes from its epoll in one turn. Bounded so that other tasks of the
/// worker (timers, the write engine's commits) run between turns; more ready sockets are
/// taken at the next turn, which comes at once.
const EVENTS_PER_TURN: usize = 1024;

/// Reads of the epoll in one turn: the last one normally finds it empty, and registers the
/// driver with tokio's reactor.
const EPOLL_READS_PER_TURN: usize = 4;

/// Rounds of woken connections polled in one turn (a connection woken again while it was
/// polled waits for the next turn, so a busy one cannot hold the driver).
const WOKEN_ROUNDS_PER_TURN: usize = 2;

/// How to serve connections on a worker's readiness loop (cheap to clone).
#[derive(Clone)]
pub struct ReadyLoop {
    inner: Rc<Inner>,
}

/// The loop, to be spawned on the worker's `LocalSet` ([`Driver::run`]).
pub struct Driver {
    poll: AsyncFd<mio::Poll>,
    events: mio::Events,
    inner: Rc<Inner>,
    /// The woken keys being polled (swapped with the shared list, so both keep capacity).
    spare: Vec<usize>,
}

struct Inner {
    /// The driver ended (its epoll failed): new connections must go elsewhere.
    failed: Cell<bool>,
    registry: mio::Registry,
    conns: RefCell<Slab<Entry>>,
    /// Where each connection's state lives, by slab key (see [`Ahead`]). Grown by
    /// [`ReadyLoop::serve`]; entries of ended connections stay until their key is reused.
    ahead: RefCell<Vec<Cell<Ahead>>>,
    woken: Arc<Woken>,
}

/// Where a connection's cold state lives, for the driver to have the CPU load it while
/// the connection before it in a turn's events is served (see `crate::hint`). With a
/// thousand connections each one's state is out of the cache at its turn, a dozen
/// separate lines; asked for only when its own poll begins, their misses still stall that
/// poll, while one event ahead they are hidden behind the previous connection's work.
/// Addresses only, never read through: a stale one (its connection ended) loads lines
/// for nothing.
///
/// One cache line, so that the step that loads it ahead loads all of it.
#[derive(Clone, Copy, Default)]
#[repr(align(64))]
struct Ahead {
    /// The socket's state (its readiness flags) and the future's box.
    socket: usize,
    fut: usize,
    /// What the connection named itself ([`AheadHint::set`]).
    named: [usize; AHEAD_NAMED],
    /// Bytes at `fut` and at each of `named` (each at most [`AHEAD_RANGE_MAX_BYTES`]).
    fut_bytes: u16,
    named_bytes: [u16; AHEAD_NAMED],
}

/// Ranges a connection may name for [`Ahead`].
pub const AHEAD_NAMED: usize = 3;

/// Most bytes of one range loaded ahead (the lines beyond are left to the poll).
const AHEAD_RANGE_MAX_BYTES: usize = 1024;

impl Ahead {
    fn prefetch(&self) {
        crate::hint::prefetch_bytes(self.socket as *const u8, std::mem::size_of::<Socket>());
        crate::hint::prefetch_bytes(self.fut as *const u8, usize::from(self.fut_bytes));
        for (&at, &bytes) in self.named.iter().zip(&self.named_bytes) {
            crate::hint::prefetch_bytes(at as *const u8, usize::from(bytes));
        }
    }
}

/// `bytes`, at most [`AHEAD_RANGE_MAX_BYTES`].
fn ahead_bytes(bytes: usize) -> u16 {
    u16::try_from(bytes.min(AHEAD_RANGE_MAX_BYTES)).unwrap_or(u16::MAX)
}

/// How a connection names the state the driver loads ahead of its events ([`Ahead`]).
/// Cheap to clone; does nothing once the loop is gone.
#[derive(Clone)]
pub struct AheadHint {
    inner: std::rc::Weak<Inner>,
    key: usize,
}

impl AheadHint {
    /// Names up to [`AHEAD_NAMED`] ranges (address, bytes; each loaded up to 1 KiB) of
    /// the connection's state, replacing those named before. The addresses must stay the
    /// state's for the connection's life (boxed or `Rc`'d state) to be of use; a wrong
    /// one costs a wasted load, never a fault.
    pub fn set(&self, ranges: [(*const u8, usize); AHEAD_NAMED]) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let ahead = inner.ahead.borrow();
        if let Some(slot) = ahead.get(self.key) {
            let mut a = slot.get();
            for (i, (at, bytes)) in ranges.into_iter().enumerate() {
                a.named[i] = at as usize;
                a.named_bytes[i] = ahead_bytes(bytes);
            }
            slot.set(a);
        }
    }
}

/// One connection: its future, its socket (with its readiness and the waker its future
/// is polled with, [`Socket::own`]), and that waker's queue state.
struct Entry {
    fut: Pin<Box<dyn Future<Output = ()>>>,
    socket: Rc<Socket>,
    wake: Arc<ConnWake>,
}

/// Connections whose waker fired, for the driver's next turn.
#[derive(Default)]
struct Woken {
    /// Each live connection at most once (see [`ConnWake::queued`]); a key of a connection
    /// that ended may come once more, and is a harmless poll of whoever has its slot.
    keys: Mutex<Vec<usize>>,
    driver: AtomicWaker,
}

/// A connection's waker (any thread may wake it: a write committed by another thread).
struct ConnWake {
    key: usize,
    /// In [`Woken::keys`] already: set by a wake, cleared by the driver before it polls.
    queued: AtomicBool,
    woken: Arc<Woken>,
}

impl Wake for ConnWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.woken
                .keys
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(self.key);
            self.woken.driver.wake();
        }
    }
}

/// A connection's socket and what the driver last learned of it.
struct Socket {
    stream: mio::net::TcpStream,
    /// May have bytes to read: set by an event, cleared once a read finds it dry.
    readable: Cell<bool>,
    /// May take bytes: set by an event, cleared once a write finds it full.
    writable: Cell<bool>,
    /// The peer will send nothing more (or the socket failed): `readable` stays set, since
    /// the end (or the error) is read after the data, with no event of its own to come.
    /// Sticky, as tokio's closed readiness.
    read_closed: Cell<bool>,
    /// The socket takes nothing more (or failed): `writable` stays set.
    write_closed: Cell<bool>,
    /// The future waits for `readable`: the next readable event polls it.
    want_read: Cell<bool>,
    /// The future waits for `writable`: the next writable event polls it.
    want_write: Cell<bool>,
    /// The connection's waker: what its future is polled with, and how its own polls are
    /// told from another task's.
    own: Waker,
    /// Another task of the thread waits for `readable` (woken at the next readable event):
    /// a half polled from outside the connection's future, such as capnp-rpc's flush task.
    other_read: RefCell<Option<Waker>>,
    /// Another task waits for `writable`.
    other_write: RefCell<Option<Waker>>,
    /// How the connection names its state for the driver ([`ReadySocket::ahead_hint`]).
    ahead: AheadHint,
}

impl Socket {
    /// Notes that whoever polls with `cx` waits for `readable` (`write`: `writable`).
    fn wait(&self, cx: &Context<'_>, write: bool) {
        let (want, other) = if write {
            (&self.want_write, &self.other_write)
        } else {
            (&self.want_read, &self.other_read)
        };
        if cx.waker().will_wake(&self.own) {
            want.set(true);
        } else {
            let mut other = other.borrow_mut();
            if !other.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *other = Some(cx.waker().clone());
            }
        }
    }

    /// Who waits for what `event` says became ready: whether the connection's own future
    /// does (others are woken here).
    fn ready(&self, event: &mio::event::Event) -> bool {
        // A hang-up or an error is news for both halves: the next read or write reports it.
        let gone = event.is_error();
        let mut own = false;
        if gone || event.is_read_closed() {
            self.read_closed.set(true);
        }
        if gone || event.is_write_closed() {
            self.write_closed.set(true);
        }
        if gone || event.is_readable() || event.is_read_closed() {
            self.readable.set(true);
            own |= self.want_read.replace(false);
            if let Some(w) = self.other_read.borrow_mut().take() {
                w.wake();
            }
        }
        if gone || event.is_writable() || event.is_write_closed() {
            self.writable.set(true);
            own |= self.want_write.replace(false);
            if let Some(w) = self.other_write.borrow_mut().take() {
                w.wake();
            }
        }
        own
    }
}

/// Ends the loop: its epoll failed (see [`Driver::run`]).
#[derive(Debug, thiserror::Error)]
#[error("readiness loop: {0}")]
pub struct ReadyError(#[from] io::Error);

impl ReadyLoop {
    /// A loop and its driver; nothing runs until the driver is spawned.
    pub fn new() -> Result<(ReadyLoop, Driver), ReadyError> {
        let poll = mio::Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let inner = Rc::new(Inner {
            failed: Cell::new(false),
            registry,
            conns: RefCell::new(Slab::new()),
            ahead: RefCell::default(),
            woken: Arc::default(),
        });
        let driver = Driver {
            // SAFETY: the `Poll` owns its epoll descriptor for its whole life, and the
            // `AsyncFd` owns the `Poll`: the descriptor it watches stays open and the same.
            poll: unsafe {
                AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE)
                    .map_err(|e| e.into_parts().1)?
            },
            events: mio::Events::with_capacity(EVENTS_PER_TURN),
            inner: Rc::clone(&inner),
            spare: Vec::new(),
        };
        Ok((ReadyLoop { inner }, driver))
    }

    /// Serves `stream` with the future `make` builds over it, polled by the driver
    /// from its next turn until it ends (then the socket closes). Must not be called from
    /// inside one of this loop's connections.
    pub fn serve<F, M>(&self, stream: std::net::TcpStream, make: M) -> Result<(), ReadyError>
    where
        M: FnOnce(ReadySocket) -> F,
        F: Future<Output = ()> + 'static,
    {
        stream.set_nonblocking(true)?;
        let mut stream = mio::net::TcpStream::from_std(stream);
        let mut conns = self
            .inner
            .conns
            .try_borrow_mut()
            .map_err(|_| io::Error::other("a connection was served from inside the loop"))?;
        let slot = conns.vacant_entry();
        let key = slot.key();
        self.inner.registry.register(
            &mut stream,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let wake = Arc::new(ConnWake {
            key,
            queued: AtomicBool::new(false),
            woken: Arc::clone(&self.inner.woken),
        });
        let waker = Waker::from(Arc::clone(&wake));
        let socket = Rc::new(Socket {
            stream,
            readable: Cell::new(true),
            writable: Cell::new(true),
            read_closed: Cell::new(false),
            write_closed: Cell::new(false),
            want_read: Cell::new(false),
            want_write: Cell::new(false),
            own: waker.clone(),
            other_read: RefCell::default(),
            other_write: RefCell::default(),
            ahead: AheadHint {
                inner: Rc::downgrade(&self.inner),
                key,
            },
        });
        let mut aheads = self
            .inner
            .ahead
            .try_borrow_mut()
            .map_err(|_| io::Error::other("a connection was served from inside the loop"))?;
        if aheads.len() <= key {
            aheads.resize_with(key + 1, Cell::default);
        }
        // Before `make`, which may name state of its own already.
        aheads[key].set(Ahead {
            socket: Rc::as_ptr(&socket) as usize,
            ..Ahead::default()
        });
        drop(aheads);
        let fut: Pin<Box<dyn Future<Output = ()>>> =
            Box::pin(make(ReadySocket(Rc::clone(&socket))));
        if let Some(cell) = self.inner.ahead.borrow().get(key) {
            let mut a = cell.get();
            a.fut = (&*fut as *const dyn Future<Output = ()>).cast::<u8>() as usize;
            a.fut_bytes = ahead_bytes(std::mem::size_of_val(&*fut));
            cell.set(a);
        }
        slot.insert(Entry { fut, socket, wake });
        // Its first poll, at the driver's next turn.
        waker.wake();
        Ok(())
    }

    /// The driver runs (or has not started): [`serve`](Self::serve) may be used. False
    /// once it ended on an error.
    pub fn is_running(&self) -> bool {
        !self.inner.failed.get()
    }

    /// Connections being served (0 while asked from inside one of them).
    pub fn len(&self) -> usize {
        self.inner.conns.try_borrow().map_or(0, |c| c.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Driver {
    /// Runs the loop. It ends only if its epoll fails, dropping every connection (their
    /// sockets close); the worker logs why.
    pub async fn run(mut self) -> ReadyError {
        let err = std::future::poll_fn(|cx| self.turn(cx)).await;
        self.inner.failed.set(true);
        self.inner.conns.borrow_mut().clear();
        err
    }

    fn turn(&mut self, cx: &mut Context<'_>) -> Poll<ReadyError> {
        self.inner.woken.driver.register(cx.waker());
        // Until tokio's reactor has the driver's waker for the epoll's next events (only a
        // `Pending` registers it), or a turn's worth of events was taken.
        let mut more = true;
        for _ in 0..EPOLL_READS_PER_TURN {
            let mut ready = match self.poll.poll_read_ready_mut(cx) {
                Poll::Ready(Ok(ready)) => ready,
                Poll::Ready(Err(e)) => return Poll::Ready(e.into()),
                Poll::Pending => {
                    more = false;
                    break;
                }
            };
            match ready
                .get_inner_mut()
                .poll(&mut self.events, Some(Duration::ZERO))
            {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Poll::Ready(e.into()),
            }
            let drained = self.events.iter().count() < EVENTS_PER_TURN;
            if drained {
                // Tokio's reactor tells when the epoll has events again.
                ready.clear_ready();
            }
            let mut conns = self.inner.conns.borrow_mut();
            let aheads = self.inner.ahead.borrow();
            // Two steps ahead of the event served: the connection's `Ahead` record (its
            // address is known without a load) and its slab entry; one step ahead: what
            // the record names, now in the cache.
            let mut far = self.events.iter().skip(2);
            let mut near = self.events.iter().skip(1);
            for event in self.events.iter() {
                if let Some(e) = far.next() {
                    let key = e.token().0;
                    if let Some(a) = aheads.get(key) {
                        crate::hint::prefetch(a);
                    }
                    if let Some(entry) = conns.get(key) {
                        crate::hint::prefetch(entry);
                    }
                }
                if let Some(a) = near.next().and_then(|e| aheads.get(e.token().0)) {
                    a.get().prefetch();
                }
                poll_ready(&mut conns, event);
            }
            drop(aheads);
            if !drained {
                break;
            }
        }
        for _ in 0..WOKEN_ROUNDS_PER_TURN {
            std::mem::swap(
                &mut *self
                    .inner
                    .woken
                    .keys
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
                &mut self.spare,
            );
            if self.spare.is_empty() {
                break;
            }
            let mut conns = self.inner.conns.borrow_mut();
            for key in self.spare.drain(..) {
                if let Some(entry) = conns.get(key) {
                    entry.wake.queued.store(false, Ordering::Release);
                    poll_entry(&mut conns, key);
                }
            }
        }
        // Still woken ones, or events left: the next turn comes after the worker's other tasks.
        if more
            || !self
                .inner
                .woken
                .keys
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
        {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

/// Marks what `event` says of its socket and polls the connection if it waits for that.
fn poll_ready(conns: &mut Slab<Entry>, event: &mio::event::Event) {
    let key = event.token().0;
    let Some(entry) = conns.get(key) else {
        return;
    };
    if entry.socket.ready(event) {
        poll_entry(conns, key);
    }
}

fn poll_entry(conns: &mut Slab<Entry>, key: usize) {
    let Some(entry) = conns.get_mut(key) else {
        return;
    };
    let mut cx = Context::from_waker(&entry.socket.own);
    if entry.fut.as_mut().poll(&mut cx).is_ready() {
        // Its future and socket go (the descriptor's close takes it out of the epoll).
        drop(conns.remove(key));
    }
}

/// A connection's socket as the loop hands it over: whole (tokio's `AsyncRead` and
/// `AsyncWrite`, for a TLS stream over it), or [split](Self::split) into its halves.
pub struct ReadySocket(Rc<Socket>);

/// A connection socket's read half (futures' `AsyncRead`).
pub struct SocketReader(Rc<Socket>);

/// A connection socket's write half (futures' `AsyncWrite`).
pub struct SocketWriter(Rc<Socket>);

impl ReadySocket {
    /// How the connection names the state the driver loads ahead of its events.
    pub fn ahead_hint(&self) -> AheadHint {
        self.0.ahead.clone()
    }

    pub fn split(self) -> (SocketReader, SocketWriter) {
        (SocketReader(Rc::clone(&self.0)), SocketWriter(self.0))
    }
}

impl Socket {
    fn poll_read(&self, cx: &Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let len = buf.len();
        self.io(cx, false, len, |mut s| s.read(buf))
    }

    fn poll_write(&self, cx: &Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.io(cx, true, buf.len(), |mut s| s.write(buf))
    }

    /// One read (`write`: one write) of up to `len` bytes by `op`, in step with that half's
    /// readiness: not tried while the half is not ready, and not ready once it found the
    /// socket dry or full (a `WouldBlock`, or fewer bytes than asked), unless the peer's
    /// end or an error made it ready for good. Whoever then waits is noted ([`Self::wait`]).
    fn io(
        &self,
        cx: &Context<'_>,
        write: bool,
        len: usize,
        mut op: impl FnMut(&mio::net::TcpStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        let (ready, closed) = if write {
            (&self.writable, &self.write_closed)
        } else {
            (&self.readable, &self.read_closed)
        };
        if !ready.get() {
            self.wait(cx, write);
            return Poll::Pending;
        }
        loop {
            match op(&self.stream) {
                Ok(n) => {
                    if 0 < n && n < len && !closed.get() {
                        ready.set(false);
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready.set(closed.get());
                    self.wait(cx, write);
                    return Poll::Pending;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn shutdown(&self) -> Poll<io::Result<()>> {
        Poll::Ready(match self.stream.shutdown(std::net::Shutdown::Write) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
            _ => Ok(()),
        })
    }
}

impl crate::frames::PeerReader for SocketReader {
    /// Best effort and never blocking (the frame layer's `Abort` on a breach): a full
    /// socket buffer just loses the reason.
    fn try_send(&self, bytes: &[u8]) {
        let _ = (&self.0.stream).write(bytes);
    }
}

impl futures::io::AsyncRead for SocketReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_read(cx, buf)
    }
}

impl futures::io::AsyncWrite for SocketWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.shutdown()
    }
}

impl tokio::io::AsyncRead for ReadySocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.0.poll_read(cx, buf.initialize_unfilled()) {
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl tokio::io::AsyncWrite for ReadySocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.shutdown()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{AsyncReadExt, AsyncWriteExt};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Runs `f` with a loop driven on a fresh current-thread runtime's `LocalSet`, and a
    /// listener whose accepted connections `f` serves on it.
    fn with_loop<F, Fut>(f: F)
    where
        F: FnOnce(ReadyLoop, std::net::TcpListener) -> Fut,
        Fut: Future<Output = ()>,
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let (ready, driver) = ReadyLoop::new().expect("loop");
            let driver = tokio::task::spawn_local(driver.run());
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            f(ready, listener).await;
            driver.abort();
        });
    }

    /// A connected pair: the client as a tokio stream, the server's end from `listener`.
    async fn pair(
        listener: &std::net::TcpListener,
    ) -> (tokio::net::TcpStream, std::net::TcpStream) {
        let client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().expect("accept");
        (client, server)
    }

    fn served_by_echo(s: ReadySocket) -> impl Future<Output = ()> {
        let (r, w) = s.split();
        echo(r, w)
    }

    /// Echoes what it reads until the peer hangs up.
    async fn echo(mut r: SocketReader, mut w: SocketWriter) {
        let mut buf = vec![0u8; 4096];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if w.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Yields until `done` holds, a bounded number of times (each yield lets the driver
    /// take the events the kernel already queued).
    async fn until(mut done: impl FnMut() -> bool) {
        for _ in 0..10_000 {
            if done() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("condition not reached");
    }

    #[test]
    fn connections_are_served_and_leave_the_slab_when_they_end() {
        with_loop(|ready, listener| async move {
            let mut clients = Vec::new();
            for _ in 0..50 {
                let (client, server) = pair(&listener).await;
                ready.serve(server, served_by_echo).expect("serve");
                clients.push(client);
            }
            for round in 0..3u8 {
                for (i, c) in clients.iter_mut().enumerate() {
                    c.write_all(&[round, i as u8]).await.expect("write");
                }
                for (i, c) in clients.iter_mut().enumerate() {
                    let mut got = [0u8; 2];
                    c.read_exact(&mut got).await.expect("read");
                    assert_eq!(got, [round, i as u8]);
                }
            }
            assert_eq!(ready.len(), 50);
            drop(clients);
            until(|| ready.is_empty()).await;
        });
    }

    /// What a connection names, and where its socket and future live, are what the loop
    /// loads ahead of its events; ranges are cut to 1 KiB, and a hint outliving its loop
    /// does nothing.
    #[test]
    fn a_connection_s_named_state_is_recorded_for_the_loop_to_load_ahead() {
        let hint = std::rc::Rc::new(std::cell::RefCell::new(None));
        with_loop(|ready, listener| {
            let hint = std::rc::Rc::clone(&hint);
            async move {
                let (_client, server) = pair(&listener).await;
                let state = Box::new([0u8; 4096]);
                let at = state.as_ptr();
                let named = std::rc::Rc::clone(&hint);
                ready
                    .serve(server, move |s| {
                        let h = s.ahead_hint();
                        h.set([(at, 64), (at.wrapping_add(64), 4096), (at, 0)]);
                        *named.borrow_mut() = Some(h);
                        served_by_echo(s)
                    })
                    .expect("serve");
                let aheads = ready.inner.ahead.borrow();
                let a = aheads[0].get();
                assert_eq!(a.named, [at as usize, at as usize + 64, at as usize]);
                assert_eq!(a.named_bytes, [64, 1024, 0]);
                assert_eq!(std::mem::size_of::<Ahead>(), 64, "one cache line");
                let conns = ready.inner.conns.borrow();
                let entry = conns.get(0).expect("served");
                assert_eq!(a.socket, Rc::as_ptr(&entry.socket) as usize);
                assert_eq!(
                    a.fut,
                    (&*entry.fut as *const dyn Future<Output = ()>).cast::<u8>() as usize
                );
                assert!(0 < a.fut_bytes && usize::from(a.fut_bytes) <= AHEAD_RANGE_MAX_BYTES);
                drop(state);
            }
        });
        // The loop is gone: naming again is a no-op.
        let h = hint.borrow_mut().take().expect("named");
        h.set([(std::ptr::null(), 1); AHEAD_NAMED]);
    }

    #[test]
    fn a_full_socket_is_written_again_when_it_drains() {
        with_loop(|ready, listener| async move {
            let (mut client, server) = pair(&listener).await;
            ready.serve(server, served_by_echo).expect("serve");
            // Far more than both socket buffers: the echo's writes find the socket full.
            let sent: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
            let (mut rd, mut wr) = client.split();
            let write = async {
                wr.write_all(&sent).await.expect("write");
                wr.shutdown().await.expect("shutdown");
            };
            let mut got = Vec::new();
            let read = rd.read_to_end(&mut got);
            let ((), n) = tokio::join!(write, read);
            assert_eq!(n.expect("read"), sent.len());
            assert!(got == sent, "echo differs");
        });
    }

    #[test]
    fn a_wake_from_another_thread_polls_the_connection() {
        with_loop(|ready, listener| async move {
            let (mut client, server) = pair(&listener).await;
            let (tx, rx) = futures::channel::oneshot::channel::<u8>();
            ready
                .serve(server, move |s| async move {
                    let (_r, mut w) = s.split();
                    if let Ok(b) = rx.await {
                        let _ = w.write_all(&[b]).await;
                    }
                })
                .expect("serve");
            let sender = std::thread::spawn(move || tx.send(7));
            let mut got = [0u8; 1];
            client.read_exact(&mut got).await.expect("read");
            assert_eq!(got, [7]);
            assert!(sender.join().expect("thread").is_ok());
            // The future ended after its write: the socket closes.
            assert_eq!(client.read(&mut got).await.expect("eof"), 0);
            until(|| ready.is_empty()).await;
        });
    }

    #[test]
    fn a_half_polled_from_another_task_has_that_task_woken() {
        with_loop(|ready, listener| async move {
            let (mut client, server) = pair(&listener).await;
            let sent: Vec<u8> = (0..4u32 << 20).map(|i| (i % 253) as u8).collect();
            let to_send = sent.clone();
            ready
                .serve(server, move |s| {
                    let (_r, mut w) = s.split();
                    // The writing is another task's (as capnp-rpc's flush task): the socket
                    // fills, and only a wake of that task gets the rest out.
                    let task = tokio::task::spawn_local(async move {
                        w.write_all(&to_send).await.expect("write");
                        w.close().await.expect("close");
                    });
                    async move {
                        let _ = task.await;
                    }
                })
                .expect("serve");
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.expect("read");
            assert!(got == sent, "bytes differ");
        });
    }
}
