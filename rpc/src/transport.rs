//! The byte stream under Cap'n Proto RPC, shared by server and client.
//!
//! [`vat_network`] builds the two-party network over a TCP stream: buffered reads, the
//! caller's reader limits, and a [`CoalescingWriter`] for writes.
//!
//! Why a coalescing writer: capnp-rpc's write queue flushes after every message, so a
//! connection with 16 calls in flight paid 16 `sendto` calls for 16 small replies. The
//! coalescing writer turns "flush" into "flush soon": it wakes the connection's flusher
//! task on the current `LocalSet` and returns at once; the flusher goes to the back of the
//! run queue once more before writing. Messages queued meanwhile (other replies finished
//! in the same scheduler tick; on the client, the `Finish` of the last call and the next
//! call) join one buffer and leave in one syscall. There is no timer and no Nagle-style
//! wait: a lone message waits only for the tasks already ready on its thread.
//!
//! Measured with kv-loadgen (server pinned to one core, 1 worker): against writing the
//! first message of a burst at once, this gave 70k vs 67k gets/s at 50 connections and
//! 113k vs 100k with 16 calls in flight each, at the same 48 us for a lone call.
//!
//! Must be used inside a `tokio::task::LocalSet` (the flush task is spawned locally).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use capnp_rpc::{rpc_twoparty_capnp, twoparty};
use futures::io::{AsyncRead, AsyncWrite, BufReader};
use futures::AsyncReadExt;
use tokio_util::compat::TokioAsyncReadCompatExt;

/// Bytes buffered before a writer must wait for the flusher to drain the buffer: bounds
/// the memory one connection can hold in its write buffer.
const MAX_BUFFERED_BYTES: usize = 256 * 1024;
/// A drained buffer larger than this gives its memory back. Buffers start empty and grow
/// with use: an idle connection holds none.
pub(crate) const IDLE_BUFFER_BYTES: usize = 64 * 1024;

/// Gives an empty buffer's memory back when a burst left it larger than
/// [`IDLE_BUFFER_BYTES`]: what a burst needed does not stay with a connection gone quiet.
pub(crate) fn shrink_idle(buf: &mut Vec<u8>) {
    if buf.is_empty() && buf.capacity() > IDLE_BUFFER_BYTES {
        *buf = Vec::new();
    }
}

/// The two-party network capkv speaks over `stream`.
pub fn vat_network(
    stream: tokio::net::TcpStream,
    side: rpc_twoparty_capnp::Side,
    options: capnp::message::ReaderOptions,
) -> twoparty::VatNetwork<BufReader<impl AsyncRead + Unpin>> {
    vat_network_over(stream, side, options)
}

/// The two-party network over any byte stream (a TLS stream, for instance).
pub fn vat_network_over<S>(
    stream: S,
    side: rpc_twoparty_capnp::Side,
    options: capnp::message::ReaderOptions,
) -> twoparty::VatNetwork<BufReader<impl AsyncRead + Unpin>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let (reader, writer) = buffered_halves(stream);
    twoparty::VatNetwork::new(reader, writer, side, options)
}

/// `stream`'s halves as capkv's transport uses them: buffered reads, coalesced writes
/// (inside a `LocalSet`: the writer's flusher is a local task).
pub fn buffered_halves<S>(
    stream: S,
) -> (
    BufReader<impl AsyncRead + Unpin>,
    CoalescingWriter<impl AsyncWrite + Unpin + 'static>,
)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let (reader, writer) = stream.compat().split();
    (
        BufReader::new(PeerCheck::new(reader)),
        CoalescingWriter::new(writer),
    )
}

/// What a stream's first bytes are called when they are not Cap'n Proto; the client maps
/// errors carrying it to `unavailable`.
pub const NOT_CAPNP: &str = "the peer does not speak Cap'n Proto RPC";

/// Checks that the first bytes a peer sends can start a Cap'n Proto message (a segment
/// count within capnp's bound), so that a client pointed at an HTTP, SSH, Redis or TLS port
/// says so instead of reading their greeting as a message of a billion segments ("HTTP" is
/// 1,329,865,021 of them). Only the start is checked: later bytes come from a peer that
/// began as Cap'n Proto, and a bad frame from it is a real decoding error.
pub struct PeerCheck<R> {
    inner: R,
    /// The first word seen so far (a segment count is 4 bytes).
    head: [u8; 4],
    head_len: usize,
}

impl<R> PeerCheck<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            head: [0; 4],
            head_len: 0,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for PeerCheck<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let n = match Pin::new(&mut this.inner).poll_read(cx, dst) {
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        if this.head_len < 4 {
            let take = n.min(4 - this.head_len);
            this.head[this.head_len..this.head_len + take].copy_from_slice(&dst[..take]);
            this.head_len += take;
            if this.head_len == 4 {
                let segments = u64::from(u32::from_le_bytes(this.head)) + 1;
                if segments > crate::frames::MAX_SEGMENTS as u64 {
                    // What it sent from its first byte (earlier reads were handed on).
                    let mut sent = this.head.to_vec();
                    sent.extend_from_slice(&dst[take..n]);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{NOT_CAPNP} (it sent {})", shown(&sent)),
                    )));
                }
            }
        }
        Poll::Ready(Ok(n))
    }
}

