//! The connection half both raw clients share ([`crate::raw`] for capkv, [`crate::raw_redis`]
//! for Redis): an outbox that callers encode their requests into and one writer task that
//! sends whatever it holds when it runs (the requests of one scheduler tick leave in one
//! write), callers parked in a slab of slots by request id (no channel or allocation per
//! call), and the wire-latency stamps: a request is stamped when the write carrying it goes
//! to the kernel, its reply when the read that brought it returns, which is how
//! redis-benchmark times its requests. The protocol halves only encode requests and route
//! replies to ids.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::target::ErrorCode;
use crate::workload::OpKind;

/// Outbox bytes past which a caller waits for the writer (bounds a connection's buffer).
const MAX_OUTBOX_BYTES: usize = 256 * 1024;

/// What a reply said.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Reply {
    /// Success (a missing key is a success, as in Redis).
    Ok,
    /// An error the server answered with, by code name.
    Error(ErrorCode),
    /// A protocol-level failure, or the connection ended.
    Exception,
}

/// A caller waiting for its reply.
struct Slot {
    kind: OpKind,
    reply: Option<Reply>,
    waker: Option<Waker>,
    /// The caller stopped waiting (its future was dropped): the id is freed on the reply.
    abandoned: bool,
    /// When the write carrying the request went to the kernel.
    written: Option<Instant>,
    /// From `written` to the read that brought the reply.
    wire: Option<Duration>,
}

/// One connection's outbox, writer and waiting callers.
pub(crate) struct Pipe {
    /// Requests encoded since the writer last ran.
    outbox: RefCell<Vec<u8>>,
    /// The writer task, parked while the outbox is empty.
    writer: RefCell<Option<Waker>>,
    /// Callers waiting for room in the outbox.
    room: RefCell<Vec<Waker>>,
    /// Callers by id (`first_id` is index 0); free ids to reuse.
    slots: RefCell<Vec<Option<Slot>>>,
    free: RefCell<Vec<u32>>,
    /// Requests encoded into the outbox since the writer last took it: stamped when it
    /// writes.
    unwritten: RefCell<Vec<u32>>,
    /// Ids below it belong to the protocol (capkv's bootstrap and capabilities).
    first_id: u32,
    dead: Cell<bool>,
}

impl Pipe {
    pub(crate) fn new(first_id: u32) -> Pipe {
        Pipe {
            outbox: RefCell::new(Vec::with_capacity(4096)),
            writer: RefCell::new(None),
            room: RefCell::new(Vec::new()),
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            unwritten: RefCell::new(Vec::new()),
            first_id,
            dead: Cell::new(false),
        }
    }

    /// Encodes a message no caller waits for (a handshake step, a Finish) into the outbox.
    pub(crate) fn send(&self, encode: impl FnOnce(&mut Vec<u8>)) {
        encode(&mut self.outbox.borrow_mut());
        self.wake_writer();
    }

    /// Starts the connection's writer on `w` and its reader, `read` (inside a `LocalSet`).
    pub(crate) fn start(
        self: &Rc<Self>,
        w: tokio::net::tcp::OwnedWriteHalf,
        read: impl Future<Output = ()> + 'static,
    ) {
        tokio::task::spawn_local(write_outbox(Rc::clone(self), w));
        tokio::task::spawn_local(read);
    }

    /// One request of `kind` on the one key of `keys` (raw clients send no batches),
    /// encoded by `encode` under the id it is given, then its reply and wire latency.
    /// Waits first while the outbox is full.
    pub(crate) async fn call(
        &self,
        kind: OpKind,
        keys: &[Vec<u8>],
        encode: impl FnOnce(&mut Vec<u8>, u32, &[u8]),
    ) -> (Result<(), ErrorCode>, Option<Duration>) {
        let [key] = keys else {
            return (Err("raw_mode_single_keys_only"), None);
        };
        std::future::poll_fn(|cx| self.poll_room(cx)).await;
        if self.dead.get() {
            return (Err("transport"), None);
        }
        let id = self.take_id(kind);
        self.unwritten.borrow_mut().push(id);
        self.send(|out| encode(out, id, key));
        let (reply, wire) = WaitReply {
            pipe: self,
            id,
            done: false,
        }
        .await;
        let result = match reply {
            Reply::Ok => Ok(()),
            Reply::Error(code) => Err(code),
            Reply::Exception if self.dead.get() => Err("transport"),
            Reply::Exception => Err("exception"),
        };
        (result, wire)
    }

