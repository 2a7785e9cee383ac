//! The byte stream under Cap'n Proto RPC, shared by server and client.
//!
//! [`vat_network`] builds the two-party network over a TCP stream: buffered reads, the
//! caller's reader limits, and a [`CoalescingWriter`] for writes.
//!
//! Why a coalescing writer: capnp-rpc's write queue flushes after every message, so a
//! connection with 16 calls in flight paid 16 `sendto` calls for 16 small replies. The
//! coalescing writer turns "flush" into "flush soon": it schedules one flush task on the
//! current `LocalSet` and returns at once. Messages queued before that task runs (other
//! replies finished in the same scheduler tick) join the same buffer and leave in one
//! syscall. A lone message is delayed by one scheduler tick, not by a timer: there is no
//! Nagle-style wait.
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

/// Bytes buffered before a write goes straight to the socket instead of waiting for the
/// flush task: bounds the memory one connection can hold in its write buffer.
const MAX_BUFFERED_BYTES: usize = 256 * 1024;

/// The two-party network capkv speaks over `stream`.
pub fn vat_network(
    stream: tokio::net::TcpStream,
    side: rpc_twoparty_capnp::Side,
    options: capnp::message::ReaderOptions,
) -> twoparty::VatNetwork<BufReader<impl AsyncRead + Unpin>> {
    let (reader, writer) = stream.compat().split();
    twoparty::VatNetwork::new(
        BufReader::new(reader),
        CoalescingWriter::new(writer),
        side,
        options,
    )
}

struct State<W> {
    inner: W,
    buf: Vec<u8>,
    /// A flush task is pending (scheduled or running).
    flush_scheduled: bool,
    /// The flush task's failure, reported by the next write or flush.
    error: Option<io::Error>,
    /// Woken when the buffer drains (a writer waiting on a full buffer).
    drained: Option<Waker>,
}

/// An `AsyncWrite` whose `flush` coalesces (see the module docs).
pub struct CoalescingWriter<W> {
    state: Rc<RefCell<State<W>>>,
}

impl<W: AsyncWrite + Unpin + 'static> CoalescingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            state: Rc::new(RefCell::new(State {
                inner,
                buf: Vec::with_capacity(8 * 1024),
                flush_scheduled: false,
                error: None,
                drained: None,
            })),
        }
    }

    fn schedule_flush(&self) {
        let mut s = self.state.borrow_mut();
        if s.flush_scheduled {
            return;
        }
        s.flush_scheduled = true;
        let state = Rc::clone(&self.state);
        tokio::task::spawn_local(futures::future::poll_fn(move |cx| {
            let mut s = state.borrow_mut();
            let r = poll_drain(&mut s, cx);
            if r.is_ready() {
                s.flush_scheduled = false;
                if let Some(w) = s.drained.take() {
                    w.wake();
                }
            }
            r.map(|res| {
                if let Err(e) = res {
                    s.error = Some(e);
                }
            })
        }));
    }
}

/// Writes the whole buffer and flushes the socket.
fn poll_drain<W: AsyncWrite + Unpin>(
    s: &mut State<W>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    while !s.buf.is_empty() {
        let State { inner, buf, .. } = s;
        match Pin::new(inner).poll_write(cx, buf) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                buf.drain(..n);
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
    }
    Pin::new(&mut s.inner).poll_flush(cx)
}

fn take_error<W>(s: &mut State<W>) -> io::Result<()> {
    match s.error.take() {
        Some(e) => Err(e),
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
        take_error(&mut s)?;
        if s.buf.len() + data.len() > MAX_BUFFERED_BYTES && !s.buf.is_empty() {
            // Full: wait for the flush task to drain it (schedule one if none is pending).
            s.drained = Some(cx.waker().clone());
            let scheduled = s.flush_scheduled;
            drop(s);
            if !scheduled {
                self.schedule_flush();
            }
            return Poll::Pending;
        }
        s.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        take_error(&mut self.state.borrow_mut())?;
        if !self.state.borrow().buf.is_empty() {
            self.schedule_flush();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = self.state.borrow_mut();
        take_error(&mut s)?;
        match poll_drain(&mut s, cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut s.inner).poll_close(cx),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
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
                "nothing written before the flush task runs"
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