/// The start of what a peer sent, quoted when it is text, else in hex.
fn shown(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(32)];
    let text = head
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or(&[]);
    if !text.is_empty() && text.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        format!("{:?}", String::from_utf8_lossy(text))
    } else {
        let hex: Vec<String> = head.iter().take(16).map(|b| format!("{b:02x}")).collect();
        format!("bytes {}", hex.join(" "))
    }
}

struct State<W> {
    inner: W,
    buf: Vec<u8>,
    /// `flush` was called since the buffer was last drained.
    flush_requested: bool,
    /// The flusher task, parked while there is nothing to flush.
    flusher: Option<Waker>,
    /// The writer was dropped: the flusher drains what is left and ends.
    closed: bool,
    /// The first write failure; every later write and flush reports it.
    error: Option<(io::ErrorKind, String)>,
    /// A writer waiting for a full buffer to drain.
    drained: Option<Waker>,
    /// The flusher already went to the back of the run queue for this request.
    deferred: bool,
    /// Told about every byte that reaches the socket (server connections).
    backlog: Option<Rc<crate::backlog::ReplyBacklog>>,
}

/// An `AsyncWrite` whose `flush` coalesces (see the module docs).
pub struct CoalescingWriter<W> {
    state: Rc<RefCell<State<W>>>,
    flusher: tokio::task::AbortHandle,
}

impl<W: AsyncWrite + Unpin + 'static> CoalescingWriter<W> {
    /// Wraps `inner` and starts its flusher task on the current `LocalSet`.
    pub fn new(inner: W) -> Self {
        Self::with_backlog(inner, None)
    }

    /// Like [`CoalescingWriter::new`], telling `backlog` how many bytes leave (see
    /// [`crate::backlog`]).
    pub fn with_backlog(inner: W, backlog: Option<Rc<crate::backlog::ReplyBacklog>>) -> Self {
        let state = Rc::new(RefCell::new(State {
            inner,
            buf: Vec::new(),
            flush_requested: false,
            flusher: None,
            closed: false,
            error: None,
            drained: None,
            deferred: false,
            backlog,
        }));
        // One long-lived task per connection, woken (not spawned) per flush: a wake puts
        // it at the back of the run queue, behind the tasks already ready in this tick.
        let task_state = Rc::clone(&state);
        let flusher = tokio::task::spawn_local(futures::future::poll_fn(move |cx| {
            flusher_poll(&mut task_state.borrow_mut(), cx)
        }))
        .abort_handle();
        Self { state, flusher }
    }

    /// Stops the flusher task, dropping what it has not written and the socket's write
    /// half. A dropped writer otherwise drains its buffer first, which never ends for a
    /// peer that does not read.
    pub fn abort_handle(&self) -> tokio::task::AbortHandle {
        self.flusher.clone()
    }
}