    /// Ready while the outbox has room (or the connection is dead).
    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.dead.get() || self.outbox.borrow().len() < MAX_OUTBOX_BYTES {
            return Poll::Ready(());
        }
        self.room.borrow_mut().push(cx.waker().clone());
        Poll::Pending
    }

    fn wake_writer(&self) {
        if let Some(w) = self.writer.borrow_mut().take() {
            w.wake();
        }
    }

    fn index(&self, id: u32) -> Option<usize> {
        id.checked_sub(self.first_id).map(|i| i as usize)
    }

    fn take_id(&self, kind: OpKind) -> u32 {
        let slot = Some(Slot {
            kind,
            reply: None,
            waker: None,
            abandoned: false,
            written: None,
            wire: None,
        });
        let mut slots = self.slots.borrow_mut();
        match self.free.borrow_mut().pop() {
            Some(id) => {
                slots[(id - self.first_id) as usize] = slot;
                id
            }
            None => {
                slots.push(slot);
                self.first_id + slots.len() as u32 - 1
            }
        }
    }

    fn free_id(&self, id: u32) {
        if let Some(i) = self.index(id) {
            if let Some(slot) = self.slots.borrow_mut().get_mut(i) {
                *slot = None;
            }
            self.free.borrow_mut().push(id);
        }
    }

    /// The writer is handing the outbox to the kernel at `now`: the requests in it were
    /// written then.
    fn stamp_written(&self, now: Instant) {
        let mut slots = self.slots.borrow_mut();
        for id in self.unwritten.borrow_mut().drain(..) {
            if let Some(Some(slot)) = self.index(id).and_then(|i| slots.get_mut(i)) {
                slot.written = Some(now);
            }
        }
    }

    /// The reply for `id`, read at `read_at`: its caller's slot gets what `reply` makes of
    /// it (given the request's kind). False when no caller has that id.
    pub(crate) fn answer(
        &self,
        id: u32,
        read_at: Instant,
        reply: impl FnOnce(OpKind) -> Reply,
    ) -> bool {
        let abandoned = {
            let mut slots = self.slots.borrow_mut();
            let Some(Some(slot)) = self.index(id).and_then(|i| slots.get_mut(i)) else {
                return false;
            };
            slot.reply = Some(reply(slot.kind));
            slot.wire = slot.written.map(|w| read_at.saturating_duration_since(w));
            if let Some(w) = slot.waker.take() {
                w.wake();
            }
            slot.abandoned
        };
        if abandoned {
            self.free_id(id);
        }
        true
    }

    /// The connection ended: every caller gets an exception, and the writer stops.
    pub(crate) fn fail_all(&self) {
        self.dead.set(true);
        for slot in self.slots.borrow_mut().iter_mut().flatten() {
            slot.reply.get_or_insert(Reply::Exception);
            if let Some(w) = slot.waker.take() {
                w.wake();
            }
        }
        for w in self.room.borrow_mut().drain(..) {
            w.wake();
        }
        self.wake_writer();
    }
}

/// A caller's wait for the reply in its slot; frees the id when done, or marks it
/// abandoned when dropped first (the reader frees it on the reply).
struct WaitReply<'a> {
    pipe: &'a Pipe,
    id: u32,
    done: bool,
}

impl Future for WaitReply<'_> {
    type Output = (Reply, Option<Duration>);
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let reply = {
            let mut slots = self.pipe.slots.borrow_mut();
            let Some(Some(slot)) = self.pipe.index(self.id).and_then(|i| slots.get_mut(i)) else {
                return Poll::Ready((Reply::Exception, None));
            };
            match slot.reply.take() {
                Some(r) => (r, slot.wire),
                None => {
                    slot.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        };
        self.done = true;
        self.pipe.free_id(self.id);
        Poll::Ready(reply)
    }
}

impl Drop for WaitReply<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let answered = {
            let mut slots = self.pipe.slots.borrow_mut();
            match self.pipe.index(self.id).and_then(|i| slots.get_mut(i)) {
                Some(Some(slot)) => {
                    slot.abandoned = true;
                    slot.waker = None;
                    slot.reply.is_some() || self.pipe.dead.get()
                }
                _ => false,
            }
        };
        if answered {
            self.pipe.free_id(self.id);
        }
    }
}

/// Sends what the outbox holds, whenever it holds something, until the connection ends.
async fn write_outbox(pipe: Rc<Pipe>, mut w: tokio::net::tcp::OwnedWriteHalf) {
    let mut sending = Vec::with_capacity(4096);
    loop {
        std::future::poll_fn(|cx| {
            if pipe.dead.get() || !pipe.outbox.borrow().is_empty() {
                return Poll::Ready(());
            }
            *pipe.writer.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        if pipe.dead.get() {
            return;
        }
        // Once more behind the tasks already ready: their requests join this write.
        tokio::task::yield_now().await;
        std::mem::swap(&mut *pipe.outbox.borrow_mut(), &mut sending);
        for waker in pipe.room.borrow_mut().drain(..) {
            waker.wake();
        }
        pipe.stamp_written(Instant::now());
        if w.write_all(&sending).await.is_err() {
            pipe.fail_all();
            return;
        }
        sending.clear();
    }
}
