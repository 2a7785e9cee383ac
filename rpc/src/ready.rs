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
    woken: Arc<Woken>,
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
        });
        let fut = make(ReadySocket(Rc::clone(&socket)));
        slot.insert(Entry {
            fut: Box::pin(fut),
            socket,
            wake,
        });
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
            for event in self.events.iter() {
                poll_ready(&mut conns, event);
            }
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