fn flusher_poll<W: AsyncWrite + Unpin>(s: &mut State<W>, cx: &mut Context<'_>) -> Poll<()> {
    loop {
        if s.error.is_some() {
            wake_drained(s);
            return Poll::Ready(());
        }
        let drain_on_close = s.closed && !s.buf.is_empty();
        if !s.flush_requested && !drain_on_close {
            if s.closed {
                return Poll::Ready(());
            }
            if !s.flusher.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                s.flusher = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        if !s.deferred && !s.closed {
            // Go to the back of the run queue once: the RPC task that asked for this flush
            // is usually woken again right away with more replies (calls that arrived in
            // the same read), and they should leave in this write. A direct self-wake, not
            // `yield_now`, whose wake-up tokio defers to the next driver turn.
            s.deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        match poll_drain(s, cx) {
            Poll::Ready(Ok(())) => {
                s.flush_requested = false;
                s.deferred = false;
                shrink_idle(&mut s.buf);
                wake_drained(s);
            }
            Poll::Ready(Err(e)) => {
                s.error = Some((e.kind(), e.to_string()));
            }
            Poll::Pending => return Poll::Pending,
        }
    }
}

fn wake_drained<W>(s: &mut State<W>) {
    if let Some(w) = s.drained.take() {
        w.wake();
    }
}

fn request_flush<W>(s: &mut State<W>) {
    s.flush_requested = true;
    if let Some(w) = s.flusher.take() {
        w.wake();
    }
}

/// Writes the whole buffer and flushes the socket.
fn poll_drain<W: AsyncWrite + Unpin>(
    s: &mut State<W>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    while !s.buf.is_empty() {
        let State {
            inner,
            buf,
            backlog,
            ..
        } = s;
        match Pin::new(inner).poll_write(cx, buf) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                buf.drain(..n);
                if let Some(b) = backlog {
                    b.written(n);
                }
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
    }
    Pin::new(&mut s.inner).poll_flush(cx)
}

fn check<W>(s: &State<W>) -> io::Result<()> {
    match &s.error {
        Some((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
        None => Ok(()),
    }
}

impl<W: AsyncWrite + Unpin + 'static> AsyncWrite for CoalescingWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut s = self.state.borrow_mut();
        check(&s)?;
        if s.buf.len() + data.len() > MAX_BUFFERED_BYTES && !s.buf.is_empty() {
            // Full: wait for the flusher to drain it.
            s.drained = Some(cx.waker().clone());
            request_flush(&mut s);
            return Poll::Pending;
        }
        s.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = self.state.borrow_mut();
        check(&s)?;
        if !s.buf.is_empty() {
            request_flush(&mut s);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = self.state.borrow_mut();
        check(&s)?;
        match poll_drain(&mut s, cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut s.inner).poll_close(cx),
            other => other,
        }
    }
}

impl<W> Drop for CoalescingWriter<W> {
    fn drop(&mut self) {
        // The flusher sends what is still buffered, then ends.
        if let Ok(mut s) = self.state.try_borrow_mut() {
            s.closed = true;
            if let Some(w) = s.flusher.take() {
                w.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{PeerCheck, NOT_CAPNP};
    use futures::AsyncReadExt as _;

    fn read_all_through_check(bytes: &[u8], chunk: usize) -> std::io::Result<Vec<u8>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut r = PeerCheck::new(futures::io::Cursor::new(bytes.to_vec()));
            let mut out = Vec::new();
            let mut buf = vec![0u8; chunk];
            loop {
                let n = r.read(&mut buf).await?;
                if n == 0 {
                    return Ok(out);
                }
                out.extend_from_slice(&buf[..n]);
            }
        })
    }

    /// A Cap'n Proto stream passes unchanged however it is cut; an HTTP answer, a TLS alert
    /// or a Redis error is named for what it is, with what the peer sent.
    #[test]
    fn the_first_bytes_must_be_capnp() {
        let mut msg = capnp::message::Builder::new_default();
        msg.init_root::<capnp_rpc::rpc_capnp::message::Builder<'_>>()
            .init_finish()
            .set_question_id(7);
        let wire = capnp::serialize::write_message_to_words(&msg);
        for chunk in [1, 3, 4096] {
            assert_eq!(read_all_through_check(&wire, chunk).unwrap(), wire);
        }
        for (sent, shown) in [
            (
                &b"HTTP/1.1 400 Bad Request\r\n\r\n"[..],
                "\"HTTP/1.1 400 Bad Request\"",
            ),
            (&b"-ERR unknown command\r\n"[..], "\"-ERR unknown command\""),
            (
                &[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x50][..],
                "bytes 15 03 03 00 02 02 50",
            ),
        ] {
            for chunk in [1, 4096] {
                let e = read_all_through_check(sent, chunk).unwrap_err().to_string();
                assert!(e.starts_with(NOT_CAPNP), "{e}");
                if chunk > 4 {
                    assert!(e.contains(shown), "{e}");
                } else {
                    assert!(
                        e.contains(&shown[..5]),
                        "the first four bytes at least: {e}"
                    );
                }
            }
        }
    }

    use super::*;
    use futures::AsyncWriteExt;

    /// Counts the writes that reach the "socket".
    #[derive(Default, Clone)]
    struct Sink(Rc<RefCell<(Vec<u8>, usize)>>);

    impl AsyncWrite for Sink {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            d: &[u8],
        ) -> Poll<io::Result<usize>> {
            let mut s = self.0.borrow_mut();
            s.0.extend_from_slice(d);
            s.1 += 1;
            Poll::Ready(Ok(d.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn local<F: std::future::Future<Output = ()>>(f: F) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, f);
    }

    #[test]
    fn flushes_in_the_same_tick_coalesce_into_one_write() {
        local(async {
            let sink = Sink::default();
            let mut w = CoalescingWriter::new(sink.clone());
            for i in 0..16u8 {
                w.write_all(&[i; 10]).await.unwrap();
                w.flush().await.unwrap();
            }
            assert_eq!(
                sink.0.borrow().1,
                0,
                "nothing written before the flusher runs"
            );
            tokio::task::yield_now().await;
            let s = sink.0.borrow();
            assert_eq!(s.1, 1, "sixteen flushes, one write");
            assert_eq!(s.0.len(), 160);
            assert_eq!(&s.0[150..], &[15u8; 10]);
        });
    }

    #[test]
    fn a_full_buffer_waits_for_the_flush_and_close_drains() {
        local(async {
            let sink = Sink::default();
            let mut w = CoalescingWriter::new(sink.clone());
            let big = vec![7u8; MAX_BUFFERED_BYTES];
            w.write_all(&big).await.unwrap();
            w.write_all(&[1, 2, 3]).await.unwrap(); // had to wait for a drain
            w.close().await.unwrap();
            assert_eq!(sink.0.borrow().0.len(), MAX_BUFFERED_BYTES + 3);
        });
    }
}
